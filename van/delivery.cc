#include "van/delivery.h"

#include <cstdint>
#include <cstring>
#include <new>
#include <string>

#include "common/logging.h"
#include "van/codec.h"

namespace meshpost {

Status ValidateSend(const char* van, const OutMessage& msg, bool streams) {
  const size_t n = msg.segments.size();
  if (msg.stream != nullptr && !streams) {
    return FailedPreconditionError(std::string(van) +
                                   ": this transport does not stream; a message whose bytes are "
                                   "still being written cannot be sent over it");
  }
  for (const SendSegment& seg : msg.segments) {
    if (seg.streamed && msg.stream == nullptr) {
      return InvalidArgumentError(std::string(van) +
                                  ": a segment is marked streamed but the message has no stream");
    }
  }
  if (n != msg.meta.data.size()) {
    return InvalidArgumentError(std::string(van) + ": " + std::to_string(n) +
                                " segments but meta describes " +
                                std::to_string(msg.meta.data.size()));
  }
  if (n > kMaxTensorsPerMessage) {
    return InvalidArgumentError(std::string(van) + ": " + std::to_string(n) +
                                " segments; at most " + std::to_string(kMaxTensorsPerMessage) +
                                " per message");
  }
  for (size_t i = 0; i < n; ++i) {
    const SendSegment& seg = msg.segments[i];
    if (seg.size != msg.meta.data[i].nbytes) {
      return InvalidArgumentError(std::string(van) + ": segment " + std::to_string(i) + " has " +
                                  std::to_string(seg.size) + " bytes but meta.data[" +
                                  std::to_string(i) + "].nbytes is " +
                                  std::to_string(msg.meta.data[i].nbytes));
    }
    if (seg.size != 0 && seg.data == nullptr) {
      return InvalidArgumentError(std::string(van) + ": segment " + std::to_string(i) + " has " +
                                  std::to_string(seg.size) + " bytes and a null data pointer");
    }
  }
  return OkStatus();
}

Result<void*> SegmentDestination(VanReceiver* receiver, const Meta& meta, size_t index,
                                 size_t size) {
  if (index >= meta.data.size()) {
    return DataLossError("data segment " + std::to_string(index) + " beyond the " +
                         std::to_string(meta.data.size()) + " its header describes");
  }
  if (size != meta.data[index].nbytes) {
    return DataLossError("data segment " + std::to_string(index) + " has " + std::to_string(size) +
                         " bytes; descriptor says " + std::to_string(meta.data[index].nbytes));
  }
  return receiver->Destination(meta, index);
}

RecvSegment LandSegment(void* dest, void* data, size_t size, std::shared_ptr<void> owner) {
  RecvSegment seg;
  seg.size = size;
  if (dest != nullptr) {
    if (size != 0 && dest != data) std::memcpy(dest, data, size);
    seg.data = dest;
  } else if (size != 0 && reinterpret_cast<uintptr_t>(data) % kVanBufferAlign != 0) {
    constexpr std::align_val_t kAlign{kVanBufferAlign};
    std::shared_ptr<void> copy(::operator new(size, kAlign),
                               [](void* p) { ::operator delete(p, kAlign); });
    std::memcpy(copy.get(), data, size);
    seg.data = copy.get();
    seg.owner = std::move(copy);
  } else {
    seg.data = data;
    seg.owner = std::move(owner);
  }
  return seg;
}

void Deliver(VanReceiver* receiver, const char* van, InMessage&& in, const Status& refused,
             LogRateLimiter& limiter) {
  if (refused.ok()) {
    receiver->OnMessage(std::move(in));
    return;
  }
  MP_LOG_ERROR_LIMITED(limiter, "van", "{}: refused {} from node {}: {}", van,
                       CommandName(in.meta.cmd), in.meta.sender, refused.ToString());
  receiver->OnDropped(in.meta, refused);
}

}  // namespace meshpost
