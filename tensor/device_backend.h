// DeviceBackend: the device operations meshpost needs to move GPU memory — streams, events,
// async copies, 64-bit flag writes/waits ordered on a stream, pinned host memory, IPC
// export, host registration and dma-buf export — behind one small interface. Two
// implementations: CUDA (tensor/backend/cuda_backend.h, the driver loaded at first use) and
// a fake on host memory whose streams are worker threads (tensor/backend/fake_backend.h).
// All calls are thread-safe. Errors are Statuses naming the call and the driver's reason.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include "common/result.h"
#include "tensor/dtype.h"

namespace meshpost {

// A stream is the backend's native stream value (for CUDA the CUstream / cudaStream_t
// bits, so torch.cuda.current_stream().cuda_stream can be passed in). 0 is the legacy
// default stream of the current device.
using DeviceStream = uintptr_t;
// Opaque event created by CreateEvent.
struct DeviceEventImpl;
using DeviceEvent = DeviceEventImpl*;

// need_event: when set, the transport reads the caller's GPU tensors only after the work
// submitted to `stream` (the caller's current stream) so far has completed.
struct StreamSync {
  bool need_event = false;
  DeviceStream stream = 0;
};

// An exported allocation: `bytes` is what the importing process passes to OpenIpc; ptr
// lies `offset` bytes into the allocation, which is `alloc_size` bytes long.
struct IpcExport {
  std::array<uint8_t, 64> bytes{};
  size_t offset = 0;
  size_t alloc_size = 0;
  int device = 0;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual const char* name() const = 0;
  // OK when at least one device is usable; otherwise why not (driver missing, no device),
  // naming what was tried. Every other call fails with this status when it is not OK.
  virtual Status Available() = 0;
  virtual int device_count() = 0;
  // cuda:N for device memory, cpu for host memory (pinned or not).
  virtual Result<Device> PointerDevice(const void* ptr) = 0;

  virtual Result<DeviceStream> CreateStream(int device) = 0;
  virtual void DestroyStream(DeviceStream stream) = 0;
  virtual Result<DeviceEvent> CreateEvent(int device) = 0;
  virtual void DestroyEvent(DeviceEvent event) = 0;
  // Captures the work submitted to `stream` so far; EventDone / StreamWaitEvent refer to
  // the most recent record.
  virtual Status RecordEvent(DeviceEvent event, DeviceStream stream) = 0;
  // Later work on `stream` starts after the event's captured work; the CPU does not block.
  virtual Status StreamWaitEvent(DeviceStream stream, DeviceEvent event) = 0;
  virtual Result<bool> EventDone(DeviceEvent event) = 0;
  // Blocks the calling thread until the event completed; DeadlineExceeded after
  // timeout_ms (< 0: no limit). Polls with backoff: never an unbounded driver wait.
  virtual Status SyncEvent(DeviceEvent event, int64_t timeout_ms);

  // Copies n bytes between any mix of host and device memory, ordered on `stream`.
  virtual Status CopyAsync(void* dst, const void* src, size_t n, DeviceStream stream) = 0;
  // Flags are 8-byte signed counters in device or pinned (mapped) host memory. A flag op's
  // value is `value` or, when value_addr is set, the int64 at value_addr read when the op
  // runs (so a captured CUDA Graph replays with the current sequence number).
  // WriteFlagAsync stores it after the work before it on `stream`, with release ordering:
  // data written before is visible before the flag.
  virtual Status WriteFlagAsync(int64_t* flag, int64_t value, const int64_t* value_addr,
                                DeviceStream stream) = 0;
  // Later work on `stream` starts once *flag >= the value; the CPU does not block.
  virtual Status WaitFlagAsync(const int64_t* flag, int64_t value, const int64_t* value_addr,
                               DeviceStream stream) = 0;
  // The host sets a flag (pinned memory) that streams wait on with WaitFlagAsync; release
  // ordering, so host writes before it are visible to the stream's later work.
  virtual void HostWriteFlag(int64_t* flag, int64_t value) {
    __atomic_store_n(flag, value, __ATOMIC_RELEASE);
  }
  // *counter += 1, ordered on `stream`.
  virtual Status IncrementAsync(int64_t* counter, DeviceStream stream) = 0;

  virtual Result<void*> AllocPinned(size_t n) = 0;
  virtual void FreePinned(void* ptr) = 0;
  virtual Result<void*> AllocDevice(int device, size_t n) = 0;
  virtual void FreeDevice(void* ptr) = 0;
  // Page-locks caller memory so copies from/to it run asynchronously.
  virtual Status RegisterHost(void* ptr, size_t n) = 0;
  virtual Status UnregisterHost(void* ptr) = 0;
  // The device address of pinned host memory (zero-copy access from kernels).
  virtual Result<void*> HostDevicePointer(void* host_ptr) = 0;

  // Exports the device allocation holding ptr to other processes on this host.
  virtual Result<IpcExport> ExportIpc(void* ptr) = 0;
  // Maps an exported allocation; returns its base. CloseIpc(base) unmaps it.
  virtual Result<void*> OpenIpc(const IpcExport& exported) = 0;
  virtual Status CloseIpc(void* base) = 0;
  // A dma-buf file descriptor covering device memory [ptr, ptr + n) (GPUDirect RDMA through
  // ibv_reg_dmabuf_mr); ptr lies `offset` bytes into it (the driver exports whole pages).
  // The caller closes fd. Unimplemented where the driver lacks dma-buf export.
  struct Dmabuf {
    int fd = -1;
    uint64_t offset = 0;
    size_t length = 0;
  };
  virtual Result<Dmabuf> DmabufFd(void* ptr, size_t n) = 0;

  // Checking hook: the CPU is about to read (write=false) or write [ptr, ptr + n). The CUDA
  // backend ignores it; the fake backend records a hazard when device work touching the
  // range is still in flight. Call it where host code touches memory a device op used.
  virtual void HostAccess(const void* ptr, size_t n, bool write) {}
};

// The process's CUDA backend. In builds without CUDA its Available() is Unimplemented; in
// CUDA builds it loads libcuda.so.1 at first use, so a machine without a driver or GPU
// still runs CPU work and gets a status saying why GPU tensors are refused.
DeviceBackend* CudaBackend();
// True when this build was compiled with CUDA support (MESHPOST_WITH_CUDA).
bool BuiltWithCuda();

}  // namespace meshpost
