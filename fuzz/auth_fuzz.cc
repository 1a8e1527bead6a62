// libFuzzer target: the authentication handshake (common/auth) fed untrusted frames, as
// an attacker without the token would send them to either side, plus sealed headers.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/auth.h"

namespace {
const std::string kToken = "fuzzing-cluster-token-0123456789";
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace meshpost;
  if (size == 0) return 0;
  // First byte picks the target, the rest is the frame.
  const uint8_t which = data[0] % 4;
  const uint8_t* p = data + 1;
  const size_t n = size - 1;
  switch (which) {
    case 0: {  // acceptor: hello then proof, both from the input
      AcceptorHandshake a(kToken, 1);
      const size_t half = n / 2;
      auto hello = DecodeAuthFrame(p, half);
      if (hello.ok()) (void)a.OnHello(*hello);
      auto proof = DecodeAuthFrame(p + half, n - half);
      if (proof.ok()) {
        auto who = a.OnProof(*proof);
        // Without the token no proof may pass (the MAC is 256 bits).
        if (who.ok()) std::abort();
      }
      break;
    }
    case 1: {  // connector: an attacker's challenge
      ConnectorHandshake c(kToken, 2, 1);
      (void)c.Hello();
      auto challenge = DecodeAuthFrame(p, n);
      if (challenge.ok() && c.OnChallenge(*challenge, true).ok()) std::abort();
      break;
    }
    case 2: {  // sealed header opener
      // Not the seed corpus's key: a sealed seed then fails the MAC, and no mutation can
      // forge one (the invariant under test) without the key.
      SessionKey key{};
      key.fill(0x5a);
      MessageOpener opener(key);
      if (opener.Open(p, n).ok()) std::abort();
      break;
    }
    default: {
      auto f = DecodeAuthFrame(p, n);
      if (f.ok()) {
        const std::string again = EncodeAuthFrame(*f);
        auto back = DecodeAuthFrame(again.data(), again.size());
        if (!back.ok() || EncodeAuthFrame(*back) != again) std::abort();
      }
    }
  }
  return 0;
}
