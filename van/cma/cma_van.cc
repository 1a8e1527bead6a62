// Same-host van (see cma_van.h for the contract).
//
// Design (docs/performance.md explains the measurements behind it):
// - Doorbell: one SOCK_SEQPACKET unix socket per (sender, receiver) pair in the abstract
//   namespace. Seqpacket keeps frame boundaries, reports peer death as EOF and can carry
//   memfds (SCM_RIGHTS) for the fallback, so it needs no extra rendezvous.
// - Frame ring (frame_ring.h): after the handshake the connector passes a ring in shared
//   memory, and its frames travel there: a memcpy and a store, seen by a polling receiver
//   without a system call (a socket message costs each side ~5 us here). Frames carrying a
//   descriptor, or too large, still go on the socket, and a marker in the ring keeps their
//   place. A receiver about to sleep arms the ring; the next frame then also sends a kWake
//   on the socket, so the epoll sets below wake it exactly as a socket frame would.
// - Payload: the receiver *pulls*. A data frame names, per segment, the sender's address
//   (CMA), a range of a shared staging buffer (fallback) or bytes inline in the frame
//   (small segments). The receive thread asks its VanReceiver for the destination and
//   copies once, so it only ever writes into memory it chose itself. No address exchange
//   is needed and a hostile sender can at worst make us read its own memory.
// - The sender keeps segment owners until the receiver acknowledges the copy (an ack frame
//   on the same socket); acks are cumulative and processed by the sender's receive thread.
// - Shared blocks (tensor/shared_memory.h): a segment (or a request's pull slot) that lies
//   in a memfd block this process allocated travels as (block, offset): the block's fd is
//   passed once per connection (kBlock), the receiver maps it once and reads (or views)
//   the bytes in place; a freed block is announced (kBlockGone) with the next send. A
//   response written into a peer's mapped block names the peer's own (block, offset), so
//   nothing moves but the completion. The receiver maps only what was passed to it and
//   checks every (block, offset, len) against the mapping (docs/security.md).
// - View reports: a receiver that hands out a view of a peer's block (no copy) counts it,
//   and the count's changes (+1 per view made, -1 per view dropped) ride on its next data
//   frame to that peer. The owner keeps, per block and connection, how many views that peer
//   holds (SharedBlock::peer_views), so a block it rewrites (ps/push_staging.h, copies of
//   ordinary pushes) is only one no peer still reads. A peer can only report on blocks
//   passed to it, and never below zero.
// - CUDA memory (cma_device.h, docs/gpu.md): device ranges the owner registered travel the
//   same way, named by the CUDA IPC handle of their allocation (kDevBlock, once per
//   connection); the receiver opens it once and copies on a stream of its own (device to
//   device into a CUDA pull slot, device to host elsewhere) before it acks, or hands a
//   request's CUDA pull slots out as device views, so a server that computes into one
//   sends only the completion. Between two nodes of one process the raw device address
//   travels instead (a process cannot open its own IPC handle).
// - Two epoll sets: the data set (inbound connections, the ack side of outbound
//   connections, a kick eventfd) and the main set (listen socket, wake eventfd, and the
//   data set itself). The receive thread waits on the main set; it spins with
//   epoll_wait(0) for WaitPolicy::spin_ns after the last event, then blocks, so an idle
//   van costs no CPU.
// - Caller-driven progress (common/progress.h): a caller's thread about to block for a
//   message (Wait, GetBatch) takes the data set out of the main set and waits on it
//   itself, so the message wakes that thread directly, not the receive thread first
//   (one wake-up per side of a round trip instead of two). Whoever dispatches holds
//   rx_mu_, so the receive-side state stays single-threaded; the kick eventfd wakes the
//   caller when what it waits for arrives through another van.
#include "van/cma/cma_van.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/auth.h"
#include "common/log_rate.h"
#include "common/logging.h"
#include "common/net.h"
#include "common/wire.h"
#include "tensor/device_backend.h"
#include "tensor/shared_memory.h"
#include "van/cma/cma_device.h"
#include "van/cma/frame_ring.h"
#include "van/codec.h"
#include "van/delivery.h"

namespace meshpost {
namespace {

constexpr const char* kLog = "van";

// --- RAII wrappers -------------------------------------------------------------------

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.Release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = o.Release();
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int Release() {
    int f = fd_;
    fd_ = -1;
    return f;
  }
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

class Mapping {
 public:
  Mapping() = default;
  Mapping(void* p, size_t n) : p_(p), n_(n) {}
  ~Mapping() {
    if (p_ != nullptr) ::munmap(p_, n_);
  }
  Mapping(Mapping&& o) noexcept : p_(o.p_), n_(o.n_) {
    o.p_ = nullptr;
    o.n_ = 0;
  }
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      if (p_ != nullptr) ::munmap(p_, n_);
      p_ = o.p_;
      n_ = o.n_;
      o.p_ = nullptr;
      o.n_ = 0;
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  char* data() const { return static_cast<char*>(p_); }
  size_t size() const { return n_; }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

std::string ErrnoText(const char* what, int err) {
  return std::string(what) + ": " + std::strerror(err);
}

// --- Doorbell wire format ------------------------------------------------------------
// Every frame: magic u32, version u16, type u8, flags u8, then per type:
//   kHello    : pid u32, probe_addr u64, probe_len u32, cookie[16], want_cma u8
//   kHelloAck : cma_ok u8
//   kStaging  : id u32, size u64          (+ one memfd via SCM_RIGHTS)
//   kData     : seq u64, nseg u32, Source(meta), nseg x Source, inline bytes to the end
//   kAck      : seq u64                   (cumulative: releases every send <= seq)
//   kProof    : an auth frame (common/auth.h) proving the connector knows the token
//   kBlock    : id u32, size u64          (+ the shared block's memfd via SCM_RIGHTS)
//   kBlockGone: id u32                    (the sender freed that block)
//   kDevBlock : id u32, device i32, alloc_size u64, handle[64]   (a CUDA IPC handle)
//   kDevGone  : id u32                    (that allocation is no longer the sender's)
//   kRing     : (empty)                   (+ the connector's frame ring memfd, SCM_RIGHTS)
//   kWake     : (empty)                   (the ring has frames and the receiver armed it)
// Frame ring (frame_ring.h): after kRing, every frame the connector sends travels through
// the ring in shared memory, except those that carry a descriptor or are too large for it:
// those go on the socket and a marker record in the ring keeps their place in the order.
// The socket then carries only such frames, kWake doorbells (when the receiver said it
// sleeps) and EOF; acks still come back on it.
// Source: kind u8, staging_id u32, offset_or_addr u64, len u64. For kShared the id is the
// sender's block (passed in a kBlock), for kPeerShared the receiver's own block (which the
// receiver passed to the sender); the offset is within that block. kDevice / kPeerDevice
// are the same for device allocations (kDevBlock); kDeviceLocal carries a raw device
// address and is accepted only on a connection from this very process.
// kData with kFlagSlots: after the sources, nslots u32 and nslots Sources naming, per pull
// slot of the request, the sender's block range (kShared, kDevice, kDeviceLocal) or
// nothing (kInline, len 0).
// kData with kFlagViews: after the slot table, nviews u32 and nviews x (block u32, delta
// i32): changes in how many views of the receiver's blocks (kShared, as the receiver sent
// them) the sender holds.
// With a cluster token, kHello and kHelloAck carry kFlagAuth and end with an auth frame
// (hello / challenge); the connection carries nothing but kProof until the proof checks
// out, and every message on it is then attributed to the node that proved itself. The
// socket itself is kernel-local, so nothing can be injected into it afterwards: no
// per-message MAC is needed here (the tcp van needs one).

constexpr uint32_t kFrameMagic = 0x4D43504D;  // "MPCM"
constexpr uint16_t kFrameVersion = 2;
constexpr size_t kFramePreamble = 8;
constexpr size_t kSourceBytes = 1 + 4 + 8 + 8;
constexpr size_t kDataFixed = kFramePreamble + 8 + 4;
constexpr size_t kMaxFrameBytes = 128 << 10;  // < the default unix socket send buffer
constexpr size_t kMaxMetaBytes = kMaxBodyBytes + (1u << 20);
constexpr size_t kCookieBytes = 16;
constexpr size_t kMaxStagingBuffers = 4096;         // per inbound connection
constexpr uint64_t kMaxStagingBytes = 4ull << 30;   // per outbound peer
constexpr size_t kMinStagingClass = 16;             // 64 KiB
constexpr size_t kIovBatch = 1024;                  // IOV_MAX
constexpr size_t kMaxImports = 4096;                // shared blocks per inbound connection
constexpr size_t kMaxRingBytes = size_t{64} << 20;  // largest frame ring accepted
constexpr size_t kMaxQueuedFrames = 256;            // socket frames read ahead of their ring marker

enum FrameType : uint8_t {
  kHello = 1,
  kHelloAck = 2,
  kStaging = 3,
  kData = 4,
  kAck = 5,
  kProof = 6,
  kBlock = 7,
  kBlockGone = 8,
  kDevBlock = 9,
  kDevGone = 10,
  kRing = 11,
  kWake = 12
};
enum SourceKind : uint8_t {
  kInline = 0,
  kRemote = 1,
  kStaged = 2,
  kShared = 3,
  kPeerShared = 4,
  kDevice = 5,
  kPeerDevice = 6,
  kDeviceLocal = 7
};
bool IsDeviceSource(uint8_t kind) {
  return kind == kDevice || kind == kPeerDevice || kind == kDeviceLocal;
}
constexpr uint8_t kFlagNeedsAck = 1;
constexpr uint8_t kFlagAuth = 2;   // kHello / kHelloAck: an auth frame follows
constexpr uint8_t kFlagSlots = 4;  // kData: a pull-slot table follows the sources
constexpr uint8_t kFlagViews = 8;  // kData: view count changes follow the slot table
constexpr size_t kViewDeltaBytes = 4 + 4;
constexpr size_t kMaxViewDeltas = 4096;  // per frame; more wait for the next frame

struct Source {
  uint8_t kind = kInline;
  uint32_t staging_id = 0;
  uint64_t offset = 0;  // inline offset, staging offset or remote address
  uint64_t len = 0;
};

void PutPreamble(WireWriter* w, FrameType type, uint8_t flags) {
  w->Put<uint32_t>(kFrameMagic);
  w->Put<uint16_t>(kFrameVersion);
  w->Put<uint8_t>(type);
  w->Put<uint8_t>(flags);
}

void PutSource(WireWriter* w, const Source& s) {
  w->Put<uint8_t>(s.kind);
  w->Put<uint32_t>(s.staging_id);
  w->Put<uint64_t>(s.offset);
  w->Put<uint64_t>(s.len);
}

bool GetSource(WireReader* r, Source* s) {
  return r->Get(&s->kind) && r->Get(&s->staging_id) && r->Get(&s->offset) && r->Get(&s->len);
}

int SizeClass(size_t n) {
  int c = 0;
  while ((size_t{1} << c) < n) ++c;
  return c;
}

// Sends one frame (optionally with an fd). MSG_NOSIGNAL: a dead peer is an error, not a
// SIGPIPE. Blocks when the socket buffer is full, but never longer than timeout_ms.
Status SendFrame(int fd, const void* data, size_t size, int pass_fd, int timeout_ms) {
  iovec iov{const_cast<void*>(data), size};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  if (pass_fd >= 0) {
    std::memset(control, 0, sizeof(control));
    mh.msg_control = control;
    mh.msg_controllen = sizeof(control);
    cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
  }
  const uint64_t deadline = GetNanosecond() + static_cast<uint64_t>(timeout_ms) * 1000000ull;
  for (;;) {
    ssize_t n = ::sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n == static_cast<ssize_t>(size)) return OkStatus();
    if (n >= 0) return InternalError("short seqpacket send");
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return UnavailableError(ErrnoText("doorbell send", errno));
    }
    const uint64_t now = GetNanosecond();
    if (now >= deadline) return DeadlineExceededError("doorbell send: peer not reading");
    pollfd p{fd, POLLOUT, 0};
    ::poll(&p, 1, static_cast<int>((deadline - now) / 1000000ull) + 1);
  }
}

// Views this node holds of peers' shared blocks, as changes not yet reported to each
// block's owner (by node id). Thread-safe: views are dropped on any thread.
class ViewLedger {
 public:
  using Delta = std::pair<uint32_t, int32_t>;  // (the owner's block id, change)
  void Add(int node, uint32_t block, int32_t delta) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& m = pending_[node];
    if ((m[block] += delta) == 0) m.erase(block);
  }
  // Up to kMaxViewDeltas pending changes for `node`, removed from the ledger.
  std::vector<Delta> Take(int node) {
    std::vector<Delta> out;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(node);
    if (it == pending_.end()) return out;
    auto& m = it->second;
    while (!m.empty() && out.size() < kMaxViewDeltas) {
      out.push_back(*m.begin());
      m.erase(m.begin());
    }
    return out;
  }
  void Forget(int node) {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.erase(node);
  }
  // A frame that took changes was not sent: they wait for the next one.
  void Restore(int node, const std::vector<Delta>& deltas) {
    for (const Delta& d : deltas) Add(node, d.first, d.second);
  }
  // The owner of `mapping` learns of this view now and of its end when the result drops.
  static std::shared_ptr<void> View(const std::shared_ptr<ViewLedger>& ledger, int node,
                                    uint32_t block, std::shared_ptr<void> mapping) {
    struct Held {
      std::shared_ptr<ViewLedger> ledger;
      int node;
      uint32_t block;
      std::shared_ptr<void> mapping;
      ~Held() { ledger->Add(node, block, -1); }
    };
    ledger->Add(node, block, +1);
    void* at = mapping.get();
    // new, not make_shared of a temporary: a temporary Held would report the end at once.
    std::shared_ptr<Held> held(new Held{ledger, node, block, std::move(mapping)});
    return std::shared_ptr<void>(std::move(held), at);
  }

