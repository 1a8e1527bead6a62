// meshpost_bench: round-trip benchmark of the vans, plus the memcpy and raw ZeroMQ
// baselines, driven by scripts/bench.py (which also runs the torch baselines and writes
// the JSON and the plot). Roles:
//   server  --transport T                    prints "READY <endpoint> <port> <pid>", echoes
//                                            every request into the worker's pull slot
//                                            until stdin closes
//   client  --transport T --servers E,P,PID;... --push B --pull B --iters N --warmup W
//                                            prints one JSON object with round-trip stats
//   memcpy  --push B --pull B --iters N      copies the same bytes once (the one-copy bound)
//   zmq-server / zmq-client --port P         raw ZeroMQ PAIR round trip of the same bytes
// A round trip = one request carrying `push` bytes (AFD: uint8[128,7168] + int32[4]) to
// every server and one `pull`-byte response from each (AFD: bf16[128,7168]) landing in a
// registered destination, exactly the ps data path without the ps bookkeeping.
#include <sys/mman.h>
#include <unistd.h>
#include <zmq.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/waiter.h"
#include "tests/support/die.h"
#include "van/cma/cma_van.h"
#include "van/van.h"
#include "van/zmq/zmq_van.h"

namespace meshpost {
namespace {

// Benchmark buffers: 2 MiB aligned and, with --hugepages 1, transparent-huge-page backed
// (what registered tensors should be; CMA's page pinning is ~2x cheaper on huge pages).
bool g_hugepages = true;
struct Buffer {
  char* p = nullptr;
  size_t n = 0;
  Buffer() = default;
  Buffer(size_t size, char fill) : n(size) {
    const size_t cap =
        std::max<size_t>((size + (2u << 20) - 1) / (2u << 20) * (2u << 20), 2u << 20);
    p = static_cast<char*>(std::aligned_alloc(2u << 20, cap));
    if (g_hugepages) ::madvise(p, cap, MADV_HUGEPAGE);
    std::memset(p, fill, size);
  }
  ~Buffer() { std::free(p); }
  Buffer(Buffer&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p, o.p);
    std::swap(n, o.n);
    return *this;
  }
  char* data() { return p; }
  size_t size() const { return n; }
};

struct Args {
  std::string role;
  std::string transport = "cma";
  std::string servers;
  size_t push = 917504;   // uint8[128,7168]
  size_t push_extra = 0;  // int32[4] = 16 (second push tensor)
  size_t pull = 1835008;  // bf16[128,7168]
  int iters = 1000;
  int warmup = 100;
  int id = 0;
  int port = 0;
  bool cma_disable = false;
  int64_t spin_ns = 50'000;
};

Args Parse(int argc, char** argv) {
  Args a;
  if (argc > 1) a.role = argv[1];
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--transport")
      a.transport = v;
    else if (k == "--servers")
      a.servers = v;
    else if (k == "--push")
      a.push = std::stoull(v);
    else if (k == "--push-extra")
      a.push_extra = std::stoull(v);
    else if (k == "--pull")
      a.pull = std::stoull(v);
    else if (k == "--iters")
      a.iters = std::stoi(v);
    else if (k == "--warmup")
      a.warmup = std::stoi(v);
    else if (k == "--id")
      a.id = std::stoi(v);
    else if (k == "--port")
      a.port = std::stoi(v);
    else if (k == "--cma-disable")
      a.cma_disable = v == "1";
    else if (k == "--spin-ns")
      a.spin_ns = std::stoll(v);
    else if (k == "--hugepages")
      g_hugepages = v == "1";
    else {
      std::fprintf(stderr, "meshpost_bench: unknown flag %s\n", k.c_str());
      std::exit(2);
    }
  }
  return a;
}

using support::Die;

std::unique_ptr<Van> MakeVan(const Args& a) {
  VanOptions o;
  o.wait.spin_ns = a.spin_ns;
  o.cma_disable = a.cma_disable;
  if (a.transport == "tcp") return CreateZmqVan(o);
  if (a.transport == "cma") return CreateCmaVan(o);
  Die("unknown transport " + a.transport);
}

