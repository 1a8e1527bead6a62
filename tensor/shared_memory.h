// Shared host memory: memfd-backed blocks, 2 MiB aligned and huge-page advised, that a
// same-host transport can hand to peers (the fd travels once, the peer maps it once), so a
// peer reads a push or writes a response in place. AllocateShared / AllocateSharedTensor
// create a block whose lifetime is its shared_ptr; SharedMemoryRegistry answers, for any
// address, which block (id, fd, offset) holds it, and tells listeners when a block is freed
// (so a van can tell the peers it exported the block to). docs/performance.md explains why.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "common/result.h"
#include "tensor/tensor_view.h"

namespace meshpost {

// Blocks are multiples of this and start at an address aligned to it (one huge page).
constexpr size_t kSharedBlockAlign = size_t{2} << 20;
// Largest single block (a larger request is InvalidArgument, not an OOM later).
constexpr uint64_t kMaxSharedBlockBytes = uint64_t{64} << 30;

// One memfd mapping. Sealed against shrinking and growing, so a peer's mapping of it can
// never fault past the end. Destroying it unmaps, closes the fd and notifies listeners.
class SharedBlock {
 public:
  ~SharedBlock();
  SharedBlock(const SharedBlock&) = delete;
  SharedBlock& operator=(const SharedBlock&) = delete;

  uint32_t id() const { return id_; }  // unique in this process, never reused
  int fd() const { return fd_; }
  char* data() const { return data_; }
  size_t size() const { return size_; }
  bool huge_pages() const { return huge_; }  // MFD_HUGETLB backing (else THP advised)
  // Views of this block that peers reported holding (the same-host van keeps the count
  // from their reports): bytes written into the block now would change what they see.
  int64_t peer_views() const { return peer_views_.load(std::memory_order_acquire); }
  void AddPeerViews(int64_t delta) { peer_views_.fetch_add(delta, std::memory_order_acq_rel); }

 private:
  friend Result<std::shared_ptr<SharedBlock>> AllocateShared(size_t bytes);
  SharedBlock() = default;
  uint32_t id_ = 0;
  int fd_ = -1;
  char* data_ = nullptr;
  size_t size_ = 0;
  bool huge_ = false;
  std::atomic<int64_t> peer_views_{0};
};

// A block of at least `bytes` (rounded up to kSharedBlockAlign; 0 is InvalidArgument).
Result<std::shared_ptr<SharedBlock>> AllocateShared(size_t bytes);

// A contiguous CPU tensor in a fresh block; its owner is the block.
Result<TensorView> AllocateSharedTensor(DType dtype, const std::vector<int64_t>& shape);

// Where an address range lives in shared memory.
struct SharedRef {
  uint32_t block_id = 0;
  int fd = -1;
  size_t offset = 0;  // of the range's start within the block
  size_t block_size = 0;
  std::shared_ptr<SharedBlock> block;  // keeps the block alive while the caller holds it
};

// Process-wide index of live blocks. Thread-safe. (A process-wide table because memory
// outlives any one node: a tensor allocated before a node starts is still shareable.)
class SharedMemoryRegistry {
 public:
  static SharedMemoryRegistry& Get();

  // The block holding all of [addr, addr + size), if any (size 0: addr alone).
  bool Find(const void* addr, size_t size, SharedRef* out) const;
  // The live block with this id, if any.
  std::shared_ptr<SharedBlock> FindId(uint32_t id) const;
  size_t live_blocks() const;

  // `fn(block_id)` runs after a block is freed, on the freeing thread, without registry
  // locks held; it must be quick and must not allocate or free shared blocks. The returned
  // token unregisters the listener when destroyed.
  using FreeListener = std::function<void(uint32_t block_id)>;
  std::shared_ptr<void> AddFreeListener(FreeListener fn);

  // Internal (SharedBlock): bookkeeping.
  void Add(const std::shared_ptr<SharedBlock>& block);
  void Remove(SharedBlock* block);

 private:
  SharedMemoryRegistry() = default;
  struct Impl;
  Impl& impl() const;
};

}  // namespace meshpost
