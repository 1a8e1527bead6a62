// Attack tests: a real cluster (scheduler, servers, workers as processes, launched by
// LocalCluster) under attack by a raw ZeroMQ client that holds no cluster token and uses
// no meshpost code: it writes frames by hand from docs/wire_format.md. The nodes
// (security_node.cc) check every request and answer they see and exit non-zero on any
// forged value, so "every process exits 0" means no forgery got through.
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "launch/local_cluster.h"

namespace meshpost {
namespace {

constexpr int64_t kProcessLimitMs = 180000;
const char* kToken = "security-test-cluster-token-0123456789";

// ---------------------------------------------------------------- raw wire encoding

class Bytes {
 public:
  template <typename T>
  Bytes& Put(T v) {
    char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    s_.append(b, sizeof(T));
    return *this;
  }
  Bytes& Str(const std::string& v) {
    Put<uint32_t>(static_cast<uint32_t>(v.size()));
    s_ += v;
    return *this;
  }
  std::string s_;
};

struct RawDesc {
  int64_t key;
  uint8_t dtype;  // tensor/dtype.h numbering: 0 = float32, 5 = uint8
  std::vector<int64_t> shape;
  uint64_t nbytes;
};

std::string RawHeader(uint8_t cmd, int32_t sender, int32_t recipient, uint64_t id, int32_t arg,
                      const std::string& body, const std::vector<RawDesc>& data = {},
                      const std::vector<RawDesc>& slots = {}) {
  Bytes b;
  b.Put<uint8_t>(cmd).Put<int32_t>(sender).Put<int32_t>(recipient).Put<uint64_t>(id);
  b.Put<int32_t>(arg).Put<int32_t>(0).Str(body);
  for (const auto* list : {&data, &slots}) {
    b.Put<uint32_t>(static_cast<uint32_t>(list->size()));
    for (const RawDesc& d : *list) {
      b.Put<int64_t>(d.key).Put<uint8_t>(d.dtype).Put<uint8_t>(
          static_cast<uint8_t>(d.shape.size()));
      for (int64_t dim : d.shape) b.Put<int64_t>(dim);
      b.Put<uint64_t>(d.nbytes).Put<uint64_t>(0);
    }
  }
  for (int i = 0; i < 4; ++i) b.Put<uint64_t>(0);
  Bytes frame;
  frame.Put<uint32_t>(0x5453504D).Put<uint16_t>(1).Put<uint16_t>(0);
  frame.Put<uint32_t>(static_cast<uint32_t>(b.s_.size()));
  return frame.s_ + b.s_;
}

// One node entry of a REGISTER body / NODE_TABLE.
std::string RawNode(int32_t id, uint8_t role, int32_t rank, const std::string& host, int32_t port) {
  Bytes b;
  b.Put<int32_t>(id).Put<uint8_t>(role).Put<int32_t>(rank).Str(host).Put<int32_t>(port);
  b.Put<int32_t>(4242).Str("attacker-host").Put<uint32_t>(0);
  return b.s_;
}

// ---------------------------------------------------------------- the attacker

class Attacker {
 public:
  Attacker() : ctx_(zmq_ctx_new()) {
    // A listener the forged node tables and registrations point at: nothing may connect.
    trap_ = zmq_socket(ctx_, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(trap_, ZMQ_LINGER, &zero, sizeof(zero));
    zmq_bind(trap_, "tcp://127.0.0.1:*");
    char last[256];
    size_t len = sizeof(last);
    zmq_getsockopt(trap_, ZMQ_LAST_ENDPOINT, last, &len);
    trap_port_ = std::atoi(std::strrchr(last, ':') + 1);
  }
  ~Attacker() {
    for (void* s : socks_) zmq_close(s);
    zmq_close(trap_);
    zmq_ctx_term(ctx_);
  }
  int trap_port() const { return trap_port_; }

  void* Dial(int port) {
    void* s = zmq_socket(ctx_, ZMQ_DEALER);
    int linger = 2000;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_connect(s, ("tcp://127.0.0.1:" + std::to_string(port)).c_str());
    socks_.push_back(s);
    return s;
  }
  // Header plus one data frame sent without copying (`data` must outlive the context);
  // *released is incremented once ZeroMQ no longer needs the bytes (written out, or
  // dropped with the connection the receiver closed).
  static void SendBig(void* s, const std::string& header, const std::string& data,
                      std::atomic<int>* released) {
    zmq_send(s, header.data(), header.size(), ZMQ_SNDMORE);
    zmq_msg_t m;
    zmq_msg_init_data(
        &m, const_cast<char*>(data.data()), data.size(),
        [](void*, void* hint) { static_cast<std::atomic<int>*>(hint)->fetch_add(1); }, released);
    zmq_msg_send(&m, s, 0);
  }
  static void Send(void* s, const std::string& header, const std::vector<std::string>& data = {}) {
    zmq_send(s, header.data(), header.size(), data.empty() ? 0 : ZMQ_SNDMORE);
    for (size_t i = 0; i < data.size(); ++i) {
      zmq_send(s, data[i].data(), data[i].size(), i + 1 < data.size() ? ZMQ_SNDMORE : 0);
    }
  }
  // Whether anything reached the trap listener (a connection that sent a frame).
  bool TrapGotTraffic() {
    zmq_pollitem_t item{trap_, 0, ZMQ_POLLIN, 0};
    return zmq_poll(&item, 1, 0) > 0;
  }

 private:
  void* ctx_;
  void* trap_;
  int trap_port_ = 0;
  std::vector<void*> socks_;
};

// ---------------------------------------------------------------- process inspection

std::string ReadAll(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

int FdCount(pid_t pid) {
  int n = 0;
  DIR* d = opendir(("/proc/" + std::to_string(pid) + "/fd").c_str());
  if (d == nullptr) return -1;
  while (readdir(d) != nullptr) ++n;
  closedir(d);
  return n - 2;
}

int64_t StatusKb(pid_t pid, const std::string& field) {
  std::istringstream in(ReadAll("/proc/" + std::to_string(pid) + "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::atoll(line.c_str() + field.size() + 1);
  }
  return -1;
}

// Local address (hex "0100007F" = 127.0.0.1) of the socket listening on `port`.
std::string ListenAddressHex(int port) {
  std::istringstream in(ReadAll("/proc/net/tcp"));
  std::string line;
  char want[8];
  std::snprintf(want, sizeof(want), "%04X", port);
  std::getline(in, line);
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string sl, local, remote, state;
    f >> sl >> local >> remote >> state;
    if (state == "0A" && local.substr(local.find(':') + 1) == want) {
      return local.substr(0, local.find(':'));
    }
  }
  return "";
}

// Polls a condition for up to `limit` (bounded waiting on the processes under test).
template <typename Pred>
bool Eventually(Pred pred, std::chrono::seconds limit = std::chrono::seconds(90)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return pred();
}

// ---------------------------------------------------------------- the cluster under attack

class SecurityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/meshpost_sec_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    cluster_.KillAll();
    std::string cmd = "rm -rf '" + dir_ + "'";
    int ignored = std::system(cmd.c_str());
    (void)ignored;
  }

