#include "van/cma/frame_ring.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace meshpost {
namespace cma {
namespace {

// Layout: a 4 KiB header page, then `capacity` bytes of records. Each index lives on its
// own cache line so the two sides do not write one line.
constexpr uint32_t kMagic = 0x47525053;  // "SPRG"
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 4096;
constexpr size_t kTailOffset = 64;
constexpr size_t kHeadOffset = 128;
constexpr size_t kSleeperOffset = 192;
constexpr size_t kMinCapacity = 4096;

size_t RecordBytes(size_t frame) { return FrameRing::kRecordHeader + ((frame + 7) & ~size_t{7}); }

std::string ErrnoMessage(const char* what) {
  return std::string(what) + ": " + std::strerror(errno);
}

}  // namespace

Result<std::unique_ptr<FrameRing>> FrameRing::Create(size_t capacity, int* fd) {
  if (capacity < kMinCapacity || (capacity & (capacity - 1)) != 0) {
    return InvalidArgumentError("frame ring capacity " + std::to_string(capacity) +
                                ": expected a power of two >= 4096");
  }
  const size_t size = kHeaderBytes + capacity;
  const int f = ::memfd_create("meshpost-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (f < 0) return UnavailableError(ErrnoMessage("memfd_create (frame ring)"));
  auto fail = [f](const char* what) {
    Status s = UnavailableError(ErrnoMessage(what));
    ::close(f);
    return s;
  };
  if (::ftruncate(f, static_cast<off_t>(size)) != 0) return fail("ftruncate (frame ring)");
  if (::fcntl(f, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return fail("sealing the frame ring");
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
  if (p == MAP_FAILED) return fail("mmap (frame ring)");
  char* base = static_cast<char*>(p);
  std::memcpy(base, &kMagic, sizeof(kMagic));
  std::memcpy(base + 4, &kVersion, sizeof(kVersion));
  const uint64_t cap64 = capacity;
  std::memcpy(base + 8, &cap64, sizeof(cap64));
  *fd = f;
  return std::unique_ptr<FrameRing>(new FrameRing(base, size, capacity));
}

Result<std::unique_ptr<FrameRing>> FrameRing::Attach(int fd, size_t max_capacity) {
  struct stat st {};
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (::fstat(fd, &st) != 0 || seals < 0 || !(seals & F_SEAL_SHRINK)) {
    return InvalidArgumentError("frame ring: not a memfd sealed against shrinking");
  }
  if (static_cast<uint64_t>(st.st_size) < kHeaderBytes + kMinCapacity) {
    return InvalidArgumentError("frame ring: " + std::to_string(st.st_size) +
                                " bytes, smaller than the smallest ring");
  }
  uint32_t magic = 0, version = 0;
  uint64_t capacity = 0;
  if (::pread(fd, &magic, sizeof(magic), 0) != sizeof(magic) ||
      ::pread(fd, &version, sizeof(version), 4) != sizeof(version) ||
      ::pread(fd, &capacity, sizeof(capacity), 8) != sizeof(capacity)) {
    return InvalidArgumentError(ErrnoMessage("frame ring: reading its header"));
  }
  if (magic != kMagic || version != kVersion) {
    return InvalidArgumentError("frame ring: wrong magic or version " + std::to_string(version));
  }
  if (capacity < kMinCapacity || (capacity & (capacity - 1)) != 0 || capacity > max_capacity ||
      kHeaderBytes + capacity > static_cast<uint64_t>(st.st_size)) {
    return InvalidArgumentError("frame ring: capacity " + std::to_string(capacity) +
                                " is not a power of two between 4096 and " +
                                std::to_string(max_capacity) + " within the memfd's " +
                                std::to_string(st.st_size) + " bytes");
  }
  const size_t size = kHeaderBytes + static_cast<size_t>(capacity);
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return UnavailableError(ErrnoMessage("mmap (frame ring)"));
  auto ring = std::unique_ptr<FrameRing>(new FrameRing(static_cast<char*>(p), size, capacity));
  // Both indices start at 0: the producer may write before we attach (it does not wait
  // for us), and those records are read like any later ones.
  return ring;
}

FrameRing::~FrameRing() { ::munmap(base_, map_size_); }

uint64_t* FrameRing::tail_word() const { return reinterpret_cast<uint64_t*>(base_ + kTailOffset); }
uint64_t* FrameRing::head_word() const { return reinterpret_cast<uint64_t*>(base_ + kHeadOffset); }
uint32_t* FrameRing::sleeper_word() const {
  return reinterpret_cast<uint32_t*>(base_ + kSleeperOffset);
}
char* FrameRing::data() const { return base_ + kHeaderBytes; }

void FrameRing::CopyIn(uint64_t pos, const void* src, size_t n) {
  const size_t at = static_cast<size_t>(pos & (capacity_ - 1));
  const size_t first = std::min(n, capacity_ - at);
  std::memcpy(data() + at, src, first);
  if (n > first) std::memcpy(data(), static_cast<const char*>(src) + first, n - first);
}

void FrameRing::CopyOut(uint64_t pos, void* dst, size_t n) const {
  const size_t at = static_cast<size_t>(pos & (capacity_ - 1));
  const size_t first = std::min(n, capacity_ - at);
  std::memcpy(dst, data() + at, first);
  if (n > first) std::memcpy(static_cast<char*>(dst) + first, data(), n - first);
}

Result<bool> FrameRing::TryWrite(uint32_t kind, const void* frame, size_t size) {
  if (size > max_frame()) {
    return InvalidArgumentError("frame ring: a " + std::to_string(size) +
                                "-byte frame exceeds the ring's largest (" +
                                std::to_string(max_frame()) + ")");
  }
  const uint64_t head = __atomic_load_n(head_word(), __ATOMIC_ACQUIRE);
  const uint64_t used = tail_ - head;
  if (head > tail_ || used > capacity_) {
    return DataLossError("frame ring: the consumer's index " + std::to_string(head) +
                         " is outside [" + std::to_string(tail_ - capacity_) + ", " +
                         std::to_string(tail_) + "]");
  }
  const size_t record = RecordBytes(size);
  if (record > capacity_ - used) return false;
  const uint32_t header[2] = {static_cast<uint32_t>(size), kind};
  CopyIn(tail_, header, sizeof(header));
  if (size > 0) CopyIn(tail_ + kRecordHeader, frame, size);
  tail_ += record;
  __atomic_store_n(tail_word(), tail_, __ATOMIC_RELEASE);
  return true;
}

bool FrameRing::TakeSleeper() {
  // Pairs with Arm: either the consumer's re-check sees our tail, or we see its flag.
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (__atomic_load_n(sleeper_word(), __ATOMIC_RELAXED) == 0) return false;
  return __atomic_exchange_n(sleeper_word(), 0u, __ATOMIC_SEQ_CST) != 0;
}

Result<bool> FrameRing::Read(char* buf, size_t cap, uint32_t* kind, size_t* size_out) {
  const uint64_t tail = __atomic_load_n(tail_word(), __ATOMIC_ACQUIRE);
  const uint64_t avail = tail - head_;
  if (avail == 0) return false;
  if (tail < head_ || avail > capacity_ || (avail & 7) != 0 || avail < kRecordHeader) {
    return DataLossError("frame ring: the producer's index " + std::to_string(tail) +
                         " is impossible against ours (" + std::to_string(head_) + ")");
  }
  uint32_t header[2];
  CopyOut(head_, header, sizeof(header));
  const size_t size = header[0];
  if (size > cap || RecordBytes(size) > avail) {
    return DataLossError("frame ring: a record of " + std::to_string(size) + " bytes (" +
                         std::to_string(avail) + " published, at most " + std::to_string(cap) +
                         " accepted)");
  }
  CopyOut(head_ + kRecordHeader, buf, size);
  *kind = header[1];
  *size_out = size;
  head_ += RecordBytes(size);
  __atomic_store_n(head_word(), head_, __ATOMIC_RELEASE);
  return true;
}

bool FrameRing::Empty() const { return __atomic_load_n(tail_word(), __ATOMIC_ACQUIRE) == head_; }

bool FrameRing::Arm() {
  __atomic_store_n(sleeper_word(), 1u, __ATOMIC_SEQ_CST);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  return Empty();
}

void FrameRing::Disarm() {
  if (__atomic_load_n(sleeper_word(), __ATOMIC_RELAXED) != 0) {
    __atomic_store_n(sleeper_word(), 0u, __ATOMIC_RELAXED);
  }
}

}  // namespace cma
}  // namespace meshpost
