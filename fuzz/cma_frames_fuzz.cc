// libFuzzer target: the same-host van's doorbell frames (van/cma). A real CmaVan runs in
// this process; each input opens a unix-socket connection to it, performs the documented
// handshake (or not, per the first byte) and sends the rest of the input as up to four
// frames, on the socket or (mode bit 5) through a frame ring it passed first, the way the
// van's own connector sends them; then waits until the van closed the connection. Frames that name
// remote memory make the van read this process's memory through process_vm_readv, which fails
// cleanly on bad addresses, exactly as it would against a hostile peer.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "common/wire.h"
#include "van/cma/cma_van.h"
#include "van/cma/frame_ring.h"

namespace {

using namespace meshpost;

class Sink : public VanReceiver {
 public:
  Result<void*> Destination(const Meta&, size_t) override { return static_cast<void*>(nullptr); }
  void OnMessage(InMessage&&) override {}
  void OnDropped(const Meta&, const Status&) override {}
};

struct Target {
  Sink sink;
  std::unique_ptr<Van> van;
  explicit Target(bool token) {
    VanOptions o;
    o.connect_timeout_ms = 1000;
    if (token) {
      o.cluster_token = "fuzzing-cluster-token-0123456789";
      o.self_id = 1;
    }
    van = CreateCmaVan(o);
    if (!van->Bind("", 0).ok() || !van->Start(&sink).ok()) std::abort();
  }
};

int ConnectTo(const std::string& endpoint) {
  int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string name = endpoint.substr(1);
  std::memcpy(addr.sun_path + 1, name.data(), name.size());
  const socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

std::string Hello() {
  static uint8_t cookie[16] = {1};
  WireWriter w;
  w.Put<uint32_t>(0x4D43504D);  // "MPCM"
  w.Put<uint16_t>(2);
  w.Put<uint8_t>(1);  // kHello
  w.Put<uint8_t>(0);
  w.Put<uint32_t>(static_cast<uint32_t>(::getpid()));
  w.Put<uint64_t>(reinterpret_cast<uint64_t>(cookie));
  w.Put<uint32_t>(16);
  w.PutBytes(cookie, 16);
  w.Put<uint8_t>(1);
  return w.Release();
}

std::string Preamble(uint8_t type) {
  WireWriter w;
  w.Put<uint32_t>(0x4D43504D);
  w.Put<uint16_t>(2);
  w.Put<uint8_t>(type);
  w.Put<uint8_t>(0);
  return w.Release();
}

// Passes a new frame ring over the socket (kRing with its memfd).
std::unique_ptr<cma::FrameRing> PassRing(int fd) {
  int ring_fd = -1;
  auto ring = cma::FrameRing::Create(4096, &ring_fd);
  if (!ring.ok()) return nullptr;
  const std::string frame = Preamble(11);
  iovec iov{const_cast<char*>(frame.data()), frame.size()};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  mh.msg_control = control;
  mh.msg_controllen = sizeof(control);
  cmsghdr* c = CMSG_FIRSTHDR(&mh);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &ring_fd, sizeof(int));
  const bool sent = ::sendmsg(fd, &mh, MSG_NOSIGNAL) >= 0;
  ::close(ring_fd);
  return sent ? std::move(ring).value() : nullptr;
}

// One frame through the ring when it fits (else the socket plus a marker), then the
// doorbell if the van sleeps.
bool SendFrame(int fd, cma::FrameRing* ring, const uint8_t* p, size_t n) {
  if (ring == nullptr) return ::send(fd, p, n, MSG_NOSIGNAL) >= 0;
  uint32_t kind = cma::FrameRing::kFrame;
  if (n > ring->max_frame()) {
    if (::send(fd, p, n, MSG_NOSIGNAL) < 0) return false;
    kind = cma::FrameRing::kMarker;
    n = 0;
  }
  for (int tries = 0;; ++tries) {
    auto wrote = ring->TryWrite(kind, p, n);
    if (!wrote.ok() || tries > 1000) return false;
    if (*wrote) break;
    ::usleep(100);
  }
  if (ring->TakeSleeper()) {
    const std::string wake = Preamble(12);
    (void)::send(fd, wake.data(), wake.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Target plain(false);
  static Target authenticated(true);
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  Target& t = (mode & 4) ? authenticated : plain;
  const int fd = ConnectTo(t.van->endpoint());
  if (fd < 0) return 0;
  if (mode & 1) {
    const std::string hello = Hello();
    (void)::send(fd, hello.data(), hello.size(), MSG_NOSIGNAL);
  }
  std::unique_ptr<cma::FrameRing> ring;
  if (mode & 32) ring = PassRing(fd);
  const int frames = 1 + ((mode >> 1) & 1) + ((mode >> 3) & 3);
  const uint8_t* p = data + 1;
  size_t left = size - 1;
  for (int i = 0; i < frames; ++i) {
    const size_t n = i + 1 == frames ? left : left / static_cast<size_t>(frames - i);
    if (!SendFrame(fd, ring.get(), p, n)) break;
    p += n;
    left -= n;
  }
  // The van closes its side once it sees our EOF (or earlier on a bad frame): drain
  // until then so inputs do not pile up behind each other.
  ::shutdown(fd, SHUT_WR);
  char buf[4096];
  for (;;) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, 5000) <= 0) break;
    if (::recv(fd, buf, sizeof(buf), 0) <= 0) break;
  }
  ::close(fd);
  return 0;
}
