#include "van/rdma/mr_cache.h"

#include <unistd.h>

#include <cstdio>
#include <string>

namespace meshpost {
namespace rdma {
namespace {

std::string HexAddr(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx",
                static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(p)));
  return buf;
}

}  // namespace

const char* GpuRegistrationName(GpuRegistration mode) {
  switch (mode) {
    case GpuRegistration::kAuto: return "auto";
    case GpuRegistration::kDmabuf: return "dmabuf";
    case GpuRegistration::kPeerMem: return "peermem";
    case GpuRegistration::kStaging: return "staging";
  }
  return "?";
}

Result<GpuRegistration> ParseGpuRegistration(const char* var, const std::string& value) {
  for (GpuRegistration m : {GpuRegistration::kAuto, GpuRegistration::kDmabuf,
                            GpuRegistration::kPeerMem, GpuRegistration::kStaging}) {
    if (value == GpuRegistrationName(m)) return m;
  }
  return InvalidArgumentError(std::string(var) + "='" + value +
                              "'; expected auto, dmabuf, peermem or staging");
}

Result<std::unique_ptr<VerbsMr>> RegisterGpuMemory(VerbsDevice* device, DeviceBackend* backend,
                                                   void* addr, size_t len, uint32_t access,
                                                   GpuRegistration mode) {
  const std::string what = "GPUDirect registration of " + std::to_string(len) + " bytes at " +
                           HexAddr(addr) + " on " + device->name();
  if (mode == GpuRegistration::kStaging) {
    return FailedPreconditionError(what +
                                   ": MESHPOST_RDMA_GPU=staging disables GPUDirect; "
                                   "stage CUDA memory through pinned host memory instead");
  }
  if (backend == nullptr) backend = CudaBackend();
  Status usable = backend->Available();
  if (!usable.ok()) {
    return FailedPreconditionError(what + ": no usable CUDA device: " + usable.message());
  }
  auto where = backend->PointerDevice(addr);
  if (!where.ok()) return where.status().Annotate(what);
  if (where->type != DeviceType::kCUDA) {
    return InvalidArgumentError(what + ": the address is " + where->ToString() +
                                " memory, not CUDA device memory");
  }
  std::string tried;
  if (mode == GpuRegistration::kAuto || mode == GpuRegistration::kDmabuf) {
    auto buf = backend->DmabufFd(addr, len);
    if (buf.ok()) {
      auto mr = device->RegisterDmabuf(buf->fd, buf->offset, len, reinterpret_cast<uint64_t>(addr),
                                       access);
      close(buf->fd);  // the registration holds its own reference
      if (mr.ok()) return mr;
      tried = "ibv_reg_dmabuf_mr: " + mr.status().message();
    } else {
      tried = "dma-buf export (" + std::string(backend->name()) + "): " + buf.status().message();
    }
  }
  if (mode == GpuRegistration::kAuto || mode == GpuRegistration::kPeerMem) {
    auto mr = device->RegisterMemory(addr, len, access);
    if (mr.ok()) return mr;
    tried += (tried.empty() ? "" : "; ") +
             std::string("ibv_reg_mr on device memory (needs the nvidia-peermem module): ") +
             mr.status().message();
  }
  return FailedPreconditionError(
      what + " (" + where->ToString() + ", MESHPOST_RDMA_GPU=" + GpuRegistrationName(mode) +
      ") failed: " + tried +
      ". Fix: a dma-buf capable setup (open GPU kernel module, Linux >= 5.12, rdma-core >= 34) "
      "or `modprobe nvidia-peermem`; or set MESHPOST_RDMA_GPU=staging to move GPU tensors "
      "through pinned host memory");
}

MrCache::MrCache(VerbsDevice* device, size_t max_entries)
    : device_(device), max_entries_(max_entries == 0 ? 1 : max_entries) {}

Result<std::shared_ptr<VerbsMr>> MrCache::Get(const void* addr, size_t len, uint32_t access,
                                              const std::weak_ptr<const void>& owner,
                                              bool cuda_device) {
  if (addr == nullptr || len == 0) {
    return InvalidArgumentError(
        "MrCache::Get: cannot register addr=" + std::to_string(reinterpret_cast<uintptr_t>(addr)) +
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
  auto mr = cuda_device ? RegisterGpuMemory(device_, gpu_backend_, const_cast<void*>(addr), len,
                                            access, gpu_mode_)
                        : device_->RegisterMemory(const_cast<void*>(addr), len, access);
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
    return NotFoundError("MrCache::Deregister: no registration starts at " + std::to_string(start));
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
