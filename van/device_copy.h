// Copies a van makes between device and host memory on the receive side (van/ internal):
// the same-host van's CUDA IPC copies, and the rdma van's copy of a push that landed in a
// pooled host buffer into a CUDA receive buffer. One stream and one event per device,
// created at the first copy; Finish waits (bounded) for everything queued.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>

#include "common/result.h"
#include "tensor/device_backend.h"

namespace meshpost {

// How long a van waits for the copies of one message (a hung device fails that message,
// it does not block the van's thread forever).
constexpr int64_t kVanDeviceCopyTimeoutMs = 30'000;

// Not thread-safe: one thread at a time (the van's dispatching thread, or under its lock).
class DeviceCopier {
 public:
  explicit DeviceCopier(DeviceBackend* backend) : backend_(backend) {}
  ~DeviceCopier();
  DeviceCopier(const DeviceCopier&) = delete;
  DeviceCopier& operator=(const DeviceCopier&) = delete;

  // Queues a copy of n bytes between any mix of device and host memory on this copier's
  // stream of `device`.
  Status Copy(void* dst, const void* src, size_t n, int device);
  // Waits (bounded by kVanDeviceCopyTimeoutMs) until every queued copy finished.
  Status Finish();

 private:
  struct Lane {
    DeviceStream stream = 0;
    DeviceEvent done = nullptr;
    bool queued = false;
  };
  DeviceBackend* const backend_;
  std::map<int, Lane> lanes_;
};

}  // namespace meshpost
