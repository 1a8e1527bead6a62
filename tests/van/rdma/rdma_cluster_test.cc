// End-to-end through the postoffice with the rdma van forced (MESHPOST_TRANSPORT=rdma):
// a scheduler, servers and workers run as threads of this process, each with its own
// Postoffice, and every rdma van runs over one in-process FakeFabric (one fake host per
// node). Control traffic and rendezvous blobs use the real tcp van on 127.0.0.1; data
// moves as fake RDMA WRITEs. Every wait has a timeout.
#include <gtest/gtest.h>
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "fake_verbs.h"
#include "launch/local_cluster.h"
#include "ps/postoffice.h"
#include "tensor/backend/fake_backend.h"
#include "test_util.h"
#include "van/rdma/rdma_van.h"
#include "van/registry.h"

namespace meshpost {
namespace {

using rdma::testing::FakeFabric;
using rdma::testing::RoceSpec;

constexpr int64_t kWaitMs = 20000;
constexpr int64_t kRows = 16;
constexpr int64_t kCols = 64;

// A float32 host tensor whose owner keeps the memory alive.
struct FloatBuf {
  std::shared_ptr<std::vector<float>> v;
  TensorView view;
  FloatBuf(int64_t rows, int64_t cols, float fill = 0.f)
      : v(std::make_shared<std::vector<float>>(rows * cols, fill)) {
    view = TensorView{v->data(), DType::kFloat32, {rows, cols}, {}, v};
  }
  float* data() { return v->data(); }
  size_t size() const { return v->size(); }
};

// The value a worker pushes at element i in round r, and what server s answers.
float PushValue(int worker, int round, size_t i) {
  return static_cast<float>(worker * 1000 + round * 10) + static_cast<float>(i % 97) * 0.5f;
}
float AnswerValue(int server, float pushed) { return pushed * 2.f + static_cast<float>(server); }

class RdmaCluster {
 public:
  ~RdmaCluster() { (void)StopAll(); }

  // Starts scheduler, servers and workers; every node forces rdma over `fabric_`.
  // `before_start` runs once every Postoffice exists and none has started.
  Status Start(int num_servers, int num_workers,
               const std::function<void()>& before_start = nullptr) {
    num_servers_ = num_servers;
    num_workers_ = num_workers;
    int fds[2];
    if (pipe(fds) != 0) return UnavailableError("pipe failed");
    Options so = Base(Role::kScheduler, 0);
    so.port_fd = fds[1];  // the scheduler writes its port here and closes it
    MESHPOST_ASSIGN_OR_RETURN(scheduler_, Postoffice::Create(so));
    std::vector<Status> starts(1 + num_servers + num_workers);
    std::vector<std::thread> threads;
    threads.emplace_back([this, &starts] { starts[0] = scheduler_->Start(); });
    auto port = ReadReportedPort(fds[0], 20000);
    close(fds[0]);
    if (!port.ok()) {
      threads[0].join();
      return port.status().Annotate(starts[0].ToString());
    }
    root_port_ = *port;
    Status created;
    for (int r = 0; r < num_servers && created.ok(); ++r) {
      auto po = Postoffice::Create(Base(Role::kServer, r, *port), FakeFabricVans());
      if (po.ok()) servers_.push_back(std::move(po).value());
      created = po.status();
    }
    for (int r = 0; r < num_workers && created.ok(); ++r) {
      auto po = Postoffice::Create(Base(Role::kWorker, r, *port), FakeFabricVans());
      if (po.ok()) workers_.push_back(std::move(po).value());
      created = po.status();
    }
    size_t i = 1;
    if (created.ok() && before_start) before_start();
    if (created.ok()) {
      for (auto& po : servers_) {
        Postoffice* p = po.get();
        Status* out = &starts[i++];
        threads.emplace_back([p, out] { *out = p->Start(); });
      }
      for (auto& po : workers_) {
        Postoffice* p = po.get();
        Status* out = &starts[i++];
        threads.emplace_back([p, out] { *out = p->Start(); });
      }
    }
    // Bounded: every Start gives up after start_timeout_ms.
    for (auto& t : threads) t.join();
    MESHPOST_RETURN_IF_ERROR(created);
    std::string errors;
    for (size_t n = 0; n < starts.size(); ++n) {
      if (!starts[n].ok())
        errors += "[node " + std::to_string(n) + "] " + starts[n].ToString() + " ";
    }
    return errors.empty() ? OkStatus() : UnavailableError("Start: " + errors);
  }