void PrintStats(const std::string& system, const Args& a, std::vector<double> us, double wall_s,
                size_t bytes_per_iter) {
  std::sort(us.begin(), us.end());
  double sum = 0;
  for (double v : us) sum += v;
  auto pct = [&](double p) {
    return us[std::min(us.size() - 1, static_cast<size_t>(p * us.size()))];
  };
  std::printf(
      "{\"system\": \"%s\", \"push\": %zu, \"pull\": %zu, \"iters\": %zu, \"p50_us\": %.2f, "
      "\"p99_us\": %.2f, \"mean_us\": %.2f, \"min_us\": %.2f, \"bytes_per_iter\": %zu, "
      "\"throughput_gbps\": %.3f}\n",
      system.c_str(), a.push + a.push_extra, a.pull, us.size(), pct(0.5), pct(0.99),
      sum / us.size(), us.front(), bytes_per_iter, bytes_per_iter * us.size() / wall_s / 1e9);
  std::fflush(stdout);
}

// ---- van server ----

class EchoServer : public VanReceiver {
 public:
  explicit EchoServer(Van* van) : van_(van) {}
  Result<void*> Destination(const Meta& meta, size_t index) override {
    if (meta.cmd != Command::kRequest) return static_cast<void*>(nullptr);
    // A registered receive buffer per (worker, segment), as register_recv_buffer gives.
    auto& buf = recv_[{meta.sender, index}];
    if (buf.size() < meta.data[index].nbytes) buf = Buffer(meta.data[index].nbytes, 0);
    return static_cast<void*>(buf.data());
  }
  void OnMessage(InMessage&& msg) override {
    if (msg.meta.cmd == Command::kRegister) {
      std::istringstream is(msg.meta.body);
      PeerAddress p;
      p.id = msg.meta.sender;
      is >> p.endpoint >> p.port >> p.pid;
      p.host = "127.0.0.1";
      Status s = van_->Connect(p);
      if (!s.ok()) Die("server connect back: " + s.ToString());
      OutMessage ack;
      ack.meta.cmd = Command::kRegisterReply;
      ack.meta.sender = msg.meta.recipient;
      ack.meta.recipient = msg.meta.sender;
      (void)van_->Send(std::move(ack));
      return;
    }
    if (msg.meta.cmd != Command::kRequest) return;
    OutMessage out;
    out.meta.cmd = Command::kResponse;
    out.meta.sender = msg.meta.recipient;
    out.meta.recipient = msg.meta.sender;
    out.meta.id = msg.meta.id;
    out.meta.data = msg.meta.slots;  // the worker's pull slots, addr included
    for (const TensorDesc& d : out.meta.data) {
      auto& buf = send_[msg.meta.sender];
      if (buf.size() < d.nbytes) buf = Buffer(d.nbytes, 0x5a);
      out.segments.push_back({buf.data(), d.nbytes, nullptr});
    }
    Status s = van_->Send(std::move(out));
    if (!s.ok()) std::fprintf(stderr, "meshpost_bench: respond: %s\n", s.ToString().c_str());
  }
  void OnDropped(const Meta& meta, const Status& why) override {
    std::fprintf(stderr, "meshpost_bench: server dropped: %s\n", why.ToString().c_str());
  }

 private:
  Van* van_;
  std::map<std::pair<int, size_t>, Buffer> recv_;
  std::map<int, Buffer> send_;
};

int RunServer(const Args& a) {
  auto van = MakeVan(a);
  EchoServer server(van.get());
  auto port = van->Bind("127.0.0.1", 0);
  if (!port.ok()) Die(port.status().ToString());
  Status s = van->Start(&server);
  if (!s.ok()) Die(s.ToString());
  std::printf("READY %s %d %d\n", van->endpoint().c_str(), *port, static_cast<int>(getpid()));
  std::fflush(stdout);
  char c;
  while (::read(0, &c, 1) > 0) {
  }
  van->Stop();
  return 0;
}

// ---- van client ----

