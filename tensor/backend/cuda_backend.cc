// CUDA device backend over the driver API, loaded with dlopen at first use. Nothing here
// links libcuda or libcudart: a CUDA build starts on any machine, and without a driver or
// device every call returns the status Available() reports. The primary context of each
// device is used (the one the CUDA runtime, hence torch, uses), so streams and pointers
// from torch are valid here.
#include <cuda.h>
#include <dlfcn.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "tensor/device_backend.h"

extern "C" {
extern const unsigned char meshpost_cuda_fatbin[];
extern const size_t meshpost_cuda_fatbin_size;
}

namespace meshpost {

struct DeviceEventImpl {
  CUevent event = nullptr;
  int device = 0;
};

namespace {

constexpr int kMaxDevices = 64;

// Driver entry points; names are the ABI symbols (cuda.h maps the API names to _v2).
struct Driver {
#define MP_CU(fn) decltype(&::fn) fn = nullptr
  MP_CU(cuInit);
  MP_CU(cuGetErrorName);
  MP_CU(cuGetErrorString);
  MP_CU(cuDeviceGetCount);
  MP_CU(cuDeviceGet);
  MP_CU(cuDevicePrimaryCtxRetain);
  MP_CU(cuCtxSetCurrent);
  MP_CU(cuCtxGetCurrent);
  MP_CU(cuStreamCreate);
  MP_CU(cuStreamDestroy);
  MP_CU(cuStreamGetCtx);
  MP_CU(cuEventCreate);
  MP_CU(cuEventDestroy);
  MP_CU(cuEventRecord);
  MP_CU(cuStreamWaitEvent);
  MP_CU(cuEventQuery);
  MP_CU(cuMemcpyAsync);
  MP_CU(cuMemHostAlloc);
  MP_CU(cuMemFreeHost);
  MP_CU(cuMemAlloc);
  MP_CU(cuMemFree);
  MP_CU(cuMemHostRegister);
  MP_CU(cuMemHostUnregister);
  MP_CU(cuMemHostGetDevicePointer);
  MP_CU(cuIpcGetMemHandle);
  MP_CU(cuIpcOpenMemHandle);
  MP_CU(cuIpcCloseMemHandle);
  MP_CU(cuMemGetAddressRange);
  MP_CU(cuPointerGetAttribute);
  MP_CU(cuModuleLoadData);
  MP_CU(cuModuleGetFunction);
  MP_CU(cuLaunchKernel);
  MP_CU(cuCtxGetDevice);
#undef MP_CU
  // Optional (CUDA >= 11.7 drivers): dma-buf export for GPUDirect RDMA.
  decltype(&::cuMemGetHandleForAddressRange) cuMemGetHandleForAddressRange = nullptr;
};

class CudaDriverBackend final : public DeviceBackend {
 public:
  const char* name() const override { return "cuda"; }

  Status Available() override {
    std::call_once(load_once_, [this] { load_status_ = Load(); });
    return load_status_;
  }

  int device_count() override { return Available().ok() ? devices_ : 0; }

  Result<Device> PointerDevice(const void* ptr) override {
    if (!Available().ok() || ptr == nullptr) return Device{};
    unsigned int type = 0;
    CUresult r = d_.cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                                          reinterpret_cast<CUdeviceptr>(ptr));
    // Memory the driver never saw (plain malloc) is CUDA_ERROR_INVALID_VALUE: host memory.
    if (r != CUDA_SUCCESS || type != CU_MEMORYTYPE_DEVICE) return Device{};
    int ordinal = 0;
    r = d_.cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                 reinterpret_cast<CUdeviceptr>(ptr));
    if (r != CUDA_SUCCESS) return Error("cuPointerGetAttribute(DEVICE_ORDINAL)", r);
    return Device{DeviceType::kCUDA, ordinal};
  }

  Result<DeviceStream> CreateStream(int device) override {
    MESHPOST_RETURN_IF_ERROR(UseDevice(device, "CreateStream"));
    CUstream s = nullptr;
    CUresult r = d_.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
    if (r != CUDA_SUCCESS) return Error("cuStreamCreate", r);
    return reinterpret_cast<DeviceStream>(s);
  }

  void DestroyStream(DeviceStream stream) override {
    if (stream != 0 && Available().ok()) d_.cuStreamDestroy(reinterpret_cast<CUstream>(stream));
  }

