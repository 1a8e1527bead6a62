// CUDA memory on the same-host (cma) van: the owner's registered device ranges, their CUDA
// IPC exports to peers, peers' exports opened here, and the copies the receiving side makes
// between device and host memory. Only the cma van uses it (cma_van.cc explains the wire
// format); docs/gpu.md describes the path and its lifetime rules.
//
// The model is the one shared host blocks follow (tensor/shared_memory.h): the sender names
// memory, the receiver maps the name once and copies (or views) in place. A device
// allocation is named by the IPC handle of the allocation that holds it; the receiver opens
// the handle once per connection, checks every (id, offset, length) against the size the
// handle maps, and copies on a stream of its own into the destination it chose.
#pragma once

#include <sys/types.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "common/result.h"
#include "tensor/device_backend.h"
#include "van/device_copy.h"
#include "van/van.h"

namespace meshpost {
namespace cma {

// Device allocations a connection may open here (the same bound as shared host blocks).
constexpr size_t kMaxDeviceImports = 4096;

// One exported allocation, as the sender announces it (kDevBlock).
struct DeviceExport {
  uint32_t id = 0;      // unique in this process for this allocation's handle
  uint64_t offset = 0;  // of the exported range within the allocation
  uintptr_t base = 0;   // the allocation's address in the exporting process
  IpcExport handle;     // handle.alloc_size: the allocation's size
};

// A range of device memory usable in this process.
struct DeviceRange {
  char* ptr = nullptr;
  int device = -1;
  std::shared_ptr<void> keep;  // holds an opened import open while held (null: own memory)
};

class DeviceMemory {
 public:
  explicit DeviceMemory(DeviceBackend* backend) : backend_(backend), copier_(backend) {}
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  DeviceBackend* backend() const { return backend_; }
  // Whether anything was registered or opened yet (lets host-only traffic skip the tables).
  bool active() const { return active_.load(std::memory_order_acquire); }
  // OK when the backend can move device memory; its reason otherwise. Asked once.
  Status Usable();

  // --- the owner's registered device ranges (thread-safe) ---
  Status Register(const MemoryRegion& region);
  void Invalidate(const void* addr, size_t size);
  // The device of [p, p + n) when it lies in one live registered range; -1 otherwise.
  int DeviceOf(const void* p, size_t n);

  // --- exports, sender side (thread-safe) ---
  // The allocation holding [p, p + n), exported: the same id for as long as the driver
  // hands out the same handle for it (a freed and reallocated base gets a new id).
  Result<DeviceExport> Export(const void* p, size_t n);
  // Records that export `id` was announced to process `pid`.
  void SentTo(uint32_t id, pid_t pid);
  // [offset, offset + len) of our export `id`, which must have been announced to `pid`
  // (a peer answering into memory we lent it names it this way).
  Result<DeviceRange> Own(uint32_t id, pid_t pid, uint64_t offset, uint64_t len);

  // --- imports, receive side (thread-safe) ---
  // Opens a peer's export on inbound connection `conn` (from process `pid`).
  Status Open(uint64_t conn, pid_t pid, uint32_t id, const IpcExport& handle);
  // Forgets one import / every import of a connection; views handed out keep theirs open.
  Status Close(uint64_t conn, uint32_t id);
  void CloseAll(uint64_t conn);
  // [offset, offset + len) of an import, checked against the size the handle maps.
  Result<DeviceRange> Imported(uint64_t conn, uint32_t id, uint64_t offset, uint64_t len);
  // Whether [p, p + n) lies in memory process `pid` exported to us; if so its name there.
  bool ImportedFrom(pid_t pid, const void* p, size_t n, uint32_t* id, uint64_t* offset);

  // --- copies: one dispatching thread at a time (the cma van's rx_mu_) ---
  // Queues a copy of n bytes between any mix of device and host memory on this van's
  // stream of `device`; Finish waits (bounded) for every queued copy (DeviceCopier).
  Status Copy(void* dst, const void* src, size_t n, int device) {
    return copier_.Copy(dst, src, n, device);
  }
  Status Finish() { return copier_.Finish(); }

 private:
  struct Region {
    size_t size = 0;
    int device = 0;
    bool has_owner = false;
    std::weak_ptr<const void> owner;
  };
  struct Exported {
    uint32_t id = 0;
    IpcExport handle;
    std::unordered_set<pid_t> sent_to;
  };
  struct Import {
    ~Import();
    DeviceBackend* backend = nullptr;
    char* base = nullptr;
    size_t size = 0;
    int device = 0;
    pid_t pid = 0;
    uint32_t id = 0;
  };

  DeviceBackend* const backend_;
  std::once_flag usable_once_;
  Status usable_;
  std::atomic<bool> active_{false};

  std::mutex mu_;
  std::map<uintptr_t, Region> regions_;
  size_t registrations_since_sweep_ = 0;
  std::map<uintptr_t, Exported> exports_;  // by allocation base
  std::unordered_map<uint32_t, uintptr_t> export_ids_;
  uint32_t next_export_id_ = 1;
  std::map<std::pair<uint64_t, uint32_t>, std::shared_ptr<Import>> imports_;
  std::map<uintptr_t, std::shared_ptr<Import>> import_addrs_;  // by base (ImportedFrom)

  DeviceCopier copier_;  // dispatching thread only
};

}  // namespace cma
}  // namespace meshpost