  ClusterSpec Spec(bool with_token) {
    ClusterSpec spec;
    spec.argv = {MESHPOST_SECURITY_NODE};
    spec.num_workers = 2;
    spec.num_servers = 2;
    spec.env["MESHPOST_SEC_DIR"] = dir_;
    spec.env["MESHPOST_TRANSPORT"] = "tcp";
    spec.env["MESHPOST_HEARTBEAT_INTERVAL_MS"] = "200";
    spec.env["MESHPOST_HEARTBEAT_TIMEOUT_MS"] = "3000";
    spec.env["MESHPOST_START_TIMEOUT_MS"] = "60000";
    spec.env["MESHPOST_CLUSTER_TOKEN"] = with_token ? kToken : "";
    return spec;
  }

  void Start(const ClusterSpec& spec) {
    ASSERT_TRUE(cluster_.Start(spec).ok());
    for (const char* n : {"scheduler:0", "server:0", "server:1", "worker:0", "worker:1"}) {
      const std::string path = dir_ + "/" + n + ".port";
      ASSERT_TRUE(Eventually([&] { return !ReadAll(path).empty(); })) << n << " never started";
      ports_[n] = std::atoi(ReadAll(path).c_str());
    }
  }

  int64_t Rounds(const std::string& worker) {
    const std::string text = ReadAll(dir_ + "/" + worker + ".rounds");
    return text.empty() ? -1 : std::atoll(text.c_str());
  }

  // Waits until both workers completed `more` further checked rounds.
  void ExpectTrafficContinues(int64_t more) {
    const int64_t base = std::max(Rounds("worker:0"), Rounds("worker:1"));
    EXPECT_TRUE(Eventually([&] {
      return Rounds("worker:0") >= base + more && Rounds("worker:1") >= base + more;
    })) << "traffic stalled after the attack (rounds "
        << Rounds("worker:0") << ", " << Rounds("worker:1") << ")";
  }