  Result<DeviceEvent> CreateEvent(int device) override {
    MESHPOST_RETURN_IF_ERROR(UseDevice(device, "CreateEvent"));
    CUevent e = nullptr;
    CUresult r = d_.cuEventCreate(&e, CU_EVENT_DISABLE_TIMING);
    if (r != CUDA_SUCCESS) return Error("cuEventCreate", r);
    return new DeviceEventImpl{e, device};
  }

  void DestroyEvent(DeviceEvent event) override {
    if (event == nullptr) return;
    if (Available().ok()) d_.cuEventDestroy(event->event);
    delete event;
  }

  Status RecordEvent(DeviceEvent event, DeviceStream stream) override {
    MESHPOST_RETURN_IF_ERROR(UseStream(stream, "RecordEvent"));
    return Check("cuEventRecord", d_.cuEventRecord(event->event, Cu(stream)));
  }

  Status StreamWaitEvent(DeviceStream stream, DeviceEvent event) override {
    MESHPOST_RETURN_IF_ERROR(UseStream(stream, "StreamWaitEvent"));
    return Check("cuStreamWaitEvent", d_.cuStreamWaitEvent(Cu(stream), event->event, 0));
  }

  Result<bool> EventDone(DeviceEvent event) override {
    MESHPOST_RETURN_IF_ERROR(UseDevice(event->device, "EventDone"));
    CUresult r = d_.cuEventQuery(event->event);
    if (r == CUDA_SUCCESS) return true;
    if (r == CUDA_ERROR_NOT_READY) return false;
    return Error("cuEventQuery", r);
  }

  Status CopyAsync(void* dst, const void* src, size_t n, DeviceStream stream) override {
    if (n == 0) return OkStatus();
    MESHPOST_RETURN_IF_ERROR(UseStream(stream, "CopyAsync"));
    // Unified addressing: the driver infers the direction from the pointers.
    return Check("cuMemcpyAsync",
                 d_.cuMemcpyAsync(reinterpret_cast<CUdeviceptr>(dst),
                                  reinterpret_cast<CUdeviceptr>(src), n, Cu(stream)));
  }

  Status WriteFlagAsync(int64_t* flag, int64_t value, const int64_t* value_addr,
                        DeviceStream stream) override {
    return Launch("meshpost_write_flag", stream, flag, value_addr, value);
  }

  Status WaitFlagAsync(const int64_t* flag, int64_t value, const int64_t* value_addr,
                       DeviceStream stream) override {
    return Launch("meshpost_wait_flag", stream, const_cast<int64_t*>(flag), value_addr, value);
  }

