#include "van/rdma/mr_cache.h"

#include <string>

namespace meshpost {
namespace rdma {

MrCache::MrCache(VerbsDevice* device, size_t max_entries)
    : device_(device), max_entries_(max_entries == 0 ? 1 : max_entries) {}

Result<std::shared_ptr<VerbsMr>> MrCache::Get(const void* addr, size_t len, uint32_t access,
                                              const std::weak_ptr<const void>& owner) {
  if (addr == nullptr || len == 0) {
    return InvalidArgumentError("MrCache::Get: cannot register addr=" +
                                std::to_string(reinterpret_cast<uintptr_t>(addr)) +
                                " len=" + std::to_string(len) + "; expected a non-empty range");
  }
  const uint64_t start = reinterpret_cast<uint64_t>(addr);
  const uint64_t end = start + len;
  if (end < start) return InvalidArgumentError("MrCache::Get: address range wraps around");
  // Candidates start at or before addr; overlapping entries make this a backward scan,
  // bounded by max_entries.
  auto it = entries_.upper_bound(start);
  while (it != entries_.begin()) {
    --it;
    Entry& e = it->second;
    if (Expired(e)) {
      ++stats_.stale;
      it = entries_.erase(it);
      continue;
    }
    if (e.end >= end && (e.mr->info().access & access) == access) {
      ++stats_.hits;
      e.last_use = ++tick_;
      return e.mr;
    }
  }
  ++stats_.misses;
  if (entries_.size() >= max_entries_) {
    Sweep();
    while (entries_.size() >= max_entries_) EvictLru();
  }
  auto mr = device_->RegisterMemory(const_cast<void*>(addr), len, access);
  if (!mr.ok()) return mr.status();
  Entry e;
  e.mr = std::shared_ptr<VerbsMr>(std::move(mr).value());
  e.end = end;
  e.owner = owner;
  // An empty weak_ptr that never pointed anywhere means "caller-managed".
  e.has_owner = owner.owner_before(std::weak_ptr<const void>{}) ||
                std::weak_ptr<const void>{}.owner_before(owner);
  e.last_use = ++tick_;
  auto result = e.mr;
  entries_.emplace(start, std::move(e));
  return result;
}

size_t MrCache::Invalidate(const void* addr, size_t len) {
  const uint64_t start = reinterpret_cast<uint64_t>(addr);
  const uint64_t end = start + len;
  size_t n = 0;
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (it->first < end && it->second.end > start) {
      it = entries_.erase(it);
      ++n;
    } else {
      ++it;
    }
  }
  stats_.invalidated += n;
  return n;
}

Status MrCache::Deregister(const void* addr) {
  const uint64_t start = reinterpret_cast<uint64_t>(addr);
  auto it = entries_.find(start);
  if (it == entries_.end()) {
    return NotFoundError("MrCache::Deregister: no registration starts at " +
                         std::to_string(start));
  }
  entries_.erase(it);
  ++stats_.invalidated;
  return OkStatus();
}

size_t MrCache::Sweep() {
  size_t n = 0;
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (Expired(it->second)) {
      it = entries_.erase(it);
      ++n;
    } else {
      ++it;
    }
  }
  stats_.stale += n;
  return n;
}

void MrCache::EvictLru() {
  auto victim = entries_.end();
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (victim == entries_.end() || it->second.last_use < victim->second.last_use) victim = it;
  }
  if (victim == entries_.end()) return;
  entries_.erase(victim);
  ++stats_.evictions;
}

}  // namespace rdma
}  // namespace meshpost
