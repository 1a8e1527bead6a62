#include "ps/push_staging.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

namespace meshpost {
namespace {

constexpr size_t kStagedAlign = 64;  // each staged tensor starts on a cache line

size_t AlignUp(size_t n, size_t a) { return (n + a - 1) & ~(a - 1); }

bool Qualifies(const KeyTensor& kt, const SendSegment& seg, size_t min_bytes) {
  if (kt.tensor.device.type != DeviceType::kCPU || seg.size < min_bytes || seg.streamed)
    return false;
  SharedRef ref;
  return !SharedMemoryRegistry::Get().Find(seg.data, seg.size, &ref);
}

}  // namespace

PushStagingLease::~PushStagingLease() {
  if (!reusable_.load(std::memory_order_acquire)) return;  // the block is freed with us
  if (auto pool = pool_.lock()) pool->Put(std::move(block_));
}

void PushStagingLease::Completed(bool ok) {
  if (!ok) return;
  MarkReusable();
  if (auto pool = pool_.lock()) pool->NoteCompleted(block_->peer_views() > 0);
}

bool PushStagingPool::Wanted() {
  if (skip_.load(std::memory_order_relaxed) <= 0) return true;
  skip_.fetch_sub(1, std::memory_order_relaxed);
  return false;
}

void PushStagingPool::NoteCompleted(bool viewed) {
  skip_.store(viewed ? 0 : kProbeEvery, std::memory_order_relaxed);
}

Result<std::shared_ptr<PushStagingLease>> PushStagingPool::Stage(
    const KeyTensorBatch& push, size_t min_bytes, std::vector<SendSegment>* segments) {
  if (min_bytes == 0) return std::shared_ptr<PushStagingLease>();
  // Where each qualifying segment goes in the block (one registry lookup per segment).
  std::vector<std::pair<size_t, size_t>> placed;  // (segment index, offset)
  size_t total = 0;
  for (size_t i = 0; i < push.size(); ++i) {
    if (!Qualifies(push[i], (*segments)[i], min_bytes)) continue;
    const size_t at = AlignUp(total, kStagedAlign);
    placed.emplace_back(i, at);
    total = at + (*segments)[i].size;
  }
  if (placed.empty()) return std::shared_ptr<PushStagingLease>();
  MESHPOST_ASSIGN_OR_RETURN(std::shared_ptr<SharedBlock> block, Take(total));
  auto lease = std::make_shared<PushStagingLease>(std::move(block), weak_from_this());
  char* base = lease->block()->data();
  for (const auto& [i, at] : placed) {
    SendSegment& seg = (*segments)[i];
    std::memcpy(base + at, seg.data, seg.size);
    seg = SendSegment{base + at, seg.size, std::shared_ptr<const void>(lease, base + at)};
  }
  return lease;
}

Result<std::shared_ptr<SharedBlock>> PushStagingPool::Take(size_t bytes) {
  const size_t size = AlignUp(bytes, kSharedBlockAlign);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(size);
    if (it != free_.end()) {
      // A block a server still views (it kept a get_batch tensor) must not change.
      auto& list = it->second;
      for (auto b = list.begin(); b != list.end(); ++b) {
        if ((*b)->peer_views() > 0) continue;
        std::shared_ptr<SharedBlock> block = std::move(*b);
        list.erase(b);
        return block;
      }
    }
  }
  auto block = AllocateShared(size);
  if (!block.ok()) return block.status().Annotate("staging a push in shared memory");
  return block;
}

void PushStagingPool::Put(std::shared_ptr<SharedBlock> block) {
  std::shared_ptr<SharedBlock> drop;  // freed outside the lock (it notifies listeners)
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto& list = free_[block->size()];
    list.push_back(std::move(block));
    if (list.size() > kKeepPerSize) {
      // Freeing is always safe (a viewer's mapping outlives ours): drop a block a server
      // still views, else the oldest.
      auto victim =
          std::find_if(list.begin(), list.end(), [](const auto& b) { return b->peer_views() > 0; });
      if (victim == list.end()) victim = list.begin();
      drop = std::move(*victim);
      list.erase(victim);
    }
  }
}

size_t PushStagingPool::free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& [size, list] : free_) n += list.size();
  return n;
}

}  // namespace meshpost
