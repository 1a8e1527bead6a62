// Memory-region cache keyed by address range (van/rdma internal). Get() returns a
// registration covering [addr, addr+len) with at least the requested access, registering
// on a miss. A registration made for memory with an owner is valid only while that owner
// lives, so a freed-and-reused address never hits a stale MR; Invalidate/Deregister drop
// caller-managed entries explicitly. Entries are shared: an evicted MR is deregistered
// once the last in-flight transfer using it lets go. Not thread-safe (one owner).
#pragma once

#include <cstdint>
#include <map>
#include <memory>

#include "van/rdma/verbs_api.h"

namespace meshpost {
namespace rdma {

struct MrCacheStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t stale = 0;      // entries dropped because their owner had been freed
  uint64_t evictions = 0;  // entries dropped to respect max_entries
  uint64_t invalidated = 0;
};

class MrCache {
 public:
  MrCache(VerbsDevice* device, size_t max_entries);

  // owner: the allocation that keeps [addr, addr+len) alive, or empty when the caller
  // manages the lifetime (and must Invalidate before freeing).
  Result<std::shared_ptr<VerbsMr>> Get(const void* addr, size_t len, uint32_t access,
                                       const std::weak_ptr<const void>& owner = {});
  // Drops every entry overlapping [addr, addr+len); returns how many.
  size_t Invalidate(const void* addr, size_t len);
  // Drops the entry that starts exactly at addr; NotFound if there is none.
  Status Deregister(const void* addr);
  // Drops entries whose owner has been freed; returns how many.
  size_t Sweep();

  size_t size() const { return entries_.size(); }
  const MrCacheStats& stats() const { return stats_; }

 private:
  struct Entry {
    std::shared_ptr<VerbsMr> mr;
    uint64_t end = 0;
    std::weak_ptr<const void> owner;
    bool has_owner = false;
    uint64_t last_use = 0;
  };
  using Map = std::multimap<uint64_t, Entry>;
  static bool Expired(const Entry& e) { return e.has_owner && e.owner.expired(); }
  void EvictLru();

  VerbsDevice* device_;
  size_t max_entries_;
  uint64_t tick_ = 0;
  Map entries_;  // by start address
  MrCacheStats stats_;
};

}  // namespace rdma
}  // namespace meshpost
