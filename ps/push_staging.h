// Shared-memory copies of ordinary push tensors for same-host servers (issue 11;
// docs/performance.md, "Ordinary tensors").
//
// Over the same-host van a push in ordinary memory costs the server a cross-memory-attach
// read (process_vm_readv pins the worker's pages one by one, about half memcpy speed). A
// push in a shared block (tensor/shared_memory.h) costs it nothing: the server maps the
// block once and its get_batch tensors are views of it, or it memcpys them into a registered
// receive buffer. So the worker copies a large ordinary push once, at memcpy speed, into a
// shared block of its own and sends that block instead.
//
// Lifetime: a server's get_batch tensors stay valid for as long as it references them
// (docs/python.md), so a block takes a later push only when (1) its handle completed
// successfully, so every server answered (the lease records that; a block whose handle
// failed or was abandoned is freed instead), and (2) no server still holds a view of it:
// the same-host van counts the views servers report (SharedBlock::peer_views; a server's
// report of a view rides on its response, so it is known by completion). A block freed
// while a server views it stays mapped there; only reuse could change what it sees.
#pragma once

#include <atomic>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "common/result.h"
#include "tensor/shared_memory.h"
#include "tensor/tensor_view.h"
#include "van/message.h"

namespace meshpost {

class PushStagingPool;

// One staged push: the block its tensors were copied into. Segments sent from it hold the
// lease; the worker's batch holds it until completion.
class PushStagingLease {
 public:
  PushStagingLease(std::shared_ptr<SharedBlock> block, std::weak_ptr<PushStagingPool> pool)
      : block_(std::move(block)), pool_(std::move(pool)) {}
  ~PushStagingLease();
  PushStagingLease(const PushStagingLease&) = delete;
  PushStagingLease& operator=(const PushStagingLease&) = delete;

  // Every server answered: the block may take a later push once no server views it.
  void MarkReusable() { reusable_.store(true, std::memory_order_release); }
  // The batch completed (ok: every server answered): MarkReusable, and tell the pool
  // whether any server still views the copy (PushStagingPool::Wanted).
  void Completed(bool ok);
  SharedBlock* block() const { return block_.get(); }

 private:
  std::shared_ptr<SharedBlock> block_;
  std::weak_ptr<PushStagingPool> pool_;
  std::atomic<bool> reusable_{false};
};

// Reusable shared blocks by size (multiples of kSharedBlockAlign). Thread-safe.
class PushStagingPool : public std::enable_shared_from_this<PushStagingPool> {
 public:
  // Blocks kept per size once their batch completed (some may still be viewed by a
  // server); more are freed. In-flight pushes each hold one more.
  static constexpr size_t kKeepPerSize = 8;

  // Copies every host segment of at least `min_bytes` that is not already in shared memory
  // into one block and repoints it there (the copy's owner is the lease). Returns the lease,
  // or null when no segment qualified. Segments of device tensors are left alone.
  Result<std::shared_ptr<PushStagingLease>> Stage(const KeyTensorBatch& push, size_t min_bytes,
                                                  std::vector<SendSegment>* segments);

  size_t free_blocks() const;

  // Whether to stage the next push. A completed batch whose copy no server views was
  // copied again on arrival (into a registered receive buffer), so staging cost a memcpy
  // for nothing: the next kProbeEvery pushes go as they are, then one is staged to look
  // again. Approximate under concurrent push_pulls, which is fine for a cost decision.
  static constexpr int kProbeEvery = 64;
  bool Wanted();
  void NoteCompleted(bool viewed);

 private:
  friend class PushStagingLease;
  Result<std::shared_ptr<SharedBlock>> Take(size_t bytes);
  void Put(std::shared_ptr<SharedBlock> block);

  mutable std::mutex mu_;
  std::map<size_t, std::vector<std::shared_ptr<SharedBlock>>> free_;  // by block size
  std::atomic<int> skip_{0};  // pushes left to send as they are (Wanted)
};

}  // namespace meshpost