  // Stops every node (data nodes in parallel, then the scheduler); returns the first error.
  Status StopAll() {
    if (stopped_) return OkStatus();
    stopped_ = true;
    std::vector<Status> stops(servers_.size() + workers_.size());
    std::vector<std::thread> threads;
    size_t i = 0;
    for (auto* group : {&workers_, &servers_}) {
      for (auto& po : *group) {
        Postoffice* p = po.get();
        Status* out = &stops[i++];
        threads.emplace_back([p, out] { *out = p->Stop(10000); });
      }
    }
    for (auto& t : threads) t.join();
    Status result;
    for (const Status& s : stops) {
      if (result.ok() && !s.ok()) result = s;
    }
    if (scheduler_) {
      Status s = scheduler_->Stop(10000);
      if (result.ok() && !s.ok()) result = s;
    }
    return result;
  }

  // Server `r` leaves (orderly Stop) and a new Postoffice takes its rank (issue 10): the
  // workers replace their rdma connections to it (Disconnect, Connect, rendezvous).
  Status ReplaceServer(int r) {
    MESHPOST_RETURN_IF_ERROR(servers_[r]->Stop(10000));
    MESHPOST_ASSIGN_OR_RETURN(
        auto po, Postoffice::Create(Base(Role::kServer, r, root_port_), FakeFabricVans()));
    retired_.push_back(std::move(servers_[r]));
    servers_[r] = std::move(po);
    return servers_[r]->Start();
  }

  // GPU tensors of every node go through `backend` (set before Start); `rdma_env` holds
  // MESHPOST_RDMA_* variables for every node (e.g. MESHPOST_RDMA_GPU=staging).
  void SetDevice(DeviceBackend* backend, std::map<std::string, std::string> rdma_env = {}) {
    backend_ = backend;
    rdma_env_ = std::move(rdma_env);
  }

  Postoffice* server(int r) { return servers_[r].get(); }
  Postoffice* worker(int r) { return workers_[r].get(); }
  FakeFabric& fabric() { return fabric_; }

 private:
  Options Base(Role role, int rank, int root_port = 0) {
    Options o;
    o.role = role;
    o.root_uri = "127.0.0.1";
    o.root_port = root_port;
    o.num_servers = num_servers_;
    o.num_workers = num_workers_;
    o.node_rank = rank;
    o.transport = "rdma";
    o.start_timeout_ms = 20000;
    o.spin_us = 0;
    o.device_backend = backend_;
    o.rdma_env = rdma_env_;
    return o;
  }

  // The test seam: this node's "rdma" van runs over the fake fabric, on a fake host of
  // its own with its own RoCE device and GIDs; every other van comes from the registry.
  VanFactory FakeFabricVans() {
    const int host = fabric_.AddHost({RoceSpec("mlx5_0", static_cast<uint8_t>(10 + next_ip_++))});
    FakeFabric* fabric = &fabric_;
    return [fabric, host](const std::string& name,
                          const VanOptions& vo) -> Result<std::unique_ptr<Van>> {
      if (name != "rdma") return CreateVan(name, vo);
      MESHPOST_ASSIGN_OR_RETURN(RdmaOptions ro, RdmaOptionsFromEnv(vo.env));
      ro.gpu_backend = vo.device_backend;
      ro.wait = vo.wait;
      ro.stop_drain_ms = vo.stop_drain_ms;
      ro.verbs = [fabric, host] { return fabric->Api(host); };
      MESHPOST_ASSIGN_OR_RETURN(auto van, CreateRdmaVan(ro));
      return std::unique_ptr<Van>(std::move(van));
    };
  }

