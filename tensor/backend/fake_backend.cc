#include "tensor/backend/fake_backend.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

namespace meshpost {

namespace {
// Vector clock over agents: stream ids, and kHost for all host threads together.
using Clock = std::map<int, uint64_t>;
constexpr int kHost = -1;
void Merge(Clock& into, const Clock& from) {
  for (auto& [agent, t] : from) {
    uint64_t& mine = into[agent];
    if (mine < t) mine = t;
  }
}
uint64_t At(const Clock& c, int agent) {
  auto it = c.find(agent);
  return it == c.end() ? 0 : it->second;
}
}  // namespace

struct DeviceEventImpl {
  int device = 0;
  uint64_t recorded = 0;   // generation of the latest RecordEvent
  uint64_t completed = 0;  // highest generation whose record op ran
  Clock clock;             // the recording stream's clock when the latest record ran
};

namespace {

// A stream blocked longer than this on an event or flag is reported as a hazard and let
// go, so a test with a lost signal fails instead of hanging.
constexpr auto kStuckLimit = std::chrono::seconds(60);
constexpr char kIpcMagic[8] = {'M', 'P', 'F', 'A', 'K', 'I', 'P', 'C'};

struct Range {
  uintptr_t begin = 0;
  uintptr_t end = 0;
  bool Overlaps(const Range& o) const { return begin < o.end && o.begin < end; }
};

enum class OpKind { kCopy, kRecord, kWaitEvent, kWriteFlag, kWaitFlag, kIncrement };

struct Op {
  OpKind kind = OpKind::kCopy;
  uint64_t seq = 0;
  int stream = 0;
  void* dst = nullptr;
  const void* src = nullptr;
  size_t n = 0;
  DeviceEventImpl* event = nullptr;
  uint64_t generation = 0;
  int64_t* flag = nullptr;
  int64_t value = 0;
  const int64_t* value_addr = nullptr;
  Clock submit_clock;  // the host's clock at submission: host work before it happens-before
  int64_t Target() const {
    return value_addr ? __atomic_load_n(value_addr, __ATOMIC_ACQUIRE) : value;
  }
  Range reads() const {
    return {reinterpret_cast<uintptr_t>(src), reinterpret_cast<uintptr_t>(src) + n};
  }
  Range writes() const {
    return {reinterpret_cast<uintptr_t>(dst), reinterpret_cast<uintptr_t>(dst) + n};
  }
};

// One access to a byte range by an agent at its own epoch, with the agent's clock then.
struct Access {
  Range range;
  int agent = 0;
  uint64_t epoch = 0;
  bool write = false;
  std::string what;
};
constexpr size_t kMaxAccessRecords = 8192;

struct Allocation {
  size_t size = 0;
  int device = 0;
  int fd = -1;          // memfd (owned unless `mapped`)
  bool mapped = false;  // an OpenIpc view of another allocation
};

std::string Hex(uintptr_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}

}  // namespace

class FakeBackend::Impl {
 public:
  struct Stream {
    int id = 0;
    int device = 0;
    std::deque<std::shared_ptr<Op>> queue;
    bool held = false;
    bool running = false;  // an op was popped and is executing
    bool blocked = false;  // the executing op waits on an event or flag
    bool stop = false;
    int64_t delay_us = 0;
    Clock clock;
    std::thread thread;
  };

  explicit Impl(int devices) : devices_(devices) {
    std::lock_guard<std::mutex> lock(mu_);
    StartStreamLocked(0);  // stream 0: the default stream of device 0
  }

