// Payload integrity on tcp (MESHPOST_AUTH_PAYLOAD): an on-path attacker (a TCP proxy
// between two authenticated tcp vans) flips one byte inside a tensor payload. With payload
// MACs the message is refused before any byte lands and the connection keeps working;
// without them (headers only) the altered tensor is delivered, which is the documented
// limit of header-only sealing (docs/security.md).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "van/van.h"
#include "van/zmq/zmq_van.h"

namespace meshpost {
namespace {

const std::string kToken = "payload-mac-test-token-0123456789";
constexpr uint8_t kFill = 0xAB;
constexpr size_t kPayload = 64 * 1024;

class Recorder : public VanReceiver {
 public:
  Result<void*> Destination(const Meta&, size_t) override { return static_cast<void*>(nullptr); }
  void OnMessage(InMessage&& msg) override {
    std::lock_guard<std::mutex> lock(mu);
    std::string bytes;
    for (const RecvSegment& s : msg.segments)
      bytes.append(static_cast<const char*>(s.data), s.size);
    delivered.push_back(std::move(bytes));
    cv.notify_all();
  }
  void OnDropped(const Meta&, const Status& why) override {
    std::lock_guard<std::mutex> lock(mu);
    dropped.push_back(why.ToString());
    cv.notify_all();
  }
  bool WaitForEvents(size_t n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(30),
                       [&] { return delivered.size() + dropped.size() >= n; });
  }
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> delivered;
  std::vector<std::string> dropped;
};

// Forwards one TCP connection to 127.0.0.1:target. In the client-to-server direction,
// after 4096 consecutive kFill bytes (only a payload has such runs), the next kFill byte
// is flipped, once.
class TamperingProxy {
 public:
  explicit TamperingProxy(int target) : target_(target) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    EXPECT_EQ(bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(listen(listen_fd_, 1), 0);
    socklen_t len = sizeof(a);
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { Run(); });
  }
  ~TamperingProxy() {
    stop_ = true;
    thread_.join();
    close(listen_fd_);
  }
  int port() const { return port_; }
  bool flipped() const { return flipped_.load(); }