 private:
  std::mutex mu_;
  std::unordered_map<int, std::map<uint32_t, int32_t>> pending_;
};

// Pool of van-owned receive buffers (used when Destination returns nullptr), so large
// messages do not page-fault fresh memory every time. Buffers return on owner release.
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  ~BufferPool() {
    for (auto& list : free_) {
      for (void* p : list) std::free(p);
    }
  }
  std::shared_ptr<void> Get(size_t size) {
    const int cls = std::max(SizeClass(size), 12);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_[cls].empty()) {
        p = free_[cls].back();
        free_[cls].pop_back();
      }
    }
    if (p == nullptr) {
      // Large buffers are 2 MiB aligned and THP-advised: process_vm_readv pins pages one
      // by one and runs ~2x faster into huge pages (docs/performance.md).
      const size_t align = cls >= 21 ? (size_t{1} << 21) : 64;
      p = std::aligned_alloc(align, size_t{1} << cls);
      if (p == nullptr) return nullptr;
      if (cls >= 21) ::madvise(p, size_t{1} << cls, MADV_HUGEPAGE);
    }
    std::shared_ptr<BufferPool> self = shared_from_this();
    return std::shared_ptr<void>(p, [self, cls](void* q) { self->Put(q, cls); });
  }

 private:
  static constexpr size_t kKeepPerClass = 4;
  void Put(void* p, int cls) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_[cls].size() < kKeepPerClass && cls <= 30) {
        free_[cls].push_back(p);
        return;
      }
    }
    std::free(p);
  }
  std::mutex mu_;
  std::array<std::vector<void*>, 64> free_;
};

// A growable FIFO ring (no allocation once warm): unacknowledged sends of one peer.
template <typename T>
class Ring {
 public:
  bool empty() const { return count_ == 0; }
  size_t size() const { return count_; }
  T& front() { return items_[head_]; }
  void push_back(T&& v) {
    if (count_ == items_.size()) Grow();
    items_[(head_ + count_) % items_.size()] = std::move(v);
    ++count_;
  }
  T pop_front() {
    T v = std::move(items_[head_]);
    head_ = (head_ + 1) % items_.size();
    --count_;
    return v;
  }

 private:
  void Grow() {
    std::vector<T> bigger(std::max<size_t>(16, items_.size() * 2));
    for (size_t i = 0; i < count_; ++i) bigger[i] = std::move(items_[(head_ + i) % items_.size()]);
    items_ = std::move(bigger);
    head_ = 0;
  }
  std::vector<T> items_;
  size_t head_ = 0;
  size_t count_ = 0;
};

// A shared-memory staging buffer (fallback path), created by the sender, sealed against
// resizing so the receiver's mapping can never SIGBUS, announced once over the socket.
struct StagingBuffer {
  uint32_t id = 0;
  int size_class = 0;
  UniqueFd fd;
  Mapping map;
};