  ~Impl() {
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [id, s] : streams_) {
        s->stop = true;
        s->held = false;
        threads.push_back(std::move(s->thread));
      }
      cv_.notify_all();
    }
    for (auto& t : threads) t.join();
    for (auto& [base, a] : allocations_) {
      munmap(reinterpret_cast<void*>(base), a.size);
      if (!a.mapped && a.fd >= 0) close(a.fd);
    }
    for (auto& [base, size] : pinned_) free(reinterpret_cast<void*>(base));
  }

  Status CheckAvailable() {
    std::lock_guard<std::mutex> lock(mu_);
    return unavailable_;
  }

  Result<DeviceStream> CreateStream(int device) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!unavailable_.ok()) return unavailable_;
    if (device < 0 || device >= devices_) return BadDevice("CreateStream", device);
    return StartStreamLocked(device);
  }

  // Requires mu_.
  DeviceStream StartStreamLocked(int device) {
    const int id = next_stream_++;
    auto s = std::make_unique<Stream>();
    s->id = id;
    s->device = device;
    Stream* raw = s.get();
    streams_.emplace(id, std::move(s));
    raw->thread = std::thread([this, raw] { Run(raw); });
    return static_cast<DeviceStream>(id);
  }

  void DestroyStream(DeviceStream stream) {
    std::thread t;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = streams_.find(static_cast<int>(stream));
      if (it == streams_.end() || stream == 0) return;
      it->second->stop = true;
      it->second->held = false;
      t = std::move(it->second->thread);
      cv_.notify_all();
    }
    // The worker drains its queue (like cudaStreamDestroy: queued work still runs).
    t.join();
    std::lock_guard<std::mutex> lock(mu_);
    streams_.erase(static_cast<int>(stream));
  }

  Status Enqueue(std::shared_ptr<Op> op, DeviceStream stream, const char* fn) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!unavailable_.ok()) return unavailable_;
    Stream* s = FindLocked(stream);
    if (s == nullptr) {
      return InvalidArgumentError(std::string("FakeBackend::") + fn + ": stream " +
                                  std::to_string(stream) + " does not exist");
    }
    if (s->stop) {
      return FailedPreconditionError(std::string("FakeBackend::") + fn + ": stream " +
                                     std::to_string(stream) + " is being destroyed");
    }
    op->seq = ++next_seq_;
    op->stream = s->id;
    if (op->kind == OpKind::kRecord) op->generation = ++op->event->recorded;
    if (op->kind == OpKind::kWaitEvent) op->generation = op->event->recorded;
    if (op->kind == OpKind::kCopy) inflight_.emplace(op->seq, op);
    op->submit_clock = host_clock_;
    ++host_clock_[kHost];
    s->queue.push_back(std::move(op));
    cv_.notify_all();
    return OkStatus();
  }

  // Requires mu_.
  Stream* FindLocked(DeviceStream stream) {
    auto it = streams_.find(static_cast<int>(stream));
    return it == streams_.end() ? nullptr : it->second.get();
  }

  void Run(Stream* s) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock,
               [s] { return (!s->held && !s->queue.empty()) || (s->stop && s->queue.empty()); });
      if (s->queue.empty()) return;  // stopping
      std::shared_ptr<Op> op = s->queue.front();
      s->queue.pop_front();
      s->running = true;
      const int64_t delay = s->delay_us;
      if (delay > 0) {
        lock.unlock();
        std::this_thread::sleep_for(std::chrono::microseconds(delay));
        lock.lock();
      }
      Execute(s, *op, lock);
      if (op->kind == OpKind::kCopy) inflight_.erase(op->seq);
      s->running = false;
      s->blocked = false;
      cv_.notify_all();
    }
  }

  // Requires mu_ (held by `lock`); may release it while copying or waiting.
  void Execute(Stream* s, Op& op, std::unique_lock<std::mutex>& lock) {
    Merge(s->clock, op.submit_clock);
    ++s->clock[s->id];
    switch (op.kind) {
      case OpKind::kCopy: {
        const std::string what =
            "copy #" + std::to_string(op.seq) + " on stream " + std::to_string(s->id);
        CheckAccessLocked(op.reads(), false, s->id, s->clock, what);
        CheckAccessLocked(op.writes(), true, s->id, s->clock, what);
        ++copies_;
        const int64_t cost_ns = static_cast<int64_t>(op.n) * copy_ps_per_byte_ / 1000;
        lock.unlock();
        std::memmove(op.dst, op.src, op.n);
        // Models a copy engine's bandwidth: the copy takes time proportional to its bytes.
        if (cost_ns > 0) std::this_thread::sleep_for(std::chrono::nanoseconds(cost_ns));
        lock.lock();
        break;
      }
      case OpKind::kRecord:
        if (op.event->completed < op.generation) op.event->completed = op.generation;
        op.event->clock = s->clock;
        break;
      case OpKind::kWaitEvent: {
        s->blocked = true;
        cv_.notify_all();
        DeviceEventImpl* e = op.event;
        const uint64_t gen = op.generation;
        if (!cv_.wait_for(lock, kStuckLimit,
                          [e, gen, s] { return e->completed >= gen || s->stop; })) {
          hazards_.push_back("stream " + std::to_string(s->id) +
                             " waited too long for an event that was never completed");
        }
        Merge(s->clock, e->clock);
        break;
      }
      case OpKind::kWriteFlag:
        Merge(flag_clocks_[op.flag], s->clock);
        __atomic_store_n(op.flag, op.Target(), __ATOMIC_RELEASE);
        break;
      case OpKind::kIncrement: __atomic_fetch_add(op.flag, 1, __ATOMIC_ACQ_REL); break;
      case OpKind::kWaitFlag: {
        s->blocked = true;
        cv_.notify_all();
        const auto give_up = std::chrono::steady_clock::now() + kStuckLimit;
        // Host code may write the flag too, without notifying: poll in short slices.
        while (__atomic_load_n(op.flag, __ATOMIC_ACQUIRE) < op.Target() && !s->stop) {
          if (std::chrono::steady_clock::now() > give_up) {
            hazards_.push_back("stream " + std::to_string(s->id) + " waited too long for flag " +
                               Hex(reinterpret_cast<uintptr_t>(op.flag)) + " to reach " +
                               std::to_string(op.Target()));
            break;
          }
          cv_.wait_for(lock, std::chrono::milliseconds(1));
        }
        Merge(s->clock, flag_clocks_[op.flag]);
        break;
      }
    }
  }

  // Requires mu_. Dynamic race detection over vector clocks (as in FastTrack): an access
  // conflicts with an earlier access to overlapping bytes by another agent, where at least
  // one writes, unless the earlier one happens-before this one (through submission order,
  // events, flags, or a host sync on an event). A conflict is a hazard: on a GPU the
  // outcome would depend on timing.
  void CheckAccessLocked(const Range& r, bool write, int agent, const Clock& clock,
                         const std::string& what) {
    if (r.begin == r.end) return;
    for (const Access& a : accesses_) {
      if (a.agent == agent || !(a.write || write) || !a.range.Overlaps(r)) continue;
      if (a.epoch <= At(clock, a.agent)) continue;  // ordered
      hazards_.push_back(what + (write ? " writes " : " reads ") + Hex(r.begin) + " (+" +
                         std::to_string(r.end - r.begin) + " bytes) unordered with " + a.what +
                         (a.write ? " that wrote it" : " that read it"));
    }
    // A write ordered after every earlier access to the bytes it covers makes them moot.
    if (write) {
      accesses_.erase(std::remove_if(accesses_.begin(), accesses_.end(),
                                     [&](const Access& a) {
                                       return a.range.begin >= r.begin && a.range.end <= r.end &&
                                              (a.agent == agent || a.epoch <= At(clock, a.agent));
                                     }),
                      accesses_.end());
    }
    accesses_.push_back(Access{r, agent, At(clock, agent), write, what});
    if (accesses_.size() > kMaxAccessRecords) accesses_.pop_front();
  }

  void HostAccess(const void* ptr, size_t n, bool write) {
    const Range h{reinterpret_cast<uintptr_t>(ptr), reinterpret_cast<uintptr_t>(ptr) + n};
    std::lock_guard<std::mutex> lock(mu_);
    ++host_clock_[kHost];
    CheckAccessLocked(h, write, kHost, host_clock_,
                      std::string("host ") + (write ? "write" : "read"));
  }

  // Requires mu_. The host observed the event complete: what it captured happens-before
  // the host's later actions.
  void HostSyncedLocked(const DeviceEventImpl* e) { Merge(host_clock_, e->clock); }

  Result<DeviceEvent> CreateEvent(int device) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!unavailable_.ok()) return unavailable_;
    if (device < 0 || device >= devices_) return BadDevice("CreateEvent", device);
    auto e = std::make_unique<DeviceEventImpl>();
    e->device = device;
    DeviceEvent raw = e.get();
    events_.emplace(raw, std::move(e));
    return raw;
  }

  void DestroyEvent(DeviceEvent event) {
    // Like cudaEventDestroy, queued ops that refer to the event still work: the object
    // lives until the backend goes away; only new uses are refused.
    std::lock_guard<std::mutex> lock(mu_);
    auto it = events_.find(event);
    if (it != events_.end()) {
      destroyed_.push_back(std::move(it->second));
      events_.erase(it);
    }
  }

  Result<bool> EventDone(DeviceEvent event) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!events_.count(event)) {
      return InvalidArgumentError("FakeBackend::EventDone: unknown event");
    }
    const bool done = event->completed >= event->recorded;
    if (done) HostSyncedLocked(event);
    return done;
  }

  bool Known(DeviceEvent event) {
    std::lock_guard<std::mutex> lock(mu_);
    return events_.count(event) != 0;
  }

  Result<void*> AllocDevice(int device, size_t n) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!unavailable_.ok()) return unavailable_;
      if (device < 0 || device >= devices_) return BadDevice("AllocDevice", device);
    }
    if (n == 0) n = 1;
    const int fd = memfd_create("meshpost-fake-device", MFD_CLOEXEC);
    if (fd < 0) return ResourceExhaustedError("FakeBackend::AllocDevice: memfd_create failed");
    if (ftruncate(fd, static_cast<off_t>(n)) != 0) {
      close(fd);
      return ResourceExhaustedError("FakeBackend::AllocDevice: ftruncate(" + std::to_string(n) +
                                    ") failed");
    }
    void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      close(fd);
      return ResourceExhaustedError("FakeBackend::AllocDevice: mmap failed");
    }
    std::lock_guard<std::mutex> lock(mu_);
    allocations_[reinterpret_cast<uintptr_t>(p)] = Allocation{n, device, fd, false};
    return p;
  }

  void FreeDevice(void* ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = allocations_.find(reinterpret_cast<uintptr_t>(ptr));
    if (it == allocations_.end() || it->second.mapped) return;
    munmap(ptr, it->second.size);
    close(it->second.fd);
    allocations_.erase(it);
  }

  // Requires mu_. The allocation containing p, or end().
  std::map<uintptr_t, Allocation>::iterator AllocationOfLocked(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = allocations_.upper_bound(a);
    if (it == allocations_.begin()) return allocations_.end();
    --it;
    return a < it->first + it->second.size ? it : allocations_.end();
  }

  Result<Device> PointerDevice(const void* ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = AllocationOfLocked(ptr);
    if (it == allocations_.end()) return Device{};
    return Device{DeviceType::kCUDA, it->second.device};
  }

  Result<void*> AllocPinned(size_t n) {
    void* p = aligned_alloc(4096, ((n ? n : 1) + 4095) / 4096 * 4096);
    if (p == nullptr) return ResourceExhaustedError("FakeBackend::AllocPinned: out of memory");
    std::lock_guard<std::mutex> lock(mu_);
    pinned_[reinterpret_cast<uintptr_t>(p)] = n;
    return p;
  }

  void FreePinned(void* ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    if (pinned_.erase(reinterpret_cast<uintptr_t>(ptr))) free(ptr);
  }

  Status RegisterHost(void* ptr, size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!registered_.emplace(reinterpret_cast<uintptr_t>(ptr), n).second) {
      return FailedPreconditionError(
          "FakeBackend::RegisterHost: " + Hex(reinterpret_cast<uintptr_t>(ptr)) +
          " is already registered");
    }
    return OkStatus();
  }

  Status UnregisterHost(void* ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!registered_.erase(reinterpret_cast<uintptr_t>(ptr))) {
      return NotFoundError("FakeBackend::UnregisterHost: " + Hex(reinterpret_cast<uintptr_t>(ptr)) +
                           " is not registered");
    }
    return OkStatus();
  }

  Result<void*> HostDevicePointer(void* host_ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    const uintptr_t a = reinterpret_cast<uintptr_t>(host_ptr);
    for (auto* table : {&pinned_, &registered_}) {
      auto it = table->upper_bound(a);
      if (it != table->begin() && a < std::prev(it)->first + std::prev(it)->second) {
        return host_ptr;  // unified addressing: the same address on the device
      }
    }
    return InvalidArgumentError("HostDevicePointer: " + Hex(a) +
                                " is not pinned or registered host memory");
  }

  Result<IpcExport> ExportIpc(void* ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!unavailable_.ok()) return unavailable_;
    auto it = AllocationOfLocked(ptr);
    if (it == allocations_.end()) {
      return InvalidArgumentError("ExportIpc: " + Hex(reinterpret_cast<uintptr_t>(ptr)) +
                                  " is not device memory");
    }
    IpcExport ex;
    const int32_t pid = getpid(), fd = it->second.fd;
    const uint64_t size = it->second.size;
    std::memcpy(ex.bytes.data(), kIpcMagic, 8);
    std::memcpy(ex.bytes.data() + 8, &pid, 4);
    std::memcpy(ex.bytes.data() + 12, &fd, 4);
    std::memcpy(ex.bytes.data() + 16, &size, 8);
    ex.offset = reinterpret_cast<uintptr_t>(ptr) - it->first;
    ex.alloc_size = size;
    ex.device = it->second.device;
    return ex;
  }

  Result<void*> OpenIpc(const IpcExport& ex) {
    if (std::memcmp(ex.bytes.data(), kIpcMagic, 8) != 0) {
      return InvalidArgumentError("OpenIpc: not a handle exported by the fake backend");
    }
    int32_t pid, fd;
    uint64_t size;
    std::memcpy(&pid, ex.bytes.data() + 8, 4);
    std::memcpy(&fd, ex.bytes.data() + 12, 4);
    std::memcpy(&size, ex.bytes.data() + 16, 8);
    // The exporter's memfd, reached through procfs: what a CUDA IPC handle is to the driver.
    const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
    const int local = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (local < 0) {
      return UnavailableError("OpenIpc: cannot open " + path + ": " + std::strerror(errno) +
                              " (exporter gone?)");
    }
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, local, 0);
    close(local);
    if (p == MAP_FAILED) return UnavailableError("OpenIpc: mmap of " + path + " failed");
    std::lock_guard<std::mutex> lock(mu_);
    allocations_[reinterpret_cast<uintptr_t>(p)] = Allocation{size, ex.device, -1, true};
    return p;
  }

  Status CloseIpc(void* base) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = allocations_.find(reinterpret_cast<uintptr_t>(base));
    if (it == allocations_.end() || !it->second.mapped) {
      return InvalidArgumentError("CloseIpc: " + Hex(reinterpret_cast<uintptr_t>(base)) +
                                  " was not returned by OpenIpc");
    }
    munmap(base, it->second.size);
    allocations_.erase(it);
    return OkStatus();
  }

  Result<DeviceBackend::Dmabuf> DmabufFd(void* ptr, size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = AllocationOfLocked(ptr);
    if (it == allocations_.end() ||
        reinterpret_cast<uintptr_t>(ptr) + n > it->first + it->second.size) {
      return InvalidArgumentError("DmabufFd: [" + Hex(reinterpret_cast<uintptr_t>(ptr)) + ", +" +
                                  std::to_string(n) + ") is not inside one device allocation");
    }
    const int fd = it->second.mapped ? -1 : dup(it->second.fd);
    if (fd < 0) return UnimplementedError("DmabufFd: no dma-buf for an imported mapping");
    return DeviceBackend::Dmabuf{fd, reinterpret_cast<uintptr_t>(ptr) - it->first, n};
  }

  bool WaitIdle(int64_t timeout_ms) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [this] {
      for (auto& [id, s] : streams_) {
        const bool idle = s->held || s->blocked || (!s->running && s->queue.empty());
        if (!idle) return false;
      }
      return true;
    });
  }

  void SetHeld(DeviceStream stream, bool held) {
    std::lock_guard<std::mutex> lock(mu_);
    if (Stream* s = FindLocked(stream)) s->held = held;
    cv_.notify_all();
  }

  void SetCopyCost(int64_t ps_per_byte) {
    std::lock_guard<std::mutex> lock(mu_);
    copy_ps_per_byte_ = ps_per_byte;
  }

  void SetDelay(DeviceStream stream, int64_t us) {
    std::lock_guard<std::mutex> lock(mu_);
    if (Stream* s = FindLocked(stream)) s->delay_us = us;
  }

  Status BadDevice(const char* fn, int device) {
    return InvalidArgumentError(std::string("FakeBackend::") + fn + ": device " +
                                std::to_string(device) + " out of range [0, " +
                                std::to_string(devices_) + ")");
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  const int devices_;
  int64_t copy_ps_per_byte_ = 0;  // SetCopyCost
  Status unavailable_;
  int next_stream_ = 0;
  uint64_t next_seq_ = 0;
  uint64_t copies_ = 0;
  std::map<int, std::unique_ptr<Stream>> streams_;
  std::map<uint64_t, std::shared_ptr<Op>> inflight_;  // copies submitted, not finished
  Clock host_clock_;
  std::deque<Access> accesses_;
  std::map<const int64_t*, Clock> flag_clocks_;
  std::map<DeviceEvent, std::unique_ptr<DeviceEventImpl>> events_;
  std::map<uintptr_t, Allocation> allocations_;
  std::map<uintptr_t, size_t> pinned_;
  std::map<uintptr_t, size_t> registered_;
  std::vector<std::unique_ptr<DeviceEventImpl>> destroyed_;
  std::vector<std::string> hazards_;
};