class Client : public VanReceiver {
 public:
  Client(size_t servers, size_t pull, WaitPolicy wait) : waiter_(wait) {
    for (size_t i = 0; i < servers; ++i) pulls_.emplace_back(pull, 0);
  }
  Result<void*> Destination(const Meta& meta, size_t index) override {
    if (meta.cmd != Command::kResponse) return static_cast<void*>(nullptr);
    // The worker's pull tensor, validated against the slot it advertised.
    const size_t s = static_cast<size_t>(meta.sender - 100);
    if (s >= pulls_.size() || meta.data[index].nbytes != pulls_[s].size()) {
      return InvalidArgumentError("response does not match the pull slot");
    }
    return static_cast<void*>(pulls_[s].data());
  }
  void OnMessage(InMessage&& msg) override {
    done_.fetch_add(1, std::memory_order_release);
    waiter_.Notify();
  }
  void OnDropped(const Meta& meta, const Status& why) override {
    std::fprintf(stderr, "meshpost_bench: client dropped: %s\n", why.ToString().c_str());
  }
  bool WaitDone(uint64_t n) {
    return waiter_.WaitUntil([&] { return done_.load(std::memory_order_acquire) >= n; },
                             GetNanosecond() + 30'000'000'000ull);
  }
  uint64_t pull_addr(size_t s) { return reinterpret_cast<uint64_t>(pulls_[s].data()); }

 private:
  std::vector<Buffer> pulls_;
  std::atomic<uint64_t> done_{0};
  Waiter waiter_;
};

int RunClient(const Args& a) {
  struct Server {
    std::string endpoint;
    int port;
    int pid;
  };
  std::vector<Server> servers;
  std::stringstream ss(a.servers);
  std::string item;
  while (std::getline(ss, item, ';')) {
    Server s;
    std::replace(item.begin(), item.end(), ',', ' ');
    std::istringstream is(item);
    is >> s.endpoint >> s.port >> s.pid;
    servers.push_back(s);
  }
  if (servers.empty()) Die("client needs --servers");
  auto van = MakeVan(a);
  WaitPolicy wait;
  wait.spin_ns = a.spin_ns;
  Client client(servers.size(), a.pull, wait);
  auto port = van->Bind("127.0.0.1", 0);
  if (!port.ok()) Die(port.status().ToString());
  if (!van->Start(&client).ok()) Die("start");
  const int me = 200 + a.id;
  uint64_t expected = 0;
  for (size_t j = 0; j < servers.size(); ++j) {
    Status s = van->Connect({100 + static_cast<int>(j), "127.0.0.1", servers[j].port,
                             servers[j].endpoint, servers[j].pid});
    if (!s.ok()) Die("connect: " + s.ToString());
    OutMessage hello;
    hello.meta.cmd = Command::kRegister;
    hello.meta.sender = me;
    hello.meta.recipient = 100 + static_cast<int>(j);
    hello.meta.body =
        van->endpoint() + " " + std::to_string(*port) + " " + std::to_string(getpid());
    if (!van->Send(std::move(hello)).ok()) Die("hello");
  }
  expected += servers.size();
  if (!client.WaitDone(expected)) Die("servers did not answer the hello");

  Buffer push(a.push, 1), extra(std::max<size_t>(a.push_extra, 1), 2);
  std::vector<double> us;
  us.reserve(a.iters);
  uint64_t wall_start = 0;
  for (int it = 0; it < a.warmup + a.iters; ++it) {
    if (it == a.warmup) wall_start = GetNanosecond();
    const uint64_t t0 = GetNanosecond();
    for (size_t j = 0; j < servers.size(); ++j) {
      OutMessage m;
      m.meta.cmd = Command::kRequest;
      m.meta.sender = me;
      m.meta.recipient = 100 + static_cast<int>(j);
      m.meta.id = static_cast<uint64_t>(it);
      TensorDesc d;
      d.key = 1;
      d.dtype = DType::kUInt8;
      d.shape = {static_cast<int64_t>(a.push)};
      d.nbytes = a.push;
      m.meta.data.push_back(d);
      m.segments.push_back({push.data(), a.push, nullptr});
      if (a.push_extra) {
        d.key = 2;
        d.shape = {static_cast<int64_t>(a.push_extra)};
        d.nbytes = a.push_extra;
        m.meta.data.push_back(d);
        m.segments.push_back({extra.data(), a.push_extra, nullptr});
      }
      TensorDesc slot;
      slot.key = 3;
      slot.dtype = DType::kUInt8;
      slot.shape = {static_cast<int64_t>(a.pull)};
      slot.nbytes = a.pull;
      slot.addr = client.pull_addr(j);
      m.meta.slots.push_back(slot);
      Status s = van->Send(std::move(m));
      if (!s.ok()) Die("send: " + s.ToString());
    }
    expected += servers.size();
    if (!client.WaitDone(expected)) Die("timeout waiting for responses");
    if (it >= a.warmup) us.push_back((GetNanosecond() - t0) / 1e3);
  }
  const double wall = (GetNanosecond() - wall_start) / 1e9;
  std::string system = "meshpost-" + a.transport;
  if (a.transport == "cma")
    system = van->PeerTransport(100) == "cma" ? "meshpost-cma" : "meshpost-cma-shm";
  PrintStats(system, a, us, wall, (a.push + a.push_extra + a.pull) * servers.size());
  van->Stop();
  return 0;
}

// ---- baselines ----

int RunMemcpy(const Args& a) {
  const size_t n = a.push + a.push_extra + a.pull;
  // Distinct source/destination buffers of the round trip's size, touched first so the
  // bound measures copying, not page faults (the vans reuse warm buffers too).
  Buffer src(n, 1), dst(n, 0);
  std::vector<double> us;
  const uint64_t start = GetNanosecond();
  for (int it = 0; it < a.warmup + a.iters; ++it) {
    const uint64_t t0 = GetNanosecond();
    std::memcpy(dst.data(), src.data(), a.push + a.push_extra);
    std::memcpy(dst.data() + a.push + a.push_extra, src.data() + a.push + a.push_extra, a.pull);
    asm volatile("" : : "r"(dst.data()) : "memory");
    if (it >= a.warmup) us.push_back((GetNanosecond() - t0) / 1e3);
  }
  (void)start;
  double total = 0;
  for (double v : us) total += v;
  PrintStats("memcpy", a, us, total / 1e6, n);
  return 0;
}

int RunZmq(const Args& a, bool server) {
  void* ctx = zmq_ctx_new();
  void* s = zmq_socket(ctx, ZMQ_PAIR);
  Buffer push(a.push + a.push_extra, 1), pull(a.pull, 2);
  if (server) {
    if (zmq_bind(s, "tcp://127.0.0.1:*") != 0) Die("zmq bind");
    char last[256];
    size_t len = sizeof(last);
    zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, last, &len);
    std::printf("READY %s 0 %d\n", last, static_cast<int>(getpid()));
    std::fflush(stdout);
    for (;;) {
      int n = zmq_recv(s, push.data(), push.size(), 0);
      if (n < 0) break;
      if (n == 4 && std::memcmp(push.data(), "QUIT", 4) == 0) break;
      if (zmq_send(s, pull.data(), pull.size(), 0) < 0) break;
    }
  } else {
    if (zmq_connect(s, a.servers.c_str()) != 0) Die("zmq connect");
    std::vector<double> us;
    uint64_t wall_start = 0;
    for (int it = 0; it < a.warmup + a.iters; ++it) {
      if (it == a.warmup) wall_start = GetNanosecond();
      const uint64_t t0 = GetNanosecond();
      zmq_send(s, push.data(), push.size(), 0);
      zmq_recv(s, pull.data(), pull.size(), 0);
      if (it >= a.warmup) us.push_back((GetNanosecond() - t0) / 1e3);
    }
    const double wall = (GetNanosecond() - wall_start) / 1e9;
    zmq_send(s, "QUIT", 4, 0);
    PrintStats("zmq", a, us, wall, a.push + a.push_extra + a.pull);
  }
  int zero = 0;
  zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof(zero));
  zmq_close(s);
  zmq_ctx_term(ctx);
  return 0;
}

}  // namespace
}  // namespace meshpost

int main(int argc, char** argv) {
  using namespace meshpost;
  Args a = Parse(argc, argv);
  if (a.role == "server") return RunServer(a);
  if (a.role == "client") return RunClient(a);
  if (a.role == "memcpy") return RunMemcpy(a);
  if (a.role == "zmq-server") return RunZmq(a, true);
  if (a.role == "zmq-client") return RunZmq(a, false);
  std::fprintf(stderr,
               "usage: meshpost_bench server|client|memcpy|zmq-server|zmq-client [flags]\n"
               "(normally run through scripts/bench.py)\n");
  return 2;
}
