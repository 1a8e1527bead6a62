// libFuzzer target: the message codec (van/codec) on untrusted bytes. Anything that
// decodes must re-encode to bytes that decode to the same message.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "van/codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto meta = meshpost::DecodeMeta(data, size);
  if (!meta.ok()) return 0;
  const std::string again = meshpost::EncodeMeta(*meta);
  auto back = meshpost::DecodeMeta(again.data(), again.size());
  if (!back.ok() || back->cmd != meta->cmd || back->sender != meta->sender ||
      back->body != meta->body || back->data.size() != meta->data.size() ||
      back->slots.size() != meta->slots.size() || meshpost::EncodeMeta(*back) != again) {
    std::abort();  // the codec does not round-trip what it accepted
  }
  return 0;
}