FakeBackend::FakeBackend(int devices) : impl_(std::make_unique<Impl>(devices)) {}
FakeBackend::~FakeBackend() = default;

void FakeBackend::HoldStream(DeviceStream stream) { impl_->SetHeld(stream, true); }
void FakeBackend::ReleaseStream(DeviceStream stream) { impl_->SetHeld(stream, false); }
void FakeBackend::SetDelayUs(DeviceStream stream, int64_t us) { impl_->SetDelay(stream, us); }
void FakeBackend::SetCopyCost(int64_t ps_per_byte) { impl_->SetCopyCost(ps_per_byte); }
bool FakeBackend::WaitIdle(int64_t timeout_ms) { return impl_->WaitIdle(timeout_ms); }
std::vector<std::string> FakeBackend::Hazards() const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->hazards_;
}
void FakeBackend::ClearHazards() {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->hazards_.clear();
}
void FakeBackend::SetUnavailable(Status why) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->unavailable_ = std::move(why);
}
uint64_t FakeBackend::copies_executed() const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->copies_;
}

Status FakeBackend::Available() { return impl_->CheckAvailable(); }
int FakeBackend::device_count() { return impl_->CheckAvailable().ok() ? impl_->devices_ : 0; }
Result<Device> FakeBackend::PointerDevice(const void* ptr) { return impl_->PointerDevice(ptr); }
Result<DeviceStream> FakeBackend::CreateStream(int device) { return impl_->CreateStream(device); }
void FakeBackend::DestroyStream(DeviceStream stream) { impl_->DestroyStream(stream); }
Result<DeviceEvent> FakeBackend::CreateEvent(int device) { return impl_->CreateEvent(device); }
void FakeBackend::DestroyEvent(DeviceEvent event) { impl_->DestroyEvent(event); }

