// Die(): how a standalone test or bench program (a child process of a test, a benchmark
// driver) reports a failure: "<program>: <why>" on stderr, then exit status 1 without
// running static destructors while other threads may still be blocked in meshpost. Not for
// GoogleTest bodies, which assert instead.
#pragma once

#include <errno.h>  // program_invocation_short_name (glibc)
#include <unistd.h>

#include <cstdio>
#include <string>

namespace meshpost {
namespace support {

[[noreturn]] inline void Die(const std::string& why) {
  std::fflush(stdout);
  std::fprintf(stderr, "%s: %s\n", program_invocation_short_name, why.c_str());
  std::fflush(stderr);
  _exit(1);
}

}  // namespace support
}  // namespace meshpost