  void StopAndExpectCleanExits() {
    const int64_t last = std::max(Rounds("worker:0"), Rounds("worker:1")) + 40;
    {
      std::ofstream f(dir_ + "/stop.tmp");
      f << last << "\n";
    }
    std::rename((dir_ + "/stop.tmp").c_str(), (dir_ + "/stop").c_str());
    for (const ProcessExit& e : cluster_.WaitAll(kProcessLimitMs)) {
      EXPECT_TRUE(e.ok()) << e.Describe();
    }
  }

  std::string dir_;
  LocalCluster cluster_;
  std::map<std::string, int> ports_;
};

// Node ids: scheduler 0, servers 1..S, workers S+1..S+W (ps/node_context.h).
constexpr int kScheduler = 0, kServer0 = 1, kServer1 = 2, kWorker0 = 3, kWorker1 = 4;

TEST_F(SecurityTest, ForgedControlAndDataMessagesChangeNothing) {
  Start(Spec(true));
  Attacker evil;
  ExpectTrafficContinues(10);
  const int trap = evil.trap_port();
  std::string table;
  {
    Bytes b;
    b.Put<uint32_t>(5);
    table = b.s_ + RawNode(0, 0, 0, "127.0.0.1", trap) + RawNode(1, 1, 0, "127.0.0.1", trap) +
            RawNode(2, 1, 1, "127.0.0.1", trap) + RawNode(3, 2, 0, "127.0.0.1", trap) +
            RawNode(4, 2, 1, "127.0.0.1", trap);
  }
  const std::string floats(16 * 4, '\x7f');
  const RawDesc push{0, 0, {16}, 64};
  for (const char* worker : {"worker:0", "worker:1"}) {
    void* s = evil.Dial(ports_[worker]);
    const int me = std::string(worker) == "worker:0" ? kWorker0 : kWorker1;
    // A node table pointing every server at the attacker.
    Attacker::Send(s, RawHeader(3, kScheduler, me, 0, 0, table));
    // Responses for the next handles, claiming to come from each server.
    for (uint64_t h = 0; h < 400; ++h) {
      for (int srv : {kServer0, kServer1}) {
        Attacker::Send(
            s, RawHeader(21, srv, me, (h << 12) | static_cast<uint64_t>(srv - 1), 0, "", {push}),
            {floats});
      }
    }
    // Evictions, from the scheduler and from the peers themselves.
    Attacker::Send(s, RawHeader(10, kScheduler, me, 0, kServer0, "forged death"));
    Attacker::Send(s, RawHeader(10, kScheduler, me, 1, kServer1, "forged leave"));
    Attacker::Send(s, RawHeader(11, kServer0, me, 0, 0, "forged peer leave"));
  }
  for (const char* server : {"server:0", "server:1"}) {
    void* s = evil.Dial(ports_[server]);
    const int me = std::string(server) == "server:0" ? kServer0 : kServer1;
    for (uint64_t h = 0; h < 50; ++h) {
      Attacker::Send(s, RawHeader(20, kWorker0, me, h << 12, 0, "", {push}, {push}), {floats});
    }
    Attacker::Send(s, RawHeader(3, kScheduler, me, 0, 0, table));
    Attacker::Send(s, RawHeader(10, kScheduler, me, 0, kWorker0, "forged death"));
    Attacker::Send(s, RawHeader(11, kWorker1, me, 0, 0, "forged peer leave"));
  }
  {
    void* s = evil.Dial(ports_["scheduler:0"]);
    for (int id : {kServer0, kServer1, kWorker0, kWorker1}) {
      Attacker::Send(s, RawHeader(8, id, kScheduler, 0, 0, ""));     // LEAVE
      Attacker::Send(s, RawHeader(4, id, kScheduler, 1000, 7, ""));  // BARRIER
    }
  }
  // Forged evictions, tables, requests and responses act on arrival; 200 further checked
  // rounds after them show none landed.
  ExpectTrafficContinues(200);
  EXPECT_FALSE(evil.TrapGotTraffic()) << "a node followed a forged node table";
  StopAndExpectCleanExits();
}

TEST_F(SecurityTest, RefusedRegistrationsLeaveNothingBehind) {
  for (bool with_token : {true, false}) {
    SCOPED_TRACE(with_token ? "with a cluster token" : "without a token");
    cluster_ = LocalCluster();
    std::string cmd = "rm -f '" + dir_ + "'/*";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
    Start(Spec(with_token));
    const pid_t sched = cluster_.pid("scheduler");
    ASSERT_GT(sched, 0);
    ExpectTrafficContinues(10);
    const int fds_before = FdCount(sched);
    Attacker evil;
    void* s = evil.Dial(ports_["scheduler:0"]);
    for (int i = 0; i < 2000; ++i) {
      Bytes body;
      body.Put<uint32_t>(1);
      // Rank 0 is taken: every one of these is refused, each naming the trap as its address.
      Attacker::Send(s, RawHeader(1, 1, kScheduler, 0, 0,
                                  body.s_ + RawNode(1, 1, 0, "127.0.0.1", evil.trap_port())));
    }
    ExpectTrafficContinues(30);
    // Refusal replies may linger briefly; afterwards the scheduler is back to where it was.
    EXPECT_TRUE(
        Eventually([&] { return FdCount(sched) <= fds_before + 8; }, std::chrono::seconds(60)))
        << "scheduler fds grew from " << fds_before << " to " << FdCount(sched);
    if (with_token) {
      EXPECT_FALSE(evil.TrapGotTraffic()) << "an unauthenticated REGISTER was answered";
    }
    StopAndExpectCleanExits();
  }
}

TEST_F(SecurityTest, OversizedFramesDoNotGrowMemory) {
  ClusterSpec spec = Spec(true);
  spec.env["MESHPOST_MAX_MESSAGE_BYTES"] = std::to_string(16 << 20);
  Start(spec);
  ExpectTrafficContinues(10);
  const pid_t server = cluster_.pid("server:0");
  const int64_t hwm_before = StatusKb(server, "VmHWM");
  {
    const std::string huge(128u << 20, 'x');
    std::atomic<int> released{0};
    Attacker evil;
    for (int i = 0; i < 4; ++i) {
      void* s = evil.Dial(ports_["server:0"]);
      const RawDesc d{0, 5, {static_cast<int64_t>(huge.size())}, huge.size()};
      Attacker::SendBig(s, RawHeader(20, kWorker0, kServer0, 1, 0, "", {d}), huge, &released);
    }
    EXPECT_TRUE(Eventually([&] { return released.load() == 4; }));
    ExpectTrafficContinues(50);
  }
  // Four frames of 128 MiB: without a limit the server holds them all at once.
  const int64_t growth_kb = StatusKb(server, "VmHWM") - hwm_before;
  EXPECT_LT(growth_kb, 96 * 1024) << "peak RSS grew by " << growth_kb / 1024 << " MiB";
  StopAndExpectCleanExits();
}

TEST_F(SecurityTest, ANodeWithAnotherTokenFailsStartAtOnceSayingSo) {
  ClusterSpec spec = Spec(true);
  spec.env["MESHPOST_START_TIMEOUT_MS"] = "20000";
  spec.env_for["worker:1"]["MESHPOST_CLUSTER_TOKEN"] = "not-this-clusters-token-0123456789";
  ASSERT_TRUE(cluster_.Start(spec).ok());
  for (const ProcessExit& e : cluster_.WaitAll(kProcessLimitMs)) {
    EXPECT_TRUE(e.exited) << e.Describe();  // nobody hangs: the others time out at start
  }
  const std::string error = ReadAll(dir_ + "/worker:1.start_error");
  EXPECT_NE(error.find("does not know this cluster's token"), std::string::npos) << error;
  EXPECT_EQ(error.find("after 20000 ms"), std::string::npos)
      << "failed only at the timeout: " << error;
}

TEST_F(SecurityTest, NodesListenOnlyOnTheAdvertisedAddress) {
  Start(Spec(false));
  for (const auto& [name, port] : ports_) {
    EXPECT_EQ(ListenAddressHex(port), "0100007F")
        << name << " listens on " << ListenAddressHex(port) << " (00000000 = every interface)";
  }
  StopAndExpectCleanExits();
}

// Pauses are stimuli here, not synchronisation: the test holds a process stopped for a
// multiple of the heartbeat timeout and then checks what the cluster concluded.
void PauseFor(pid_t pid, std::chrono::milliseconds how_long) {
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  std::this_thread::sleep_for(how_long);
  ASSERT_EQ(kill(pid, SIGCONT), 0);
}

TEST_F(SecurityTest, SchedulerPausedPastTheHeartbeatTimeoutDeclaresNobodyDead) {
  ClusterSpec spec = Spec(true);
  spec.env["MESHPOST_HEARTBEAT_TIMEOUT_MS"] = "1500";
  Start(spec);
  ExpectTrafficContinues(10);
  PauseFor(cluster_.pid("scheduler"), std::chrono::milliseconds(5000));
  // Nodes marked the scheduler dead during the pause; its acks must clear that, and the
  // scheduler must not evict the nodes whose heartbeats queued up while it was stopped.
  ExpectTrafficContinues(50);
  StopAndExpectCleanExits();  // leaving needs a live scheduler that still knows everyone
}

TEST_F(SecurityTest, PausedServerLearnsAtOnceThatItWasEvicted) {
  ClusterSpec spec = Spec(true);
  spec.env["MESHPOST_SEC_SCENARIO"] = "evict";
  spec.env["MESHPOST_HEARTBEAT_TIMEOUT_MS"] = "1500";
  Start(spec);
  ExpectTrafficContinues(10);
  PauseFor(cluster_.pid("server:1"), std::chrono::milliseconds(5000));
  EXPECT_TRUE(Eventually([&] { return !ReadAll(dir_ + "/server:1.evicted").empty(); }))
      << "the resumed server never learned it was evicted";
  EXPECT_TRUE(Eventually([&] {
    return !ReadAll(dir_ + "/worker:0.done").empty() && !ReadAll(dir_ + "/worker:1.done").empty();
  }));
  {
    std::ofstream f(dir_ + "/stop");
    f << "0\n";
  }
  for (const ProcessExit& e : cluster_.WaitAll(kProcessLimitMs)) {
    EXPECT_TRUE(e.ok()) << e.Describe();
  }
}

// Forged barrier completions (to a waiting member) and forged arrivals (to the scheduler,
// as the member that has not arrived) release nothing: worker 0's barrier returns only
// after worker 1 really arrived (security_node.cc, scenario "barrier").
TEST_F(SecurityTest, ForgedBarrierArrivalsAndCompletionsReleaseNothing) {
  ClusterSpec spec = Spec(true);
  spec.env["MESHPOST_SEC_SCENARIO"] = "barrier";
  Start(spec);
  ASSERT_TRUE(Eventually([&] { return !ReadAll(dir_ + "/worker:0.waiting").empty(); }));
  {
    Attacker evil;
    void* w0 = evil.Dial(ports_["worker:0"]);
    void* sched = evil.Dial(ports_["scheduler:0"]);
    constexpr int kWorkers = 4, kAll = 7;
    for (uint64_t seq = 0; seq < 8; ++seq) {
      for (int mask : {kWorkers, kAll}) {
        Attacker::Send(w0, RawHeader(5, kScheduler, kWorker0, seq, mask, ""));     // BARRIER_DONE
        Attacker::Send(sched, RawHeader(4, kWorker1, kScheduler, seq, mask, ""));  // BARRIER
      }
    }
    // The attacker's sockets linger until their frames went out (or were refused).
  }
  // Nothing to observe directly: worker 0 exits non-zero if its barrier returned before
  // "go". Give forged frames time to be processed, then let worker 1 arrive.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  {
    std::ofstream f(dir_ + "/go");
    f << "1\n";
  }
  EXPECT_TRUE(Eventually([&] {
    return !ReadAll(dir_ + "/worker:0.done").empty() && !ReadAll(dir_ + "/worker:1.done").empty();
  })) << "the real barrier never completed";
  {
    std::ofstream f(dir_ + "/stop");
    f << "0\n";
  }
  for (const ProcessExit& e : cluster_.WaitAll(kProcessLimitMs)) {
    EXPECT_TRUE(e.ok()) << e.Describe();
  }
}

// ---------------------------------------------------------------- replacing a lost rank

class ReplaceTest : public SecurityTest {
 protected:
  void TearDown() override {
    for (pid_t p : extra_) {
      kill(p, SIGKILL);
      waitpid(p, nullptr, 0);
    }
    SecurityTest::TearDown();
  }

