// ZeroMQ TCP van. One ROUTER socket receives from every peer on the receive thread; one
// DEALER socket per peer sends. Sends happen on the caller's thread under that peer's
// mutex rather than being handed to a sender thread: a hand-off costs a thread wake-up
// (tens of microseconds on a shared 2-core box), more than the whole small-message send.
//
// With a cluster token (VanOptions::cluster_token) every DEALER->ROUTER connection runs the
// handshake of common/auth.h before it carries messages. ROUTER assigns each incoming
// connection its own routing id (peers never set one, and ids ZeroMQ generates cannot be
// chosen by a peer), so the routing id names the connection and the acceptor attributes
// every message on it to the node that authenticated it. The connector's side of the
// handshake (reading the challenge on its DEALER) runs on the receive thread; Send() queues
// messages for a connection until it is authenticated, so no caller ever blocks on it.
//
// A connection can be lost after it authenticated (the acceptor closes it on a frame above
// its MESHPOST_MAX_MESSAGE_BYTES, a peer restarts its socket, the network drops it).
// ZeroMQ would reconnect the DEALER by itself, but that new connection carries no
// handshake, so the acceptor would drop everything on it. So with a token every DEALER has
// a socket monitor, read by a monitor thread; on a disconnect the receive thread replaces
// the DEALER with a new one that runs the handshake again (fresh nonces on both sides, so a
// fresh session key and sequence numbers from 1: nothing of the old session can be
// replayed into the new one). Sends queue meanwhile; if the new connection does not
// authenticate within connect_timeout_ms the peer fails with UNAVAILABLE naming it.
#include "van/zmq/zmq_van.h"

#include <zmq.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/auth.h"
#include "common/log_rate.h"
#include "common/logging.h"
#include "van/codec.h"
#include "van/delivery.h"
#include "van/streamed_bytes.h"

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

