// ZeroMQ TCP van. One ROUTER socket receives from every peer on the receive thread; one
// DEALER socket per peer sends. Sends happen on the caller's thread under that peer's
// mutex rather than being handed to a sender thread: a hand-off costs a thread wake-up
// (tens of microseconds on a shared 2-core box), more than the whole small-message send.
#include <zmq.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "common/logging.h"
#include "van/codec.h"
#include "van/zmq/zmq_van.h"

namespace meshpost {
namespace {

constexpr const char* kLog = "van";

struct ZmqMsg {
  zmq_msg_t msg;
  ZmqMsg() { zmq_msg_init(&msg); }
  ~ZmqMsg() { zmq_msg_close(&msg); }
  ZmqMsg(const ZmqMsg&) = delete;
  ZmqMsg& operator=(const ZmqMsg&) = delete;
  void* data() { return zmq_msg_data(&msg); }
  size_t size() { return zmq_msg_size(&msg); }
};

// Rides along a zero-copy frame; ZeroMQ calls ReleaseZeroCopy from its I/O thread once it
// no longer reads the bytes, which drops the owner and lets Stop() know the send drained.
struct ZeroCopyHint {
  std::shared_ptr<const void> owner;
  std::atomic<int64_t>* inflight;
};

void ReleaseZeroCopy(void* /*data*/, void* hint) {
  auto* h = static_cast<ZeroCopyHint*>(hint);
  h->inflight->fetch_sub(1, std::memory_order_acq_rel);
  delete h;
}

std::string ZmqError(const char* what) {
  return std::string(what) + ": " + zmq_strerror(zmq_errno());
}

class ZmqVan : public Van {
 public:
  explicit ZmqVan(const VanOptions& options) : options_(options) {
    ctx_ = zmq_ctx_new();
    zmq_ctx_set(ctx_, ZMQ_IO_THREADS, options_.io_threads);
    zmq_ctx_set(ctx_, ZMQ_MAX_SOCKETS, 65536);
  }
  ~ZmqVan() override {
    Stop();
    zmq_ctx_term(ctx_);
  }

  const char* name() const override { return "tcp"; }
  std::string endpoint() const override { return endpoint_; }

  Result<int> Bind(const std::string& host, int port) override {
    if (receiver_socket_ != nullptr) return FailedPreconditionError("van already bound");
    void* s = zmq_socket(ctx_, ZMQ_ROUTER);
    if (s == nullptr) return InternalError(ZmqError("zmq_socket(ROUTER)"));
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof(zero));
    zmq_setsockopt(s, ZMQ_RCVHWM, &zero, sizeof(zero));
    const std::string endpoint =
        "tcp://" + (host.empty() ? std::string("*") : host) + ":" +
        (port == 0 ? std::string("*") : std::to_string(port));
    if (zmq_bind(s, endpoint.c_str()) != 0) {
      Status st = UnavailableError(ZmqError(("bind " + endpoint).c_str()));
      zmq_close(s);
      return st;
    }
    char last[256];
    size_t len = sizeof(last);
    zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, last, &len);
    const char* colon = std::strrchr(last, ':');
    int bound = colon ? std::atoi(colon + 1) : 0;
    if (bound <= 0) {
      zmq_close(s);
      return InternalError(std::string("cannot read bound port from ") + last);
    }
    receiver_socket_ = s;
    endpoint_ = last;
    MP_LOG_DEBUG(kLog, "bound {}", last);
    return bound;
  }

  Status Start(VanReceiver* receiver) override {
    if (receiver_socket_ == nullptr) return FailedPreconditionError("van Start before Bind");
    if (running_.exchange(true)) return FailedPreconditionError("van already started");
    receiver_ = receiver;
    recv_thread_ = std::thread([this] {
      PinCurrentThread(options_.pinner, "tcp receive");
      ReceiveLoop();
    });
    return OkStatus();
  }