Status FakeBackend::RecordEvent(DeviceEvent event, DeviceStream stream) {
  if (!impl_->Known(event)) return InvalidArgumentError("RecordEvent: unknown event");
  auto op = std::make_shared<Op>();
  op->kind = OpKind::kRecord;
  op->event = event;
  return impl_->Enqueue(std::move(op), stream, "RecordEvent");
}

Status FakeBackend::StreamWaitEvent(DeviceStream stream, DeviceEvent event) {
  if (!impl_->Known(event)) return InvalidArgumentError("StreamWaitEvent: unknown event");
  auto op = std::make_shared<Op>();
  op->kind = OpKind::kWaitEvent;
  op->event = event;
  return impl_->Enqueue(std::move(op), stream, "StreamWaitEvent");
}

Result<bool> FakeBackend::EventDone(DeviceEvent event) { return impl_->EventDone(event); }

Status FakeBackend::CopyAsync(void* dst, const void* src, size_t n, DeviceStream stream) {
  if (n == 0) return OkStatus();
  if (dst == nullptr || src == nullptr) {
    return InvalidArgumentError("CopyAsync: null " + std::string(dst ? "src" : "dst") + " for " +
                                std::to_string(n) + " bytes");
  }
  auto op = std::make_shared<Op>();
  op->kind = OpKind::kCopy;
  op->dst = dst;
  op->src = src;
  op->n = n;
  return impl_->Enqueue(std::move(op), stream, "CopyAsync");
}

