// RdmaVan: the Van face of RdmaTransport plus the completion poller thread. The poller
// is the adaptive wait of DESIGN §4: it polls the CQ while there was recent activity
// (spin_ns), then arms the completion channel and blocks in 100 ms slices so Stop() is
// noticed; busy_poll never blocks. The transport may detect a dead connection on any
// thread that drives it (a failed post inside Send); the van queues such failures and the
// poller reports them, so VanReceiver::OnPeerFailure never runs inside a caller's Send.
#include "van/rdma/rdma_van.h"

#include <atomic>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/logging.h"
#include "van/rdma/rdma_transport.h"

namespace meshpost {
namespace {

class RdmaVanImpl : public RdmaVan {
 public:
  explicit RdmaVanImpl(const RdmaOptions& options) : options_(options) {}
  ~RdmaVanImpl() override { Stop(); }

  const char* name() const override { return "rdma"; }

  Result<int> Bind(const std::string& /*host*/, int /*port*/) override {
    if (transport_) return FailedPreconditionError("RdmaVan::Bind: already bound");
    auto t = rdma::RdmaTransport::Create(
        options_.verbs ? options_.verbs() : rdma::CreateIbverbsApi(), options_,
        [this](int peer, std::string blob) -> Status {
          VanReceiver* r = receiver_.load(std::memory_order_acquire);
          if (r == nullptr) {
            return FailedPreconditionError("RdmaVan: rendezvous with node " + std::to_string(peer) +
                                           " before Start");
          }
          return r->SendRendezvous(name(), peer, std::move(blob));
        });
    if (!t.ok()) return t.status().Annotate("RdmaVan::Bind");
    transport_ = std::move(t).value();
    transport_->SetPeerFailureCallback([this](int peer, const Status& why) {
      std::lock_guard<std::mutex> lock(failures_mu_);
      failures_.emplace_back(peer, why);
      failures_pending_.store(true, std::memory_order_release);
    });
    const auto& l = transport_->local();
    endpoint_ =
        "rdma://" + l.device + ":" + std::to_string(l.port) + "/gid/" + std::to_string(l.gid_index);
    return 0;
  }

  std::string endpoint() const override { return endpoint_; }

  Status Start(VanReceiver* receiver) override {
    if (!transport_) return FailedPreconditionError("RdmaVan::Start before Bind");
    if (running_.exchange(true)) return FailedPreconditionError("RdmaVan already started");
    receiver_.store(receiver, std::memory_order_release);
    transport_->SetReceiver(receiver);
    poller_ = std::thread([this] {
      PinCurrentThread(options_.pinner, "rdma progress");
      PollLoop();
    });
    return OkStatus();
  }

  Status Connect(const PeerAddress& peer) override {
    if (!transport_) return FailedPreconditionError("RdmaVan::Connect before Bind");
    return transport_->Connect(peer.id);
  }

  void Disconnect(int peer_id) override {
    if (transport_) transport_->Disconnect(peer_id);
  }

  Status Send(OutMessage&& msg) override {
    if (!transport_) return FailedPreconditionError("RdmaVan::Send before Bind");
    auto h = transport_->Send(std::move(msg), /*detached=*/true);
    return h.ok() ? OkStatus() : h.status();
  }

  void Stop() override {
    if (transport_ && running_.load()) {
      // The poller still runs: let the last sends (responses, PEER_LEAVE) complete.
      Status s = transport_->Drain(options_.stop_drain_ms);
      if (!s.ok()) MP_LOG_WARN("van", "rdma: stopping with sends unfinished: {}", s.ToString());
    }
    if (running_.exchange(false) && poller_.joinable()) poller_.join();
    if (transport_) transport_->Shutdown();
  }