  Status Connect(const PeerAddress& peer) override {
    std::lock_guard<std::mutex> lock(peers_mu_);
    auto it = peers_.find(peer.id);
    if (it != peers_.end()) {
      if (it->second->host == peer.host && it->second->port == peer.port) return OkStatus();
      peers_.erase(it);
    }
    auto p = std::make_shared<Peer>();
    p->host = peer.host;
    p->port = peer.port;
    p->socket = zmq_socket(ctx_, ZMQ_DEALER);
    if (p->socket == nullptr) return InternalError(ZmqError("zmq_socket(DEALER)"));
    int zero = 0;
    zmq_setsockopt(p->socket, ZMQ_LINGER, &zero, sizeof(zero));
    zmq_setsockopt(p->socket, ZMQ_SNDHWM, &zero, sizeof(zero));
    const std::string endpoint = "tcp://" + peer.host + ":" + std::to_string(peer.port);
    if (zmq_connect(p->socket, endpoint.c_str()) != 0) {
      return UnavailableError(ZmqError(("connect " + endpoint).c_str()));
    }
    peers_[peer.id] = std::move(p);
    MP_LOG_DEBUG(kLog, "connected to node {} at {}", peer.id, endpoint);
    return OkStatus();
  }

  void Disconnect(int peer_id) override {
    std::lock_guard<std::mutex> lock(peers_mu_);
    peers_.erase(peer_id);
  }