Status FakeBackend::WriteFlagAsync(int64_t* flag, int64_t value, const int64_t* value_addr,
                                   DeviceStream stream) {
  if (flag == nullptr) return InvalidArgumentError("WriteFlagAsync: null flag address");
  auto op = std::make_shared<Op>();
  op->kind = OpKind::kWriteFlag;
  op->flag = flag;
  op->value = value;
  op->value_addr = value_addr;
  return impl_->Enqueue(std::move(op), stream, "WriteFlagAsync");
}

Status FakeBackend::WaitFlagAsync(const int64_t* flag, int64_t value, const int64_t* value_addr,
                                  DeviceStream stream) {
  if (flag == nullptr) return InvalidArgumentError("WaitFlagAsync: null flag address");
  auto op = std::make_shared<Op>();
  op->kind = OpKind::kWaitFlag;
  op->flag = const_cast<int64_t*>(flag);
  op->value = value;
  op->value_addr = value_addr;
  return impl_->Enqueue(std::move(op), stream, "WaitFlagAsync");
}

Status FakeBackend::IncrementAsync(int64_t* counter, DeviceStream stream) {
  if (counter == nullptr) return InvalidArgumentError("IncrementAsync: null counter address");
  auto op = std::make_shared<Op>();
  op->kind = OpKind::kIncrement;
  op->flag = counter;
  return impl_->Enqueue(std::move(op), stream, "IncrementAsync");
}

