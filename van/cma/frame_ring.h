// A single-producer, single-consumer ring of frames in shared memory: the same-host van's
// doorbell for frames that need no descriptor (docs/performance.md, "Doorbells in shared
// memory"). A frame written here costs the sender a memcpy and a store, and a receiver
// that is polling sees it without a system call; one that sleeps is woken through the
// connection's socket, only when it said it sleeps (Arm / TakeSleeper).
//
// The producer creates the ring (a sealed memfd) and passes its descriptor to the
// consumer. Both map it writable: the producer owns `tail`, the consumer `head` and the
// sleeper flag. Neither trusts what the other writes there: each keeps its own index
// privately and checks the peer's against it, so a peer that scribbles over the ring can
// only corrupt the frames it sends itself (which the consumer then parses like any other
// frame from that peer), never make either side read or write outside the mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "common/result.h"

namespace meshpost {
namespace cma {

class FrameRing {
 public:
  // Record kinds. A marker says "the next frame of this connection is on the socket"
  // (one that carries a descriptor, or too large for the ring), so the consumer keeps one
  // order across both paths.
  static constexpr uint32_t kFrame = 1;
  static constexpr uint32_t kMarker = 2;
  static constexpr size_t kRecordHeader = 8;  // len u32, kind u32; records 8-byte aligned

  // A new ring with `capacity` bytes of records (a power of two, >= 4 KiB). *fd receives
  // the memfd to pass to the consumer (the caller closes it once passed).
  static Result<std::unique_ptr<FrameRing>> Create(size_t capacity, int* fd);
  // The consumer's side of a ring received from a peer: `fd` must be a memfd sealed
  // against shrinking, large enough for the header's capacity, which must be at most
  // max_capacity.
  static Result<std::unique_ptr<FrameRing>> Attach(int fd, size_t max_capacity);

  ~FrameRing();
  FrameRing(const FrameRing&) = delete;
  FrameRing& operator=(const FrameRing&) = delete;

  size_t capacity() const { return capacity_; }
  // The largest frame Write accepts.
  size_t max_frame() const { return capacity_ / 4; }

  // --- producer ---
  // Appends one record. Returns false when the ring has no room now (the consumer is
  // behind); an error when the consumer's index is impossible (it corrupted the ring).
  Result<bool> TryWrite(uint32_t kind, const void* data, size_t size);
  // After a write: whether the consumer said it sleeps; clears the flag, so one doorbell
  // wakes it once. Ordered after the write (a consumer that armed after it sees the frame).
  bool TakeSleeper();

  // --- consumer ---
  // Copies the next record into buf (up to cap bytes) and frees its room: true with *kind
  // and *size set; false when the ring is empty; an error when the producer wrote
  // something impossible (an index out of range, a record larger than cap or than what
  // was published), after which the connection must be closed.
  Result<bool> Read(char* buf, size_t cap, uint32_t* kind, size_t* size);
  bool Empty() const;
  // Says "I am about to sleep": the producer's next write rings the socket doorbell.
  // Returns false when a record is already waiting (do not sleep).
  bool Arm();
  // Awake again: writes need not ring.
  void Disarm();

 private:
  FrameRing(char* base, size_t map_size, size_t capacity)
      : base_(base), map_size_(map_size), capacity_(capacity) {}
  uint64_t* tail_word() const;
  uint64_t* head_word() const;
  uint32_t* sleeper_word() const;
  char* data() const;
  void CopyIn(uint64_t pos, const void* src, size_t n);
  void CopyOut(uint64_t pos, void* dst, size_t n) const;

  char* base_;
  size_t map_size_;
  size_t capacity_;
  uint64_t tail_ = 0;  // producer: next write position (private copy)
  uint64_t head_ = 0;  // consumer: next read position (private copy)
};

}  // namespace cma
}  // namespace meshpost
