// Trace capture options (MESHPOST_TRACE, MESHPOST_TRACE_DIR, ...): parsed here, not in
// ps/options.cc, so the capture feature owns its variables; options.cc calls
// ReadTraceOptions / ValidateTraceOptions. Variables are listed in docs/configuration.md.
#pragma once

#include <cstdint>
#include <string>

#include "common/env.h"
#include "common/result.h"

namespace meshpost {

struct TraceOptions {
  enum class Mode : uint8_t { kOff = 0, kSample = 1, kAll = 2, kAlternate = 3 };
  Mode mode = Mode::kOff;                 // MESHPOST_TRACE: off | sample:N | all | alternate:N
  uint32_t sample_every = 1;              // N of sample:N / alternate:N (1 for all)
  std::string dir;                        // MESHPOST_TRACE_DIR (required unless off)
  uint64_t max_file_bytes = 64ull << 20;  // MESHPOST_TRACE_FILE_MB: rotate above this
  int max_files = 8;                      // MESHPOST_TRACE_MAX_FILES: newest kept per node
  uint32_t ring_records = 1u << 16;       // MESHPOST_TRACE_RING: records buffered in memory

  bool enabled() const { return mode != Mode::kOff; }
  // True when the request with this (worker-side) handle is captured. Workers and servers
  // decide the same way, so a sampled request is captured at both ends.
  // sample:N keeps about one push_pull in N. Handle ids advance by the number of ids a
  // push_pull allocates (StepMesh's contract), so "handle % N" could select none (every
  // handle odd with a stride of 2); a Fibonacci hash of the handle spreads any stride, and
  // worker and server decide alike because both see the worker's handle.
  // alternate:N captures handle ids in alternating blocks of N ids (on, off, on, ...): the
  // overhead benchmark compares the round trips of captured and uncaptured blocks within
  // one run of the same processes (docs/profiling.md, "Overhead").
  bool Sampled(uint64_t handle) const {
    if (mode == Mode::kAll) return true;
    if (mode == Mode::kAlternate) return (handle / sample_every) % 2 == 0;
    if (mode != Mode::kSample) return false;
    uint64_t x = handle * 0x9E3779B97F4A7C15ull;
    x ^= x >> 29;
    return x % sample_every == 0;
  }
};

// "off", "all", "sample:N" or "alternate:N" (1 <= N <= 1e9); the error names `name` and
// the value.
Status ParseTraceMode(const std::string& name, const std::string& value, TraceOptions* out);
Status ReadTraceOptions(const EnvLookup& env, TraceOptions* out);
Status ValidateTraceOptions(const TraceOptions& t);
const char* TraceModeName(TraceOptions::Mode mode);

}  // namespace meshpost