 private:
  void Run() {
    pollfd lp{listen_fd_, POLLIN, 0};
    while (!stop_ && poll(&lp, 1, 100) <= 0) {
    }
    if (stop_) return;
    const int client = accept(listen_fd_, nullptr, nullptr);
    const int server = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(target_));
    if (connect(server, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) return;
    size_t run = 0;
    char buf[65536];
    while (!stop_) {
      pollfd fds[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
      if (poll(fds, 2, 100) <= 0) continue;
      if (fds[0].revents & (POLLIN | POLLHUP)) {
        const ssize_t n = read(client, buf, sizeof(buf));
        if (n <= 0) break;
        for (ssize_t i = 0; i < n; ++i) {
          const auto b = static_cast<uint8_t>(buf[i]);
          if (b != kFill) {
            run = 0;
            continue;
          }
          if (++run > 4096 && !flipped_) {
            buf[i] = static_cast<char>(kFill ^ 0x01);
            flipped_ = true;
          }
        }
        if (write(server, buf, n) != n) break;
      }
      if (fds[1].revents & (POLLIN | POLLHUP)) {
        const ssize_t n = read(server, buf, sizeof(buf));
        if (n <= 0) break;
        if (write(client, buf, n) != n) break;
      }
    }
    close(client);
    close(server);
  }

  int target_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<bool> flipped_{false};
  std::thread thread_;
};

OutMessage Request(const std::vector<uint8_t>& payload) {
  OutMessage m;
  m.meta.cmd = Command::kRequest;
  m.meta.sender = 2;
  m.meta.recipient = 1;
  TensorDesc d;
  d.dtype = DType::kUInt8;
  d.shape = {static_cast<int64_t>(payload.size())};
  d.nbytes = payload.size();
  m.meta.data = {d};
  m.segments = {{payload.data(), payload.size(), nullptr}};
  return m;
}

// Sends two identical requests through the tampering proxy; the first is altered.
void SendThroughProxy(bool auth_payload, Recorder* rec, bool* flipped) {
  VanOptions o;
  o.cluster_token = kToken;
  o.auth_payload = auth_payload;
  o.self_id = 1;
  auto receiver = CreateZmqVan(o);
  auto port = receiver->Bind("127.0.0.1", 0);
  ASSERT_TRUE(port.ok());
  ASSERT_TRUE(receiver->Start(rec).ok());
  TamperingProxy proxy(*port);
  o.self_id = 2;
  Recorder unused;
  auto sender = CreateZmqVan(o);
  ASSERT_TRUE(sender->Bind("127.0.0.1", 0).ok());
  ASSERT_TRUE(sender->Start(&unused).ok());
  ASSERT_TRUE(sender->Connect({1, "127.0.0.1", proxy.port()}).ok());
  const std::vector<uint8_t> payload(kPayload, kFill);
  ASSERT_TRUE(sender->Send(Request(payload)).ok());
  ASSERT_TRUE(sender->Send(Request(payload)).ok());
  EXPECT_TRUE(rec->WaitForEvents(2));
  *flipped = proxy.flipped();
  sender->Stop();
  receiver->Stop();
}

TEST(PayloadMacTest, TamperedPayloadIsRefusedWithPayloadMacs) {
  Recorder rec;
  bool flipped = false;
  SendThroughProxy(/*auth_payload=*/true, &rec, &flipped);
  ASSERT_TRUE(flipped) << "the proxy never saw the payload";
  ASSERT_EQ(rec.dropped.size(), 1u);
  EXPECT_NE(rec.dropped[0].find("payload MAC mismatch"), std::string::npos) << rec.dropped[0];
  // The connection keeps working: the next, untouched message arrives intact.
  ASSERT_EQ(rec.delivered.size(), 1u);
  EXPECT_EQ(rec.delivered[0], std::string(kPayload, static_cast<char>(kFill)));
}

TEST(PayloadMacTest, WithoutPayloadMacsTheAlteredTensorIsDelivered) {
  Recorder rec;
  bool flipped = false;
  SendThroughProxy(/*auth_payload=*/false, &rec, &flipped);
  ASSERT_TRUE(flipped);
  EXPECT_TRUE(rec.dropped.empty());
  ASSERT_EQ(rec.delivered.size(), 2u);
  size_t altered = 0;
  for (const std::string& d : rec.delivered) {
    for (char c : d) altered += static_cast<uint8_t>(c) != kFill;
  }
  EXPECT_EQ(altered, 1u) << "header-only sealing does not cover tensor bytes";
}

TEST(PayloadMacTest, AReceiverRequiringPayloadMacsRefusesUntaggedData) {
  VanOptions o;
  o.cluster_token = kToken;
  o.self_id = 1;
  o.auth_payload = true;
  Recorder rec;
  auto receiver = CreateZmqVan(o);
  auto port = receiver->Bind("127.0.0.1", 0);
  ASSERT_TRUE(port.ok());
  ASSERT_TRUE(receiver->Start(&rec).ok());
  o.self_id = 2;
  o.auth_payload = false;
  Recorder unused;
  auto sender = CreateZmqVan(o);
  ASSERT_TRUE(sender->Bind("127.0.0.1", 0).ok());
  ASSERT_TRUE(sender->Start(&unused).ok());
  ASSERT_TRUE(sender->Connect({1, "127.0.0.1", *port}).ok());
  const std::vector<uint8_t> payload(kPayload, kFill);
  ASSERT_TRUE(sender->Send(Request(payload)).ok());
  ASSERT_TRUE(rec.WaitForEvents(1));
  ASSERT_EQ(rec.dropped.size(), 1u);
  EXPECT_NE(rec.dropped[0].find("MESHPOST_AUTH_PAYLOAD"), std::string::npos) << rec.dropped[0];
  sender->Stop();
  receiver->Stop();
}

}  // namespace
}  // namespace meshpost