Result<std::unique_ptr<StagingBuffer>> CreateStaging(uint32_t id, int size_class) {
  const size_t size = size_t{1} << size_class;
  UniqueFd fd(::memfd_create("meshpost-staging", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return UnavailableError(ErrnoText("memfd_create", errno));
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
    return ResourceExhaustedError(ErrnoText("ftruncate staging buffer", errno));
  }
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return UnavailableError(ErrnoText("seal staging buffer", errno));
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return ResourceExhaustedError(ErrnoText("mmap staging buffer", errno));
  auto b = std::make_unique<StagingBuffer>();
  b->id = id;
  b->size_class = size_class;
  b->fd = std::move(fd);
  b->map = Mapping(p, size);
  return b;
}

// --- The van -------------------------------------------------------------------------

class CmaVan : public Van {
 public:
  explicit CmaVan(const VanOptions& options)
      : options_(options),
        pool_(std::make_shared<BufferPool>()),
        drain_(options.wait),
        device_(options.device_backend != nullptr ? options.device_backend : CudaBackend()) {
    std::random_device rd;
    for (auto& b : probe_cookie_) b = static_cast<uint8_t>(rd());
    // The listener holds the export table weakly: a block may be freed on any thread,
    // also while this van is being destroyed.
    std::weak_ptr<ExportState> weak = exports_;
    free_listener_ = SharedMemoryRegistry::Get().AddFreeListener([weak](uint32_t id) {
      auto st = weak.lock();
      if (!st) return;
      std::lock_guard<std::mutex> lock(st->mu);
      auto it = st->exported.find(id);
      if (it == st->exported.end()) return;
      for (const auto& [conn, pid] : it->second) st->gone[conn].push_back(id);
      st->exported.erase(it);
      auto from = st->peer_views.lower_bound({id, 0});
      auto to = from;
      while (to != st->peer_views.end() && to->first.first == id) ++to;
      st->peer_views.erase(from, to);
    });
  }
  ~CmaVan() override { Stop(); }

  const char* name() const override { return "cma"; }
  std::string endpoint() const override { return endpoint_; }

  // Shared host memory (tensor/shared_memory.h) is exported to peers as it is sent: the
  // owner registers nothing, a block in the registry is recognised by address. CUDA memory
  // is registered (the device tensors of a push_pull or respond), then moves by CUDA IPC,
  // unless MESHPOST_CMA_GPU=staging or no device is usable.
  bool RegistersMemory() const override { return options_.cma_gpu_ipc; }
  bool SupportsMemory(MemoryKind kind) const override {
    if (kind == MemoryKind::kCudaDevice) {
      return options_.cma_gpu_ipc && const_cast<cma::DeviceMemory&>(device_).Usable().ok();
    }
    return kind == MemoryKind::kHost || kind == MemoryKind::kSharedHost;
  }
  Status RegisterRecvBuffer(int /*peer_id*/, int64_t /*key*/, const MemoryRegion& region) override {
    return RegisterMemory(region);
  }
  Status RegisterMemory(const MemoryRegion& region) override {
    if (region.kind != MemoryKind::kCudaDevice) return OkStatus();
    if (!SupportsMemory(MemoryKind::kCudaDevice)) {
      return UnimplementedError(
          std::string("cma van: CUDA memory is not moved by IPC here (") +
          (options_.cma_gpu_ipc ? device_.Usable().ToString()
                                : "MESHPOST_CMA_GPU=staging stages it through pinned host memory") +
          ")");
    }
    return device_.Register(region);
  }
  void InvalidateMemory(const void* addr, size_t size) override { device_.Invalidate(addr, size); }
  bool WritesDeviceDestinations() const override { return SupportsMemory(MemoryKind::kCudaDevice); }

  std::string PeerTransport(int peer_id) const override {
    std::lock_guard<std::mutex> lock(peers_mu_);
    auto it = peers_.find(peer_id);
    if (it == peers_.end()) return name();
    return it->second->cma ? "cma" : "cma-shm";
  }

  // Cross-memory attach and memfds only work between processes on one running kernel.
  Status CanReach(const PeerAddress& peer) const override {
    if (peer.host_identity == host_identity_) return OkStatus();
    return UnavailableError("the peer runs on " + peer.host_identity + ", this node on " +
                            host_identity_);
  }

  Result<int> Bind(const std::string& /*host*/, int /*port*/) override {
    if (listen_fd_.valid()) return FailedPreconditionError("cma van already bound");
    static std::atomic<uint32_t> counter{0};
    std::random_device rd;
    const std::string name = "meshpost-cma-" + std::to_string(::getpid()) + "-" +
                             std::to_string(counter.fetch_add(1)) + "-" +
                             std::to_string(rd() & 0xffffff);
    UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd.valid()) return UnavailableError(ErrnoText("socket(AF_UNIX)", errno));
    sockaddr_un addr{};
    socklen_t len = 0;
    MESHPOST_RETURN_IF_ERROR(AbstractAddress(name, &addr, &len));
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0) {
      return UnavailableError(ErrnoText(("bind @" + name).c_str(), errno));
    }
    if (::listen(fd.get(), 128) != 0) return UnavailableError(ErrnoText("listen", errno));
    listen_fd_ = std::move(fd);
    endpoint_ = "@" + name;
    MP_LOG_DEBUG(kLog, "cma van bound {}", endpoint_);
    return 0;
  }

  Status Start(VanReceiver* receiver) override {
    if (!listen_fd_.valid()) return FailedPreconditionError("cma van Start before Bind");
    if (receiver == nullptr) return InvalidArgumentError("cma van Start: receiver is null");
    if (running_.load() || stopped_.load()) {
      return FailedPreconditionError("cma van already started");
    }
    epoll_fd_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
    data_epoll_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_fd_.valid() || !data_epoll_.valid()) {
      return UnavailableError(ErrnoText("epoll_create1", errno));
    }
    wake_fd_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    kick_fd_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!wake_fd_.valid() || !kick_fd_.valid()) {
      return UnavailableError(ErrnoText("eventfd", errno));
    }
    MESHPOST_RETURN_IF_ERROR(WatchOn(epoll_fd_.get(), wake_fd_.get(), kWakeId));
    MESHPOST_RETURN_IF_ERROR(WatchOn(epoll_fd_.get(), listen_fd_.get(), kListenId));
    MESHPOST_RETURN_IF_ERROR(WatchOn(epoll_fd_.get(), data_epoll_.get(), kDataId));
    MESHPOST_RETURN_IF_ERROR(Watch(kick_fd_.get(), kKickId));
    receiver_ = receiver;
    running_ = true;
    recv_thread_ = std::thread([this] {
      PinCurrentThread(options_.pinner, "cma receive");
      ReceiveLoop();
    });
    return OkStatus();
  }

  Status Connect(const PeerAddress& peer) override {
    if (!running_.load()) return FailedPreconditionError("cma van Connect before Start");
    if (peer.endpoint.size() < 2 || peer.endpoint[0] != '@') {
      return InvalidArgumentError("cma van Connect: peer " + std::to_string(peer.id) +
                                  " endpoint '" + peer.endpoint +
                                  "' is not a cma endpoint (expected '@name')");
    }
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      auto it = peers_.find(peer.id);
      if (it != peers_.end() && it->second->endpoint == peer.endpoint && !it->second->dead.load()) {
        return OkStatus();
      }
    }
    const int timeout_ms = static_cast<int>(std::max<int64_t>(1, options_.connect_timeout_ms));
    // Blocking connect (bounded by SO_SNDTIMEO when the listener's backlog is full), then
    // non-blocking for the rest of the connection's life.
    UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (!fd.valid()) return UnavailableError(ErrnoText("socket(AF_UNIX)", errno));
    int sndbuf = 1 << 20;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    sockaddr_un addr{};
    socklen_t len = 0;
    MESHPOST_RETURN_IF_ERROR(AbstractAddress(peer.endpoint.substr(1), &addr, &len));
    int rc;
    do {
      rc = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), len);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
      return UnavailableError(ErrnoText(
          ("cma van connect to node " + std::to_string(peer.id) + " at " + peer.endpoint).c_str(),
          errno));
    }
    ::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) | O_NONBLOCK);
    // Handshake: the receiver proves it can read our memory (CMA) by reading a cookie.
    const bool auth = !options_.cluster_token.empty();
    std::unique_ptr<ConnectorHandshake> handshake;
    WireWriter w;
    PutPreamble(&w, kHello, auth ? kFlagAuth : 0);
    w.Put<uint32_t>(static_cast<uint32_t>(::getpid()));
    w.Put<uint64_t>(reinterpret_cast<uint64_t>(probe_cookie_.data()));
    w.Put<uint32_t>(kCookieBytes);
    w.PutBytes(probe_cookie_.data(), kCookieBytes);
    w.Put<uint8_t>(options_.cma_disable ? 0 : 1);
    if (auth) {
      handshake =
          std::make_unique<ConnectorHandshake>(options_.cluster_token, options_.self_id, peer.id);
      const std::string hello = handshake->Hello();
      w.PutBytes(hello.data(), hello.size());
    }
    Status s = SendFrame(fd.get(), w.buffer().data(), w.size(), -1, timeout_ms);
    if (!s.ok()) return s.Annotate("cma van handshake with node " + std::to_string(peer.id));
    std::string challenge;
    auto cma_ok = AwaitHelloAck(fd.get(), timeout_ms, &challenge);
    if (cma_ok.ok() && auth) {
      Status as = ProveToAcceptor(fd.get(), handshake.get(), challenge, timeout_ms);
      if (!as.ok()) cma_ok = as;
    }
    if (!cma_ok.ok()) {
      return cma_ok.status().Annotate("cma van handshake with node " + std::to_string(peer.id) +
                                      " at " + peer.endpoint);
    }
    auto p = std::make_shared<Peer>();
    {
      ucred cred{};
      socklen_t clen = sizeof(cred);
      if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &clen) == 0) p->pid = cred.pid;
    }
    p->id = peer.id;
    p->endpoint = peer.endpoint;
    p->cma = *cma_ok;
    p->conn_id = next_conn_id_.fetch_add(1);
    // The frame ring: every later frame to this peer goes through shared memory.
    if (options_.cma_ring_bytes > 0) {
      int ring_fd = -1;
      auto ring = cma::FrameRing::Create(options_.cma_ring_bytes, &ring_fd);
      Status rs = ring.status();
      if (ring.ok()) {
        WireWriter rw;
        PutPreamble(&rw, kRing, 0);
        rs = SendFrame(fd.get(), rw.buffer().data(), rw.size(), ring_fd, timeout_ms);
        ::close(ring_fd);
        if (rs.ok()) p->ring = std::move(ring).value();
      }
      if (!rs.ok()) {
        return rs.Annotate("cma van: passing the frame ring to node " + std::to_string(peer.id));
      }
    }
    p->fd = std::move(fd);
    if (!p->cma && !logged_fallback_.exchange(true)) {
      MP_LOG_INFO(kLog,
                  "cross-memory attach not usable towards node {}{}: using the shared-memory "
                  "copy path (logged once)",
                  peer.id, options_.cma_disable ? " (disabled by options)" : "");
    }
    std::shared_ptr<Peer> old;
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      auto it = peers_.find(peer.id);
      if (it != peers_.end()) old = it->second;
      peers_[peer.id] = p;
      out_conns_[p->conn_id] = p;
    }
    if (old) Retire(old);
    Status ws = Watch(p->fd.get(), p->conn_id);
    if (!ws.ok()) {
      Retire(p);
      return ws;
    }
    MP_LOG_DEBUG(kLog, "cma van connected to node {} at {} ({})", peer.id, peer.endpoint,
                 p->cma ? "cma" : "shm");
    return OkStatus();
  }

  void Disconnect(int peer_id) override {
    std::shared_ptr<Peer> p;
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      auto it = peers_.find(peer_id);
      if (it == peers_.end()) return;
      p = it->second;
      peers_.erase(it);
    }
    // Views of its blocks we have not reported yet: a process taking its id later has
    // other blocks.
    views_held_->Forget(peer_id);
    // The peer may still be reading our memory; give it a bounded chance to finish.
    if (!OnDispatchThread()) {
      drain_.WaitUntil([&] { return p->Idle(); }, GetNanosecond() + 1'000'000'000ull);
    }
    Retire(p);
  }

  Status Send(OutMessage&& msg) override {
    MESHPOST_RETURN_IF_ERROR(ValidateSend("CmaVan::Send", msg));
    std::shared_ptr<Peer> peer;
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      auto it = peers_.find(msg.meta.recipient);
      if (it == peers_.end()) {
        return UnavailableError("cma van: no connection to node " +
                                std::to_string(msg.meta.recipient));
      }
      peer = it->second;
    }
    std::string header = EncodeMeta(msg.meta);
    std::lock_guard<std::mutex> lock(peer->send_mu);
    if (peer->dead.load()) {
      return UnavailableError("cma van: node " + std::to_string(peer->id) +
                              " closed its connection");
    }
    MESHPOST_RETURN_IF_ERROR(AnnounceGone(peer.get()));
    const size_t n = msg.segments.size();
    // A request's pull slots in shared blocks: the receiver gets writable views of them.
    std::vector<Source>& slot_src = peer->slot_sources;
    slot_src.clear();
    bool any_slot = false;
    if (msg.meta.cmd == Command::kRequest) {
      slot_src.resize(msg.meta.slots.size());
      for (size_t j = 0; j < msg.meta.slots.size(); ++j) {
        const TensorDesc& d = msg.meta.slots[j];
        if (d.addr == 0 || d.nbytes == 0) continue;
        const void* addr = reinterpret_cast<const void*>(d.addr);
        auto exported = ExportDevice(peer.get(), addr, d.nbytes, &slot_src[j]);
        if (exported.ok() && !*exported) {
          exported = ExportShared(peer.get(), addr, d.nbytes, &slot_src[j]);
        }
        if (!exported.ok()) return exported.status();
        // Only our own memory becomes a writable view at the peer (a slot inside memory the
        // peer lent us is left to the ordinary path).
        const uint8_t kind = slot_src[j].kind;
        if (*exported && kind != kShared && kind != kDevice && kind != kDeviceLocal) {
          slot_src[j] = Source{};
        }
        any_slot = any_slot || slot_src[j].kind != kInline;
      }
      if (!any_slot) slot_src.clear();
    }
    // Changes in the views we hold of this peer's blocks ride along; put back if unsent.
    std::vector<ViewLedger::Delta> views = views_held_->Take(peer->id);
    struct Unsent {
      ViewLedger* ledger;
      int node;
      const std::vector<ViewLedger::Delta>* views;
      bool sent = false;
      ~Unsent() {
        if (!sent) ledger->Restore(node, *views);
      }
    } unsent{views_held_.get(), peer->id, &views};
    const size_t fixed = kDataFixed + kSourceBytes * (n + 1) +
                         (any_slot ? 4 + kSourceBytes * slot_src.size() : 0) +
                         (views.empty() ? 0 : 4 + kViewDeltaBytes * views.size());
    if (fixed > kMaxFrameBytes) {
      return InvalidArgumentError("cma van Send: " + std::to_string(n) +
                                  " segments do not fit one doorbell frame");
    }
    // Decide where every segment's bytes come from. Small ones ride inline in the frame
    // (one syscall fewer than a remote read); the rest are read by the receiver.
    size_t budget = kMaxFrameBytes - fixed;
    size_t inline_bytes = 0;
    size_t staged_bytes = 0;
    std::vector<Source>& src = peer->sources;
    src.assign(n + 1, Source{});
    Status shared_status;
    auto place = [&](Source* s, const void* data, size_t size, size_t inline_limit) {
      s->len = size;
      if (data != nullptr && size > 0) {
        // Memory the peer can map (ours or its own) travels as a name, never as bytes.
        auto shared = ExportDevice(peer.get(), data, size, s);
        if (shared.ok() && !*shared) shared = ExportShared(peer.get(), data, size, s);
        if (!shared.ok() && shared_status.ok()) shared_status = shared.status();
        if (shared.ok() && *shared) return;
      }
      if (size <= inline_limit && size <= budget) {
        s->kind = kInline;
        s->offset = inline_bytes;
        inline_bytes += size;
        budget -= size;
      } else if (peer->cma) {
        s->kind = kRemote;
      } else {
        s->kind = kStaged;
        s->offset = staged_bytes;
        staged_bytes += (size + 63) & ~size_t{63};
      }
    };
    place(&src[0], nullptr, header.size(), kMaxFrameBytes);
    for (size_t i = 0; i < n; ++i) {
      place(&src[i + 1], msg.segments[i].data, msg.segments[i].size,
            msg.segments[i].data == nullptr ? 0 : options_.zero_copy_min);
    }
    if (!shared_status.ok()) return shared_status;
    StagingBuffer* staging = nullptr;
    if (staged_bytes > 0) {
      auto st = AcquireStaging(peer.get(), staged_bytes);
      if (!st.ok()) return st.status();
      staging = *st;
    }
    std::shared_ptr<std::string> header_owner;
    // Shared sources need no ack: the receiver maps the block itself, so our owner may go.
    // Our device memory is copied by the receiver before it acks: its owner (a torch
    // tensor whose allocation the caching allocator would hand out again) must stay.
    auto reads_our_memory = [](const Source& s) {
      return s.kind == kRemote || s.kind == kStaged || s.kind == kDevice || s.kind == kDeviceLocal;
    };
    const bool needs_ack = std::any_of(src.begin(), src.end(), reads_our_memory);
    auto payload_of = [&](size_t k) -> const void* {
      return k == 0 ? static_cast<const void*>(header.data()) : msg.segments[k - 1].data;
    };
    for (size_t k = 0; k <= n; ++k) {
      Source& s = src[k];
      if (s.kind == kStaged) {
        s.staging_id = staging->id;
        if (s.len) std::memcpy(staging->map.data() + s.offset, payload_of(k), s.len);
      } else if (s.kind == kRemote) {
        if (k == 0) {
          header_owner = std::make_shared<std::string>(std::move(header));
          s.offset = reinterpret_cast<uint64_t>(header_owner->data());
        } else {
          s.offset = reinterpret_cast<uint64_t>(msg.segments[k - 1].data);
        }
      }
    }
    WireWriter& w = peer->frame;
    w.buffer().clear();
    PutPreamble(&w, kData,
                static_cast<uint8_t>((needs_ack ? kFlagNeedsAck : 0) | (any_slot ? kFlagSlots : 0) |
                                     (views.empty() ? 0 : kFlagViews)));
    const uint64_t seq = ++peer->next_seq;
    w.Put<uint64_t>(seq);
    w.Put<uint32_t>(static_cast<uint32_t>(n));
    for (const Source& s : src) PutSource(&w, s);
    if (any_slot) {
      w.Put<uint32_t>(static_cast<uint32_t>(slot_src.size()));
      for (const Source& s : slot_src) PutSource(&w, s);
    }
    if (!views.empty()) {
      w.Put<uint32_t>(static_cast<uint32_t>(views.size()));
      for (const auto& [block, delta] : views) {
        w.Put<uint32_t>(block);
        w.Put<int32_t>(delta);
      }
    }
    for (size_t k = 0; k <= n; ++k) {
      if (src[k].kind == kInline && src[k].len) w.PutBytes(payload_of(k), src[k].len);
    }
    if (needs_ack) {
      // Registered before the doorbell rings: the ack may arrive before sendmsg returns.
      std::lock_guard<std::mutex> plock(peer->pending_mu);
      if (header_owner) peer->pending.push_back({seq, std::move(header_owner), nullptr});
      if (staging) peer->pending.push_back({seq, nullptr, staging});
      for (size_t i = 0; i < n; ++i) {
        if (src[i + 1].kind != kInline && msg.segments[i].owner) {
          peer->pending.push_back({seq, std::move(msg.segments[i].owner), nullptr});
        }
      }
      peer->pending.push_back({seq, nullptr, nullptr});  // marks seq as in flight
    }
    Status s = SendToPeer(peer.get(), w.buffer().data(), w.size(), -1);
    if (!s.ok()) {
      MarkDead(peer.get(), s);
      return s.Annotate("cma van send to node " + std::to_string(peer->id));
    }
    unsent.sent = true;
    return OkStatus();
  }

  void Stop() override {
    if (running_.load()) {
      // Peers may still be reading our memory: wait (bounded) for their acks before the
      // owners go away, so the last response of a run reaches its worker.
      std::vector<std::shared_ptr<Peer>> peers;
      {
        std::lock_guard<std::mutex> lock(peers_mu_);
        for (auto& kv : peers_) peers.push_back(kv.second);
      }
      if (!OnDispatchThread()) {
        drain_.WaitUntil(
            [&] {
              for (auto& p : peers) {
                if (!p->Idle()) return false;
              }
              return true;
            },
            DeadlineFromTimeoutMs(options_.stop_drain_ms));
      }
      running_ = false;
      Kick(wake_fd_.get());
      Kick(kick_fd_.get());
      // A caller inside Progress returns (running_ is false) and ends its progress; the
      // state below is torn down after it did. Not from a callback: the holder may be
      // waiting for the rx_mu_ this thread holds (it then finds the connections gone).
      if (t_progress_holder_ != this && !OnDispatchThread()) {
        std::lock_guard<std::mutex> role(progress_role_);
      }
      if (recv_thread_.joinable()) {
        if (std::this_thread::get_id() == recv_thread_.get_id()) {
          recv_thread_.detach();  // Stop from a callback; the loop exits on return
        } else {
          recv_thread_.join();
        }
      }
    }
    stopped_ = true;
    std::unordered_map<int, std::shared_ptr<Peer>> peers;
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      peers.swap(peers_);
      out_conns_.clear();
    }
    for (auto& kv : peers) Retire(kv.second);
    {
      // From a callback (which already holds rx_mu_), the teardown runs under that hold.
      std::unique_lock<std::mutex> rx(rx_mu_, std::defer_lock);
      if (t_dispatching_ != this) rx.lock();
      for (auto& kv : in_conns_) DropImports(kv.second.get());
      in_conns_.clear();
      rings_.store(0);
    }
    listen_fd_.Reset();
  }

  // --- caller-driven progress ---
  bool SupportsProgress() const override { return true; }

  bool BeginProgress() override {
    if (!running_.load()) return false;
    if (!progress_role_.try_lock()) return false;
    t_progress_holder_ = this;
    progress_held_.store(true, std::memory_order_seq_cst);
    // The receive thread no longer sees data events; one it already took is dispatched
    // under rx_mu_ like ours.
    ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, data_epoll_.get(), nullptr);
    // We poll the rings now: frames need no doorbell until we arm them to sleep.
    if (rings_.load(std::memory_order_relaxed) > 0) {
      std::lock_guard<std::mutex> rx(rx_mu_);
      DisarmRings();
    }
    return true;
  }

  bool Progress(uint64_t deadline_ns) override {
    if (!running_.load(std::memory_order_relaxed)) return false;
    int timeout_ms = 0;
    if (deadline_ns != 0) {
      const uint64_t now = GetNanosecond();
      if (now < deadline_ns) {
        timeout_ms = static_cast<int>(
            std::min<uint64_t>((deadline_ns - now + 999'999) / 1'000'000, 1'000'000));
      }
    }
    bool armed = false;
    if (rings_.load(std::memory_order_relaxed) > 0) {
      std::lock_guard<std::mutex> rx(rx_mu_);
      // Frames in shared memory first: they need no system call.
      if (ServeRings()) return running_.load(std::memory_order_relaxed);
      if (timeout_ms > 0) {
        armed = true;
        if (!ArmRings()) timeout_ms = 0;
      }
    }
    std::array<epoll_event, 64> events;
    const int n =
        ::epoll_wait(data_epoll_.get(), events.data(), static_cast<int>(events.size()), timeout_ms);
    const int wait_errno = errno;
    if (n > 0 || armed) {
      std::lock_guard<std::mutex> rx(rx_mu_);
      if (armed) DisarmRings();
      if (n > 0) HandleData(events.data(), n);
    }
    if (n < 0 && wait_errno != EINTR) {
      MP_LOG_ERROR(kLog, "cma van epoll_wait (caller progress): {}", std::strerror(wait_errno));
      return false;
    }
    return running_.load(std::memory_order_relaxed);
  }

  void EndProgress() override {
    t_progress_holder_ = nullptr;
    progress_held_.store(false, std::memory_order_seq_cst);
    // Data that arrived after our last Progress makes the receive thread take it.
    Status readded = WatchOn(epoll_fd_.get(), data_epoll_.get(), kDataId);
    if (!readded.ok() && running_.load()) {
      MP_LOG_ERROR(kLog, "cma van: data set back to the receive thread: {}", readded.ToString());
    }
    // Ring frames written after our last look rang no doorbell (nobody had armed): the
    // receive thread may be asleep, so arm for it, and wake it if one is already there.
    if (rings_.load(std::memory_order_relaxed) > 0) {
      std::lock_guard<std::mutex> rx(rx_mu_);
      if (!ArmRings()) Kick(wake_fd_.get());
    }
    progress_role_.unlock();
  }

  void WakeProgress() override {
    if (t_progress_holder_ == this) return;  // the holder delivered it itself
    if (progress_held_.load(std::memory_order_seq_cst)) Kick(kick_fd_.get());
  }

 private:
  static constexpr uint64_t kWakeId = 0;
  static constexpr uint64_t kListenId = 1;
  static constexpr uint64_t kKickId = 2;  // in the data set
  static constexpr uint64_t kDataId = 3;  // the data set, in the main set
  static constexpr uint64_t kFirstConnId = 4;

  // The van this thread holds caller progress of / is dispatching for (nullptr: none).
  static inline thread_local const CmaVan* t_progress_holder_ = nullptr;
  static inline thread_local const CmaVan* t_dispatching_ = nullptr;

  // Callbacks run here: waiting for our own receive side would only time out.
  bool OnDispatchThread() const {
    return t_dispatching_ == this || std::this_thread::get_id() == recv_thread_.get_id();
  }

  static void Kick(int fd) {
    uint64_t one = 1;
    ssize_t ignored = ::write(fd, &one, sizeof(one));
    (void)ignored;
  }

  struct Pending {
    uint64_t seq = 0;
    std::shared_ptr<const void> owner;
    StagingBuffer* staging = nullptr;
  };

  // Outbound connection: sends data frames, reads acks (receive thread).
  struct Peer {
    int id = -1;
    std::string endpoint;
    bool cma = false;
    uint64_t conn_id = 0;
    UniqueFd fd;
    std::atomic<bool> dead{false};
    std::mutex send_mu;  // frame building + sendmsg
    uint64_t next_seq = 0;
    WireWriter frame;
    std::vector<Source> sources;
    std::vector<Source> slot_sources;
    pid_t pid = 0;                                     // the acceptor's pid (SO_PEERCRED)
    std::unordered_set<uint32_t> exported;             // our blocks this connection has (send_mu)
    std::unordered_map<uintptr_t, uint32_t> dev_sent;  // allocation base -> export id (send_mu)
    std::unique_ptr<cma::FrameRing> ring;              // frames to the acceptor (send_mu)
    std::mutex pending_mu;  // pending, staging pool (receive thread releases)
    Ring<Pending> pending;
    std::vector<std::unique_ptr<StagingBuffer>> staging_all;
    std::array<std::vector<StagingBuffer*>, 64> staging_free;
    uint64_t staging_bytes = 0;
    bool Idle() {
      std::lock_guard<std::mutex> lock(pending_mu);
      return pending.empty() || dead.load();
    }
  };

  // Inbound connection: receives data frames, sends acks. Owned by the receive thread.
  struct InConn {
    uint64_t id = 0;
    UniqueFd fd;
    pid_t pid = 0;
    std::unordered_set<uint32_t> imports;  // the connector's blocks mapped here
    bool hello = false;
    bool cma = false;
    std::unique_ptr<AcceptorHandshake> handshake;  // until the proof arrives (token set)
    int peer_id = -1;  // authenticated node id (token set); -1 while unauthenticated
    // A newer connection authenticated as the same node (a replacement took its rank):
    // closed the next time it is served, nothing more read from it.
    bool superseded = false;
    std::unordered_map<uint32_t, Mapping> staging;
    std::unique_ptr<cma::FrameRing> ring;  // the connector's frames (after kRing)
    struct Queued {
      std::vector<char> bytes;
      UniqueFd fd;
    };
    std::deque<Queued> queued;  // socket frames whose ring marker is not read yet
  };

  // Sends one frame to a peer, in order with all others (requires peer->send_mu): through
  // its frame ring when it has one and the frame fits and carries no descriptor; else on
  // the socket, with a marker in the ring that keeps the frame's place.
  Status SendToPeer(Peer* peer, const void* data, size_t size, int pass_fd) {
    const int timeout_ms = static_cast<int>(std::max<int64_t>(1, options_.connect_timeout_ms));
    cma::FrameRing* ring = peer->ring.get();
    if (ring != nullptr && pass_fd < 0 && size <= std::min(ring->max_frame(), kMaxFrameBytes)) {
      return WriteRing(peer, cma::FrameRing::kFrame, data, size, timeout_ms);
    }
    MESHPOST_RETURN_IF_ERROR(SendFrame(peer->fd.get(), data, size, pass_fd, timeout_ms));
    if (ring == nullptr) return OkStatus();
    return WriteRing(peer, cma::FrameRing::kMarker, nullptr, 0, timeout_ms);
  }

  // Appends a record to the peer's ring, waiting (bounded) while it is full, as a send
  // waits while the socket buffer is; rings the socket doorbell if the receiver sleeps.
  Status WriteRing(Peer* peer, uint32_t kind, const void* data, size_t size, int timeout_ms) {
    uint64_t deadline = 0;
    for (int attempt = 0;; ++attempt) {
      auto wrote = peer->ring->TryWrite(kind, data, size);
      if (!wrote.ok()) return wrote.status();
      if (*wrote) break;
      if (peer->dead.load()) return UnavailableError("the peer closed its connection");
      const uint64_t now = GetNanosecond();
      if (deadline == 0) {
        deadline = now + static_cast<uint64_t>(timeout_ms) * 1'000'000ull;
      } else if (now >= deadline) {
        return DeadlineExceededError("frame ring full: peer not reading");
      }
      if (attempt < 100) {
        CpuRelax();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
    if (peer->ring->TakeSleeper()) {
      WireWriter w;
      PutPreamble(&w, kWake, 0);
      // A full socket buffer means the receiver has something to read anyway; a dead
      // peer shows as EOF on the ack side.
      ssize_t ignored =
          ::send(peer->fd.get(), w.buffer().data(), w.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      (void)ignored;
    }
    return OkStatus();
  }

  static Status AbstractAddress(const std::string& name, sockaddr_un* addr, socklen_t* len) {
    if (name.empty() || name.size() + 1 > sizeof(addr->sun_path)) {
      return InvalidArgumentError("cma endpoint name '" + name + "' is empty or too long");
    }
    addr->sun_family = AF_UNIX;
    addr->sun_path[0] = '\0';
    std::memcpy(addr->sun_path + 1, name.data(), name.size());
    *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    return OkStatus();
  }

  static Status WatchOn(int epoll_fd, int fd, uint64_t id) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = id;
    if (::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
      return InternalError(ErrnoText("epoll_ctl(ADD)", errno));
    }
    return OkStatus();
  }
  // A connection (or the kick eventfd): into the data set.
  Status Watch(int fd, uint64_t id) { return WatchOn(data_epoll_.get(), fd, id); }

  // The acceptor's answer to kHello; *challenge receives the auth frame it carries (if any).
  Result<bool> AwaitHelloAck(int fd, int timeout_ms, std::string* challenge) {
    const uint64_t deadline = GetNanosecond() + static_cast<uint64_t>(timeout_ms) * 1000000ull;
    char buf[512];
    for (;;) {
      ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
      if (n == 0) {
        return UnavailableError(
            "peer closed the connection during the handshake" +
            std::string(options_.cluster_token.empty()
                            ? " (does the peer require a cluster token? MESHPOST_CLUSTER_TOKEN)"
                            : ""));
      }
      if (n > 0) {
        WireReader r(buf, static_cast<size_t>(n));
        uint32_t magic = 0;
        uint16_t version = 0;
        uint8_t type = 0, flags = 0, cma_ok = 0;
        if (!r.Get(&magic) || !r.Get(&version) || !r.Get(&type) || !r.Get(&flags) ||
            !r.Get(&cma_ok) || magic != kFrameMagic || version != kFrameVersion ||
            type != kHelloAck) {
          return DataLossError("malformed handshake reply");
        }
        if (flags & kFlagAuth) challenge->assign(buf + (n - r.remaining()), r.remaining());
        return cma_ok != 0;
      }
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        return UnavailableError(ErrnoText("handshake recv", errno));
      }
      const uint64_t now = GetNanosecond();
      if (now >= deadline) {
        return DeadlineExceededError("no handshake reply within " + std::to_string(timeout_ms) +
                                     " ms (is the peer van started?)");
      }
      pollfd p{fd, POLLIN, 0};
      ::poll(&p, 1, static_cast<int>((deadline - now) / 1000000ull) + 1);
    }
  }

  Status ProveToAcceptor(int fd, ConnectorHandshake* handshake, const std::string& challenge,
                         int timeout_ms) {
    if (challenge.empty()) {
      return UnavailableError(
          "the peer runs without a cluster token, this node with one (MESHPOST_CLUSTER_TOKEN "
          "must be set on every node or none)");
    }
    MESHPOST_ASSIGN_OR_RETURN(AuthFrame frame, DecodeAuthFrame(challenge.data(), challenge.size()));
    MESHPOST_ASSIGN_OR_RETURN(std::string proof, handshake->OnChallenge(frame, false));
    WireWriter w;
    PutPreamble(&w, kProof, 0);
    w.PutBytes(proof.data(), proof.size());
    return SendFrame(fd, w.buffer().data(), w.size(), -1, timeout_ms);
  }

  Result<StagingBuffer*> AcquireStaging(Peer* peer, size_t bytes) {
    const int cls = std::max<int>(SizeClass(bytes), kMinStagingClass);
    {
      std::lock_guard<std::mutex> lock(peer->pending_mu);
      auto& list = peer->staging_free[cls];
      if (!list.empty()) {
        StagingBuffer* b = list.back();
        list.pop_back();
        return b;
      }
      if (peer->staging_bytes + (uint64_t{1} << cls) > kMaxStagingBytes) {
        return ResourceExhaustedError(
            "cma van: shared-memory staging towards node " + std::to_string(peer->id) +
            " exceeds " + std::to_string(kMaxStagingBytes >> 20) + " MiB of unacknowledged sends");
      }
    }
    auto created = CreateStaging(static_cast<uint32_t>(peer->staging_all.size() + 1), cls);
    if (!created.ok()) return created.status();
    WireWriter w;
    PutPreamble(&w, kStaging, 0);
    w.Put<uint32_t>((*created)->id);
    w.Put<uint64_t>((*created)->map.size());
    Status s = SendToPeer(peer, w.buffer().data(), w.size(), (*created)->fd.get());
    if (!s.ok()) {
      MarkDead(peer, s);
      return s;
    }
    StagingBuffer* b = created->get();
    std::lock_guard<std::mutex> lock(peer->pending_mu);
    peer->staging_bytes += b->map.size();
    peer->staging_all.push_back(std::move(created).value());
    return b;
  }

  // Releases everything pending towards a peer; owners are destroyed outside the lock.
  void MarkDead(Peer* peer, const Status& why) {
    // Debug, not info: every orderly shutdown closes these sockets (a "Broken pipe" on the
    // doorbell is a peer that already left); a peer that died is reported by ps/.
    if (!peer->dead.exchange(true) && why.code() != StatusCode::kCancelled) {
      MP_LOG_DEBUG(kLog, "cma van: connection to node {} closed: {}", peer->id, why.ToString());
    }
    Ring<Pending> released;
    {
      std::lock_guard<std::mutex> lock(peer->pending_mu);
      while (!peer->pending.empty()) released.push_back(peer->pending.pop_front());
    }
    drain_.Notify();
  }

  void Retire(const std::shared_ptr<Peer>& p) {
    if (data_epoll_.valid() && p->fd.valid()) {
      ::epoll_ctl(data_epoll_.get(), EPOLL_CTL_DEL, p->fd.get(), nullptr);
    }
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      out_conns_.erase(p->conn_id);
    }
    ::shutdown(p->fd.get(), SHUT_RDWR);
    MarkDead(p.get(), CancelledError("disconnected"));
    ForgetExports(p.get());
  }

  // --- shared blocks, send side ---

  // Names [data, data + size) as shared memory towards `peer` when it can map it: a range
  // of the peer's own block we mapped (kPeerShared) or of one of our blocks (kShared, its
  // fd passed first if this connection has not seen it). False: ordinary memory.
  // Requires peer->send_mu.
  Result<bool> ExportShared(Peer* peer, const void* data, size_t size, Source* s) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(data);
    {
      std::lock_guard<std::mutex> lock(imports_mu_);
      auto it = import_addrs_.upper_bound(a);
      if (it != import_addrs_.begin()) {
        --it;
        const Import& im = imports_.at(it->second);
        const size_t off = a - it->first;
        if (off < im.map->size() && size <= im.map->size() - off && im.pid == peer->pid) {
          s->kind = kPeerShared;
          s->staging_id = im.block;
          s->offset = off;
          s->len = size;
          return true;
        }
      }
    }
    SharedRef ref;
    if (!SharedMemoryRegistry::Get().Find(data, size, &ref)) return false;
    if (peer->exported.count(ref.block_id) == 0) {
      WireWriter w;
      PutPreamble(&w, kBlock, 0);
      w.Put<uint32_t>(ref.block_id);
      w.Put<uint64_t>(ref.block_size);
      Status sent = SendToPeer(peer, w.buffer().data(), w.size(), ref.fd);
      if (!sent.ok()) {
        MarkDead(peer, sent);
        return sent.Annotate("cma van: passing shared block " + std::to_string(ref.block_id) +
                             " to node " + std::to_string(peer->id));
      }
      peer->exported.insert(ref.block_id);
      std::lock_guard<std::mutex> lock(exports_->mu);
      exports_->exported[ref.block_id].emplace_back(peer->conn_id, peer->pid);
    }
    s->kind = kShared;
    s->staging_id = ref.block_id;
    s->offset = ref.offset;
    s->len = size;
    return true;
  }

  // Names [data, data + size) as CUDA memory towards `peer` when it is: a range of an
  // allocation the peer exported to us (kPeerDevice), our registered device memory as a
  // raw address when the peer is this process (kDeviceLocal), or as a range of its
  // allocation, whose IPC handle is passed first if this connection has not seen it
  // (kDevice). False: not device memory this van moves. Requires peer->send_mu.
  Result<bool> ExportDevice(Peer* peer, const void* data, size_t size, Source* s) {
    if (!options_.cma_gpu_ipc || !device_.active()) return false;
    uint32_t id = 0;
    uint64_t offset = 0;
    if (device_.ImportedFrom(peer->pid, data, size, &id, &offset)) {
      *s = Source{kPeerDevice, id, offset, size};
      return true;
    }
    const int device = device_.DeviceOf(data, size);
    if (device < 0) return false;
    if (peer->pid == ::getpid()) {
      *s = Source{kDeviceLocal, static_cast<uint32_t>(device), reinterpret_cast<uint64_t>(data),
                  size};
      return true;
    }
    auto ex = device_.Export(data, size);
    if (!ex.ok()) {
      return ex.status().Annotate("cma van: exporting CUDA memory to node " +
                                  std::to_string(peer->id));
    }
    auto sent = peer->dev_sent.find(ex->base);
    if (sent == peer->dev_sent.end() || sent->second != ex->id) {
      WireWriter w;
      if (sent != peer->dev_sent.end()) {  // the allocation at that address is a new one
        PutPreamble(&w, kDevGone, 0);
        w.Put<uint32_t>(sent->second);
      }
      Status st = w.size() == 0 ? OkStatus() : SendToPeer(peer, w.buffer().data(), w.size(), -1);
      if (st.ok()) {
        w.buffer().clear();
        PutPreamble(&w, kDevBlock, 0);
        w.Put<uint32_t>(ex->id);
        w.Put<int32_t>(ex->handle.device);
        w.Put<uint64_t>(ex->handle.alloc_size);
        w.PutBytes(ex->handle.bytes.data(), ex->handle.bytes.size());
        st = SendToPeer(peer, w.buffer().data(), w.size(), -1);
      }
      if (!st.ok()) {
        MarkDead(peer, st);
        return st.Annotate("cma van: passing CUDA allocation " + std::to_string(ex->id) +
                           " to node " + std::to_string(peer->id));
      }
      device_.SentTo(ex->id, peer->pid);
      peer->dev_sent[ex->base] = ex->id;
    }
    *s = Source{kDevice, ex->id, ex->offset, size};
    return true;
  }

  // Tells the peer which of the blocks it mapped we freed since the last send, so it can
  // unmap them (its views keep theirs until dropped). Requires peer->send_mu.
  Status AnnounceGone(Peer* peer) {
    std::vector<uint32_t> gone;
    {
      std::lock_guard<std::mutex> lock(exports_->mu);
      auto it = exports_->gone.find(peer->conn_id);
      if (it == exports_->gone.end()) return OkStatus();
      gone.swap(it->second);
      exports_->gone.erase(it);
    }
    for (uint32_t id : gone) {
      peer->exported.erase(id);
      WireWriter w;
      PutPreamble(&w, kBlockGone, 0);
      w.Put<uint32_t>(id);
      Status sent = SendToPeer(peer, w.buffer().data(), w.size(), -1);
      if (!sent.ok()) {
        MarkDead(peer, sent);
        return sent.Annotate("cma van send to node " + std::to_string(peer->id));
      }
    }
    return OkStatus();
  }

  void ForgetExports(Peer* peer) {
    std::lock_guard<std::mutex> send_lock(peer->send_mu);
    std::lock_guard<std::mutex> lock(exports_->mu);
    exports_->gone.erase(peer->conn_id);
    for (uint32_t id : peer->exported) {
      auto it = exports_->exported.find(id);
      if (it == exports_->exported.end()) continue;
      auto& v = it->second;
      v.erase(std::remove_if(v.begin(), v.end(),
                             [&](const auto& e) { return e.first == peer->conn_id; }),
              v.end());
      if (v.empty()) exports_->exported.erase(it);
    }
    peer->exported.clear();
  }

  // Whether our block `id` was passed to the process `pid` on a live connection.
  bool ExportedTo(uint32_t id, pid_t pid) {
    std::lock_guard<std::mutex> lock(exports_->mu);
    auto it = exports_->exported.find(id);
    if (it == exports_->exported.end()) return false;
    for (const auto& e : it->second) {
      if (e.second == pid) return true;
    }
    return false;
  }

  // A peer's report of how many views of our blocks it holds (kFlagViews), counted per
  // block and connection: only blocks passed to that process, never below zero.
  void ApplyPeerViews(InConn* c, const std::vector<ViewLedger::Delta>& deltas) {
    std::vector<std::pair<uint32_t, int64_t>> applied;
    size_t below_zero = 0;
    {
      std::lock_guard<std::mutex> lock(exports_->mu);
      for (const auto& [block, delta] : deltas) {
        // A block we freed meanwhile (its views' end is reported later) or never passed to
        // this process: nothing to count.
        auto it = exports_->exported.find(block);
        const bool passed = it != exports_->exported.end() &&
                            std::any_of(it->second.begin(), it->second.end(),
                                        [&](const auto& e) { return e.second == c->pid; });
        if (!passed) continue;
        int64_t& held = exports_->peer_views[{block, c->id}];
        const int64_t change = std::max<int64_t>(delta, -held);
        if (change != delta) ++below_zero;
        held += change;
        if (held == 0) exports_->peer_views.erase({block, c->id});
        if (change != 0) applied.emplace_back(block, change);
      }
    }
    for (const auto& [block, change] : applied) {
      if (auto b = SharedMemoryRegistry::Get().FindId(block)) b->AddPeerViews(change);
    }
    if (below_zero > 0) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                           "cma van: pid {} reported dropping more views of {} of our blocks "
                           "than it held; counted as none",
                           c->pid, below_zero);
    }
  }

  // The connection is gone: the views its peer reported no longer hold our blocks.
  void ForgetPeerViews(uint64_t conn) {
    std::vector<std::pair<uint32_t, int64_t>> dropped;
    {
      std::lock_guard<std::mutex> lock(exports_->mu);
      for (auto it = exports_->peer_views.begin(); it != exports_->peer_views.end();) {
        if (it->first.second == conn) {
          dropped.emplace_back(it->first.first, it->second);
          it = exports_->peer_views.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (const auto& [block, held] : dropped) {
      if (auto b = SharedMemoryRegistry::Get().FindId(block)) b->AddPeerViews(-held);
    }
  }

  // --- shared blocks, receive side ---

  void OnBlock(InConn* c, WireReader* r, UniqueFd fd) {
    uint32_t id = 0;
    uint64_t size = 0;
    if (!r->Get(&id) || !r->Get(&size) || !fd.valid()) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: malformed shared block from pid {}", c->pid);
      return;
    }
    if (c->imports.size() >= kMaxImports || c->imports.count(id) != 0) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                           "cma van: refused shared block {} from pid {} (duplicate or more "
                           "than {} blocks)",
                           id, c->pid, kMaxImports);
      return;
    }
    // Only a memfd sealed against shrinking, at least as large as announced, can be mapped
    // without a SIGBUS risk when its owner misbehaves.
    struct stat st {};
    const int seals = ::fcntl(fd.get(), F_GET_SEALS);
    if (::fstat(fd.get(), &st) != 0 || seals < 0 || !(seals & F_SEAL_SHRINK) || size == 0 ||
        size > kMaxSharedBlockBytes || static_cast<uint64_t>(st.st_size) < size) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                           "cma van: refused shared block {} from pid {} (not a sealed memfd of "
                           "{} bytes)",
                           id, c->pid, size);
      return;
    }
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (p == MAP_FAILED) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: mmap shared block: {}",
                           std::strerror(errno));
      return;
    }
    Import im;
    im.pid = c->pid;
    im.block = id;
    im.map = std::make_shared<Mapping>(p, size);
    c->imports.insert(id);
    std::lock_guard<std::mutex> lock(imports_mu_);
    import_addrs_[reinterpret_cast<uintptr_t>(p)] = {c->id, id};
    imports_[{c->id, id}] = std::move(im);
  }

  void OnBlockGone(InConn* c, WireReader* r) {
    uint32_t id = 0;
    if (!r->Get(&id) || c->imports.erase(id) == 0) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: bad shared block release from pid {}",
                           c->pid);
      return;
    }
    ForgetImport(c->id, id);
  }

  // Views handed out keep their mapping (shared_ptr); only the lookup entry goes.
  void ForgetImport(uint64_t conn, uint32_t id) {
    std::shared_ptr<Mapping> map;  // unmapped (if last) outside the lock
    std::lock_guard<std::mutex> lock(imports_mu_);
    auto it = imports_.find({conn, id});
    if (it == imports_.end()) return;
    map = std::move(it->second.map);
    import_addrs_.erase(reinterpret_cast<uintptr_t>(map->data()));
    imports_.erase(it);
  }

  void DropImports(InConn* c) {
    ForgetPeerViews(c->id);
    for (uint32_t id : c->imports) ForgetImport(c->id, id);
    c->imports.clear();
    device_.CloseAll(c->id);
  }

  // --- CUDA allocations, receive side ---

  void OnDevBlock(InConn* c, WireReader* r) {
    uint32_t id = 0;
    int32_t device = -1;
    uint64_t size = 0;
    IpcExport ex;
    if (!r->Get(&id) || !r->Get(&device) || !r->Get(&size) || r->remaining() != ex.bytes.size()) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: malformed CUDA allocation from pid {}",
                           c->pid);
      return;
    }
    for (auto& b : ex.bytes) r->Get(&b);
    ex.device = device;
    ex.alloc_size = size;
    Status opened = device_.Open(c->id, c->pid, id, ex);
    if (!opened.ok()) {
      // Data naming it fails (DataLoss "unknown device allocation") and says so again.
      MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                           "cma van: CUDA allocation {} from pid {} not opened: {}", id, c->pid,
                           opened.ToString());
    }
  }

  void OnDevGone(InConn* c, WireReader* r) {
    uint32_t id = 0;
    Status closed = r->Get(&id) ? device_.Close(c->id, id) : DataLossError("malformed frame");
    if (!closed.ok()) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: bad CUDA allocation release from pid {}: {}",
                           c->pid, closed.ToString());
    }
  }

  // The device memory a device source names, checked: an allocation the connector passed
  // us, our own one we passed to that process, or (from this very process) a raw address.
  Result<cma::DeviceRange> DeviceSource(InConn* c, const Source& s) {
    switch (s.kind) {
      case kDevice: return device_.Imported(c->id, s.staging_id, s.offset, s.len);
      case kPeerDevice: return device_.Own(s.staging_id, c->pid, s.offset, s.len);
      case kDeviceLocal:
        if (c->pid != ::getpid()) {
          return DataLossError("a raw device address from pid " + std::to_string(c->pid) +
                               ", which is not this process");
        }
        return cma::DeviceRange{reinterpret_cast<char*>(s.offset), static_cast<int>(s.staging_id),
                                nullptr};
      default:
        return DataLossError("source kind " + std::to_string(s.kind) + " is not device memory");
    }
  }

  // Host bytes into device memory `dst`: local ones (inline, mapped) right away, remote
  // ones through a van buffer that the next FlushReads fills.
  Status HostToDevice(const Source& s, const char* local, void* dst, int device) {
    if (s.kind != kRemote) return device_.Copy(dst, local, s.len, device);
    Bounce b{dst, pool_->Get(s.len), s.len, device};
    if (!b.buffer) {
      return ResourceExhaustedError("cannot allocate a receive buffer of " + std::to_string(s.len) +
                                    " bytes");
    }
    read_local_.push_back({b.buffer.get(), s.len});
    read_remote_.push_back({reinterpret_cast<void*>(s.offset), s.len});
    to_device_.push_back(std::move(b));
    return OkStatus();
  }

  // A segment in device memory: copied on this van's stream into the destination the
  // receiver chose (device or host memory) or into a van buffer; nothing moves when the
  // sender wrote our own memory in place. Finish() waits for the copies.
  Status ReceiveDeviceSegment(InConn* c, const Meta& meta, size_t index, const Source& s,
                              InMessage* in) {
    MESHPOST_ASSIGN_OR_RETURN(cma::DeviceRange src, DeviceSource(c, s));
    MESHPOST_ASSIGN_OR_RETURN(void* dest, SegmentDestination(receiver_, meta, index, s.len));
    RecvSegment seg;
    seg.size = s.len;
    seg.data = dest;
    if (dest == nullptr && s.len > 0) {
      seg.owner = pool_->Get(s.len);
      if (!seg.owner) {
        return ResourceExhaustedError("cannot allocate a receive buffer of " +
                                      std::to_string(s.len) + " bytes");
      }
      seg.data = seg.owner.get();
    }
    if (s.len > 0 && seg.data != src.ptr) {
      const int dst_device = device_.DeviceOf(seg.data, s.len);
      MESHPOST_RETURN_IF_ERROR(
          device_.Copy(seg.data, src.ptr, s.len, dst_device >= 0 ? dst_device : src.device));
    }
    in->segments.push_back(std::move(seg));
    return OkStatus();
  }

  std::shared_ptr<Mapping> FindImport(uint64_t conn, uint32_t id) {
    std::lock_guard<std::mutex> lock(imports_mu_);
    auto it = imports_.find({conn, id});
    return it == imports_.end() ? nullptr : it->second.map;
  }

  // --- receive thread ---

  void ReceiveLoop() {
    std::array<epoll_event, 64> events;
    uint64_t last_activity = GetNanosecond();
    while (running_.load(std::memory_order_relaxed)) {
      // Frame rings are ours to poll unless a caller holds progress.
      const bool rings = !progress_held_.load(std::memory_order_acquire) &&
                         rings_.load(std::memory_order_relaxed) > 0;
      if (rings) {
        std::lock_guard<std::mutex> rx(rx_mu_);
        if (ServeRings()) last_activity = GetNanosecond();
      }
      bool spin = options_.wait.busy_poll ||
                  GetNanosecond() - last_activity < static_cast<uint64_t>(options_.wait.spin_ns);
      bool armed = false;
      if (!spin && rings) {
        std::lock_guard<std::mutex> rx(rx_mu_);
        armed = true;
        spin = !ArmRings();
      }
      int n = ::epoll_wait(epoll_fd_.get(), events.data(), static_cast<int>(events.size()),
                           spin ? 0 : -1);
      if (armed) {
        std::lock_guard<std::mutex> rx(rx_mu_);
        DisarmRings();
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        MP_LOG_ERROR(kLog, "cma van epoll_wait: {}", std::strerror(errno));
        break;
      }
      if (n == 0) {
        CpuRelax();
        continue;
      }
      for (int i = 0; i < n; ++i) {
        const uint64_t id = events[i].data.u64;
        if (id == kWakeId) {
          Drain(wake_fd_.get());
        } else if (id == kListenId) {
          std::lock_guard<std::mutex> rx(rx_mu_);
          AcceptAll();
        } else if (id == kDataId && !progress_held_.load(std::memory_order_acquire)) {
          std::array<epoll_event, 64> data;
          const int m =
              ::epoll_wait(data_epoll_.get(), data.data(), static_cast<int>(data.size()), 0);
          if (m > 0) {
            std::lock_guard<std::mutex> rx(rx_mu_);
            HandleData(data.data(), m);
          }
        }
        if (!running_.load(std::memory_order_relaxed)) break;
      }
      last_activity = GetNanosecond();
    }
  }

  static void Drain(int eventfd) {
    uint64_t v;
    ssize_t ignored = ::read(eventfd, &v, sizeof(v));
    (void)ignored;
  }

  // Serves the data-set events (connections, the kick); requires rx_mu_. Runs on the
  // receive thread or on a caller's thread inside Progress.
  void HandleData(const epoll_event* events, int n) {
    const CmaVan* outer = t_dispatching_;
    t_dispatching_ = this;
    for (int i = 0; i < n; ++i) {
      const uint64_t id = events[i].data.u64;
      if (id == kKickId) {
        Drain(kick_fd_.get());
        // The receive thread took these events just before a caller began to hold
        // progress: that kick may have been meant for the holder, so it gets another.
        if (t_progress_holder_ != this && progress_held_.load(std::memory_order_seq_cst)) {
          Kick(kick_fd_.get());
        }
      } else if (auto in = in_conns_.find(id); in != in_conns_.end()) {
        if (!ServeInbound(in->second.get())) CloseInbound(in);
      } else {
        ServeOutbound(id);
      }
      if (!running_.load(std::memory_order_relaxed)) break;
    }
    t_dispatching_ = outer;
  }

  void AcceptAll() {
    for (;;) {
      UniqueFd fd(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (!fd.valid()) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
          MP_LOG_ERROR(kLog, "cma van accept: {}", std::strerror(errno));
        }
        return;
      }
      ucred cred{};
      socklen_t len = sizeof(cred);
      if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        MP_LOG_ERROR(kLog, "cma van SO_PEERCRED: {}", std::strerror(errno));
        continue;
      }
      auto c = std::make_unique<InConn>();
      c->fd = std::move(fd);
      c->pid = cred.pid;
      const uint64_t id = next_conn_id_.fetch_add(1);
      c->id = id;
      if (!Watch(c->fd.get(), id).ok()) continue;
      in_conns_[id] = std::move(c);
    }
  }

  // Reads one frame (and any passed fd) from a non-blocking socket. Returns the frame
  // size, 0 when nothing is queued, -1 on EOF/error.
  ssize_t ReadFrame(int fd, UniqueFd* passed) {
    iovec iov{recv_buf_.data(), recv_buf_.size()};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
    mh.msg_control = control;
    mh.msg_controllen = sizeof(control);
    ssize_t n;
    do {
      n = ::recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    // On failure the control buffer is untouched garbage: never parse it.
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    // Any descriptor that arrives is owned at once, even in a frame we then drop.
    for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t k = 0; k < count; ++k) {
        int f;
        std::memcpy(&f, CMSG_DATA(c) + k * sizeof(int), sizeof(int));
        if (k == 0 && passed != nullptr && !passed->valid()) {
          *passed = UniqueFd(f);
        } else {
          ::close(f);
        }
      }
    }
    if (n == 0) return -1;
    if (mh.msg_flags & MSG_TRUNC) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: dropped an oversized doorbell frame{}", "");
      return -2;
    }
    return n;
  }

  // Drains an outbound connection: acks (and EOF when the peer goes away).
  void ServeOutbound(uint64_t conn_id) {
    std::shared_ptr<Peer> peer;
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      auto it = out_conns_.find(conn_id);
      if (it == out_conns_.end()) return;
      peer = it->second;
    }
    for (int budget = 0; budget < 256; ++budget) {
      const ssize_t n = ReadFrame(peer->fd.get(), nullptr);
      if (n == 0) return;
      if (n == -2) continue;
      if (n < 0) {
        ::epoll_ctl(data_epoll_.get(), EPOLL_CTL_DEL, peer->fd.get(), nullptr);
        MarkDead(peer.get(), UnavailableError("peer closed the doorbell socket"));
        return;
      }
      WireReader r(recv_buf_.data(), static_cast<size_t>(n));
      uint32_t magic = 0;
      uint16_t version = 0;
      uint8_t type = 0, flags = 0;
      uint64_t seq = 0;
      if (!r.Get(&magic) || !r.Get(&version) || !r.Get(&type) || !r.Get(&flags) ||
          magic != kFrameMagic || version != kFrameVersion || type != kAck || !r.Get(&seq)) {
        MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                             "cma van: dropped a malformed ack frame from node {}", peer->id);
        continue;
      }
      {
        std::lock_guard<std::mutex> lock(peer->pending_mu);
        while (!peer->pending.empty() && peer->pending.front().seq <= seq) {
          Pending p = peer->pending.pop_front();
          if (p.staging) peer->staging_free[p.staging->size_class].push_back(p.staging);
          // Owners may run user deleters: release them outside the lock.
          if (p.owner) released_.push_back(std::move(p.owner));
        }
      }
      released_.clear();
      drain_.Notify();
    }
  }

  // Drains an inbound connection's socket, then its frame ring. Returns false when it must
  // be closed.
  bool ServeInbound(InConn* c) {
    if (c->superseded) return false;
    for (int budget = 0; budget < 64; ++budget) {
      UniqueFd passed;
      const ssize_t n = ReadFrame(c->fd.get(), &passed);
      if (n == 0) break;
      if (n == -2) continue;
      if (n < 0) {
        // What the peer wrote into its ring before it went is still delivered (bounded:
        // nothing refills a ring whose writer is gone, unless it lives on elsewhere).
        for (int i = 0; c->ring && i < 64 && !c->ring->Empty(); ++i) {
          if (!ServeRing(c)) break;
        }
        return false;
      }
      if (c->ring) {
        // A doorbell only says "look at the ring"; any other frame waits for its marker.
        if (FrameTypeOf(static_cast<size_t>(n)) == kWake) continue;
        if (c->queued.size() >= kMaxQueuedFrames) {
          MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                               "cma van: pid {} sent {} socket frames without ring markers; "
                               "closing",
                               c->pid, c->queued.size());
          return false;
        }
        c->queued.push_back(
            {std::vector<char>(recv_buf_.data(), recv_buf_.data() + n), std::move(passed)});
        continue;
      }
      if (!DispatchFrame(c, static_cast<size_t>(n), std::move(passed))) return false;
      if (!running_.load(std::memory_order_relaxed)) return true;
    }
    return c->ring ? ServeRing(c) : true;
  }

  // The type of the frame in recv_buf_ (0 when it is not one of ours).
  uint8_t FrameTypeOf(size_t n) const {
    WireReader r(recv_buf_.data(), n);
    uint32_t magic = 0;
    uint16_t version = 0;
    uint8_t type = 0;
    if (!r.Get(&magic) || !r.Get(&version) || !r.Get(&type) || magic != kFrameMagic ||
        version != kFrameVersion) {
      return 0;
    }
    return type;
  }

  // Dispatches the frames the connector wrote into its ring, in order, fetching the
  // socket frame each marker stands for (requires rx_mu_). Returns false when the
  // connection must be closed.
  bool ServeRing(InConn* c) {
    if (c->superseded) return false;
    for (int budget = 0; budget < 64; ++budget) {
      uint32_t kind = 0;
      size_t n = 0;
      auto got = c->ring->Read(recv_buf_.data(), kMaxFrameBytes, &kind, &n);
      if (!got.ok()) {
        MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: pid {}: {}; closing", c->pid,
                             got.status().message());
        return false;
      }
      if (!*got) return true;
      UniqueFd passed;
      if (kind == cma::FrameRing::kMarker) {
        if (c->queued.empty() && !ReadMarkedFrame(c)) return false;
        InConn::Queued q = std::move(c->queued.front());
        c->queued.pop_front();
        n = q.bytes.size();
        std::memcpy(recv_buf_.data(), q.bytes.data(), n);
        passed = std::move(q.fd);
      } else if (kind != cma::FrameRing::kFrame) {
        MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                             "cma van: pid {} wrote a ring record of unknown kind {}; closing",
                             c->pid, kind);
        return false;
      }
      if (!DispatchFrame(c, n, std::move(passed))) return false;
      if (!running_.load(std::memory_order_relaxed)) return true;
    }
    return true;
  }

  // A marker whose socket frame is not read yet: the connector sent that frame before it
  // wrote the marker, so it is in the socket (or the connection is gone). Queues it.
  bool ReadMarkedFrame(InConn* c) {
    const uint64_t deadline = GetNanosecond() + 2'000'000'000ull;
    while (c->queued.empty()) {
      UniqueFd passed;
      const ssize_t n = ReadFrame(c->fd.get(), &passed);
      if (n < 0 && n != -2) return false;
      if (n > 0 && FrameTypeOf(static_cast<size_t>(n)) != kWake) {
        c->queued.push_back(
            {std::vector<char>(recv_buf_.data(), recv_buf_.data() + n), std::move(passed)});
      } else if (n == 0) {
        if (GetNanosecond() >= deadline) {
          MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                               "cma van: pid {} marked a socket frame it did not send; closing",
                               c->pid);
          return false;
        }
        pollfd p{c->fd.get(), POLLIN, 0};
        ::poll(&p, 1, 100);
      }
    }
    return true;
  }

  // Polls every inbound frame ring and dispatches what waits (requires rx_mu_). Returns
  // whether anything was there.
  bool ServeRings() {
    if (rings_.load(std::memory_order_relaxed) == 0) return false;
    ready_.clear();
    for (const auto& [id, c] : in_conns_) {
      if (c->ring && !c->ring->Empty()) ready_.push_back(id);
    }
    if (ready_.empty()) return false;
    const CmaVan* outer = t_dispatching_;
    t_dispatching_ = this;
    for (uint64_t id : ready_) {
      auto it = in_conns_.find(id);
      if (it == in_conns_.end()) continue;
      if (!ServeRing(it->second.get())) CloseInbound(it);
      if (!running_.load(std::memory_order_relaxed)) break;
    }
    t_dispatching_ = outer;
    return true;
  }

  // Before the consumer sleeps (requires rx_mu_): asks every connector to ring the socket
  // for its next frame. False when a frame is already waiting (do not sleep).
  bool ArmRings() {
    bool empty = true;
    for (const auto& kv : in_conns_) {
      if (kv.second->ring && !kv.second->ring->Arm()) empty = false;
    }
    return empty;
  }
  void DisarmRings() {
    for (const auto& kv : in_conns_) {
      if (kv.second->ring) kv.second->ring->Disarm();
    }
  }

  void CloseInbound(std::unordered_map<uint64_t, std::unique_ptr<InConn>>::iterator it) {
    ::epoll_ctl(data_epoll_.get(), EPOLL_CTL_DEL, it->second->fd.get(), nullptr);
    if (it->second->ring) rings_.fetch_sub(1, std::memory_order_relaxed);
    DropImports(it->second.get());
    in_conns_.erase(it);
  }

  // One frame from an inbound connection, in recv_buf_ (requires rx_mu_). Returns false
  // when the connection must be closed.
  bool DispatchFrame(InConn* c, size_t n, UniqueFd passed) {
    WireReader r(recv_buf_.data(), n);
    uint32_t magic = 0;
    uint16_t version = 0;
    uint8_t type = 0, flags = 0;
    if (!r.Get(&magic) || !r.Get(&version) || !r.Get(&type) || !r.Get(&flags) ||
        magic != kFrameMagic || version != kFrameVersion) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: dropped a malformed doorbell frame (pid {})",
                           c->pid);
      return true;
    }
    if (type == kHello) {
      if (c->hello) {
        MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: second handshake from pid {}; closing",
                             c->pid);
        return false;
      }
      return OnHello(c, &r, flags);
    }
    if (!c->hello) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: frame before handshake from pid {}; closing",
                           c->pid);
      return false;
    }
    if (type == kProof && c->handshake) return OnProof(c, &r);
    if (c->handshake) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                           "cma van: frame type {} from pid {} before it authenticated; closing",
                           type, c->pid);
      return false;
    }
    switch (type) {
      case kStaging: OnStaging(c, &r, std::move(passed)); return true;
      case kBlock: OnBlock(c, &r, std::move(passed)); return true;
      case kBlockGone: OnBlockGone(c, &r); return true;
      case kDevBlock: OnDevBlock(c, &r); return true;
      case kDevGone: OnDevGone(c, &r); return true;
      case kData: return OnData(c, flags, n);
      case kRing: return OnRing(c, std::move(passed));
      case kWake: return true;
      default:
        MP_LOG_ERROR(kLog, "cma van: dropped a doorbell frame of unknown type {}", type);
        return true;
    }
  }

  bool OnRing(InConn* c, UniqueFd fd) {
    if (c->ring || !fd.valid()) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                           "cma van: pid {} sent a second frame ring or none; closing", c->pid);
      return false;
    }
    auto ring = cma::FrameRing::Attach(fd.get(), kMaxRingBytes);
    if (!ring.ok()) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: refused the frame ring of pid {}: {}",
                           c->pid, ring.status().message());
      return false;
    }
    c->ring = std::move(ring).value();
    rings_.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

  bool OnProof(InConn* c, WireReader* r) {
    std::string bytes(r->remaining(), '\0');
    for (auto& b : bytes) r->Get(reinterpret_cast<uint8_t*>(&b));
    auto frame = DecodeAuthFrame(bytes.data(), bytes.size());
    auto who = frame.ok() ? c->handshake->OnProof(*frame) : Result<int32_t>(frame.status());
    if (!who.ok()) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: refused pid {}: {}", c->pid,
                           who.status().message());
      return false;
    }
    c->peer_id = *who;
    c->handshake.reset();
    if (options_.self_id != 0) {
      // The newest authenticated connection of a node wins (see the tcp van): what a
      // replaced holder still sends is not its successor's.
      for (auto& [id, other] : in_conns_) {
        if (other.get() != c && other->peer_id == *who) other->superseded = true;
      }
    }
    MP_LOG_DEBUG(kLog, "cma van: connection from node {} (pid {}) authenticated", c->peer_id,
                 c->pid);
    return true;
  }

  bool OnHello(InConn* c, WireReader* r, uint8_t flags) {
    uint32_t pid = 0, probe_len = 0;
    uint64_t probe_addr = 0;
    uint8_t cookie[kCookieBytes];
    uint8_t want_cma = 0;
    if (!r->Get(&pid) || !r->Get(&probe_addr) || !r->Get(&probe_len) || probe_len != kCookieBytes) {
      MP_LOG_ERROR(kLog, "cma van: malformed handshake from pid {}", c->pid);
      return false;
    }
    for (auto& b : cookie) {
      if (!r->Get(&b)) return false;
    }
    if (!r->Get(&want_cma)) return false;
    std::string challenge;
    if (!options_.cluster_token.empty()) {
      if (!(flags & kFlagAuth)) {
        MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                             "cma van: refused pid {}: it did not authenticate (this cluster "
                             "requires MESHPOST_CLUSTER_TOKEN)",
                             c->pid);
        return false;
      }
      std::string bytes(r->remaining(), '\0');
      for (auto& b : bytes) r->Get(reinterpret_cast<uint8_t*>(&b));
      auto hello = DecodeAuthFrame(bytes.data(), bytes.size());
      c->handshake = std::make_unique<AcceptorHandshake>(options_.cluster_token, options_.self_id);
      auto answer =
          hello.ok() ? c->handshake->OnHello(*hello) : Result<std::string>(hello.status());
      if (!answer.ok()) {
        MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: refused pid {}: {}", c->pid,
                             answer.status().message());
        return false;
      }
      challenge = std::move(answer).value();
    }
    c->hello = true;
    c->cma = false;
    if (want_cma && !options_.cma_disable) {
      uint8_t got[kCookieBytes] = {0};
      iovec local{got, kCookieBytes};
      iovec remote{reinterpret_cast<void*>(probe_addr), kCookieBytes};
      // The kernel-reported pid (SO_PEERCRED) is the one valid in our pid namespace.
      ssize_t n = ::process_vm_readv(c->pid, &local, 1, &remote, 1, 0);
      if (n == static_cast<ssize_t>(kCookieBytes) && std::memcmp(got, cookie, kCookieBytes) == 0) {
        c->cma = true;
      } else if (!logged_refused_.exchange(true)) {
        MP_LOG_INFO(kLog,
                    "cross-memory attach refused reading pid {} ({}): using the shared-memory "
                    "copy path (logged once)",
                    c->pid, n < 0 ? std::strerror(errno) : "cookie mismatch");
      }
    }
    WireWriter w;
    PutPreamble(&w, kHelloAck, challenge.empty() ? 0 : kFlagAuth);
    w.Put<uint8_t>(c->cma ? 1 : 0);
    w.PutBytes(challenge.data(), challenge.size());
    Status s = SendFrame(c->fd.get(), w.buffer().data(), w.size(), -1, 1000);
    if (!s.ok()) {
      MP_LOG_ERROR(kLog, "cma van: handshake reply to pid {}: {}", c->pid, s.ToString());
      return false;
    }
    return true;
  }

  void OnStaging(InConn* c, WireReader* r, UniqueFd fd) {
    uint32_t id = 0;
    uint64_t size = 0;
    if (!r->Get(&id) || !r->Get(&size) || !fd.valid()) {
      MP_LOG_ERROR(kLog, "cma van: malformed staging announcement from pid {}", c->pid);
      return;
    }
    if (c->staging.size() >= kMaxStagingBuffers || c->staging.count(id) != 0) {
      MP_LOG_ERROR(kLog, "cma van: refused staging buffer {} from pid {} (duplicate or too many)",
                   id, c->pid);
      return;
    }
    // Only a sealed memfd of at least the announced size can be mapped without SIGBUS risk.
    struct stat st {};
    const int seals = ::fcntl(fd.get(), F_GET_SEALS);
    if (::fstat(fd.get(), &st) != 0 || seals < 0 || !(seals & F_SEAL_SHRINK) ||
        static_cast<uint64_t>(st.st_size) < size || size == 0 || size > kMaxStagingBytes) {
      MP_LOG_ERROR(kLog,
                   "cma van: refused staging buffer {} from pid {} (not a sealed memfd "
                   "of {} bytes)",
                   id, c->pid, size);
      return;
    }
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.get(), 0);
    if (p == MAP_FAILED) {
      MP_LOG_ERROR(kLog, "cma van: mmap staging buffer: {}", std::strerror(errno));
      return;
    }
    c->staging.emplace(id, Mapping(p, size));
  }

  // Validates a source against the frame/connection; returns the local bytes for inline
  // and staged sources (nullptr for remote ones).
  Status CheckSource(InConn* c, const Source& s, size_t inline_begin, size_t frame_size,
                     const char** local, std::shared_ptr<void>* keep = nullptr) {
    *local = nullptr;
    switch (s.kind) {
      case kInline:
        if (s.offset > frame_size - inline_begin || s.len > frame_size - inline_begin - s.offset) {
          return DataLossError("inline bytes outside the frame");
        }
        *local = recv_buf_.data() + inline_begin + s.offset;
        return OkStatus();
      case kStaged: {
        auto it = c->staging.find(s.staging_id);
        if (it == c->staging.end()) return DataLossError("unknown staging buffer");
        if (s.offset > it->second.size() || s.len > it->second.size() - s.offset) {
          return DataLossError("range outside its staging buffer");
        }
        *local = it->second.data() + s.offset;
        return OkStatus();
      }
      case kRemote:
        if (!c->cma) return DataLossError("remote read on a connection without CMA");
        return OkStatus();
      case kShared: {
        std::shared_ptr<Mapping> map = FindImport(c->id, s.staging_id);
        if (!map) return DataLossError("unknown shared block " + std::to_string(s.staging_id));
        if (s.offset > map->size() || s.len > map->size() - s.offset) {
          return DataLossError("range outside its shared block");
        }
        *local = map->data() + s.offset;
        if (keep) *keep = std::shared_ptr<void>(map, map->data() + s.offset);
        return OkStatus();
      }
      case kPeerShared: {
        // Our own block: only one we passed to this very process, and inside it.
        std::shared_ptr<SharedBlock> block = SharedMemoryRegistry::Get().FindId(s.staging_id);
        if (!block || !ExportedTo(s.staging_id, c->pid)) {
          return DataLossError("shared block " + std::to_string(s.staging_id) +
                               " is not one this node passed to the sender");
        }
        if (s.offset > block->size() || s.len > block->size() - s.offset) {
          return DataLossError("range outside its shared block");
        }
        *local = block->data() + s.offset;
        if (keep) *keep = std::shared_ptr<void>(block, block->data() + s.offset);
        return OkStatus();
      }
      default: return DataLossError("unknown source kind " + std::to_string(s.kind));
    }
  }

  // Copies the remote sources queued in read_local_/read_remote_ (process_vm_readv).
  Status FlushReads(pid_t pid) {
    for (size_t b = 0; b < read_local_.size(); b += kIovBatch) {
      const size_t cnt = std::min(kIovBatch, read_local_.size() - b);
      size_t want = 0;
      for (size_t k = 0; k < cnt; ++k) want += read_local_[b + k].iov_len;
      ssize_t got = ::process_vm_readv(pid, &read_local_[b], cnt, &read_remote_[b], cnt, 0);
      if (got < 0) return UnavailableError(ErrnoText("process_vm_readv", errno));
      if (static_cast<size_t>(got) != want) {
        return DataLossError("process_vm_readv copied " + std::to_string(got) + " of " +
                             std::to_string(want) + " bytes (sender address invalid)");
      }
    }
    read_local_.clear();
    read_remote_.clear();
    return OkStatus();
  }

  bool OnData(InConn* c, uint8_t flags, size_t frame_size) {
    WireReader r(recv_buf_.data() + kFramePreamble, frame_size - kFramePreamble);
    uint64_t seq = 0;
    uint32_t nseg = 0;
    if (!r.Get(&seq) || !r.Get(&nseg) || nseg > kMaxTensorsPerMessage ||
        kDataFixed + kSourceBytes * (size_t{nseg} + 1) > frame_size) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: dropped a malformed data frame from pid {}",
                           c->pid);
      return true;  // no trustworthy seq to ack; the sender learns at disconnect
    }
    Source meta_src;
    GetSource(&r, &meta_src);
    sources_.resize(nseg);
    for (auto& s : sources_) GetSource(&r, &s);
    slot_sources_.clear();
    if (flags & kFlagSlots) {
      uint32_t nslots = 0;
      if (!r.Get(&nslots) || nslots > kMaxTensorsPerMessage ||
          r.remaining() < kSourceBytes * size_t{nslots}) {
        MP_LOG_ERROR_LIMITED(
            log_limit_, kLog,
            "cma van: dropped a data frame with a malformed slot table from pid {}", c->pid);
        return true;
      }
      slot_sources_.resize(nslots);
      for (auto& s : slot_sources_) GetSource(&r, &s);
    }
    if (flags & kFlagViews) {
      uint32_t nviews = 0;
      if (!r.Get(&nviews) || nviews > kMaxViewDeltas ||
          r.remaining() < kViewDeltaBytes * size_t{nviews}) {
        MP_LOG_ERROR_LIMITED(
            log_limit_, kLog,
            "cma van: dropped a data frame with a malformed view report from pid {}", c->pid);
        return true;
      }
      view_deltas_.resize(nviews);
      for (auto& [block, delta] : view_deltas_) {
        r.Get(&block);
        r.Get(&delta);
      }
      ApplyPeerViews(c, view_deltas_);
    }
    const size_t inline_begin = frame_size - r.remaining();
    const bool needs_ack = (flags & kFlagNeedsAck) != 0;
    read_local_.clear();
    read_remote_.clear();

    // 1. The header (meta), inline or pulled.
    const char* local = nullptr;
    Status st = CheckSource(c, meta_src, inline_begin, frame_size, &local);
    if (st.ok() && meta_src.len > kMaxMetaBytes) st = DataLossError("meta too large");
    const char* meta_bytes = local;
    if (st.ok() && meta_src.kind == kRemote) {
      meta_buf_.resize(meta_src.len);
      read_local_.push_back({meta_buf_.data(), meta_src.len});
      read_remote_.push_back({reinterpret_cast<void*>(meta_src.offset), meta_src.len});
      st = FlushReads(c->pid);
      meta_bytes = meta_buf_.data();
    }
    Result<Meta> meta = st.ok() ? DecodeMeta(meta_bytes, meta_src.len) : Result<Meta>(st);
    if (!meta.ok()) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog, "cma van: dropped malformed frame from pid {}: {}",
                           c->pid, meta.status().ToString());
      return !needs_ack || SendAck(c, seq);
    }
    if (c->peer_id >= 0 && meta->sender != c->peer_id) {
      MP_LOG_ERROR_LIMITED(log_limit_, kLog,
                           "cma van: dropped {} claiming to come from node {} on the "
                           "connection node {} authenticated",
                           CommandName(meta->cmd), meta->sender, c->peer_id);
      return !needs_ack || SendAck(c, seq);
    }
    InMessage in;
    in.meta = std::move(meta).value();
    // With a token the connection's authenticated node (checked equal to the claim above);
    // without one the doorbell names a pid, not a node, so only the claim is known.
    in.peer = c->peer_id >= 0 ? c->peer_id : in.meta.sender;

    // 2. Every data segment into the destination the receiver chooses.
    Status refused;
    if (in.meta.data.size() != nseg) {
      refused =
          DataLossError("frame carries " + std::to_string(nseg) +
                        " segments; its header describes " + std::to_string(in.meta.data.size()));
    }
    in.segments.reserve(nseg);
    const bool device_active = device_.active();
    for (size_t i = 0; refused.ok() && i < nseg; ++i) {
      const Source& s = sources_[i];
      if (IsDeviceSource(s.kind)) {
        refused = ReceiveDeviceSegment(c, in.meta, i, s, &in);
        continue;
      }
      std::shared_ptr<void> keep;
      refused = CheckSource(c, s, inline_begin, frame_size, &local, &keep);
      if (!refused.ok()) break;
      auto dest = SegmentDestination(receiver_, in.meta, i, s.len);
      if (!dest.ok()) {
        refused = dest.status();
        break;
      }
      RecvSegment seg;
      seg.size = s.len;
      const int dst_device =
          device_active && *dest != nullptr ? device_.DeviceOf(*dest, s.len) : -1;
      if (dst_device >= 0) {
        // Host bytes for device memory (a CPU response into a CUDA pull slot): a host
        // copy first where they are remote, then host to device on our stream.
        seg.data = *dest;
        refused = HostToDevice(s, local, seg.data, dst_device);
      } else if (s.kind == kShared || s.kind == kPeerShared) {
        // Mapped memory: one memcpy into a chosen destination (none when the peer wrote
        // our slot in place), or a view of the mapping that keeps it mapped.
        if (*dest != nullptr) {
          if (s.len > 0 && *dest != local) std::memcpy(*dest, local, s.len);
          seg.data = *dest;
        } else {
          seg.data = const_cast<char*>(local);
          // A view of the sender's block: the sender hears of it (and of its end).
          seg.owner = s.kind == kShared
                          ? ViewLedger::View(views_held_, in.peer, s.staging_id, std::move(keep))
                          : std::move(keep);
        }
      } else if (*dest != nullptr) {
        seg.data = *dest;
      } else if (s.len > 0) {
        seg.owner = pool_->Get(s.len);
        if (!seg.owner) {
          refused = ResourceExhaustedError("cannot allocate a receive buffer of " +
                                           std::to_string(s.len) + " bytes");
          break;
        }
        seg.data = seg.owner.get();
      }
      if (s.len > 0 && dst_device < 0 && s.kind != kShared && s.kind != kPeerShared) {
        if (s.kind == kRemote) {
          read_local_.push_back({seg.data, s.len});
          read_remote_.push_back({reinterpret_cast<void*>(s.offset), s.len});
        } else {
          std::memcpy(seg.data, local, s.len);
        }
      }
      in.segments.push_back(std::move(seg));
    }
    if (refused.ok()) refused = FlushReads(c->pid);
    for (const Bounce& b : to_device_) {
      if (!refused.ok()) break;
      refused = device_.Copy(b.dst, b.buffer.get(), b.size, b.device);
    }
    // Every queued device copy finished before the ack lets the sender reuse its memory.
    Status copied = device_.Finish();
    if (refused.ok()) refused = copied;
    to_device_.clear();
    if (refused.ok() && !slot_sources_.empty()) refused = MapSlots(c, &in);
    read_local_.clear();
    read_remote_.clear();
    // Ack before user code runs: the sender may release its buffers right away.
    const bool alive = !needs_ack || SendAck(c, seq);
    Deliver(receiver_, "cma van", std::move(in), refused, log_limit_);
    return alive;
  }

  // The request's pull slots that lie in the sender's shared blocks or CUDA allocations,
  // as writable views (host or device memory).
  Status MapSlots(InConn* c, InMessage* in) {
    if (in->meta.cmd != Command::kRequest || slot_sources_.size() != in->meta.slots.size()) {
      return DataLossError("slot table of " + std::to_string(slot_sources_.size()) +
                           " entries for a " + CommandName(in->meta.cmd) + " with " +
                           std::to_string(in->meta.slots.size()) + " pull slots");
    }
    in->peer_slots.resize(slot_sources_.size());
    for (size_t j = 0; j < slot_sources_.size(); ++j) {
      const Source& s = slot_sources_[j];
      if (s.kind == kInline && s.len == 0) continue;
      if (s.kind != kShared && s.kind != kDevice && s.kind != kDeviceLocal)
        return DataLossError("slot table entry of kind " + std::to_string(s.kind));
      if (s.len != in->meta.slots[j].nbytes) {
        return DataLossError("slot " + std::to_string(j) + " maps " + std::to_string(s.len) +
                             " bytes; its descriptor says " +
                             std::to_string(in->meta.slots[j].nbytes));
      }
      if (s.kind != kShared) {
        MESHPOST_ASSIGN_OR_RETURN(cma::DeviceRange r, DeviceSource(c, s));
        in->peer_slots[j] =
            RecvSegment{r.ptr, s.len, std::move(r.keep), Device{DeviceType::kCUDA, r.device}};
        continue;
      }
      const char* local = nullptr;
      std::shared_ptr<void> keep;
      MESHPOST_RETURN_IF_ERROR(CheckSource(c, s, 0, 0, &local, &keep));
      in->peer_slots[j] = RecvSegment{const_cast<char*>(local), s.len, std::move(keep)};
    }
    return OkStatus();
  }

  bool SendAck(InConn* c, uint64_t seq) {
    WireWriter& w = ack_frame_;
    w.buffer().clear();
    PutPreamble(&w, kAck, 0);
    w.Put<uint64_t>(seq);
    Status s = SendFrame(c->fd.get(), w.buffer().data(), w.size(), -1, 1000);
    if (!s.ok()) {
      MP_LOG_ERROR(kLog, "cma van: ack to pid {} failed ({}); closing", c->pid, s.ToString());
      return false;
    }
    return true;
  }

  const VanOptions options_;
  const std::string host_identity_ = HostIdentity();
  std::shared_ptr<BufferPool> pool_;
  std::array<uint8_t, kCookieBytes> probe_cookie_{};
  UniqueFd listen_fd_;
  UniqueFd epoll_fd_;    // main set: the receive thread waits here
  UniqueFd data_epoll_;  // data set: connections and the kick (in the main set, or a caller's)
  UniqueFd wake_fd_;     // wakes the receive thread (Stop)
  UniqueFd kick_fd_;     // wakes a caller inside Progress (WakeProgress, Stop)
  std::string endpoint_;
  VanReceiver* receiver_ = nullptr;
  std::atomic<bool> running_{false};
  std::atomic<bool> stopped_{false};
  std::atomic<bool> logged_fallback_{false};
  std::atomic<bool> logged_refused_{false};
  std::atomic<uint64_t> next_conn_id_{kFirstConnId};
  std::thread recv_thread_;
  Waiter drain_;                      // woken on acks and peer death (Stop / Disconnect drain)
  mutable cma::DeviceMemory device_;  // CUDA memory: registrations, IPC exports and imports

  mutable std::mutex peers_mu_;
  std::unordered_map<int, std::shared_ptr<Peer>> peers_;
  std::unordered_map<uint64_t, std::shared_ptr<Peer>> out_conns_;

  // Caller progress: held by the thread between BeginProgress and EndProgress;
  // progress_held_ mirrors it for the receive thread and WakeProgress.
  std::mutex progress_role_;
  std::atomic<bool> progress_held_{false};
  // Receive-side state, touched only by the thread that dispatches, under rx_mu_ (the
  // receive thread, or a caller inside Progress).
  std::mutex rx_mu_;
  std::unordered_map<uint64_t, std::unique_ptr<InConn>> in_conns_;
  std::vector<char> recv_buf_ = std::vector<char>(kMaxFrameBytes + 64);
  std::atomic<int> rings_{0};    // inbound connections with a frame ring
  std::vector<uint64_t> ready_;  // ServeRings scratch
  std::string meta_buf_;
  std::vector<Source> sources_;
  std::vector<Source> slot_sources_;
  std::vector<iovec> read_local_;
  std::vector<iovec> read_remote_;
  struct Bounce {  // remote host bytes bound for device memory, read here first
    void* dst = nullptr;
    std::shared_ptr<void> buffer;
    size_t size = 0;
    int device = 0;
  };
  std::vector<Bounce> to_device_;
  std::vector<std::shared_ptr<const void>> released_;
  WireWriter ack_frame_;
  LogRateLimiter log_limit_;

  // Our shared blocks passed to peers, and the freed ones to announce per connection.
  struct ExportState {
    std::mutex mu;
    std::unordered_map<uint32_t, std::vector<std::pair<uint64_t, pid_t>>> exported;
    std::unordered_map<uint64_t, std::vector<uint32_t>> gone;
    // Views of our blocks each peer reported holding: (block, inbound connection) -> count.
    std::map<std::pair<uint32_t, uint64_t>, int64_t> peer_views;
  };
  // Views we hold of peers' blocks, not yet reported to them.
  const std::shared_ptr<ViewLedger> views_held_ = std::make_shared<ViewLedger>();
  std::vector<ViewLedger::Delta> view_deltas_;  // receive thread (or progress holder)
  std::shared_ptr<ExportState> exports_ = std::make_shared<ExportState>();
  // Peers' blocks mapped here, by (inbound connection, block id) and by address (so a
  // response written into one is sent as a name). Receive thread writes, senders read.
  struct Import {
    pid_t pid = 0;
    uint32_t block = 0;
    std::shared_ptr<Mapping> map;
  };
  std::mutex imports_mu_;
  std::map<std::pair<uint64_t, uint32_t>, Import> imports_;
  std::map<uintptr_t, std::pair<uint64_t, uint32_t>> import_addrs_;
  std::shared_ptr<void> free_listener_;  // last: unregistered first
};

}  // namespace

std::unique_ptr<Van> CreateCmaVan(const VanOptions& options) {
  return std::make_unique<CmaVan>(options);
}

}  // namespace meshpost
