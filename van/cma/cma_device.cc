#include "van/cma/cma_device.h"

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "common/logging.h"

namespace meshpost {
namespace cma {
namespace {

constexpr const char* kLog = "van";
// Registrations between sweeps of ranges whose owner is gone (so a long run of fresh
// tensors does not grow the table without bound).
constexpr size_t kSweepEvery = 1024;

std::string Hex(uintptr_t a) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(a));
  return buf;
}

bool Expired(bool has_owner, const std::weak_ptr<const void>& owner) {
  return has_owner && owner.expired();
}

}  // namespace

DeviceMemory::Import::~Import() {
  if (base == nullptr) return;
  Status s = backend->CloseIpc(base);
  if (!s.ok()) MP_LOG_WARN(kLog, "cma van: closing device import {}: {}", id, s.ToString());
}

Status DeviceMemory::Usable() {
  std::call_once(usable_once_, [this] { usable_ = backend_->Available(); });
  return usable_;
}

Status DeviceMemory::Register(const MemoryRegion& region) {
  if (region.kind != MemoryKind::kCudaDevice) return OkStatus();
  if (region.addr == nullptr || region.size == 0) {
    return InvalidArgumentError(
        "cma van: device region " + Hex(reinterpret_cast<uintptr_t>(region.addr)) + " of " +
        std::to_string(region.size) + " bytes (expected a non-empty range)");
  }
  if (region.device < 0) {
    return InvalidArgumentError("cma van: device region " +
                                Hex(reinterpret_cast<uintptr_t>(region.addr)) + " has device " +
                                std::to_string(region.device) + " (expected a CUDA ordinal)");
  }
  MESHPOST_RETURN_IF_ERROR(Usable());
  const std::weak_ptr<const void> none;
  const bool has_owner = region.owner.owner_before(none) || none.owner_before(region.owner);
  std::lock_guard<std::mutex> lock(mu_);
  regions_[reinterpret_cast<uintptr_t>(region.addr)] =
      Region{region.size, region.device, has_owner, region.owner};
  active_.store(true, std::memory_order_release);
  if (++registrations_since_sweep_ >= kSweepEvery) {
    registrations_since_sweep_ = 0;
    for (auto it = regions_.begin(); it != regions_.end();) {
      it = Expired(it->second.has_owner, it->second.owner) ? regions_.erase(it) : std::next(it);
    }
  }
  return OkStatus();
}

void DeviceMemory::Invalidate(const void* addr, size_t size) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = regions_.upper_bound(a);
  if (it != regions_.begin()) --it;
  while (it != regions_.end() && it->first < a + size) {
    if (it->first + it->second.size > a) {
      it = regions_.erase(it);
    } else {
      ++it;
    }
  }
}

int DeviceMemory::DeviceOf(const void* p, size_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(mu_);
  if (regions_.empty()) return -1;
  auto it = regions_.upper_bound(a);
  // The closest start at or below a first; a larger range starting earlier (a whole
  // buffer registered besides a view of it) may hold it too, so look a few further back.
  for (int step = 0; step < 8 && it != regions_.begin(); ++step) {
    --it;
    const Region& r = it->second;
    if (a - it->first <= r.size && n <= r.size - (a - it->first) &&
        !Expired(r.has_owner, r.owner)) {
      return r.device;
    }
  }
  return -1;
}

Result<DeviceExport> DeviceMemory::Export(const void* p, size_t n) {
  MESHPOST_ASSIGN_OR_RETURN(IpcExport ex, backend_->ExportIpc(const_cast<void*>(p)));
  if (ex.offset > ex.alloc_size || n > ex.alloc_size - ex.offset) {
    return InvalidArgumentError("cma van: device range " + Hex(reinterpret_cast<uintptr_t>(p)) +
                                " of " + std::to_string(n) + " bytes runs past its allocation (" +
                                std::to_string(ex.alloc_size) + " bytes)");
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(p) - ex.offset;
  std::lock_guard<std::mutex> lock(mu_);
  Exported& e = exports_[base];
  if (e.id == 0 || e.handle.bytes != ex.bytes || e.handle.alloc_size != ex.alloc_size) {
    if (e.id != 0) export_ids_.erase(e.id);  // a new allocation at the same address
    e = Exported{};
    e.id = next_export_id_++;
    if (next_export_id_ == 0) next_export_id_ = 1;
    e.handle = ex;
    e.handle.offset = 0;
    export_ids_[e.id] = base;
  }
  return DeviceExport{e.id, ex.offset, base, e.handle};
}

void DeviceMemory::SentTo(uint32_t id, pid_t pid) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = export_ids_.find(id);
  if (it != export_ids_.end()) exports_[it->second].sent_to.insert(pid);
}