Result<void*> FakeBackend::AllocPinned(size_t n) { return impl_->AllocPinned(n); }
void FakeBackend::FreePinned(void* ptr) { impl_->FreePinned(ptr); }
Result<void*> FakeBackend::AllocDevice(int device, size_t n) {
  return impl_->AllocDevice(device, n);
}
void FakeBackend::FreeDevice(void* ptr) { impl_->FreeDevice(ptr); }
Status FakeBackend::RegisterHost(void* ptr, size_t n) { return impl_->RegisterHost(ptr, n); }
Status FakeBackend::UnregisterHost(void* ptr) { return impl_->UnregisterHost(ptr); }
Result<void*> FakeBackend::HostDevicePointer(void* p) { return impl_->HostDevicePointer(p); }
Result<IpcExport> FakeBackend::ExportIpc(void* ptr) { return impl_->ExportIpc(ptr); }
Result<void*> FakeBackend::OpenIpc(const IpcExport& ex) { return impl_->OpenIpc(ex); }
Status FakeBackend::CloseIpc(void* base) { return impl_->CloseIpc(base); }
Result<DeviceBackend::Dmabuf> FakeBackend::DmabufFd(void* ptr, size_t n) {
  return impl_->DmabufFd(ptr, n);
}
void FakeBackend::HostWriteFlag(int64_t* flag, int64_t value) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    Merge(impl_->flag_clocks_[flag], impl_->host_clock_);
    ++impl_->host_clock_[kHost];
  }
  __atomic_store_n(flag, value, __ATOMIC_RELEASE);
  impl_->cv_.notify_all();
}

void FakeBackend::HostAccess(const void* ptr, size_t n, bool write) {
  impl_->HostAccess(ptr, n, write);
}

}  // namespace meshpost