namespace meshpost {
namespace {

// ZeroMQ hands a frame to its I/O thread through lock-free queues in (uninstrumented)
// libzmq, which ThreadSanitizer cannot see; these make that hand-off of a ZeroCopyHint a
// happens-before edge for it. No code in other builds.
#if defined(__SANITIZE_THREAD__)
inline void TsanRelease(void* p) { __tsan_release(p); }
inline void TsanAcquire(void* p) { __tsan_acquire(p); }
#else
inline void TsanRelease(void*) {}
inline void TsanAcquire(void*) {}
#endif

constexpr const char* kLog = "van";

// Connections that have not finished the handshake are bounded: beyond this many, the
// oldest one is forgotten (its later frames are dropped as unauthenticated).
constexpr size_t kMaxUnauthenticatedConnections = 64;
// Messages queued for one peer while its connection authenticates.
constexpr size_t kMaxQueuedWhileAuthenticating = 65536;
// Ids at or above this are temporary ids the scheduler gives nodes it refuses (their real
// id belongs to someone else), so the handshake cannot check who answers.
constexpr int kTemporaryPeerIdBase = 1 << 20;
constexpr int kDisconnectLingerMs = 1000;
// Streamed messages (van/streamed_bytes.h) a peer may have in flight towards this node;
// a STREAM_BEGIN beyond that is refused (the message is reported dropped).
constexpr size_t kMaxStreamsPerPeer = 64;

bool IsStreamCommand(Command cmd) {
  return cmd == Command::kStreamBegin || cmd == Command::kStreamPart ||
         cmd == Command::kStreamAbort;
}

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
  TsanAcquire(h);
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
    {
      std::lock_guard<std::mutex> lock(lifeline_->mu);
      lifeline_->van = nullptr;  // streams still being produced stop sending
    }
    Stop();
    CloseMonitors();
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
    // ZeroMQ reads a frame's length before allocating it; above this it closes the
    // connection instead, so a peer cannot make us allocate more than this per frame.
    const int64_t max_size = options_.max_message_bytes > 0 &&
                                     options_.max_message_bytes < static_cast<uint64_t>(INT64_MAX)
                                 ? static_cast<int64_t>(options_.max_message_bytes)
                                 : -1;
    zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &max_size, sizeof(max_size));
    const std::string endpoint = "tcp://" + (host.empty() ? std::string("*") : host) + ":" +
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
    if (running_.load()) return FailedPreconditionError("van already started");
    // Wakes the receive thread out of a blocking poll when a new outgoing connection
    // starts its handshake (its DEALER must be polled from then on).
    const std::string wake =
        "inproc://meshpost-wake-" + std::to_string(reinterpret_cast<uintptr_t>(this));
    wake_rx_ = zmq_socket(ctx_, ZMQ_PAIR);
    wake_tx_ = zmq_socket(ctx_, ZMQ_PAIR);
    if (wake_rx_ == nullptr || wake_tx_ == nullptr || zmq_bind(wake_rx_, wake.c_str()) != 0 ||
        zmq_connect(wake_tx_, wake.c_str()) != 0) {
      return InternalError(ZmqError("wake socket"));
    }
    running_ = true;
    receiver_ = receiver;
    recv_thread_ = std::thread([this] {
      PinCurrentThread(options_.pinner, "tcp receive");
      ReceiveLoop();
    });
    if (!options_.cluster_token.empty()) {
      monitor_thread_ = std::thread([this] { MonitorLoop(); });
    }
    return OkStatus();
  }

  Status Connect(const PeerAddress& peer) override {
    std::lock_guard<std::mutex> lock(peers_mu_);
    auto it = peers_.find(peer.id);
    if (it != peers_.end()) {
      bool failed;
      {
        std::lock_guard<std::mutex> plock(it->second->mu);
        failed = it->second->state == PeerState::kFailed;
      }
      // A failed connection (e.g. lost and not re-authenticated in time) is replaced when
      // the node is connected again.
      if (!failed && it->second->host == peer.host && it->second->port == peer.port) {
        return OkStatus();
      }
      peers_.erase(it);
    }
    auto p = std::make_shared<Peer>();
    p->id = peer.id;
    p->host = peer.host;
    p->port = peer.port;
    {
      std::lock_guard<std::mutex> plock(p->mu);
      MESHPOST_RETURN_IF_ERROR(OpenDealerLocked(p));
    }
    peers_[peer.id] = std::move(p);
    MP_LOG_DEBUG(kLog, "connected to node {} at {}:{}", peer.id, peer.host, peer.port);
    return OkStatus();
  }

  // What was already sent still goes out for up to kDisconnectLingerMs (a refusal sent
  // right before Disconnect reaches its node); a connection still authenticating keeps
  // its queue until the handshake ends or connect_timeout_ms passes. Then the socket is
  // closed and ZeroMQ stops reconnecting: a disconnected peer leaves nothing behind.
  void Disconnect(int peer_id) override {
    std::shared_ptr<Peer> peer;
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      auto it = peers_.find(peer_id);
      if (it == peers_.end()) return;
      peer = it->second;
      peers_.erase(it);
    }
    std::lock_guard<std::mutex> lock(peer->mu);
    if (peer->socket != nullptr) {
      const int linger = kDisconnectLingerMs;
      zmq_setsockopt(peer->socket, ZMQ_LINGER, &linger, sizeof(linger));
    }
    peer->orphaned_at_ns = GetNanosecond();
    std::lock_guard<std::mutex> streams(streams_mu_);
    for (auto it = in_streams_.begin(); it != in_streams_.end();) {
      it = it->first.first == peer_id ? in_streams_.erase(it) : std::next(it);
    }
  }

  bool SupportsStreaming() const override { return true; }

  Status Send(OutMessage&& msg) override {
    if (msg.stream != nullptr) return SendStreamed(std::move(msg));
    return SendMessage(std::move(msg));
  }

  Status SendMessage(OutMessage&& msg) {
    std::shared_ptr<Peer> peer;
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      auto it = peers_.find(msg.meta.recipient);
      if (it == peers_.end()) {
        return UnavailableError("no connection to node " + std::to_string(msg.meta.recipient));
      }
      peer = it->second;
    }
    MESHPOST_RETURN_IF_ERROR(ValidateSend("ZmqVan::Send", msg));
    // The receiver closes a connection whose frame exceeds its ZMQ_MAXMSGSIZE (Bind), and
    // every node of a cluster has the same cap: refuse here, naming the cap, instead of
    // losing the connection and leaving the handle to time out.
    for (size_t i = 0; i < msg.segments.size(); ++i) {
      if (options_.max_message_bytes > 0 && msg.segments[i].size > options_.max_message_bytes) {
        return InvalidArgumentError(
            "tensor " + std::to_string(i) + " is " + std::to_string(msg.segments[i].size) +
            " bytes, more than the " + std::to_string(options_.max_message_bytes) +
            " bytes a tcp frame may hold (max_message_bytes, MESHPOST_MAX_MESSAGE_BYTES); "
            "expected a smaller tensor or a larger MESHPOST_MAX_MESSAGE_BYTES on every node");
      }
    }
    std::lock_guard<std::mutex> lock(peer->mu);
    if (peer->socket == nullptr) return UnavailableError("connection closed");
    switch (peer->state) {
      case PeerState::kFailed: return peer->failure;
      case PeerState::kAuthenticating:
        if (peer->queued.size() >= kMaxQueuedWhileAuthenticating) {
          return ResourceExhaustedError("node " + std::to_string(peer->id) + ": " +
                                        std::to_string(peer->queued.size()) +
                                        " messages wait for the connection to authenticate");
        }
        peer->queued.push_back(std::move(msg));
        return OkStatus();
      case PeerState::kReady: break;
    }
    return SendLocked(*peer, std::move(msg));
  }

  // A message whose streamed segments are still being written: STREAM_BEGIN carries its
  // header, then one STREAM_PART per range, every segment in order (a streamed one as its
  // bytes become ready, zero-copy from the producer's buffer), or STREAM_ABORT when the
  // producer fails. Each is an ordinary sealed message; the receiver assembles them and
  // delivers the message whole (OnStreamFrame).
  Status SendStreamed(OutMessage&& msg) {
    MESHPOST_RETURN_IF_ERROR(ValidateSend("ZmqVan::Send", msg, /*streams=*/true));
    auto out = std::make_shared<OutStream>();
    out->lifeline = lifeline_;
    out->id = next_stream_id_.fetch_add(1, std::memory_order_relaxed);
    out->sender = msg.meta.sender;
    out->recipient = msg.meta.recipient;
    for (const TensorDesc& d : msg.meta.data) out->keys.push_back(d.key);
    out->segments = std::move(msg.segments);
    OutMessage begin;
    begin.meta.cmd = Command::kStreamBegin;
    begin.meta.sender = out->sender;
    begin.meta.recipient = out->recipient;
    begin.meta.id = out->id;
    begin.meta.body = EncodeMeta(msg.meta);
    MESHPOST_RETURN_IF_ERROR(SendMessage(std::move(begin)));
    msg.stream->Listen([out](size_t ready, const Status& status) { out->Pump(ready, status); });
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
      std::lock_guard<std::mutex> lock(auth_mu_);
      authenticating_.clear();
    }
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      peers_.clear();
    }
    // After the DEALERs closed (their monitors stopped): see Peer::CloseSocket.
    monitor_running_ = false;
    if (monitor_thread_.joinable()) monitor_thread_.join();
    conns_.clear();
    {
      std::lock_guard<std::mutex> lock(streams_mu_);
      in_streams_.clear();
    }
    {
      std::lock_guard<std::mutex> lock(auth_mu_);
      if (wake_tx_ != nullptr) zmq_close(wake_tx_);
      wake_tx_ = nullptr;
    }
    if (wake_rx_ != nullptr) zmq_close(wake_rx_);
    wake_rx_ = nullptr;
    if (receiver_socket_ != nullptr) {
      zmq_close(receiver_socket_);
      receiver_socket_ = nullptr;
    }
  }

 private:
  enum class PeerState { kReady, kAuthenticating, kFailed };

  // Lets a stream's producer (another thread, possibly after Stop) reach the van.
  struct Lifeline {
    std::mutex mu;
    ZmqVan* van = nullptr;  // null once the van is being destroyed
  };

  // The sending side of one streamed message (SendStreamed).
  struct OutStream {
    std::mutex mu;
    std::shared_ptr<Lifeline> lifeline;
    uint64_t id = 0;
    int sender = -1;
    int recipient = -1;
    std::vector<int64_t> keys;
    std::vector<SendSegment> segments;
    size_t seg = 0;              // next segment to send
    size_t seg_sent = 0;         // bytes of it sent
    size_t streamed_before = 0;  // streamed bytes of the segments before `seg`
    bool done = false;

    // Sends what became ready (StreamedBytes listener; the producer's thread).
    void Pump(size_t ready, const Status& status) {
      std::lock_guard<std::mutex> lock(mu);
      if (done) return;
      std::lock_guard<std::mutex> alive(lifeline->mu);
      ZmqVan* van = lifeline->van;
      Status sent = van != nullptr ? OkStatus() : UnavailableError("the tcp van stopped");
      while (sent.ok() && seg < segments.size()) {
        const SendSegment& s = segments[seg];
        size_t avail = s.size - seg_sent;
        if (s.streamed) {
          const size_t have =
              ready > streamed_before ? std::min(ready - streamed_before, s.size) : 0;
          avail = have > seg_sent ? have - seg_sent : 0;
        }
        if (avail == 0 && s.size > 0) break;
        if (avail > 0) sent = van->SendMessage(Part(seg_sent, avail));
        seg_sent += avail;
        if (seg_sent == s.size) {
          if (s.streamed) streamed_before += s.size;
          ++seg;
          seg_sent = 0;
        }
      }
      if (sent.ok() && seg == segments.size()) {
        done = true;
      } else if (!sent.ok() || !status.ok()) {
        done = true;
        if (!sent.ok()) {
          MP_LOG_ERROR(kLog, "streamed message to node {} cut short: {}", recipient,
                       sent.ToString());
        } else {
          OutMessage abort;
          abort.meta.cmd = Command::kStreamAbort;
          abort.meta.sender = sender;
          abort.meta.recipient = recipient;
          abort.meta.id = id;
          abort.meta.status_code = static_cast<int32_t>(status.code());
          abort.meta.body = status.message();
          (void)van->SendMessage(std::move(abort));
        }
      }
      if (done) segments.clear();  // owners go: the van holds what it still sends
    }

    OutMessage Part(size_t offset, size_t len) const {
      const SendSegment& s = segments[seg];
      OutMessage part;
      part.meta.cmd = Command::kStreamPart;
      part.meta.sender = sender;
      part.meta.recipient = recipient;
      part.meta.id = id;
      part.meta.arg = static_cast<int32_t>(seg);
      TensorDesc d;
      d.key = keys[seg];
      d.shape = {static_cast<int64_t>(len)};
      d.nbytes = len;
      d.addr = offset;
      part.meta.data.push_back(std::move(d));
      part.segments.push_back({static_cast<const char*>(s.data) + offset, len, s.owner});
      return part;
    }
  };

  // The receiving side of one streamed message: the header's destinations, filled part by
  // part in order. Receive thread; streams_mu_.
  struct InStream {
    InMessage msg;
    std::vector<uint64_t> got;  // bytes received per segment
    size_t next = 0;            // the segment the next part must belong to

    void SkipFilled() {
      while (next < got.size() && got[next] == msg.meta.data[next].nbytes) ++next;
    }
    bool Complete() const { return next == got.size(); }
  };

  struct Peer {
    std::mutex mu;
    void* socket = nullptr;
    int id = -1;
    std::string host;
    int port = 0;
    PeerState state = PeerState::kReady;
    std::unique_ptr<ConnectorHandshake> handshake;
    std::unique_ptr<MessageSealer> sealer;
    std::deque<OutMessage> queued;  // sent before the connection authenticated
    Status failure;                 // kFailed: why
    uint64_t orphaned_at_ns = 0;    // set by Disconnect; the handshake then has a deadline
    // Set when a lost connection is replaced: the new handshake must end by then.
    uint64_t reauth_deadline_ns = 0;
    // Incarnation of `socket` (each replacement adds one); a monitor event of an older
    // socket is ignored.
    std::atomic<uint64_t> generation{0};
    std::atomic<bool> lost{false};  // the monitor saw `socket` disconnect
    // The newest generation whose socket monitor is stopped; shared with the monitor
    // thread, which closes its end of a monitor only after that (CloseSocket).
    std::shared_ptr<std::atomic<uint64_t>> monitor_stopped =
        std::make_shared<std::atomic<uint64_t>>(0);

    // Stops the socket monitor, then closes the DEALER. ZeroMQ sends monitor events from
    // its I/O thread with a blocking send on the monitor's PAIR socket, holding the
    // socket's monitor lock: if the monitor thread closed its end of the pair first, an
    // event of this DEALER (its disconnect while it lingers) would block that send, and
    // with it the context's only I/O thread, forever; every tcp connection of the process
    // stalled (a scheduler that had refused a node stopped answering anyone). So the
    // monitor thread keeps reading a monitor until this marks it stopped.
    void CloseSocket() {
      if (socket == nullptr) return;
      zmq_socket_monitor(socket, nullptr, 0);
      monitor_stopped->store(generation.load());
      zmq_close(socket);
      socket = nullptr;
    }
    ~Peer() { CloseSocket(); }
  };

  // Acceptor-side state of one incoming connection, keyed by its ROUTER routing id; only
  // the receive thread touches it.
  struct Conn {
    std::unique_ptr<AcceptorHandshake> handshake;
    std::unique_ptr<MessageOpener> opener;  // set once authenticated
    int peer_id = -1;
    bool refused = false;  // failed the handshake or a MAC check: everything is dropped
    uint64_t order = 0;    // creation order, to evict the oldest unauthenticated one
  };

  // Requires peer->mu. Opens a new DEALER to the peer (closing the previous one, if any)
  // and, with a token, attaches a socket monitor and starts the handshake: the receive
  // thread reads the challenge, Send() queues until then.
  Status OpenDealerLocked(const std::shared_ptr<Peer>& p) {
    const std::string endpoint = "tcp://" + p->host + ":" + std::to_string(p->port);
    p->CloseSocket();  // LINGER 0: what it still held belonged to the lost session
    const uint64_t gen = p->generation.fetch_add(1) + 1;
    p->lost = false;
    p->socket = zmq_socket(ctx_, ZMQ_DEALER);
    if (p->socket == nullptr) return InternalError(ZmqError("zmq_socket(DEALER)"));
    int zero = 0;
    zmq_setsockopt(p->socket, ZMQ_LINGER, &zero, sizeof(zero));
    zmq_setsockopt(p->socket, ZMQ_SNDHWM, &zero, sizeof(zero));
    if (options_.cluster_token.empty()) {
      if (zmq_connect(p->socket, endpoint.c_str()) != 0) {
        return UnavailableError(ZmqError(("connect " + endpoint).c_str()));
      }
      return OkStatus();
    }
    // The monitor is attached before connecting, so no disconnect of this socket is missed.
    const std::string monitor = "inproc://meshpost-mon-" +
                                std::to_string(reinterpret_cast<uintptr_t>(this)) + "-" +
                                std::to_string(next_monitor_++);
    if (zmq_socket_monitor(p->socket, monitor.c_str(), ZMQ_EVENT_DISCONNECTED) != 0) {
      return InternalError(ZmqError("zmq_socket_monitor"));
    }
    {
      std::lock_guard<std::mutex> mlock(monitor_mu_);
      new_monitors_.push_back({p, gen, monitor, p->monitor_stopped});
    }
    if (zmq_connect(p->socket, endpoint.c_str()) != 0) {
      return UnavailableError(ZmqError(("connect " + endpoint).c_str()));
    }
    p->state = PeerState::kAuthenticating;
    p->sealer.reset();
    p->handshake =
        std::make_unique<ConnectorHandshake>(options_.cluster_token, options_.self_id, p->id);
    const std::string hello = p->handshake->Hello();
    // ZeroMQ queues the hello until the TCP connection is up; the receive thread reads
    // the challenge from this socket (nobody else touches it while authenticating).
    if (zmq_send(p->socket, hello.data(), hello.size(), 0) < 0) {
      return UnavailableError(ZmqError(("send hello to " + endpoint).c_str()));
    }
    std::lock_guard<std::mutex> alock(auth_mu_);
    if (std::find(authenticating_.begin(), authenticating_.end(), p) == authenticating_.end()) {
      authenticating_.push_back(p);
    }
    if (wake_tx_ != nullptr) zmq_send(wake_tx_, "", 0, ZMQ_DONTWAIT);
    return OkStatus();
  }

  // Monitor thread: reads the DEALER monitors and flags lost connections for the receive
  // thread (which alone replaces a DEALER it may be polling).
  void MonitorLoop() {
    while (monitor_running_.load()) {
      {
        std::lock_guard<std::mutex> mlock(monitor_mu_);
        for (NewMonitor& n : new_monitors_) {
          if (n.stopped->load() >= n.generation) continue;  // its DEALER is already closed
          void* s = zmq_socket(ctx_, ZMQ_PAIR);
          if (s == nullptr || zmq_connect(s, n.endpoint.c_str()) != 0) {
            MP_LOG_ERROR(kLog, "{}", ZmqError("monitor socket"));
            if (s != nullptr) zmq_close(s);
            continue;
          }
          monitors_.push_back({n.peer, n.generation, s, n.stopped});
        }
        new_monitors_.clear();
      }
      // Forget monitors of replaced or dropped DEALERs once they were stopped (not
      // before: see Peer::CloseSocket).
      for (size_t i = 0; i < monitors_.size();) {
        if (monitors_[i].stopped->load() >= monitors_[i].generation) {
          zmq_close(monitors_[i].socket);
          monitors_[i] = monitors_.back();
          monitors_.pop_back();
        } else {
          ++i;
        }
      }
      std::vector<zmq_pollitem_t> items;
      for (const Monitor& m : monitors_) items.push_back({m.socket, 0, ZMQ_POLLIN, 0});
      if (items.empty()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        continue;
      }
      int rc = zmq_poll(items.data(), static_cast<int>(items.size()), 20);
      if (rc <= 0) continue;
      bool flagged = false;
      for (size_t i = 0; i < items.size(); ++i) {
        if (!(items[i].revents & ZMQ_POLLIN)) continue;
        for (;;) {
          ZmqMsg event;
          if (zmq_msg_recv(&event.msg, monitors_[i].socket, ZMQ_DONTWAIT) < 0) break;
          uint16_t id = 0;
          if (event.size() >= sizeof(id)) std::memcpy(&id, event.data(), sizeof(id));
          while (zmq_msg_more(&event.msg)) {
            ZmqMsg rest;
            if (zmq_msg_recv(&rest.msg, monitors_[i].socket, ZMQ_DONTWAIT) < 0) break;
            if (!zmq_msg_more(&rest.msg)) break;
          }
          if (id != ZMQ_EVENT_DISCONNECTED) continue;
          auto p = monitors_[i].peer.lock();
          if (p != nullptr && p->generation.load() == monitors_[i].generation) {
            p->lost = true;
            flagged = true;
          }
        }
      }
      if (flagged) {
        reconnects_pending_.store(true);
        std::lock_guard<std::mutex> alock(auth_mu_);
        if (wake_tx_ != nullptr) zmq_send(wake_tx_, "", 0, ZMQ_DONTWAIT);
      }
    }
    CloseMonitors();
  }

  void CloseMonitors() {
    for (Monitor& m : monitors_) zmq_close(m.socket);
    monitors_.clear();
  }

  // Receive thread: replaces every DEALER whose connection was lost with a new one that
  // authenticates again before data flows.
  void ReplaceLostConnections() {
    std::vector<std::shared_ptr<Peer>> lost;
    {
      std::lock_guard<std::mutex> lock(peers_mu_);
      for (auto& [id, p] : peers_) {
        if (p->lost.load()) lost.push_back(p);
      }
    }
    for (auto& p : lost) {
      Status failed;
      {
        std::lock_guard<std::mutex> lock(p->mu);
        if (!p->lost.load() || p->orphaned_at_ns != 0 || p->state == PeerState::kFailed) continue;
        // Debug: every peer that stops before this node closes its connection this way. A
        // new connection that authenticates is logged (INFO); one that does not fails the
        // peer, which the receiver reports.
        MP_LOG_DEBUG(kLog,
                     "connection to node {} at {}:{} was closed by the peer (a frame over its "
                     "MESHPOST_MAX_MESSAGE_BYTES, a restart, or it stopped); authenticating a "
                     "new one",
                     p->id, p->host, p->port);
        failed = OpenDealerLocked(p);
        // The bound runs from the first loss: a peer that keeps closing new connections
        // does not extend it.
        if (p->reauth_deadline_ns == 0) {
          p->reauth_deadline_ns =
              DeadlineFromTimeoutMs(std::max<int64_t>(1, options_.connect_timeout_ms));
        }
        if (!failed.ok()) {
          failed = UnavailableError("node " + std::to_string(p->id) + " at " + p->host + ":" +
                                    std::to_string(p->port) +
                                    ": cannot replace the lost connection: " + failed.message());
          p->state = PeerState::kFailed;
          p->failure = failed;
          p->queued.clear();
        }
      }
      if (!failed.ok()) {
        MP_LOG_ERROR(kLog, "{}", failed.message());
        receiver_->OnPeerFailure(p->id, failed);
      }
    }
  }

  // Requires peer.mu. Encodes, seals (authenticated clusters) and sends one message.
  Status SendLocked(Peer& peer, OutMessage&& msg) {
    std::string header = EncodeMeta(msg.meta);
    const size_t n = msg.segments.size();
    if (peer.sealer) {
      // Sealed headers end with a payload-tag flag (1: a Poly1305 tag over the data frames
      // precedes it, MESHPOST_AUTH_PAYLOAD), all under the header MAC.
      const bool tagged = options_.auth_payload && n > 0;
      if (tagged) {
        PayloadTagger tagger(peer.sealer->key(), peer.sealer->next_seq());
        for (const SendSegment& seg : msg.segments) tagger.Update(seg.data, seg.size);
        const PayloadTag tag = tagger.Final();
        header.append(reinterpret_cast<const char*>(tag.data()), tag.size());
      }
      header.push_back(tagged ? 1 : 0);
      peer.sealer->Seal(&header);
    }
    int rc = zmq_send(peer.socket, header.data(), header.size(), n > 0 ? ZMQ_SNDMORE : 0);
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
        TsanRelease(hint);
        zmq_msg_init_data(&part, const_cast<void*>(seg.data), seg.size, ReleaseZeroCopy, hint);
      }
      if (zmq_msg_send(&part, peer.socket, flags) < 0) {
        zmq_msg_close(&part);
        return UnavailableError(ZmqError("send data"));
      }
    }
    return OkStatus();
  }

  std::vector<std::shared_ptr<Peer>> Authenticating() {
    std::lock_guard<std::mutex> lock(auth_mu_);
    return authenticating_;
  }

  // Spins on a non-blocking receive for the configured time, then blocks in zmq_poll in
  // 100 ms slices so Stop() is noticed without closing the socket under the thread. While
  // outgoing connections authenticate, their DEALER sockets are polled too.
  bool WaitReadable() {
    const uint64_t spin_end = GetNanosecond() + options_.wait.spin_ns;
    for (;;) {
      if (!running_.load(std::memory_order_relaxed)) return false;
      if (reconnects_pending_.load(std::memory_order_relaxed) &&
          reconnects_pending_.exchange(false)) {
        ReplaceLostConnections();
      }
      auto pending = Authenticating();
      ExpireOrphans(&pending);
      if (!pending.empty()) {
        std::vector<zmq_pollitem_t> items;
        items.push_back({receiver_socket_, 0, ZMQ_POLLIN, 0});
        items.push_back({wake_rx_, 0, ZMQ_POLLIN, 0});
        for (auto& p : pending) items.push_back({p->socket, 0, ZMQ_POLLIN, 0});
        int rc = zmq_poll(items.data(), static_cast<int>(items.size()), 20);
        if (rc < 0 && zmq_errno() != EINTR) return false;
        if (items[1].revents & ZMQ_POLLIN) DrainWake();
        for (size_t i = 2; i < items.size(); ++i) {
          if (items[i].revents & ZMQ_POLLIN) OnConnectorFrames(pending[i - 2]);
        }
        if (items[0].revents & ZMQ_POLLIN) return true;
        continue;
      }
      int events = 0;
      size_t len = sizeof(events);
      zmq_getsockopt(receiver_socket_, ZMQ_EVENTS, &events, &len);
      if (events & ZMQ_POLLIN) return true;
      if (options_.wait.busy_poll || GetNanosecond() < spin_end) {
        CpuRelax();
        continue;
      }
      zmq_pollitem_t items[2] = {{receiver_socket_, 0, ZMQ_POLLIN, 0},
                                 {wake_rx_, 0, ZMQ_POLLIN, 0}};
      int rc = zmq_poll(items, 2, 100);
      if (rc < 0 && zmq_errno() != EINTR) return false;
      if (items[1].revents & ZMQ_POLLIN) DrainWake();
      if (items[0].revents & ZMQ_POLLIN) return true;
    }
  }

  void DrainWake() {
    char b;
    while (zmq_recv(wake_rx_, &b, sizeof(b), ZMQ_DONTWAIT) >= 0) {
    }
  }

  // A disconnected peer whose handshake never finished (nobody answers at the address it
  // gave) is dropped after connect_timeout_ms instead of being retried forever.
  void ExpireOrphans(std::vector<std::shared_ptr<Peer>>* pending) {
    const uint64_t now = GetNanosecond();
    const uint64_t limit =
        static_cast<uint64_t>(std::max<int64_t>(1, options_.connect_timeout_ms)) * 1000000ull;
    std::vector<std::shared_ptr<Peer>> expired;
    std::vector<std::pair<int, Status>> failures;
    for (auto& p : *pending) {
      std::lock_guard<std::mutex> lock(p->mu);
      if (p->state != PeerState::kAuthenticating) continue;
      if (p->orphaned_at_ns != 0 && now - p->orphaned_at_ns > limit) {
        p->state = PeerState::kFailed;
        p->failure = UnavailableError("disconnected before the connection authenticated");
        p->queued.clear();
        expired.push_back(p);
      } else if (p->orphaned_at_ns == 0 && p->reauth_deadline_ns != 0 &&
                 now > p->reauth_deadline_ns) {
        p->state = PeerState::kFailed;
        p->failure = UnavailableError(
            "node " + std::to_string(p->id) + " at " + p->host + ":" + std::to_string(p->port) +
            " closed the connection and a new one did not authenticate within " +
            std::to_string(options_.connect_timeout_ms) + " ms (connect_timeout_ms)");
        p->queued.clear();
        // The receiver reports it (a peer that already left in order is not news).
        MP_LOG_DEBUG(kLog, "{}", p->failure.message());
        failures.emplace_back(p->id, p->failure);
        expired.push_back(p);
      }
    }
    for (auto& [id, why] : failures) receiver_->OnPeerFailure(id, why);
    if (expired.empty()) return;
    std::lock_guard<std::mutex> alock(auth_mu_);
    for (auto& p : expired) {
      authenticating_.erase(std::remove(authenticating_.begin(), authenticating_.end(), p),
                            authenticating_.end());
      pending->erase(std::remove(pending->begin(), pending->end(), p), pending->end());
    }
  }

  // Connector side: the acceptor's challenge (or refusal) arrived on our DEALER. A failed
  // handshake is reported to the receiver (after the peer's lock is released), so a node
  // with the wrong token fails Start at once instead of at the start timeout.
  void OnConnectorFrames(const std::shared_ptr<Peer>& peer) {
    Status failed;
    {
      std::lock_guard<std::mutex> lock(peer->mu);
      failed = ReadChallengeLocked(peer);
    }
    if (!failed.ok()) receiver_->OnPeerFailure(peer->id, failed);
  }

  // Requires peer->mu. Returns the failure when the handshake failed just now.
  Status ReadChallengeLocked(const std::shared_ptr<Peer>& peer) {
    if (peer->state != PeerState::kAuthenticating || peer->socket == nullptr) return OkStatus();
    for (;;) {
      ZmqMsg frame;
      if (zmq_msg_recv(&frame.msg, peer->socket, ZMQ_DONTWAIT) < 0) return OkStatus();
      if (zmq_msg_more(&frame.msg)) {
        // Only single-frame handshake messages travel this way; drain the rest.
        while (zmq_msg_more(&frame.msg)) {
          ZmqMsg rest;
          if (zmq_msg_recv(&rest.msg, peer->socket, ZMQ_DONTWAIT) < 0) break;
          if (!zmq_msg_more(&rest.msg)) break;
        }
        continue;
      }
      auto decoded = DecodeAuthFrame(frame.data(), frame.size());
      Status st;
      if (!decoded.ok()) {
        st = decoded.status().Annotate("authentication with node " + std::to_string(peer->id));
      } else if (decoded->type == AuthFrameType::kRefused) {
        st = UnavailableError("node " + std::to_string(peer->id) + " at " + peer->host + ":" +
                              std::to_string(peer->port) +
                              " refused this connection: " + decoded->reason);
      } else {
        auto proof = peer->handshake->OnChallenge(*decoded, peer->id >= kTemporaryPeerIdBase);
        if (proof.ok()) {
          if (zmq_send(peer->socket, proof->data(), proof->size(), 0) < 0) {
            st = UnavailableError(ZmqError("send proof"));
          } else {
            peer->sealer = std::make_unique<MessageSealer>(peer->handshake->session_key());
            peer->handshake.reset();
            peer->state = PeerState::kReady;
            if (peer->reauth_deadline_ns != 0) {
              MP_LOG_INFO(kLog,
                          "connection to node {} at {}:{} was closed by the peer; a new one "
                          "authenticated",
                          peer->id, peer->host, peer->port);
            } else {
              MP_LOG_DEBUG(kLog, "connection to node {} authenticated", peer->id);
            }
            peer->reauth_deadline_ns = 0;
            while (!peer->queued.empty()) {
              Status s = SendLocked(*peer, std::move(peer->queued.front()));
              peer->queued.pop_front();
              if (!s.ok()) MP_LOG_DEBUG(kLog, "queued send to node {}: {}", peer->id, s.ToString());
            }
          }
        } else {
          st = proof.status().Annotate("node " + std::to_string(peer->id) + " at " + peer->host +
                                       ":" + std::to_string(peer->port));
        }
      }
      if (!st.ok()) {
        peer->state = PeerState::kFailed;
        peer->failure = st;
        peer->queued.clear();
        MP_LOG_ERROR(kLog, "{}", st.message());
      }
      break;
    }
    if (peer->state != PeerState::kAuthenticating) {
      std::lock_guard<std::mutex> alock(auth_mu_);
      authenticating_.erase(std::remove(authenticating_.begin(), authenticating_.end(), peer),
                            authenticating_.end());
    }
    return peer->state == PeerState::kFailed ? peer->failure : OkStatus();
  }

  void ReceiveLoop() {
    while (WaitReadable()) {
      ReceiveOne();
    }
  }

  void SendOnRouter(const ZmqMsg& identity, const std::string& frame) {
    zmq_send(receiver_socket_, zmq_msg_data(const_cast<zmq_msg_t*>(&identity.msg)),
             zmq_msg_size(const_cast<zmq_msg_t*>(&identity.msg)), ZMQ_SNDMORE | ZMQ_DONTWAIT);
    zmq_send(receiver_socket_, frame.data(), frame.size(), ZMQ_DONTWAIT);
  }

  void Refuse(const ZmqMsg& identity, const std::string& why) {
    AuthFrame f;
    f.type = AuthFrameType::kRefused;
    f.reason = why;
    SendOnRouter(identity, EncodeAuthFrame(f));
  }

  Conn& ConnFor(const std::string& routing_id) {
    auto it = conns_.find(routing_id);
    if (it != conns_.end()) return it->second;
    size_t unauthenticated = 0;
    auto oldest = conns_.end();
    for (auto c = conns_.begin(); c != conns_.end(); ++c) {
      if (c->second.opener) continue;
      ++unauthenticated;
      if (oldest == conns_.end() || c->second.order < oldest->second.order) oldest = c;
    }
    if (unauthenticated >= kMaxUnauthenticatedConnections && oldest != conns_.end()) {
      conns_.erase(oldest);
    }
    Conn& c = conns_[routing_id];
    c.order = next_conn_order_++;
    return c;
  }

  // Acceptor side of the handshake, for a single-frame message on a connection that has
  // not authenticated yet. Returns after answering (or refusing) it.
  void OnAcceptorFrame(const ZmqMsg& identity, Conn& conn, ZmqMsg& frame) {
    auto decoded = DecodeAuthFrame(frame.data(), frame.size());
    if (!decoded.ok()) {
      conn.refused = true;
      MP_LOG_ERROR_LIMITED(auth_log_, kLog, "malformed authentication frame dropped: {}",
                           decoded.status().message());
      return;
    }
    if (options_.cluster_token.empty()) {
      Refuse(identity, "this node runs without a cluster token (MESHPOST_CLUSTER_TOKEN)");
      return;
    }
    if (decoded->type == AuthFrameType::kHello && !conn.handshake) {
      conn.handshake =
          std::make_unique<AcceptorHandshake>(options_.cluster_token, options_.self_id);
      auto challenge = conn.handshake->OnHello(*decoded);
      if (challenge.ok()) SendOnRouter(identity, *challenge);
      return;
    }
    if (decoded->type == AuthFrameType::kProof && conn.handshake) {
      auto who = conn.handshake->OnProof(*decoded);
      if (!who.ok()) {
        conn.refused = true;
        Refuse(identity, who.status().message());
        MP_LOG_ERROR_LIMITED(auth_log_, kLog, "refused a connection: {}", who.status().message());
        return;
      }
      conn.peer_id = *who;
      conn.opener = std::make_unique<MessageOpener>(conn.handshake->session_key());
      conn.handshake.reset();
      if (options_.self_id != 0) {
        // The newest authenticated connection of a node wins: a new process that took the
        // rank of a dead or departed one (issue 10) authenticates as the same node, and
        // nothing the old holder still sends (it may have been paused, not dead) may be
        // attributed to its successor. Members never open two connections to one node.
        // Not at the scheduler (self id 0): it tells holders apart by incarnation and must
        // hear a former holder to tell it that it was replaced.
        for (auto& [rid, other] : conns_) {
          if (&other == &conn || !other.opener || other.refused || other.peer_id != *who) continue;
          other.refused = true;
          MP_LOG_DEBUG(kLog, "older connection of node {} superseded", *who);
        }
      }
      MP_LOG_DEBUG(kLog, "connection from node {} authenticated", conn.peer_id);
      return;
    }
    conn.refused = true;
    MP_LOG_ERROR_LIMITED(auth_log_, kLog, "out-of-order authentication frame (type {}) dropped",
                         static_cast<int>(decoded->type));
  }

  // Reads one multi-part message: [identity][header][data...]. Every part is consumed even
  // when the message is refused, so the next message starts on a frame boundary.
  void ReceiveOne() {
    ZmqMsg identity;
    if (zmq_msg_recv(&identity.msg, receiver_socket_, ZMQ_DONTWAIT) < 0) return;
    auto header = std::make_unique<ZmqMsg>();
    if (!zmq_msg_more(&identity.msg) ||
        zmq_msg_recv(&header->msg, receiver_socket_, ZMQ_DONTWAIT) < 0) {
      MP_LOG_ERROR_LIMITED(frame_log_, kLog, "dropped a message with no header frame{}", "");
      return;
    }
    bool more = zmq_msg_more(&header->msg);
    size_t header_len = header->size();
    int authenticated_as = -1;
    bool tagged = false;
    PayloadTag tag{};
    SessionKey tag_key{};
    uint64_t tag_seq = 0;
    const bool auth_frame = LooksLikeAuthFrame(header->data(), header->size());
    if (!options_.cluster_token.empty() || auth_frame) {
      const std::string routing_id(static_cast<const char*>(identity.data()), identity.size());
      Conn& conn = ConnFor(routing_id);
      if (conn.refused) {
        DrainRest(more);
        return;
      }
      if (!conn.opener) {
        if (auth_frame && !more) {
          OnAcceptorFrame(identity, conn, *header);
        } else {
          MP_LOG_ERROR_LIMITED(auth_log_, kLog,
                               "dropped a message from an unauthenticated connection ({} bytes "
                               "header); this cluster requires MESHPOST_CLUSTER_TOKEN",
                               header->size());
          DrainRest(more);
        }
        return;
      }
      auto opened = conn.opener->Open(header->data(), header->size());
      if (!opened.ok()) {
        // A bad MAC or sequence on an authenticated connection means someone else writes
        // into it: nothing more from it can be trusted.
        conn.refused = true;
        MP_LOG_ERROR_LIMITED(auth_log_, kLog, "connection from node {} closed for good: {}",
                             conn.peer_id, opened.status().message());
        DrainRest(more);
        return;
      }
      header_len = *opened;
      authenticated_as = conn.peer_id;
      const auto* bytes = static_cast<const uint8_t*>(header->data());
      const uint8_t flag = header_len > 0 ? bytes[header_len - 1] : 0xff;
      if (flag > 1 || header_len < 1 + (flag == 1 ? kPayloadTagBytes : 0)) {
        MP_LOG_ERROR_LIMITED(frame_log_, kLog,
                             "dropped a sealed header from node {} with a bad "
                             "payload-tag flag",
                             conn.peer_id);
        DrainRest(more);
        return;
      }
      header_len -= 1;
      if (flag == 1) {
        header_len -= kPayloadTagBytes;
        std::memcpy(tag.data(), bytes + header_len, kPayloadTagBytes);
        tagged = true;
        tag_key = conn.opener->key();
        tag_seq = conn.opener->last_seq();
      }
    }
    auto meta = DecodeMeta(header->data(), header_len);
    if (!meta.ok()) {
      MP_LOG_ERROR_LIMITED(frame_log_, kLog, "dropped malformed frame: {}",
                           meta.status().ToString());
      DrainRest(more);
      return;
    }
    if (authenticated_as >= 0 && meta->sender != authenticated_as) {
      MP_LOG_ERROR_LIMITED(auth_log_, kLog,
                           "dropped {} claiming to come from node {} on the connection node {} "
                           "authenticated",
                           CommandName(meta->cmd), meta->sender, authenticated_as);
      DrainRest(more);
      return;
    }
    InMessage in;
    in.meta = std::move(meta).value();
    // With a token the connection's authenticated node (the sender check above made them
    // equal); without one, nothing better than the claim is known.
    in.peer = authenticated_as >= 0 ? authenticated_as : in.meta.sender;
    const size_t expected = in.meta.data.size();
    in.segments.reserve(expected);
    Status refused;
    if (options_.auth_payload && authenticated_as >= 0 && !tagged && more) {
      refused = FailedPreconditionError(
          "node " + std::to_string(authenticated_as) +
          " sent data frames without a payload MAC, which this node requires "
          "(MESHPOST_AUTH_PAYLOAD must be the same on every node)");
    }
    // A tagged payload is checked before any byte of it lands in the receiver's memory:
    // ZeroMQ delivers a multi-part message whole, so every frame is read first.
    std::vector<std::shared_ptr<ZmqMsg>> parts;
    while (more) {
      auto part = std::make_shared<ZmqMsg>();
      if (zmq_msg_recv(&part->msg, receiver_socket_, 0) < 0) {
        if (!running_) return;
        refused = DataLossError(ZmqError("receive data frame"));
        break;
      }
      more = zmq_msg_more(&part->msg);
      parts.push_back(std::move(part));
    }
    if (tagged && refused.ok()) {
      PayloadTagger tagger(tag_key, tag_seq);
      for (auto& part : parts) tagger.Update(part->data(), part->size());
      if (!PayloadTagEqual(tagger.Final(), tag)) {
        refused = DataLossError("payload MAC mismatch: the data frames from node " +
                                std::to_string(authenticated_as) +
                                " were altered in transit (MESHPOST_AUTH_PAYLOAD)");
      }
    }
    if (IsStreamCommand(in.meta.cmd)) {
      OnStreamFrame(std::move(in), parts, refused);
      return;
    }
    size_t index = 0;
    for (auto& part : parts) {
      if (!refused.ok()) break;
      const size_t size = part->size();
      auto dest = SegmentDestination(receiver_, in.meta, index, size);
      if (!dest.ok()) {
        refused = dest.status();
        continue;
      }
      in.segments.push_back(LandSegment(*dest, part->data(), size, part));
      ++index;
    }
    if (refused.ok() && index != expected) {
      refused = DataLossError("message has " + std::to_string(index) +
                              " data frames; its header describes " + std::to_string(expected));
    }
    Deliver(receiver_, "tcp van", std::move(in), refused, frame_log_);
  }

  // STREAM_BEGIN: the message's header; its destinations are chosen now (outside
  // streams_mu_: Destination is the receiver's code), then the stream waits for its parts.
  void OnStreamBegin(InMessage&& frame, std::vector<std::shared_ptr<ZmqMsg>>& parts,
                     const Status& refused) {
    const std::pair<int, uint64_t> key{frame.peer, frame.meta.id};
    auto inner = refused.ok() ? DecodeMeta(frame.meta.body.data(), frame.meta.body.size())
                              : Result<Meta>(refused);
    bool duplicate = false;
    size_t of_peer = 0;
    {
      std::lock_guard<std::mutex> lock(streams_mu_);
      duplicate = in_streams_.count(key) != 0;
      for (const auto& [k, s] : in_streams_) of_peer += k.first == frame.peer;
    }
    if (!inner.ok() || inner->sender != frame.meta.sender || !parts.empty() || duplicate ||
        (inner->cmd != Command::kRequest && inner->cmd != Command::kResponse)) {
      MP_LOG_ERROR_LIMITED(
          frame_log_, kLog, "dropped a malformed or duplicate stream {} from node {}{}",
          frame.meta.id, frame.peer, inner.ok() ? std::string() : ": " + inner.status().ToString());
      return;
    }
    InStream st;
    st.msg.meta = std::move(inner).value();
    st.msg.peer = frame.peer;
    Status why;
    if (of_peer >= kMaxStreamsPerPeer) {
      why = ResourceExhaustedError("node " + std::to_string(frame.peer) + " has " +
                                   std::to_string(of_peer) + " streamed messages in flight");
    }
    for (size_t i = 0; why.ok() && i < st.msg.meta.data.size(); ++i) {
      const uint64_t n = st.msg.meta.data[i].nbytes;
      if (options_.max_message_bytes > 0 && n > options_.max_message_bytes) {
        why = DataLossError("streamed segment of " + std::to_string(n) + " bytes");
        break;
      }
      auto dest = SegmentDestination(receiver_, st.msg.meta, i, n);
      if (!dest.ok()) {
        why = dest.status();
        break;
      }
      RecvSegment seg;
      seg.size = n;
      seg.data = *dest;
      if (seg.data == nullptr && n > 0) {
        constexpr std::align_val_t kAlign{kVanBufferAlign};
        void* p = ::operator new(n, kAlign, std::nothrow);
        if (p == nullptr) {
          why = ResourceExhaustedError("cannot allocate " + std::to_string(n) + " bytes");
          break;
        }
        seg.owner = std::shared_ptr<void>(p, [](void* q) { ::operator delete(q, kAlign); });
        seg.data = p;
      }
      st.msg.segments.push_back(std::move(seg));
    }
    st.got.assign(st.msg.meta.data.size(), 0);
    st.SkipFilled();
    if (!why.ok() || st.Complete()) {
      Deliver(receiver_, "tcp van", std::move(st.msg), why, frame_log_);
      return;
    }
    std::lock_guard<std::mutex> lock(streams_mu_);
    in_streams_.emplace(key, std::move(st));
  }

  // STREAM_BEGIN / PART / ABORT from an authenticated (or claimed) peer: assembles the
  // message in the destinations its receiver chose at BEGIN and delivers it whole; parts
  // must come in order and fit their segment, anything else drops the message (OnDropped).
  void OnStreamFrame(InMessage&& frame, std::vector<std::shared_ptr<ZmqMsg>>& parts,
                     Status refused) {
    const std::pair<int, uint64_t> key{frame.peer, frame.meta.id};
    InMessage done;  // delivered (or dropped) after streams_mu_ is released
    Status why;
    bool deliver = false;
    Meta progress;  // a part landed in a message still incomplete: its header
    size_t progress_seg = 0, progress_bytes = 0;
    if (frame.meta.cmd == Command::kStreamBegin) {
      OnStreamBegin(std::move(frame), parts, refused);
      return;
    }
    {
      std::unique_lock<std::mutex> lock(streams_mu_);
      auto it = in_streams_.find(key);
      if (it == in_streams_.end()) {
        lock.unlock();
        MP_LOG_ERROR_LIMITED(frame_log_, kLog, "dropped {} for unknown stream {} from node {}",
                             CommandName(frame.meta.cmd), frame.meta.id, frame.peer);
        return;
      } else if (frame.meta.cmd == Command::kStreamAbort) {
        why = UnavailableError("node " + std::to_string(frame.peer) +
                               " could not finish the message: " + frame.meta.body);
      } else {
        InStream& st = it->second;
        const size_t seg = static_cast<size_t>(frame.meta.arg);
        if (!refused.ok()) {
          why = refused;
        } else if (frame.meta.arg < 0 || seg != st.next || frame.meta.data.size() != 1 ||
                   parts.size() != 1 || frame.meta.data[0].nbytes != parts[0]->size() ||
                   frame.meta.data[0].addr != st.got[seg] || parts[0]->size() == 0 ||
                   parts[0]->size() > st.msg.meta.data[seg].nbytes - st.got[seg]) {
          why = DataLossError("stream part out of order or outside segment " +
                              std::to_string(frame.meta.arg));
        } else {
          std::memcpy(static_cast<char*>(st.msg.segments[seg].data) + st.got[seg], parts[0]->data(),
                      parts[0]->size());
          st.got[seg] += parts[0]->size();
          st.SkipFilled();
          if (!st.Complete()) {
            progress = st.msg.meta;
            progress_seg = seg;
            progress_bytes = st.got[seg];
          }
        }
        if (!why.ok() || st.Complete()) {
          done = std::move(st.msg);
          deliver = true;
        }
      }
      if (!deliver && !why.ok() && it != in_streams_.end()) {
        done = std::move(it->second.msg);
        deliver = true;
      }
      if (deliver && it != in_streams_.end()) in_streams_.erase(it);
    }
    if (deliver) Deliver(receiver_, "tcp van", std::move(done), why, frame_log_);
    if (progress_bytes > 0) receiver_->OnStreamProgress(progress, progress_seg, progress_bytes);
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
  // Socket monitors of the DEALERs (clusters with a token): new ones are handed to the
  // monitor thread under monitor_mu_; monitors_ belongs to the monitor thread.
  struct NewMonitor {
    std::weak_ptr<Peer> peer;
    uint64_t generation;
    std::string endpoint;
    std::shared_ptr<std::atomic<uint64_t>> stopped;  // Peer::monitor_stopped
  };
  struct Monitor {
    std::weak_ptr<Peer> peer;
    uint64_t generation;
    void* socket;
    std::shared_ptr<std::atomic<uint64_t>> stopped;
  };
  std::thread monitor_thread_;
  std::atomic<bool> monitor_running_{true};
  std::mutex monitor_mu_;
  std::vector<NewMonitor> new_monitors_;
  std::vector<Monitor> monitors_;
  std::atomic<uint64_t> next_monitor_{0};
  std::atomic<bool> reconnects_pending_{false};
  std::mutex peers_mu_;
  std::unordered_map<int, std::shared_ptr<Peer>> peers_;
  std::mutex auth_mu_;       // guards authenticating_ and wake_tx_
  void* wake_tx_ = nullptr;  // written by Connect (under auth_mu_)
  void* wake_rx_ = nullptr;  // receive thread only
  std::vector<std::shared_ptr<Peer>> authenticating_;
  // Receive thread only: incoming connections by routing id.
  std::unordered_map<std::string, Conn> conns_;
  uint64_t next_conn_order_ = 0;
  // Streamed messages: being sent (ids) and being assembled, by (peer, stream id).
  std::shared_ptr<Lifeline> lifeline_ = [this] {
    auto l = std::make_shared<Lifeline>();
    l->van = this;
    return l;
  }();
  std::atomic<uint64_t> next_stream_id_{1};
  std::mutex streams_mu_;
  std::map<std::pair<int, uint64_t>, InStream> in_streams_;
  LogRateLimiter frame_log_;
  LogRateLimiter auth_log_;
};

}  // namespace

std::unique_ptr<Van> CreateZmqVan(const VanOptions& options) {
  return std::make_unique<ZmqVan>(options);
}

}  // namespace meshpost
