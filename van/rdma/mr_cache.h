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
#include <string>

#include "tensor/device_backend.h"
#include "van/rdma/verbs_api.h"

namespace meshpost {
namespace rdma {

// How CUDA device memory is registered for GPUDirect RDMA (MESHPOST_RDMA_GPU).
enum class GpuRegistration {
  kAuto,     // dma-buf first, then ibv_reg_mr on the device pointer (nvidia-peermem)
  kDmabuf,   // ibv_reg_dmabuf_mr on a dma-buf from cuMemGetHandleForAddressRange only
  kPeerMem,  // ibv_reg_mr on the device pointer only (needs the nvidia-peermem module)
  kStaging,  // no GPUDirect: CUDA memory is refused by the van; GPU tensors travel through
             // meshpost's pinned-host staging (what push_pull / respond do anyway)
};
const char* GpuRegistrationName(GpuRegistration mode);
// "auto", "dmabuf", "peermem", "staging"; an InvalidArgument naming `var` otherwise.
Result<GpuRegistration> ParseGpuRegistration(const char* var, const std::string& value);

// Registers CUDA device memory [addr, addr + len) with `device`: ibv_reg_dmabuf_mr on a
// dma-buf the backend exports (DmabufFd), else ibv_reg_mr on the device pointer, as `mode`
// allows. When nothing works: FailedPrecondition naming every attempt and its reason, and
// what to do (load nvidia-peermem, a dma-buf capable driver/kernel, or
// MESHPOST_RDMA_GPU=staging). InvalidArgument when addr is not device memory.
Result<std::unique_ptr<VerbsMr>> RegisterGpuMemory(VerbsDevice* device, DeviceBackend* backend,
                                                   void* addr, size_t len, uint32_t access,
                                                   GpuRegistration mode);

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
  // cuda_device: the range is CUDA device memory, registered with RegisterGpuMemory
  // (EnableGpu must have been called); a later host-kind Get inside it hits the entry.
  Result<std::shared_ptr<VerbsMr>> Get(const void* addr, size_t len, uint32_t access,
                                       const std::weak_ptr<const void>& owner = {},
                                       bool cuda_device = false);
  // Device memory registration: backend null means CudaBackend() at first use.
  void EnableGpu(DeviceBackend* backend, GpuRegistration mode) {
    gpu_backend_ = backend;
    gpu_mode_ = mode;
  }
  GpuRegistration gpu_mode() const { return gpu_mode_; }
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
  DeviceBackend* gpu_backend_ = nullptr;
  GpuRegistration gpu_mode_ = GpuRegistration::kAuto;
  size_t max_entries_;
  uint64_t tick_ = 0;
  Map entries_;  // by start address
  MrCacheStats stats_;
};

}  // namespace rdma
}  // namespace meshpost