Result<DeviceRange> DeviceMemory::Own(uint32_t id, pid_t pid, uint64_t offset, uint64_t len) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = export_ids_.find(id);
  if (it == export_ids_.end()) {
    return DataLossError("device allocation " + std::to_string(id) +
                         " is not one this node exported");
  }
  const Exported& e = exports_.at(it->second);
  if (e.sent_to.count(pid) == 0) {
    return DataLossError("device allocation " + std::to_string(id) +
                         " was not passed to the sender");
  }
  if (offset > e.handle.alloc_size || len > e.handle.alloc_size - offset) {
    return DataLossError("range outside its device allocation");
  }
  return DeviceRange{reinterpret_cast<char*>(it->second) + offset, e.handle.device, nullptr};
}

Status DeviceMemory::Open(uint64_t conn, pid_t pid, uint32_t id, const IpcExport& handle) {
  MESHPOST_RETURN_IF_ERROR(Usable());
  {
    std::lock_guard<std::mutex> lock(mu_);
    size_t of_conn = 0;
    for (auto it = imports_.lower_bound({conn, 0}); it != imports_.end() && it->first.first == conn;
         ++it) {
      ++of_conn;
    }
    if (imports_.count({conn, id}) != 0 || of_conn >= kMaxDeviceImports) {
      return ResourceExhaustedError("device allocation " + std::to_string(id) +
                                    " is already open or the connection has " +
                                    std::to_string(kMaxDeviceImports) + " open");
    }
  }
  if (handle.alloc_size == 0 || handle.device < 0) {
    return DataLossError("device allocation " + std::to_string(id) + " of " +
                         std::to_string(handle.alloc_size) + " bytes on device " +
                         std::to_string(handle.device));
  }
  MESHPOST_ASSIGN_OR_RETURN(void* base, backend_->OpenIpc(handle));
  auto im = std::make_shared<Import>();
  im->backend = backend_;
  im->base = static_cast<char*>(base);
  im->size = handle.alloc_size;
  im->device = handle.device;
  im->pid = pid;
  im->id = id;
  std::lock_guard<std::mutex> lock(mu_);
  active_.store(true, std::memory_order_release);
  import_addrs_.emplace(reinterpret_cast<uintptr_t>(base), im);
  imports_[{conn, id}] = std::move(im);
  return OkStatus();
}

Status DeviceMemory::Close(uint64_t conn, uint32_t id) {
  std::shared_ptr<Import> im;  // closed (if last) outside the lock
  std::lock_guard<std::mutex> lock(mu_);
  auto it = imports_.find({conn, id});
  if (it == imports_.end()) {
    return DataLossError("device allocation " + std::to_string(id) + " is not open");
  }
  im = std::move(it->second);
  imports_.erase(it);
  auto a = import_addrs_.find(reinterpret_cast<uintptr_t>(im->base));
  if (a != import_addrs_.end() && a->second == im) import_addrs_.erase(a);
  return OkStatus();
}

void DeviceMemory::CloseAll(uint64_t conn) {
  std::vector<std::shared_ptr<Import>> closing;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = imports_.lower_bound({conn, 0});
       it != imports_.end() && it->first.first == conn;) {
    auto a = import_addrs_.find(reinterpret_cast<uintptr_t>(it->second->base));
    if (a != import_addrs_.end() && a->second == it->second) import_addrs_.erase(a);
    closing.push_back(std::move(it->second));
    it = imports_.erase(it);
  }
}

Result<DeviceRange> DeviceMemory::Imported(uint64_t conn, uint32_t id, uint64_t offset,
                                           uint64_t len) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = imports_.find({conn, id});
  if (it == imports_.end()) {
    return DataLossError("unknown device allocation " + std::to_string(id));
  }
  const Import& im = *it->second;
  if (offset > im.size || len > im.size - offset) {
    return DataLossError("range outside its device allocation");
  }
  return DeviceRange{im.base + offset, im.device,
                     std::shared_ptr<void>(it->second, im.base + offset)};
}

bool DeviceMemory::ImportedFrom(pid_t pid, const void* p, size_t n, uint32_t* id,
                                uint64_t* offset) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = import_addrs_.upper_bound(a);
  if (it == import_addrs_.begin()) return false;
  --it;
  const Import& im = *it->second;
  const uint64_t off = a - it->first;
  if (im.pid != pid || off > im.size || n > im.size - off) return false;
  *id = im.id;
  *offset = off;
  return true;
}

}  // namespace cma
}  // namespace meshpost