  // Declared first: every node's rdma van points into the fabric, so it is destroyed last.
  FakeFabric fabric_;
  int next_ip_ = 0;
  int num_servers_ = 1;
  int num_workers_ = 1;
  bool stopped_ = false;
  std::unique_ptr<Postoffice> scheduler_;
  std::vector<std::unique_ptr<Postoffice>> servers_;
  std::vector<std::unique_ptr<Postoffice>> workers_;
  std::vector<std::unique_ptr<Postoffice>> retired_;  // replaced holders, stopped
  int root_port_ = 0;
  DeviceBackend* backend_ = nullptr;
  std::map<std::string, std::string> rdma_env_;
};

// Server loop for `rounds` batches: checks every push against PushValue and answers each
// worker's pull slot with AnswerValue. `recv_chunk` (optional) must contain the push data.
void ServeRounds(Postoffice* po, int rounds,
                 const std::vector<std::pair<const char*, size_t>>* recv_chunks = nullptr) {
  AFTensorServer* server = po->server();
  for (int round = 0; round < rounds; ++round) {
    auto batch = server->GetBatch(kWaitMs);
    ASSERT_TRUE(batch.ok()) << "server " << po->rank() << " round " << round << ": "
                            << batch.status();
    ASSERT_EQ(batch->size(), static_cast<size_t>(server->num_workers()));
    for (const BatchRequest& req : *batch) {
      ASSERT_EQ(req.push.size(), 1u);
      const TensorView& t = req.push[0].tensor;
      ASSERT_EQ(t.dtype, DType::kFloat32);
      ASSERT_EQ(t.shape, (std::vector<int64_t>{kRows, kCols}));
      if (recv_chunks != nullptr) {
        // The payload was written straight into the registered chunk: zero-copy RDMA.
        const auto [chunk, chunk_bytes] = (*recv_chunks)[req.worker_rank];
        const char* p = static_cast<const char*>(t.data);
        EXPECT_TRUE(p >= chunk && p + t.nbytes() <= chunk + chunk_bytes)
            << "worker " << req.worker_rank << " push landed outside its registered chunk";
      }
      const float* in = static_cast<const float*>(t.data);
      FloatBuf answer(kRows, kCols);
      int bad = 0;
      for (size_t i = 0; i < answer.size(); ++i) {
        if (in[i] != PushValue(req.worker_rank, round, i)) ++bad;
        answer.data()[i] = AnswerValue(po->rank(), in[i]);
      }
      EXPECT_EQ(bad, 0) << "server " << po->rank() << " got wrong bytes from worker "
                        << req.worker_rank << " in round " << round;
      ASSERT_EQ(req.pull_slots.size(), 1u);
      Status s = server->Respond(req.handle, {answer.view});
      ASSERT_TRUE(s.ok()) << s;
    }
  }
}

// Worker side of `rounds` push_pulls: one float32 [16, 64] push, one pull slot per server.
// `pull_addrs` (optional) collects the address of every pull tensor used.
void PushPullRounds(Postoffice* po, int rounds, std::vector<uint64_t>* pull_addrs = nullptr) {
  AFTensorWorker* worker = po->worker();
  const int S = worker->num_servers();
  for (int round = 0; round < rounds; ++round) {
    FloatBuf push(kRows, kCols);
    for (size_t i = 0; i < push.size(); ++i) push.data()[i] = PushValue(po->rank(), round, i);
    std::vector<FloatBuf> pulls;
    KeyTensorBatch pull_batch;
    for (int s = 0; s < S; ++s) {
      pulls.emplace_back(kRows, kCols, -1.f);
      pull_batch.push_back({100 + s, pulls.back().view});
      if (pull_addrs) pull_addrs->push_back(reinterpret_cast<uint64_t>(pulls.back().data()));
    }
    auto h = worker->ZBatchPushPull({{7, push.view}}, pull_batch);
    ASSERT_TRUE(h.ok()) << h.status();
    Status w = worker->Wait(*h, kWaitMs);
    ASSERT_TRUE(w.ok()) << "worker " << po->rank() << " round " << round << ": " << w;
    for (int s = 0; s < S; ++s) {
      int bad = 0;
      for (size_t i = 0; i < pulls[s].size(); ++i) {
        if (pulls[s].data()[i] != AnswerValue(s, push.data()[i])) ++bad;
      }
      EXPECT_EQ(bad, 0) << "worker " << po->rank() << " pull from server " << s << " round "
                        << round;
    }
  }
}

void ExpectAllRdma(RdmaCluster& c, int S, int W) {
  for (int s = 0; s < S; ++s) {
    auto t = c.server(s)->Transports();
    ASSERT_EQ(t.size(), static_cast<size_t>(W));
    for (const auto& [peer, how] : t) EXPECT_EQ(how, "rdma") << "server " << s << " -> " << peer;
  }
  for (int w = 0; w < W; ++w) {
    auto t = c.worker(w)->Transports();
    ASSERT_EQ(t.size(), static_cast<size_t>(S));
    for (const auto& [peer, how] : t) EXPECT_EQ(how, "rdma") << "worker " << w << " -> " << peer;
  }
}

TEST(RdmaClusterTest, PushPullRoundTrips) {
  RdmaCluster c;
  Status started = c.Start(1, 1);
  ASSERT_TRUE(started.ok()) << started;
  ExpectAllRdma(c, 1, 1);
  std::thread server([&] { ServeRounds(c.server(0), 5); });
  std::vector<uint64_t> pull_addrs;
  PushPullRounds(c.worker(0), 5, &pull_addrs);
  server.join();
  // Each response was RDMA-written straight into the worker's pull tensor (zero-copy).
  const auto writes = c.fabric().WritesSnapshot();
  ASSERT_EQ(pull_addrs.size(), 5u);
  for (uint64_t addr : pull_addrs) {
    bool found = false;
    for (const auto& w : writes) {
      found |= !w.wr.with_imm && w.wr.remote_addr == addr &&
               w.wr.length == kRows * kCols * sizeof(float);
    }
    EXPECT_TRUE(found) << "no RDMA WRITE into the pull tensor at " << addr;
  }
  // Data moved as RDMA WRITEs: 5 pushes and 5 responses of one [16, 64] float32 tensor.
  int payloads = 0;
  for (const auto& w : c.fabric().WritesSnapshot()) {
    if (!w.wr.with_imm && w.wr.length == kRows * kCols * sizeof(float)) ++payloads;
  }
  EXPECT_EQ(payloads, 10);
  Status stopped = c.StopAll();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

// A server rank taken over by a new process after the old one left: the worker's rdma van
// gets Disconnect + Connect for it, the rendezvous runs again, and push_pull returns the
// new server's answers over rdma.
TEST(RdmaClusterTest, ReplacedServerIsReachedOverRdma) {
  RdmaCluster c;
  Status started = c.Start(1, 1);
  ASSERT_TRUE(started.ok()) << started;
  {
    std::thread server([&] { ServeRounds(c.server(0), 3); });
    PushPullRounds(c.worker(0), 3);
    server.join();
  }
  Status replaced = c.ReplaceServer(0);
  ASSERT_TRUE(replaced.ok()) << replaced;
  ExpectAllRdma(c, 1, 1);
  {
    std::thread server([&] { ServeRounds(c.server(0), 3); });
    PushPullRounds(c.worker(0), 3);
    server.join();
  }
  Status stopped = c.StopAll();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

TEST(RdmaClusterTest, TwoServersTwoWorkers) {
  RdmaCluster c;
  Status started = c.Start(2, 2);
  ASSERT_TRUE(started.ok()) << started;
  ExpectAllRdma(c, 2, 2);
  std::vector<std::thread> threads;
  for (int s = 0; s < 2; ++s) threads.emplace_back([&c, s] { ServeRounds(c.server(s), 4); });
  for (int w = 0; w < 2; ++w) threads.emplace_back([&c, w] { PushPullRounds(c.worker(w), 4); });
  for (auto& t : threads) t.join();
  Status stopped = c.StopAll();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

// Payload WRITEs of `bytes` whose target range lies inside [base, base + len).
int WritesInto(FakeFabric& fabric, const char* base, size_t len, size_t bytes) {
  int n = 0;
  const uint64_t lo = reinterpret_cast<uint64_t>(base);
  for (const auto& w : fabric.WritesSnapshot()) {
    if (!w.wr.with_imm && w.wr.length == bytes && w.wr.remote_addr >= lo &&
        w.wr.remote_addr + w.wr.length <= lo + len) {
      ++n;
    }
  }
  return n;
}

// register_recv_buffer on the server: each worker's push is RDMA-written straight into its
// chunk (checked on the fabric's posted WRITEs, not only on where the data ends up, since
// the van would also copy a payload that landed elsewhere into the chunk).
void RunRegisteredReceiveBuffer(bool register_before_start) {
  constexpr int kRounds = 3;
  RdmaCluster c;
  // Two chunks of [16, 64] floats, one per worker, for key 7.
  FloatBuf recv(2 * kRows, kCols);
  const size_t chunk_bytes = kRows * kCols * sizeof(float);
  auto do_register = [&] {
    Status r = c.server(0)->server()->RegisterRecvBuffer(recv.view, {0, 1}, {7, 7});
    EXPECT_TRUE(r.ok()) << r;
  };
  Status started = register_before_start ? c.Start(1, 2, do_register) : c.Start(1, 2);
  ASSERT_TRUE(started.ok()) << started;
  if (!register_before_start) do_register();
  const char* base = reinterpret_cast<const char*>(recv.data());
  std::vector<std::pair<const char*, size_t>> chunks = {{base, chunk_bytes},
                                                        {base + chunk_bytes, chunk_bytes}};
  std::thread server([&] { ServeRounds(c.server(0), kRounds, &chunks); });
  std::thread w1([&] { PushPullRounds(c.worker(1), kRounds); });
  PushPullRounds(c.worker(0), kRounds);
  w1.join();
  server.join();
  EXPECT_EQ(WritesInto(c.fabric(), base, chunk_bytes, chunk_bytes), kRounds);
  EXPECT_EQ(WritesInto(c.fabric(), base + chunk_bytes, chunk_bytes, chunk_bytes), kRounds);
  Status stopped = c.StopAll();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

TEST(RdmaClusterTest, RegisteredReceiveBufferIsWrittenInPlace) {
  RunRegisteredReceiveBuffer(/*register_before_start=*/false);
}

TEST(RdmaClusterTest, ReceiveBufferRegisteredBeforeStartIsWrittenInPlace) {
  RunRegisteredReceiveBuffer(/*register_before_start=*/true);
}

TEST(RdmaClusterTest, CompletionErrorFailsThePendingHandleNamingThePeer) {
  RdmaCluster c;
  Status started = c.Start(1, 1);
  ASSERT_TRUE(started.ok()) << started;
  {
    std::thread server([&] { ServeRounds(c.server(0), 1); });
    PushPullRounds(c.worker(0), 1);
    server.join();
  }
  // The first round's last writes (the server returning credits) may still be posted
  // after the round returned; the failure is meant for the worker's next payload, so let
  // the fabric go quiet first (it once hit the server's credit write instead).
  size_t posted = c.fabric().WritesSnapshot().size();
  for (int quiet = 0, i = 0; quiet < 10 && i < 500; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    const size_t now = c.fabric().WritesSnapshot().size();
    quiet = now == posted ? quiet + 1 : 0;
    posted = now;
  }
  // The worker's next payload WRITE fails as a NIC would report it.
  c.fabric().FailNextWrites(rdma::kWcRemAccessErr, 1);
  FloatBuf push(kRows, kCols, 1.f);
  FloatBuf pull(kRows, kCols);
  auto h = c.worker(0)->worker()->ZBatchPushPull({{7, push.view}}, {{100, pull.view}});
  ASSERT_TRUE(h.ok()) << h.status();
  Status w = c.worker(0)->worker()->Wait(*h, kWaitMs);
  EXPECT_EQ(w.code(), StatusCode::kUnavailable) << w;
  EXPECT_NE(w.message().find("server 0"), std::string::npos) << w;
  EXPECT_NE(w.message().find("remote access error"), std::string::npos) << w;
  EXPECT_EQ(c.fabric().injected_pending(), 0u);
  // The connection is dead and the server counts as down: a later push_pull fails at once
  // (at the call or on Wait) instead of hanging.
  auto again = c.worker(0)->worker()->ZBatchPushPull({{7, push.view}}, {{100, pull.view}});
  Status later = again.ok() ? c.worker(0)->worker()->Wait(*again, kWaitMs) : again.status();
  EXPECT_EQ(later.code(), StatusCode::kUnavailable) << later;
  EXPECT_NE(later.message().find("server 0"), std::string::npos) << later;
  Status stopped = c.StopAll();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

// --- GPU tensors over rdma -------------------------------------------------------------

TensorView DeviceFloats(float* p) {
  return TensorView{p, DType::kFloat32, {kRows, kCols}, Device{DeviceType::kCUDA, 0}, nullptr};
}

// What GpuRounds saw: device copies the fake backend ran (the test's own producers
// included), payload WRITEs into the device pull tensor and out of the device push tensor.
struct GpuRoundsSeen {
  uint64_t copies = 0;
  int writes_into_pull = 0;
  int writes_from_push = 0;
};

// `rounds` push_pulls of a CUDA push into a CUDA pull slot, 1 worker x 1 server, both ends
// with need_event: the worker's push and the server's answer are produced on held streams
// that are released only after push_pull / Respond returned, with values that change
// every round, so a transport that reads device memory before the producing stream ran
// delivers stale bytes and fails the data checks.
GpuRoundsSeen GpuRounds(RdmaCluster& c, FakeBackend& be, int rounds) {
  GpuRoundsSeen seen;
  constexpr size_t kBytes = kRows * kCols * sizeof(float);
  float* push_dev = static_cast<float*>(*be.AllocDevice(0, kBytes));
  float* pull_dev = static_cast<float*>(*be.AllocDevice(0, kBytes));
  float* answer_dev = static_cast<float*>(*be.AllocDevice(0, kBytes));
  const DeviceStream user = *be.CreateStream(0), server_stream = *be.CreateStream(0);
  const uint64_t copies_before = be.copies_executed();
  AFTensorWorker* worker = c.worker(0)->worker();
  AFTensorServer* server = c.server(0)->server();
  for (int round = 0; round < rounds; ++round) {
    std::vector<float> host(kRows * kCols), doubled(kRows * kCols);
    for (size_t i = 0; i < host.size(); ++i) {
      host[i] = PushValue(0, round + 1, i);
      doubled[i] = AnswerValue(0, host[i]);
    }
    std::memset(pull_dev, 0, kBytes);
    be.HoldStream(user);
    EXPECT_TRUE(be.CopyAsync(push_dev, host.data(), kBytes, user).ok());
    std::thread serve([&] {
      auto batch = server->GetBatch(kWaitMs);
      ASSERT_TRUE(batch.ok()) << batch.status();
      ASSERT_EQ(batch->size(), 1u);
      const BatchRequest& req = (*batch)[0];
      ASSERT_EQ(req.push.size(), 1u);
      const float* got = static_cast<const float*>(req.push[0].tensor.data);
      int bad = 0;
      for (size_t i = 0; i < host.size(); ++i) bad += got[i] != host[i];
      EXPECT_EQ(bad, 0) << "round " << round << ": the push was read before it was produced";
      be.HoldStream(server_stream);
      EXPECT_TRUE(be.CopyAsync(answer_dev, doubled.data(), kBytes, server_stream).ok());
      Status s =
          server->Respond(req.handle, {DeviceFloats(answer_dev)}, StreamSync{true, server_stream});
      EXPECT_TRUE(s.ok()) << s;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a racing read would go now
      be.ReleaseStream(server_stream);
    });
    auto h = worker->ZBatchPushPull({{7, DeviceFloats(push_dev)}}, {{100, DeviceFloats(pull_dev)}},
                                    StreamSync{true, user});
    EXPECT_TRUE(h.ok()) << h.status();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    be.ReleaseStream(user);
    Status w = h.ok() ? worker->Wait(*h, kWaitMs) : h.status();
    serve.join();
    EXPECT_TRUE(w.ok()) << "round " << round << ": " << w;
    int bad = 0;
    for (size_t i = 0; i < doubled.size(); ++i) bad += pull_dev[i] != doubled[i];
    EXPECT_EQ(bad, 0) << "round " << round << ": wrong bytes in the CUDA pull tensor";
  }
  EXPECT_TRUE(be.WaitIdle(kWaitMs));
  seen.copies = be.copies_executed() - copies_before;
  seen.writes_into_pull =
      WritesInto(c.fabric(), reinterpret_cast<const char*>(pull_dev), kBytes, kBytes);
  for (const auto& w : c.fabric().WritesSnapshot()) {
    seen.writes_from_push += !w.wr.with_imm && w.wr.local_addr == push_dev && w.wr.length == kBytes;
  }
  EXPECT_TRUE(be.Hazards().empty()) << be.Hazards()[0];
  be.DestroyStream(user);
  be.DestroyStream(server_stream);
  be.FreeDevice(push_dev);
  be.FreeDevice(pull_dev);
  be.FreeDevice(answer_dev);
  return seen;
}

// GPUDirect on the push_pull path: the fabric reads the push from device memory and writes
// the response into the device pull tensor; meshpost runs no staging copy.
TEST(RdmaClusterTest, GpuTensorsMoveByGpuDirectWithoutStaging) {
  FakeBackend be;
  RdmaCluster c;
  c.SetDevice(&be);
  Status started = c.Start(1, 1);
  ASSERT_TRUE(started.ok()) << started;
  ExpectAllRdma(c, 1, 1);
  const GpuRoundsSeen seen = GpuRounds(c, be, 3);
  EXPECT_EQ(seen.copies, 6u) << "only the test's own producer copies (2 per round) may run";
  EXPECT_EQ(seen.writes_into_pull, 3);
  EXPECT_EQ(seen.writes_from_push, 3);
  Status stopped = c.StopAll();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

// A CUDA receive buffer over GPUDirect: the server registers device memory for (worker 0,
// key 7); each push is RDMA-written straight into it, or, when it lands in a van buffer
// (the GPUDirect registration failed, or a push raced the registration), copied into it
// by the device, never by the CPU. GetBatch hands the push out as a cuda:0 view of the
// chunk either way.
void RunCudaReceiveBuffer(bool registration_fails) {
  constexpr int kRounds = 3;
  constexpr size_t kBytes = kRows * kCols * sizeof(float);
  FakeBackend be;
  RdmaCluster c;
  c.SetDevice(&be);
  float* recv_dev = static_cast<float*>(*be.AllocDevice(0, kBytes));
  auto do_register = [&] {
    Status r = c.server(0)->server()->RegisterRecvBuffer(DeviceFloats(recv_dev), {0}, {7});
    EXPECT_TRUE(r.ok()) << r;
  };
  Status started = registration_fails ? c.Start(1, 1) : c.Start(1, 1, do_register);
  ASSERT_TRUE(started.ok()) << started;
  if (registration_fails) {
    c.fabric().set_fail_registrations(1000);
    do_register();  // accepted: the van only logs that GPUDirect is off for the buffer
    c.fabric().set_fail_registrations(0);
  }
  const uint64_t copies_before = be.copies_executed();
  AFTensorWorker* worker = c.worker(0)->worker();
  AFTensorServer* server = c.server(0)->server();
  std::vector<float> push(kRows * kCols), pull(kRows * kCols);
  auto cpu = [](float* p) {
    return TensorView{p, DType::kFloat32, {kRows, kCols}, Device{}, nullptr};
  };
  for (int round = 0; round < kRounds; ++round) {
    for (size_t i = 0; i < push.size(); ++i) push[i] = PushValue(0, round + 1, i);
    auto h = worker->ZBatchPushPull({{7, cpu(push.data())}}, {{100, cpu(pull.data())}});
    ASSERT_TRUE(h.ok()) << h.status();
    auto batch = server->GetBatch(kWaitMs);
    ASSERT_TRUE(batch.ok()) << batch.status();
    const KeyTensor& got = (*batch)[0].push[0];
    EXPECT_EQ(got.tensor.device, (Device{DeviceType::kCUDA, 0}));
    EXPECT_EQ(got.tensor.data, recv_dev);
    be.HostAccess(recv_dev, kBytes, /*write=*/false);
    int bad = 0;
    for (size_t i = 0; i < push.size(); ++i) bad += recv_dev[i] != push[i];
    EXPECT_EQ(bad, 0) << "round " << round;
    ASSERT_TRUE(server->Respond((*batch)[0].handle, {cpu(push.data())}).ok());
    ASSERT_TRUE(worker->Wait(*h, kWaitMs).ok());
    EXPECT_EQ(pull[5], push[5]);
  }
  const int in_place =
      WritesInto(c.fabric(), reinterpret_cast<const char*>(recv_dev), kBytes, kBytes);
  const uint64_t copies = be.copies_executed() - copies_before;
  // Every push arrived exactly once: written in place, or copied by the device.
  EXPECT_EQ(static_cast<uint64_t>(in_place) + copies, static_cast<uint64_t>(kRounds))
      << in_place << " in place, " << copies << " device copies";
  EXPECT_EQ(in_place, registration_fails ? 0 : kRounds);
  EXPECT_TRUE(be.Hazards().empty());
  Status stopped = c.StopAll();
  EXPECT_TRUE(stopped.ok()) << stopped;
  be.FreeDevice(recv_dev);
}

TEST(RdmaClusterTest, CudaReceiveBufferIsWrittenInPlaceByGpuDirect) {
  RunCudaReceiveBuffer(/*registration_fails=*/false);
}

TEST(RdmaClusterTest, CudaReceiveBufferWithoutGpuDirectIsCopiedIntoByTheDevice) {
  RunCudaReceiveBuffer(/*registration_fails=*/true);
}

// MESHPOST_RDMA_GPU=staging: the same program, every GPU tensor through pinned host memory
// (three staging copies per round: the push out, the answer out, the answer in).
TEST(RdmaClusterTest, GpuTensorsAreStagedWhenTheUserChoosesStaging) {
  FakeBackend be;
  RdmaCluster c;
  c.SetDevice(&be, {{"MESHPOST_RDMA_GPU", "staging"}});
  Status started = c.Start(1, 1);
  ASSERT_TRUE(started.ok()) << started;
  const GpuRoundsSeen seen = GpuRounds(c, be, 3);
  EXPECT_EQ(seen.copies, 6u + 9u);
  EXPECT_EQ(seen.writes_into_pull, 0);
  EXPECT_EQ(seen.writes_from_push, 0);
  Status stopped = c.StopAll();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

// RespondVec from a CUDA ret_buffer to two workers' CUDA pull slots over GPUDirect: each
// worker's rows are written in place, and every slice waits for the caller's event (not
// only the first), so none of them carries the buffer's bytes from before the stream ran.
TEST(RdmaClusterTest, GpuRespondVecWaitsForTheEventForEverySlice) {
  FakeBackend be;
  RdmaCluster c;
  c.SetDevice(&be);
  Status started = c.Start(1, 2);
  ASSERT_TRUE(started.ok()) << started;
  constexpr size_t kBytes = kRows * kCols * sizeof(float);
  float* ret = static_cast<float*>(*be.AllocDevice(0, 2 * kBytes));
  float* pulls[2] = {static_cast<float*>(*be.AllocDevice(0, kBytes)),
                     static_cast<float*>(*be.AllocDevice(0, kBytes))};
  std::memset(ret, 0, 2 * kBytes);
  const DeviceStream stream = *be.CreateStream(0);
  std::vector<float> answer(2 * kRows * kCols);
  for (size_t i = 0; i < answer.size(); ++i) answer[i] = 1.f + static_cast<float>(i) * 0.25f;
  const uint64_t copies_before = be.copies_executed();
  std::vector<FloatBuf> pushes;
  uint64_t handles[2] = {0, 0};
  for (int w = 0; w < 2; ++w) {
    std::memset(pulls[w], 0, kBytes);
    pushes.emplace_back(kRows, kCols, static_cast<float>(w));
    auto h = c.worker(w)->worker()->ZBatchPushPull({{7, pushes.back().view}},
                                                   {{100, DeviceFloats(pulls[w])}});
    ASSERT_TRUE(h.ok()) << h.status();
    handles[w] = *h;
  }
  AFTensorServer* server = c.server(0)->server();
  auto batch = server->GetBatch(kWaitMs);
  ASSERT_TRUE(batch.ok()) << batch.status();
  ASSERT_EQ(batch->size(), 2u);
  std::vector<uint64_t> by_rank(2);
  for (const BatchRequest& req : *batch) by_rank[req.worker_rank] = req.handle;
  be.HoldStream(stream);
  ASSERT_TRUE(be.CopyAsync(ret, answer.data(), 2 * kBytes, stream).ok());
  const TensorView ret_view{
      ret, DType::kFloat32, {2 * kRows, kCols}, Device{DeviceType::kCUDA, 0}, nullptr};
  FloatBuf rows(kRows, kCols);  // RespondVec reads only the row counts of tensors_vec
  Status s =
      server->RespondVec(ret_view, {rows.view, rows.view}, by_rank, StreamSync{true, stream});
  ASSERT_TRUE(s.ok()) << s;
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a racing read would go now
  be.ReleaseStream(stream);
  for (int w = 0; w < 2; ++w) {
    Status done = c.worker(w)->worker()->Wait(handles[w], kWaitMs);
    ASSERT_TRUE(done.ok()) << "worker " << w << ": " << done;
    int bad = 0;
    for (size_t i = 0; i < kRows * kCols; ++i) bad += pulls[w][i] != answer[w * kRows * kCols + i];
    EXPECT_EQ(bad, 0) << "worker " << w << " got bytes from before the producing stream ran";
    EXPECT_EQ(WritesInto(c.fabric(), reinterpret_cast<const char*>(pulls[w]), kBytes, kBytes), 1);
  }
  EXPECT_TRUE(be.WaitIdle(kWaitMs));
  EXPECT_EQ(be.copies_executed() - copies_before, 1u) << "only the test's producer copy";
  Status stopped = c.StopAll();
  EXPECT_TRUE(stopped.ok()) << stopped;
  be.DestroyStream(stream);
  be.FreeDevice(ret);
  be.FreeDevice(pulls[0]);
  be.FreeDevice(pulls[1]);
}

// GPU memory the NIC cannot register (no dma-buf export here, peer-memory registration
// refused): push_pull fails at once naming the tensor, the reason and the fallback, sends
// nothing, and the node keeps working.
TEST(RdmaClusterTest, GpuTensorsThatCannotBeRegisteredFailWithTheReason) {
  FakeBackend be;
  RdmaCluster c;
  c.SetDevice(&be);
  Status started = c.Start(1, 1);
  ASSERT_TRUE(started.ok()) << started;
  constexpr size_t kBytes = kRows * kCols * sizeof(float);
  float* push_dev = static_cast<float*>(*be.AllocDevice(0, kBytes));
  float* pull_dev = static_cast<float*>(*be.AllocDevice(0, kBytes));
  c.fabric().set_fail_registrations(1000);
  auto h = c.worker(0)->worker()->ZBatchPushPull({{7, DeviceFloats(push_dev)}},
                                                 {{100, DeviceFloats(pull_dev)}});
  c.fabric().set_fail_registrations(0);
  ASSERT_FALSE(h.ok());
  const std::string m = h.status().message();
  EXPECT_NE(m.find("push[0]"), std::string::npos) << m;
  EXPECT_NE(m.find("GPUDirect"), std::string::npos) << m;
  EXPECT_NE(m.find("Cannot allocate memory"), std::string::npos) << m;
  EXPECT_NE(m.find("MESHPOST_RDMA_GPU=staging"), std::string::npos) << m;
  std::thread server([&] { ServeRounds(c.server(0), 2); });
  PushPullRounds(c.worker(0), 2);
  server.join();
  Status stopped = c.StopAll();
  EXPECT_TRUE(stopped.ok()) << stopped;
  be.FreeDevice(push_dev);
  be.FreeDevice(pull_dev);
}

}  // namespace
}  // namespace meshpost
