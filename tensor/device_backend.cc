#include "tensor/device_backend.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "common/clock.h"

namespace meshpost {

Status DeviceBackend::SyncEvent(DeviceEvent event, int64_t timeout_ms) {
  const uint64_t deadline = DeadlineFromTimeoutMs(timeout_ms);
  // Copies of a few KB finish in microseconds, large ones in milliseconds: back off from
  // yielding to 200 us sleeps so neither case burns a core or adds much latency.
  int64_t sleep_us = 0;
  for (;;) {
    MESHPOST_ASSIGN_OR_RETURN(bool done, EventDone(event));
    if (done) return OkStatus();
    if (GetNanosecond() >= deadline) {
      return DeadlineExceededError(std::string(name()) +
                                   " backend: device event not complete after " +
                                   std::to_string(timeout_ms) + " ms");
    }
    if (sleep_us == 0) {
      std::this_thread::yield();
      sleep_us = 1;
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      sleep_us = std::min<int64_t>(sleep_us * 2, 200);
    }
  }
}

#ifndef MESHPOST_HAVE_CUDA
namespace {

// Builds without CUDA: every operation reports why.
class NoCudaBackend final : public DeviceBackend {
 public:
  const char* name() const override { return "cuda"; }
  Status Available() override { return Why(); }
  int device_count() override { return 0; }
  Result<Device> PointerDevice(const void*) override { return Device{}; }
  Result<DeviceStream> CreateStream(int) override { return Why(); }
  void DestroyStream(DeviceStream) override {}
  Result<DeviceEvent> CreateEvent(int) override { return Why(); }
  void DestroyEvent(DeviceEvent) override {}
  Status RecordEvent(DeviceEvent, DeviceStream) override { return Why(); }
  Status StreamWaitEvent(DeviceStream, DeviceEvent) override { return Why(); }
  Result<bool> EventDone(DeviceEvent) override { return Why(); }
  Status CopyAsync(void*, const void*, size_t, DeviceStream) override { return Why(); }
  Status WriteFlagAsync(int64_t*, int64_t, const int64_t*, DeviceStream) override { return Why(); }
  Status WaitFlagAsync(const int64_t*, int64_t, const int64_t*, DeviceStream) override {
    return Why();
  }
  Status IncrementAsync(int64_t*, DeviceStream) override { return Why(); }
  Result<void*> AllocPinned(size_t) override { return Why(); }
  void FreePinned(void*) override {}
  Result<void*> AllocDevice(int, size_t) override { return Why(); }
  void FreeDevice(void*) override {}
  Status RegisterHost(void*, size_t) override { return Why(); }
  Status UnregisterHost(void*) override { return Why(); }
  Result<void*> HostDevicePointer(void*) override { return Why(); }
  Result<IpcExport> ExportIpc(void*) override { return Why(); }
  Result<void*> OpenIpc(const IpcExport&) override { return Why(); }
  Status CloseIpc(void*) override { return Why(); }
  Result<Dmabuf> DmabufFd(void*, size_t) override { return Why(); }

 private:
  static Status Why() {
    return UnimplementedError(
        "this build of meshpost has no CUDA support (configured with MESHPOST_WITH_CUDA=OFF or "
        "no CUDA toolkit found); rebuild with a CUDA toolkit to move GPU tensors");
  }
};

}  // namespace

DeviceBackend* CudaBackend() {
  static NoCudaBackend backend;
  return &backend;
}
bool BuiltWithCuda() { return false; }
#endif  // MESHPOST_HAVE_CUDA

}  // namespace meshpost
