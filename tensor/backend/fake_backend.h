// FakeBackend: a DeviceBackend on host memory for tests. "Device memory" is memfd-backed
// host memory the backend marks as device (so IPC export works across processes of one
// host); each stream is a worker thread running its queue in order. Tests hold streams,
// inject delays, wait until every stream is idle or blocked, and read the hazards the
// backend detected: a copy that touches memory another stream's unfinished copy writes
// (or reads, for a write), and host accesses (HostAccess) to memory an unfinished copy
// uses. Ordering bugs therefore fail a test deterministically instead of by luck.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tensor/device_backend.h"

namespace meshpost {

class FakeBackend : public DeviceBackend {
 public:
  explicit FakeBackend(int devices = 1);
  ~FakeBackend() override;
  FakeBackend(const FakeBackend&) = delete;
  FakeBackend& operator=(const FakeBackend&) = delete;

  // --- test controls ---
  // Ops on a held stream are queued but none starts until ReleaseStream.
  void HoldStream(DeviceStream stream);
  void ReleaseStream(DeviceStream stream);
  // Sleeps this long before each op of `stream` (widens race windows in stress tests).
  void SetDelayUs(DeviceStream stream, int64_t delay_us);
  // Every copy (all streams) also sleeps n * ps_per_byte picoseconds after moving its n
  // bytes, like a copy engine of 1e12 / ps_per_byte bytes/s (0: off). For measurements
  // of chunked pipelines; tests must not assert on time.
  void SetCopyCost(int64_t ps_per_byte);
  // Until every stream is empty, held, or blocked on an event or flag; false on timeout.
  bool WaitIdle(int64_t timeout_ms);
  // Ordering violations seen so far (each names the ops and the overlapping range).
  std::vector<std::string> Hazards() const;
  void ClearHazards();
  // Makes Available() (and every call that needs a device) fail with `why`.
  void SetUnavailable(Status why);
  // Copies executed so far (all streams).
  uint64_t copies_executed() const;

  // --- DeviceBackend ---
  const char* name() const override { return "fake"; }
  Status Available() override;
  int device_count() override;
  Result<Device> PointerDevice(const void* ptr) override;
  Result<DeviceStream> CreateStream(int device) override;
  void DestroyStream(DeviceStream stream) override;
  Result<DeviceEvent> CreateEvent(int device) override;
  void DestroyEvent(DeviceEvent event) override;
  Status RecordEvent(DeviceEvent event, DeviceStream stream) override;
  Status StreamWaitEvent(DeviceStream stream, DeviceEvent event) override;
  Result<bool> EventDone(DeviceEvent event) override;
  Status CopyAsync(void* dst, const void* src, size_t n, DeviceStream stream) override;
  Status WriteFlagAsync(int64_t* flag, int64_t value, const int64_t* value_addr,
                        DeviceStream stream) override;
  Status WaitFlagAsync(const int64_t* flag, int64_t value, const int64_t* value_addr,
                       DeviceStream stream) override;
  Status IncrementAsync(int64_t* counter, DeviceStream stream) override;
  void HostWriteFlag(int64_t* flag, int64_t value) override;
  Result<void*> AllocPinned(size_t n) override;
  void FreePinned(void* ptr) override;
  Result<void*> AllocDevice(int device, size_t n) override;
  void FreeDevice(void* ptr) override;
  Status RegisterHost(void* ptr, size_t n) override;
  Status UnregisterHost(void* ptr) override;
  Result<void*> HostDevicePointer(void* host_ptr) override;
  Result<IpcExport> ExportIpc(void* ptr) override;
  Result<void*> OpenIpc(const IpcExport& exported) override;
  Status CloseIpc(void* base) override;
  Result<Dmabuf> DmabufFd(void* ptr, size_t n) override;
  void HostAccess(const void* ptr, size_t n, bool write) override;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace meshpost