  Status IncrementAsync(int64_t* counter, DeviceStream stream) override {
    MESHPOST_RETURN_IF_ERROR(UseStream(stream, "IncrementAsync"));
    MESHPOST_ASSIGN_OR_RETURN(CUfunction f, Function("meshpost_seq_add_one"));
    void* args[] = {&counter};
    return Check("cuLaunchKernel(meshpost_seq_add_one)",
                 d_.cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, Cu(stream), args, nullptr));
  }

  Result<void*> AllocPinned(size_t n) override {
    MESHPOST_RETURN_IF_ERROR(UseDevice(0, "AllocPinned"));
    void* p = nullptr;
    // Portable: usable from every context; devicemap: kernels may read it (flags).
    CUresult r =
        d_.cuMemHostAlloc(&p, n ? n : 1, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP);
    if (r != CUDA_SUCCESS) return Error("cuMemHostAlloc(" + std::to_string(n) + " bytes)", r);
    return p;
  }

  void FreePinned(void* ptr) override {
    if (ptr && Available().ok()) d_.cuMemFreeHost(ptr);
  }

  Result<void*> AllocDevice(int device, size_t n) override {
    MESHPOST_RETURN_IF_ERROR(UseDevice(device, "AllocDevice"));
    CUdeviceptr p = 0;
    CUresult r = d_.cuMemAlloc(&p, n ? n : 1);
    if (r != CUDA_SUCCESS) return Error("cuMemAlloc(" + std::to_string(n) + " bytes)", r);
    return reinterpret_cast<void*>(p);
  }

  void FreeDevice(void* ptr) override {
    if (ptr && UseDeviceOf(ptr).ok()) d_.cuMemFree(reinterpret_cast<CUdeviceptr>(ptr));
  }

  Status RegisterHost(void* ptr, size_t n) override {
    MESHPOST_RETURN_IF_ERROR(UseDevice(0, "RegisterHost"));
    return Check(
        "cuMemHostRegister",
        d_.cuMemHostRegister(ptr, n, CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP));
  }

  Status UnregisterHost(void* ptr) override {
    MESHPOST_RETURN_IF_ERROR(UseDevice(0, "UnregisterHost"));
    return Check("cuMemHostUnregister", d_.cuMemHostUnregister(ptr));
  }

  Result<void*> HostDevicePointer(void* host_ptr) override {
    MESHPOST_RETURN_IF_ERROR(UseDevice(0, "HostDevicePointer"));
    CUdeviceptr p = 0;
    CUresult r = d_.cuMemHostGetDevicePointer(&p, host_ptr, 0);
    if (r != CUDA_SUCCESS) {
      return Error("cuMemHostGetDevicePointer (is the tensor in pinned memory?)", r);
    }
    return reinterpret_cast<void*>(p);
  }

  Result<IpcExport> ExportIpc(void* ptr) override {
    MESHPOST_ASSIGN_OR_RETURN(int device, UseDeviceOf(ptr));
    CUdeviceptr base = 0;
    size_t size = 0;
    CUresult r = d_.cuMemGetAddressRange(&base, &size, reinterpret_cast<CUdeviceptr>(ptr));
    if (r != CUDA_SUCCESS) return Error("cuMemGetAddressRange", r);
    CUipcMemHandle h;
    r = d_.cuIpcGetMemHandle(&h, base);
    if (r != CUDA_SUCCESS) {
      return Error(
          "cuIpcGetMemHandle (memory from cudaMallocAsync pools or cuMemCreate is "
          "not exportable this way)",
          r);
    }
    IpcExport ex;
    static_assert(sizeof(h) <= sizeof(ex.bytes), "CUipcMemHandle grew");
    std::memcpy(ex.bytes.data(), &h, sizeof(h));
    ex.offset = reinterpret_cast<CUdeviceptr>(ptr) - base;
    ex.alloc_size = size;
    ex.device = device;
    return ex;
  }

  Result<void*> OpenIpc(const IpcExport& ex) override {
    MESHPOST_RETURN_IF_ERROR(UseDevice(ex.device, "OpenIpc"));
    CUipcMemHandle h;
    std::memcpy(&h, ex.bytes.data(), sizeof(h));
    CUdeviceptr p = 0;
    CUresult r = d_.cuIpcOpenMemHandle(&p, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
    if (r != CUDA_SUCCESS) return Error("cuIpcOpenMemHandle", r);
    return reinterpret_cast<void*>(p);
  }

  Status CloseIpc(void* base) override {
    MESHPOST_ASSIGN_OR_RETURN(int device, UseDeviceOf(base));
    (void)device;
    return Check("cuIpcCloseMemHandle",
                 d_.cuIpcCloseMemHandle(reinterpret_cast<CUdeviceptr>(base)));
  }

  Result<Dmabuf> DmabufFd(void* ptr, size_t n) override {
    MESHPOST_ASSIGN_OR_RETURN(int device, UseDeviceOf(ptr));
    (void)device;
    if (d_.cuMemGetHandleForAddressRange == nullptr) {
      return UnimplementedError(
          "DmabufFd: the loaded CUDA driver has no "
          "cuMemGetHandleForAddressRange (needs driver >= 515)");
    }
    // The driver exports whole host pages of the allocation.
    const uintptr_t page = 4096, a = reinterpret_cast<uintptr_t>(ptr);
    const uintptr_t begin = a & ~(page - 1), end = (a + n + page - 1) & ~(page - 1);
    int fd = -1;
    CUresult r = d_.cuMemGetHandleForAddressRange(&fd, begin, end - begin,
                                                  CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
    if (r != CUDA_SUCCESS) {
      return Error(
          "cuMemGetHandleForAddressRange(DMA_BUF_FD) (needs the open GPU kernel "
          "module or a dma-buf capable driver)",
          r);
    }
    return Dmabuf{fd, a - begin, end - begin};
  }

 private:
  Status Load() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* why = dlerror();
      return UnavailableError(std::string("CUDA driver not found: dlopen(libcuda.so.1) failed (") +
                              (why ? why : "unknown") +
                              "); GPU tensors need the NVIDIA driver on this machine");
    }
    bool missing = false;
    std::string missing_names;
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (fn == nullptr) {
        missing = true;
        missing_names += std::string(missing_names.empty() ? "" : ", ") + name;
      }
    };
    sym(d_.cuInit, "cuInit");
    sym(d_.cuGetErrorName, "cuGetErrorName");
    sym(d_.cuGetErrorString, "cuGetErrorString");
    sym(d_.cuDeviceGetCount, "cuDeviceGetCount");
    sym(d_.cuDeviceGet, "cuDeviceGet");
    sym(d_.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    sym(d_.cuCtxSetCurrent, "cuCtxSetCurrent");
    sym(d_.cuCtxGetCurrent, "cuCtxGetCurrent");
    sym(d_.cuCtxGetDevice, "cuCtxGetDevice");
    sym(d_.cuStreamCreate, "cuStreamCreate");
    sym(d_.cuStreamDestroy, "cuStreamDestroy_v2");
    sym(d_.cuStreamGetCtx, "cuStreamGetCtx");
    sym(d_.cuEventCreate, "cuEventCreate");
    sym(d_.cuEventDestroy, "cuEventDestroy_v2");
    sym(d_.cuEventRecord, "cuEventRecord");
    sym(d_.cuStreamWaitEvent, "cuStreamWaitEvent");
    sym(d_.cuEventQuery, "cuEventQuery");
    sym(d_.cuMemcpyAsync, "cuMemcpyAsync");
    sym(d_.cuMemHostAlloc, "cuMemHostAlloc");
    sym(d_.cuMemFreeHost, "cuMemFreeHost");
    sym(d_.cuMemAlloc, "cuMemAlloc_v2");
    sym(d_.cuMemFree, "cuMemFree_v2");
    sym(d_.cuMemHostRegister, "cuMemHostRegister_v2");
    sym(d_.cuMemHostUnregister, "cuMemHostUnregister");
    sym(d_.cuMemHostGetDevicePointer, "cuMemHostGetDevicePointer_v2");
    sym(d_.cuIpcGetMemHandle, "cuIpcGetMemHandle");
    sym(d_.cuIpcOpenMemHandle, "cuIpcOpenMemHandle_v2");
    sym(d_.cuIpcCloseMemHandle, "cuIpcCloseMemHandle");
    sym(d_.cuMemGetAddressRange, "cuMemGetAddressRange_v2");
    sym(d_.cuPointerGetAttribute, "cuPointerGetAttribute");
    sym(d_.cuModuleLoadData, "cuModuleLoadData");
    sym(d_.cuModuleGetFunction, "cuModuleGetFunction");
    sym(d_.cuLaunchKernel, "cuLaunchKernel");
    if (missing) {
      return UnavailableError("CUDA driver libcuda.so.1 is too old: missing " + missing_names);
    }
    d_.cuMemGetHandleForAddressRange = reinterpret_cast<decltype(d_.cuMemGetHandleForAddressRange)>(
        dlsym(lib, "cuMemGetHandleForAddressRange"));
    CUresult r = d_.cuInit(0);
    if (r != CUDA_SUCCESS) return Error("CUDA driver unusable: cuInit", r);
    r = d_.cuDeviceGetCount(&devices_);
    if (r != CUDA_SUCCESS) return Error("cuDeviceGetCount", r);
    if (devices_ <= 0) return UnavailableError("CUDA driver loaded but it reports no device");
    if (devices_ > kMaxDevices) devices_ = kMaxDevices;
    return OkStatus();
  }

  Status Error(const std::string& call, CUresult r) {
    const char* name = nullptr;
    const char* text = nullptr;
    if (d_.cuGetErrorName) d_.cuGetErrorName(r, &name);
    if (d_.cuGetErrorString) d_.cuGetErrorString(r, &text);
    std::string msg = call + " failed: " + (name ? name : std::to_string(static_cast<int>(r))) +
                      (text ? std::string(" (") + text + ")" : "");
    if (r == CUDA_ERROR_NO_DEVICE || r == CUDA_ERROR_STUB_LIBRARY ||
        r == CUDA_ERROR_SYSTEM_DRIVER_MISMATCH || r == CUDA_ERROR_NOT_INITIALIZED ||
        r == CUDA_ERROR_DEINITIALIZED) {
      return UnavailableError(msg);
    }
    if (r == CUDA_ERROR_OUT_OF_MEMORY) return ResourceExhaustedError(msg);
    if (r == CUDA_ERROR_INVALID_VALUE || r == CUDA_ERROR_INVALID_HANDLE) {
      return InvalidArgumentError(msg);
    }
    return InternalError(msg);
  }
  Status Check(const std::string& call, CUresult r) {
    return r == CUDA_SUCCESS ? OkStatus() : Error(call, r);
  }

  static CUstream Cu(DeviceStream s) { return reinterpret_cast<CUstream>(s); }

  // Makes the device's primary context current on the calling thread.
  Status UseDevice(int device, const char* fn) {
    MESHPOST_RETURN_IF_ERROR(Available());
    if (device < 0 || device >= devices_) {
      return InvalidArgumentError(std::string(fn) + ": device " + std::to_string(device) +
                                  " out of range [0, " + std::to_string(devices_) + ")");
    }
    CUcontext ctx = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ctx = contexts_[device];
      if (ctx == nullptr) {
        CUdevice dev;
        MESHPOST_RETURN_IF_ERROR(Check("cuDeviceGet", d_.cuDeviceGet(&dev, device)));
        MESHPOST_RETURN_IF_ERROR(
            Check("cuDevicePrimaryCtxRetain", d_.cuDevicePrimaryCtxRetain(&ctx, dev)));
        contexts_[device] = ctx;
      }
    }
    CUcontext current = nullptr;
    d_.cuCtxGetCurrent(&current);
    if (current != ctx) return Check("cuCtxSetCurrent", d_.cuCtxSetCurrent(ctx));
    return OkStatus();
  }

  // A stream carries its context; the legacy stream 0 uses the thread's current context,
  // or device 0's when the thread has none.
  Status UseStream(DeviceStream stream, const char* fn) {
    MESHPOST_RETURN_IF_ERROR(Available());
    if (stream == 0) {
      CUcontext current = nullptr;
      d_.cuCtxGetCurrent(&current);
      return current ? OkStatus() : UseDevice(0, fn);
    }
    CUcontext ctx = nullptr;
    CUresult r = d_.cuStreamGetCtx(Cu(stream), &ctx);
    if (r != CUDA_SUCCESS)
      return Error(std::string(fn) + ": cuStreamGetCtx (not a CUDA stream?)", r);
    return Check("cuCtxSetCurrent", d_.cuCtxSetCurrent(ctx));
  }

  Result<int> UseDeviceOf(const void* ptr) {
    MESHPOST_ASSIGN_OR_RETURN(Device dev, PointerDevice(ptr));
    if (dev.type != DeviceType::kCUDA) {
      return InvalidArgumentError("pointer " + std::to_string(reinterpret_cast<uintptr_t>(ptr)) +
                                  " is not CUDA device memory");
    }
    MESHPOST_RETURN_IF_ERROR(UseDevice(dev.index, "UseDeviceOf"));
    return dev.index;
  }

  // The kernel `name` in the current context's copy of the embedded fatbin.
  Result<CUfunction> Function(const char* name) {
    CUcontext ctx = nullptr;
    d_.cuCtxGetCurrent(&ctx);
    std::lock_guard<std::mutex> lock(mu_);
    auto key = std::make_pair(ctx, std::string(name));
    auto it = functions_.find(key);
    if (it != functions_.end()) return it->second;
    CUmodule& module = modules_[ctx];
    if (module == nullptr) {
      CUresult r = d_.cuModuleLoadData(&module, meshpost_cuda_fatbin);
      if (r != CUDA_SUCCESS) {
        module = nullptr;
        return Error("cuModuleLoadData(meshpost kernels; built for sm_80/89/90 + PTX)", r);
      }
    }
    CUfunction f = nullptr;
    CUresult r = d_.cuModuleGetFunction(&f, module, name);
    if (r != CUDA_SUCCESS) return Error(std::string("cuModuleGetFunction(") + name + ")", r);
    functions_[key] = f;
    return f;
  }

  Status Launch(const char* kernel, DeviceStream stream, int64_t* flag, const int64_t* value_addr,
                int64_t value) {
    if (flag == nullptr) return InvalidArgumentError(std::string(kernel) + ": null flag address");
    MESHPOST_RETURN_IF_ERROR(UseStream(stream, kernel));
    MESHPOST_ASSIGN_OR_RETURN(CUfunction f, Function(kernel));
    long long* flag_arg = reinterpret_cast<long long*>(flag);
    const long long* value_addr_arg = reinterpret_cast<const long long*>(value_addr);
    long long value_arg = value;
    void* args[] = {&flag_arg, &value_addr_arg, &value_arg};
    return Check(std::string("cuLaunchKernel(") + kernel + ")",
                 d_.cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, Cu(stream), args, nullptr));
  }

  std::once_flag load_once_;
  Status load_status_;
  Driver d_;
  int devices_ = 0;
  std::mutex mu_;
  CUcontext contexts_[kMaxDevices] = {};
  std::map<CUcontext, CUmodule> modules_;
  std::map<std::pair<CUcontext, std::string>, CUfunction> functions_;
};

}  // namespace

DeviceBackend* CudaBackend() {
  // Never destroyed: the driver may already be torn down at static destruction time.
  static auto* backend = new CudaDriverBackend();
  return backend;
}

bool BuiltWithCuda() { return true; }

}  // namespace meshpost
