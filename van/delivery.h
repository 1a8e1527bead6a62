// Plumbing every van shares, so validation and delivery are written once (van/ internal):
// ValidateSend checks an OutMessage on the caller's thread before a van touches it, and
// the receive side asks SegmentDestination for each payload, lands or keeps the bytes,
// and hands the result to Deliver, which calls OnMessage or OnDropped exactly once.
#pragma once

#include <memory>

#include "common/log_rate.h"
#include "common/result.h"
#include "van/van.h"

namespace meshpost {

// Send side: as many segments as meta.data describes, each of exactly its descriptor's
// nbytes, no null pointer with bytes, at most kMaxTensorsPerMessage. `van` names the van
// in the message ("ZmqVan::Send"). A message with a stream is refused unless `streams`
// (the van sends bytes as they become ready).
Status ValidateSend(const char* van, const OutMessage& msg, bool streams = false);

// Receive side, per data segment `index` whose `size` bytes the van received or is about
// to read: the size must equal the descriptor's nbytes; then the receiver chooses the
// destination (nullptr: the van keeps its own buffer). Errors drop the message.
Result<void*> SegmentDestination(VanReceiver* receiver, const Meta& meta, size_t index,
                                 size_t size);

// Bytes the van already holds at `data` (kept alive by `owner`): copied into `dest` when
// the receiver chose one (and it is not where they already are), kept otherwise. A kept
// buffer becomes the owner's tensor, so it must suit every element type: one that is not
// kVanBufferAlign-aligned (ZeroMQ slices small frames out of one receive batch at any
// offset) is copied into an aligned buffer first.
constexpr size_t kVanBufferAlign = 8;
RecvSegment LandSegment(void* dest, void* data, size_t size, std::shared_ptr<void> owner);

// Hands a complete message to the receiver, or, when `refused` is not OK, logs why (naming
// the van and the sender, through the van's `limiter`: a peer can provoke these lines) and
// reports it through OnDropped.
void Deliver(VanReceiver* receiver, const char* van, InMessage&& in, const Status& refused,
             LogRateLimiter& limiter);

}  // namespace meshpost
