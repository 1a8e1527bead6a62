// RdmaVan: the Van face of RdmaTransport plus the completion poller thread. The poller
// is the adaptive wait of DESIGN §4: it polls the CQ while there was recent activity
// (spin_ns), then arms the completion channel and blocks in 100 ms slices so Stop() is
// noticed; busy_poll never blocks.
#include <atomic>
#include <thread>

#include "common/clock.h"
#include "common/logging.h"
#include "van/rdma/rdma_transport.h"
#include "van/rdma/rdma_van.h"

namespace meshpost {
namespace {

// How long Stop waits for queued and in-flight sends before destroying the queue pairs.
constexpr int64_t kStopDrainMs = 1000;

class RdmaVanImpl : public RdmaVan {
 public:
  RdmaVanImpl(const RdmaOptions& options, RdmaControlSend control_send)
      : options_(options), control_send_(std::move(control_send)) {}
  ~RdmaVanImpl() override { Stop(); }

  const char* name() const override { return "rdma"; }

  Result<int> Bind(const std::string& /*host*/, int /*port*/) override {
    if (transport_) return FailedPreconditionError("RdmaVan::Bind: already bound");
    auto t = rdma::RdmaTransport::Create(
        options_.verbs ? options_.verbs() : rdma::CreateIbverbsApi(), options_, control_send_);
    if (!t.ok()) return t.status().Annotate("RdmaVan::Bind");
    transport_ = std::move(t).value();
    if (failure_cb_) transport_->SetPeerFailureCallback(failure_cb_);
    const auto& l = transport_->local();
    endpoint_ = "rdma://" + l.device + ":" + std::to_string(l.port) + "/gid/" +
                std::to_string(l.gid_index);
    return 0;
  }

  std::string endpoint() const override { return endpoint_; }

  Status Start(VanReceiver* receiver) override {
    if (!transport_) return FailedPreconditionError("RdmaVan::Start before Bind");
    if (running_.exchange(true)) return FailedPreconditionError("RdmaVan already started");
    transport_->SetReceiver(receiver);
    poller_ = std::thread([this] { PollLoop(); });
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
      Status s = transport_->Drain(kStopDrainMs);
      if (!s.ok()) MP_LOG_WARN("van", "rdma: stopping with sends unfinished: {}", s.ToString());
    }
    if (running_.exchange(false) && poller_.joinable()) poller_.join();
    if (transport_) transport_->Shutdown();
  }

  Status OnControlBlob(int peer_id, const std::string& blob) override {
    if (!transport_) return FailedPreconditionError("RdmaVan::OnControlBlob before Bind");
    return transport_->OnControlBlob(peer_id, blob.data(), blob.size());
  }
  Status RegisterRecvBuffer(int peer_id, int64_t key, void* addr, size_t size) override {
    if (!transport_) return FailedPreconditionError("RdmaVan::RegisterRecvBuffer before Bind");
    return transport_->RegisterRecvBuffer(peer_id, key, addr, size);
  }
  Status RegisterMemory(const void* addr, size_t size,
                        const std::weak_ptr<const void>& owner) override {
    if (!transport_) return FailedPreconditionError("RdmaVan::RegisterMemory before Bind");
    return transport_->RegisterMemory(addr, size, owner);
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
  void SetPeerFailureCallback(RdmaPeerFailure cb) override {
    failure_cb_ = cb;
    if (transport_) transport_->SetPeerFailureCallback(std::move(cb));
  }

 private:
  void PollLoop() {
    uint64_t last_activity = GetNanosecond();
    while (running_.load(std::memory_order_relaxed)) {
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
  RdmaControlSend control_send_;
  RdmaPeerFailure failure_cb_;
  std::unique_ptr<rdma::RdmaTransport> transport_;
  std::string endpoint_;
  std::atomic<bool> running_{false};
  std::thread poller_;
};

}  // namespace

Result<std::unique_ptr<RdmaVan>> CreateRdmaVan(const RdmaOptions& options,
                                               RdmaControlSend control_send) {
  if (!control_send) {
    return InvalidArgumentError("CreateRdmaVan: control_send is empty; rendezvous blobs need a "
                                "control channel");
  }
  return std::unique_ptr<RdmaVan>(new RdmaVanImpl(options, std::move(control_send)));
}

}  // namespace meshpost