  Status Send(OutMessage&& msg) override {
    std::shared_ptr<Peer> peer;
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      auto it = peers_.find(msg.meta.recipient);
      if (it == peers_.end()) {
        return UnavailableError("no connection to node " + std::to_string(msg.meta.recipient));
      }
      peer = it->second;
    }
    for (size_t i = 0; i < msg.segments.size(); ++i) {
      if (msg.segments[i].size != 0 && msg.segments[i].data == nullptr) {
        return InvalidArgumentError("ZmqVan::Send: segment " + std::to_string(i) + " has " +
                                    std::to_string(msg.segments[i].size) +
                                    " bytes and a null data pointer");
      }
    }
    const std::string header = EncodeMeta(msg.meta);
    std::lock_guard<std::mutex> lock(peer->mu);
    if (peer->socket == nullptr) return UnavailableError("connection closed");
    const size_t n = msg.segments.size();
    int rc = zmq_send(peer->socket, header.data(), header.size(), n > 0 ? ZMQ_SNDMORE : 0);
    if (rc < 0) return UnavailableError(ZmqError("send header"));
    for (size_t i = 0; i < n; ++i) {
      SendSegment& seg = msg.segments[i];
      const int flags = i + 1 < n ? ZMQ_SNDMORE : 0;
      zmq_msg_t part;
      if (seg.size < options_.zero_copy_min) {
        zmq_msg_init_size(&part, seg.size);
        if (seg.size) std::memcpy(zmq_msg_data(&part), seg.data, seg.size);
      } else {
        inflight_.fetch_add(1, std::memory_order_acq_rel);
        auto* hint = new ZeroCopyHint{std::move(seg.owner), &inflight_};
        zmq_msg_init_data(&part, const_cast<void*>(seg.data), seg.size, ReleaseZeroCopy, hint);
      }
      if (zmq_msg_send(&part, peer->socket, flags) < 0) {
        zmq_msg_close(&part);
        return UnavailableError(ZmqError("send data"));
      }
    }
    return OkStatus();
  }

  void Stop() override {
    // Let zero-copy sends drain before closing sockets (LINGER 0 would discard them), so
    // the last response of a run reaches its worker. Bounded: a dead peer cannot hold us.
    const uint64_t drain_deadline = DeadlineFromTimeoutMs(options_.stop_drain_ms);
    while (inflight_.load(std::memory_order_acquire) > 0 && GetNanosecond() < drain_deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (running_.exchange(false)) {
      if (recv_thread_.joinable()) recv_thread_.join();
    }
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      peers_.clear();
    }
    if (receiver_socket_ != nullptr) {
      zmq_close(receiver_socket_);
      receiver_socket_ = nullptr;
    }
  }

 private:
  struct Peer {
    std::mutex mu;
    void* socket = nullptr;
    std::string host;
    int port = 0;
    ~Peer() {
      if (socket) zmq_close(socket);
    }
  };

  // Spins on a non-blocking receive for the configured time, then blocks in zmq_poll in
  // 100 ms slices so Stop() is noticed without closing the socket under the thread.
  bool WaitReadable() {
    const uint64_t spin_end = GetNanosecond() + options_.wait.spin_ns;
    zmq_pollitem_t item{receiver_socket_, 0, ZMQ_POLLIN, 0};
    for (;;) {
      if (!running_.load(std::memory_order_relaxed)) return false;
      int events = 0;
      size_t len = sizeof(events);
      zmq_getsockopt(receiver_socket_, ZMQ_EVENTS, &events, &len);
      if (events & ZMQ_POLLIN) return true;
      if (options_.wait.busy_poll || GetNanosecond() < spin_end) {
        CpuRelax();
        continue;
      }
      int rc = zmq_poll(&item, 1, 100);
      if (rc > 0) return true;
      if (rc < 0 && zmq_errno() != EINTR) return false;
    }
  }

  void ReceiveLoop() {
    while (WaitReadable()) {
      ReceiveOne();
    }
  }

  // Reads one multi-part message: [identity][header][data...]. Every part is consumed even
  // when the message is refused, so the next message starts on a frame boundary.
  void ReceiveOne() {
    ZmqMsg identity;
    if (zmq_msg_recv(&identity.msg, receiver_socket_, ZMQ_DONTWAIT) < 0) return;
    auto header = std::make_unique<ZmqMsg>();
    if (!zmq_msg_more(&identity.msg) ||
        zmq_msg_recv(&header->msg, receiver_socket_, ZMQ_DONTWAIT) < 0) {
      MP_LOG_ERROR(kLog, "dropped a message with no header frame");
      return;
    }
    bool more = zmq_msg_more(&header->msg);
    auto meta = DecodeMeta(header->data(), header->size());
    if (!meta.ok()) {
      MP_LOG_ERROR(kLog, "dropped malformed frame: {}", meta.status().ToString());
      DrainRest(more);
      return;
    }
    InMessage in;
    in.meta = std::move(meta).value();
    in.peer = in.meta.sender;  // a ROUTER identity names no node until connections authenticate
    const size_t expected = in.meta.data.size();
    in.segments.reserve(expected);
    Status refused;
    size_t index = 0;
    while (more) {
      auto part = std::make_shared<ZmqMsg>();
      if (zmq_msg_recv(&part->msg, receiver_socket_, 0) < 0) {
        if (!running_) return;
        refused = DataLossError(ZmqError("receive data frame"));
        break;
      }
      more = zmq_msg_more(&part->msg);
      if (!refused.ok()) continue;
      if (index >= expected) {
        refused = DataLossError("message has more data frames than its " +
                                std::to_string(expected) + " descriptors");
        continue;
      }
      const size_t size = part->size();
      if (size != in.meta.data[index].nbytes) {
        refused = DataLossError("data frame " + std::to_string(index) + " has " +
                                std::to_string(size) + " bytes; descriptor says " +
                                std::to_string(in.meta.data[index].nbytes));
        continue;
      }
      auto dest = receiver_->Destination(in.meta, index);
      if (!dest.ok()) {
        refused = dest.status();
        continue;
      }
      RecvSegment seg;
      seg.size = size;
      if (*dest != nullptr) {
        if (size) std::memcpy(*dest, part->data(), size);
        seg.data = *dest;
      } else {
        seg.data = part->data();
        seg.owner = part;
      }
      in.segments.push_back(std::move(seg));
      ++index;
    }
    if (refused.ok() && index != expected) {
      refused = DataLossError("message has " + std::to_string(index) +
                              " data frames; its header describes " + std::to_string(expected));
    }
    if (!refused.ok()) {
      MP_LOG_ERROR(kLog, "refused {} from node {}: {}", CommandName(in.meta.cmd),
                   in.meta.sender, refused.ToString());
      receiver_->OnDropped(in.meta, refused);
      return;
    }
    receiver_->OnMessage(std::move(in));
  }

  void DrainRest(bool more) {
    while (more) {
      ZmqMsg part;
      if (zmq_msg_recv(&part.msg, receiver_socket_, 0) < 0) return;
      more = zmq_msg_more(&part.msg);
    }
  }

  VanOptions options_;
  void* ctx_ = nullptr;
  void* receiver_socket_ = nullptr;
  std::string endpoint_;
  VanReceiver* receiver_ = nullptr;
  std::atomic<bool> running_{false};
  std::atomic<int64_t> inflight_{0};  // zero-copy frames ZeroMQ has not released yet
  std::thread recv_thread_;
  std::mutex peers_mu_;
  std::unordered_map<int, std::shared_ptr<Peer>> peers_;
};

}  // namespace

std::unique_ptr<Van> CreateZmqVan(const VanOptions& options) {
  return std::make_unique<ZmqVan>(options);
}

}  // namespace meshpost