  ClusterSpec ReplaceSpec(const std::string& transport, bool with_token = true) {
    ClusterSpec spec = Spec(with_token);
    spec.env["MESHPOST_SEC_SCENARIO"] = "replace";
    spec.env["MESHPOST_TRANSPORT"] = transport;
    spec.env["MESHPOST_HEARTBEAT_TIMEOUT_MS"] = "1500";
    return spec;
  }

  // A new process for `role`:`rank` of the running cluster, outside LocalCluster (killed
  // by pid in TearDown).
  pid_t StartExtra(const ClusterSpec& spec, const std::string& role, int rank) {
    std::map<std::string, std::string> env = spec.env;
    env["DMLC_ROLE"] = role;
    env["DMLC_NODE_RANK"] = std::to_string(rank);
    env["DMLC_NUM_WORKER"] = std::to_string(spec.num_workers);
    env["DMLC_NUM_SERVER"] = std::to_string(spec.num_servers);
    env["DMLC_PS_ROOT_URI"] = "127.0.0.1";
    env["DMLC_PS_ROOT_PORT"] = std::to_string(cluster_.port());
    const pid_t pid = fork();
    if (pid == 0) {
      for (const auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
      execl(MESHPOST_SECURITY_NODE, MESHPOST_SECURITY_NODE, static_cast<char*>(nullptr));
      _exit(127);
    }
    extra_.push_back(pid);
    return pid;
  }

  // Exit status of an extra process, waiting at most kProcessLimitMs.
  int WaitExtra(pid_t pid) {
    int status = 0;
    const bool exited = Eventually([&] { return waitpid(pid, &status, WNOHANG) == pid; },
                                   std::chrono::seconds(kProcessLimitMs / 1000));
    if (!exited) return -1;
    extra_.erase(std::find(extra_.begin(), extra_.end(), pid));
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  // Starts a process for `role`:`rank` the way a launcher would: while the old holder
  // still counts as alive (its death is declared after the heartbeat timeout) the rank is
  // refused, naming it, and the launcher retries. Returns the admitted process, or -1.
  pid_t StartReplacement(const ClusterSpec& spec, const std::string& role, int rank) {
    const std::string me = dir_ + "/" + role + ":" + std::to_string(rank);
    for (int attempt = 0; attempt < 40; ++attempt) {
      std::remove((me + ".port").c_str());
      std::remove((me + ".start_error").c_str());
      const pid_t p = StartExtra(spec, role, rank);
      // Started (it writes its port once Start returned) or refused (it exits).
      int status = 0;
      bool exited = false;
      const bool settled = Eventually([&] {
        exited = exited || waitpid(p, &status, WNOHANG) == p;
        return exited || !ReadAll(me + ".port").empty();
      });
      if (!settled) return -1;
      if (!exited) return p;
      extra_.erase(std::find(extra_.begin(), extra_.end(), p));
      const std::string why = ReadAll(me + ".start_error");
      EXPECT_NE(why.find("which is alive"), std::string::npos) << why;
      if (why.find("which is alive") == std::string::npos) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return -1;
  }

  bool BothWorkersFailed() {
    return !ReadAll(dir_ + "/worker:0.failed").empty() &&
           !ReadAll(dir_ + "/worker:1.failed").empty();
  }

  void StopReplaceCluster(const std::string& lost) {
    {
      std::ofstream f(dir_ + "/stop");
      f << "0\n";
    }
    for (const ProcessExit& e : cluster_.WaitAll(kProcessLimitMs)) {
      if (e.name == lost) continue;  // killed by the test
      EXPECT_TRUE(e.ok()) << e.Describe();
    }
  }

  std::vector<pid_t> extra_;
};

// kill -9 of server 1; a process started with its rank while it still counts as alive is
// refused naming the holder; one started after its death is admitted, the workers connect
// to it, and push_pull returns correct data again. A final all-groups barrier (with the
// replacement) and an orderly stop of everyone follow.
TEST_F(ReplaceTest, KilledServerIsReplacedAndPushPullWorksAgain) {
  for (const auto& [transport, with_token] :
       std::vector<std::pair<std::string, bool>>{{"tcp", true}, {"cma", true}, {"tcp", false}}) {
    SCOPED_TRACE(transport + (with_token ? " with a token" : " without a token"));
    cluster_ = LocalCluster();
    std::string cmd = "rm -f '" + dir_ + "'/*";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
    const ClusterSpec spec = ReplaceSpec(transport, with_token);
    Start(spec);
    ExpectTrafficContinues(10);
    const pid_t holder = cluster_.pid("server:1");
    // While server 1 lives, its rank is refused, naming it.
    const pid_t dup = StartExtra(spec, "server", 1);
    EXPECT_EQ(WaitExtra(dup), 1);
    const std::string refused = ReadAll(dir_ + "/server:1.start_error");
    EXPECT_NE(refused.find("already taken by server 1"), std::string::npos) << refused;
    EXPECT_NE(refused.find("pid " + std::to_string(holder)), std::string::npos) << refused;
    EXPECT_NE(refused.find("which is alive"), std::string::npos) << refused;

    ASSERT_EQ(kill(holder, SIGKILL), 0);
    {
      // Forged heartbeats for the dead server (any incarnation, current table version)
      // must not keep it alive: the workers still learn that it died.
      Attacker evil;
      void* s = evil.Dial(ports_["scheduler:0"]);
      std::atomic<bool> stop{false};
      // (Without a token a forged heartbeat is indistinguishable from a real one.)
      const bool forge = with_token;
      std::thread forger([&] {
        for (uint64_t seq = 1; forge && !stop.load(); ++seq) {
          Attacker::Send(s, RawHeader(6, kServer1, kScheduler, seq, 0, ""));
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      });
      const bool noticed = Eventually([&] { return BothWorkersFailed(); });
      stop = true;
      forger.join();
      ASSERT_TRUE(noticed) << "workers never noticed server 1 died";
    }
    const pid_t replacement = StartReplacement(spec, "server", 1);
    ASSERT_GT(replacement, 0);
    // Rounds count only checked answers of both servers: these need the replacement.
    ExpectTrafficContinues(50);
    StopReplaceCluster("server:1");
    EXPECT_EQ(WaitExtra(replacement), 0);
  }
}

// kill -9 of worker 1; a replacement started as a launcher would (retrying while the rank
// still counts as alive) is admitted, servers drop what the old worker left queued, and
// both workers' push_pulls return correct data again (worker 0's request that waited for
// a partner completes with the newcomer's first one).
TEST_F(ReplaceTest, KilledWorkerIsReplacedAndBothWorkersPushPullAgain) {
  const ClusterSpec spec = ReplaceSpec("tcp");
  Start(spec);
  ExpectTrafficContinues(10);
  ASSERT_EQ(kill(cluster_.pid("worker:1"), SIGKILL), 0);
  std::remove((dir_ + "/worker:1.rounds").c_str());
  const pid_t replacement = StartReplacement(spec, "worker", 1);
  ASSERT_GT(replacement, 0) << "the replacement worker was never admitted";
  const int64_t base = Rounds("worker:0");
  EXPECT_TRUE(Eventually([&] {
    return Rounds("worker:0") >= base + 50 && Rounds("worker:1") >= 50;
  })) << "rounds after the replacement: worker 0 "
      << Rounds("worker:0") << " (from " << base << "), worker 1 " << Rounds("worker:1");
  StopReplaceCluster("worker:1");
  EXPECT_EQ(WaitExtra(replacement), 0);
}

// worker 1 is paused past the heartbeat timeout and replaced; worker 0's push_pull that
// waited for a partner completes with the newcomer's. Resumed, the former holder learns it
// was replaced from its next call; whatever it still sent is not taken for its
// successor's (the servers keep only the newest authenticated connection of a node).
TEST_F(ReplaceTest, PausedWorkerIsReplacedAndToldSoWhenItResumes) {
  const ClusterSpec spec = ReplaceSpec("tcp");
  Start(spec);
  ExpectTrafficContinues(10);
  const pid_t holder = cluster_.pid("worker:1");
  ASSERT_EQ(kill(holder, SIGSTOP), 0);
  std::remove((dir_ + "/worker:1.rounds").c_str());
  const pid_t replacement = StartReplacement(spec, "worker", 1);
  ASSERT_GT(replacement, 0);
  int64_t base = Rounds("worker:0");
  EXPECT_TRUE(Eventually([&] {
    return Rounds("worker:0") >= base + 50 && Rounds("worker:1") >= 50;
  })) << "worker 0 "
      << Rounds("worker:0") << " (from " << base << "), worker 1 " << Rounds("worker:1");
  ASSERT_EQ(kill(holder, SIGCONT), 0);
  const std::string told = dir_ + "/replaced." + std::to_string(holder);
  EXPECT_TRUE(Eventually([&] { return !ReadAll(told).empty(); }))
      << "the resumed worker never learned it was replaced";
  EXPECT_NE(ReadAll(told).find("pid " + std::to_string(replacement)), std::string::npos)
      << ReadAll(told);
  base = Rounds("worker:0");
  const int64_t base1 = Rounds("worker:1");
  EXPECT_TRUE(Eventually([&] {
    return Rounds("worker:0") >= base + 20 && Rounds("worker:1") >= base1 + 20;
  })) << "traffic stalled after the former holder resumed";
  StopReplaceCluster("");
  EXPECT_EQ(WaitExtra(replacement), 0);
}

// A barrier in progress when its member dies, and a rank replaced meanwhile: nobody hangs.
// The members that arrived are released with an error, a member arriving later at the
// same barrier gets that error at once, and the next barrier, with the replacement,
// completes (security_node.cc, scenario "barrier_replace").
TEST_F(ReplaceTest, BarrierInProgressWhenARankIsReplacedDoesNotHang) {
  ClusterSpec spec = ReplaceSpec("tcp");
  spec.env["MESHPOST_SEC_SCENARIO"] = "barrier_replace";
  Start(spec);
  auto has = [&](const std::string& f) { return !ReadAll(dir_ + "/" + f).empty(); };
  ASSERT_TRUE(Eventually([&] { return has("worker:0.waiting") && has("server:0.waiting"); }));
  ASSERT_EQ(kill(cluster_.pid("server:1"), SIGKILL), 0);
  ASSERT_TRUE(Eventually([&] { return has("worker:0.b1") && has("server:0.b1"); }))
      << "barrier members were not released when server 1 died";
  ClusterSpec again = spec;
  again.env["MESHPOST_SEC_REPLACEMENT"] = "1";
  const pid_t replacement = StartReplacement(again, "server", 1);
  ASSERT_GT(replacement, 0);
  {
    std::ofstream f(dir_ + "/go1");
    f << "1\n";
  }
  ASSERT_TRUE(Eventually([&] { return has("worker:1.b1"); }))
      << "a member arriving after the death waits for members that moved on";
  for (const char* n : {"worker:0", "server:0", "worker:1"}) {
    const std::string b1 = ReadAll(dir_ + "/" + n + ".b1");
    EXPECT_NE(b1.find("cannot complete"), std::string::npos) << n << ": " << b1;
  }
  {
    std::ofstream f(dir_ + "/go2");
    f << "1\n";
  }
  ASSERT_TRUE(Eventually([&] {
    return has("worker:0.b2") && has("worker:1.b2") && has("server:0.b2") && has("server:1.b2");
  })) << "the barrier after the replacement never completed";
  for (const char* n : {"worker:0", "worker:1", "server:0", "server:1"}) {
    EXPECT_EQ(ReadAll(dir_ + "/" + n + ".b2"), "OK\n") << n;
  }
  StopReplaceCluster("server:1");
  EXPECT_EQ(WaitExtra(replacement), 0);
}

// server 1 is paused past the heartbeat timeout and replaced; traffic resumes with the
// replacement. Resumed, the former holder learns at once that it was replaced: its next
// GetBatch and every later call (barrier included) say so.
TEST_F(ReplaceTest, PausedServerIsReplacedAndToldSoWhenItResumes) {
  for (const std::string transport : {"tcp", "cma"}) {
    SCOPED_TRACE(transport);
    cluster_ = LocalCluster();
    std::string cmd = "rm -f '" + dir_ + "'/*";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
    const ClusterSpec spec = ReplaceSpec(transport);
    Start(spec);
    ExpectTrafficContinues(10);
    const pid_t holder = cluster_.pid("server:1");
    ASSERT_EQ(kill(holder, SIGSTOP), 0);
    ASSERT_TRUE(Eventually([&] { return BothWorkersFailed(); }))
        << "workers never noticed server 1 stopped answering";
    const pid_t replacement = StartReplacement(spec, "server", 1);
    ASSERT_GT(replacement, 0);
    ExpectTrafficContinues(50);
    ASSERT_EQ(kill(holder, SIGCONT), 0);
    const std::string told = dir_ + "/replaced." + std::to_string(holder);
    EXPECT_TRUE(Eventually([&] { return !ReadAll(told).empty(); }))
        << "the resumed server never learned it was replaced";
    const std::string why = ReadAll(told);
    EXPECT_NE(why.find("was replaced"), std::string::npos) << why;
    EXPECT_NE(why.find("pid " + std::to_string(replacement)), std::string::npos) << why;
    ExpectTrafficContinues(20);  // the resumed former holder disturbs nothing
    StopReplaceCluster("");
    EXPECT_EQ(WaitExtra(replacement), 0);
  }
}

}  // namespace
}  // namespace meshpost