  Status OnRendezvousBlob(int peer_id, const std::string& blob) override {
    if (!transport_) return FailedPreconditionError("RdmaVan::OnRendezvousBlob before Bind");
    return transport_->OnControlBlob(peer_id, blob.data(), blob.size());
  }
  bool RegistersMemory() const override { return true; }
  // CUDA memory is registered for GPUDirect unless MESHPOST_RDMA_GPU=staging.
  bool SupportsMemory(MemoryKind kind) const override {
    return kind == MemoryKind::kHost ||
           (kind == MemoryKind::kCudaDevice && options_.gpu != "staging");
  }
  // A CUDA receive buffer is written in place by the peer's RDMA WRITE (GPUDirect), or,
  // for a push that landed in a van buffer, copied into by the device (rdma_transport.h).
  bool WritesDeviceDestinations() const override { return options_.gpu != "staging"; }
  Status RegisterRecvBuffer(int peer_id, int64_t key, const MemoryRegion& region) override {
    MESHPOST_RETURN_IF_ERROR(CheckRegion("RegisterRecvBuffer", region));
    return transport_->RegisterRecvBuffer(peer_id, key, region.addr, region.size,
                                          region.kind == MemoryKind::kCudaDevice, region.device);
  }
  Status RegisterMemory(const MemoryRegion& region) override {
    MESHPOST_RETURN_IF_ERROR(CheckRegion("RegisterMemory", region));
    return transport_->RegisterMemory(region.addr, region.size, region.owner,
                                      region.kind == MemoryKind::kCudaDevice);
  }
  void InvalidateMemory(const void* addr, size_t size) override {
    if (transport_) transport_->InvalidateMemory(addr, size);
  }
  Result<uint64_t> SendAsync(OutMessage&& msg) override {
    if (!transport_) return FailedPreconditionError("RdmaVan::SendAsync before Bind");
    return transport_->Send(std::move(msg), /*detached=*/false);
  }
  Status WaitSend(uint64_t handle, int64_t timeout_ms) override {
    if (!transport_) return FailedPreconditionError("RdmaVan::WaitSend before Bind");
    return transport_->Wait(handle, timeout_ms);
  }
  bool IsReady(int peer_id) const override {
    return transport_ && transport_->state(peer_id) == rdma::PeerState::kReady;
  }

 private:
  Status CheckRegion(const char* fn, const MemoryRegion& region) const {
    if (!transport_) return FailedPreconditionError(std::string("RdmaVan::") + fn + " before Bind");
    if (!SupportsMemory(region.kind)) {
      return UnimplementedError(
          std::string("RdmaVan::") + fn + ": memory kind '" + MemoryKindName(region.kind) +
          "' is not supported (host memory" +
          (region.kind == MemoryKind::kCudaDevice
               ? std::string("; CUDA memory is refused because MESHPOST_RDMA_GPU=staging: "
                             "stage it through pinned host memory)")
               : std::string(", and CUDA memory unless MESHPOST_RDMA_GPU=staging)")));
    }
    return OkStatus();
  }

  // Poller thread: reports connection failures the transport queued from any thread.
  void ReportFailures() {
    if (!failures_pending_.load(std::memory_order_acquire)) return;
    std::vector<std::pair<int, Status>> failures;
    {
      std::lock_guard<std::mutex> lock(failures_mu_);
      failures.swap(failures_);
      failures_pending_.store(false, std::memory_order_relaxed);
    }
    VanReceiver* r = receiver_.load(std::memory_order_acquire);
    for (auto& [peer, why] : failures) {
      if (r != nullptr) r->OnPeerFailure(peer, why);
    }
  }

  void PollLoop() {
    uint64_t last_activity = GetNanosecond();
    while (running_.load(std::memory_order_relaxed)) {
      ReportFailures();
      if (transport_->Progress() > 0) {
        last_activity = GetNanosecond();
        continue;
      }
      if (options_.wait.busy_poll ||
          GetNanosecond() - last_activity < static_cast<uint64_t>(options_.wait.spin_ns)) {
        CpuRelax();
        continue;
      }
      Status s = transport_->BlockForCompletions(100);
      if (!s.ok()) {
        MP_LOG_ERROR("van", "rdma: waiting for completions failed: {}", s.ToString());
        std::this_thread::yield();
      }
      last_activity = GetNanosecond();
    }
  }

  RdmaOptions options_;
  std::atomic<VanReceiver*> receiver_{nullptr};
  std::mutex failures_mu_;
  std::vector<std::pair<int, Status>> failures_;  // guarded by failures_mu_
  std::atomic<bool> failures_pending_{false};
  std::unique_ptr<rdma::RdmaTransport> transport_;
  std::string endpoint_;
  std::atomic<bool> running_{false};
  std::thread poller_;
};

}  // namespace

Result<std::unique_ptr<RdmaVan>> CreateRdmaVan(const RdmaOptions& options) {
  return std::unique_ptr<RdmaVan>(new RdmaVanImpl(options));
}

}  // namespace meshpost
