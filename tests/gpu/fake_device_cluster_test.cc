// GPU tensors end to end through the postoffice, with the fake device backend, over tcp
// (pinned staging), the same-host van with CUDA IPC (cma) and the same-host van with
// MESHPOST_CMA_GPU=staging: a scheduler, a server and a worker run as threads of this
// process. "Device" tensors are
// fake device memory, produced on a held stream so the tests decide when the data exists;
// the fake backend's race checker then proves the stream contract (need_event, staging,
// WaitOnStream) instead of luck deciding it.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "ps/postoffice.h"
#include "tensor/backend/fake_backend.h"

namespace meshpost {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr int64_t kWaitMs = 30000;
constexpr int64_t kElems = 4096;
constexpr size_t kBytes = kElems * sizeof(float);

Result<int> ReadPort(int fd) {
  std::string line;
  const uint64_t deadline = GetNanosecond() + 30'000'000'000ull;
  while (line.find('\n') == std::string::npos) {
    const uint64_t now = GetNanosecond();
    if (now >= deadline) return DeadlineExceededError("scheduler did not report its port");
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>((deadline - now) / 1000000) + 1) <= 0) continue;
    char buf[32];
    const ssize_t got = read(fd, buf, sizeof(buf));
    if (got <= 0) return UnavailableError("scheduler closed the port pipe without a port");
    line.append(buf, static_cast<size_t>(got));
  }
  return std::stoi(line);
}

// One scheduler, one server, one worker; every node moves GPU tensors through `backend`.
// `transport` is "tcp", "cma" or "cma@staging" (cma with MESHPOST_CMA_GPU=staging).
class Cluster {
 public:
  Cluster(DeviceBackend* backend, std::string transport)
      : backend_(backend), transport_(std::move(transport)) {}
  ~Cluster() { (void)Stop(); }

  Status Start() {
    int fds[2];
    if (pipe(fds) != 0) return UnavailableError("pipe failed");
    Options so = Base(Role::kScheduler, 0);
    so.port_fd = fds[1];
    MESHPOST_ASSIGN_OR_RETURN(scheduler_, Postoffice::Create(so));
    Status sched_start, server_start, worker_start;
    std::thread st([&] { sched_start = scheduler_->Start(); });
    auto port = ReadPort(fds[0]);
    close(fds[0]);
    if (!port.ok()) {
      st.join();
      return port.status();
    }
    auto server = Postoffice::Create(Base(Role::kServer, *port));
    auto worker = Postoffice::Create(Base(Role::kWorker, *port));
    if (!server.ok() || !worker.ok()) {
      st.join();
      return server.ok() ? worker.status() : server.status();
    }
    server_ = std::move(server).value();
    worker_ = std::move(worker).value();
    std::thread t1([&] { server_start = server_->Start(); });
    std::thread t2([&] { worker_start = worker_->Start(); });
    t1.join();
    t2.join();
    st.join();
    MESHPOST_RETURN_IF_ERROR(sched_start);
    MESHPOST_RETURN_IF_ERROR(server_start);
    return worker_start;
  }

  Status Stop() {
    if (!scheduler_) return OkStatus();
    Status a, b;
    std::thread t1([&] {
      if (worker_) a = worker_->Stop(10000);
    });
    std::thread t2([&] {
      if (server_) b = server_->Stop(10000);
    });
    t1.join();
    t2.join();
    Status c = scheduler_->Stop(10000);
    worker_.reset();
    server_.reset();
    scheduler_.reset();
    return a.ok() ? (b.ok() ? c : b) : a;
  }

  AFTensorWorker* worker() { return worker_->worker(); }
  int64_t staging_chunk = 0;  // MESHPOST_GPU_STAGING_CHUNK for every node (0: default)
  AFTensorServer* server() { return server_->server(); }

 private:
  Options Base(Role role, int root_port) {
    Options o;
    o.role = role;
    o.root_uri = "127.0.0.1";
    o.root_port = root_port;
    o.num_servers = 1;
    o.num_workers = 1;
    const size_t at = transport_.find('@');
    o.transport = transport_.substr(0, at);
    if (at != std::string::npos) o.cma_gpu = transport_.substr(at + 1);
    o.start_timeout_ms = 30000;
    if (staging_chunk > 0) o.gpu_staging_chunk = staging_chunk;
    o.spin_us = 0;
    o.device_backend = backend_;
    return o;
  }

  DeviceBackend* backend_;
  std::string transport_;
  std::unique_ptr<Postoffice> scheduler_, server_, worker_;
};

class FakeDeviceClusterTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(cluster_.Start().ok());
    user_stream_ = *be_.CreateStream(0);
    push_dev_ = static_cast<float*>(*be_.AllocDevice(0, kBytes));
    pull_dev_ = static_cast<float*>(*be_.AllocDevice(0, kBytes));
    answer_dev_ = static_cast<float*>(*be_.AllocDevice(0, kBytes));
    host_.resize(kElems);
    for (int64_t i = 0; i < kElems; ++i) host_[i] = static_cast<float>(i) * 0.5f;
  }
  void TearDown() override {
    EXPECT_TRUE(cluster_.Stop().ok());
    be_.FreeDevice(push_dev_);
    be_.FreeDevice(pull_dev_);
    be_.FreeDevice(answer_dev_);
  }

  static TensorView DeviceView(float* p) {
    return TensorView{p, DType::kFloat32, {kElems}, Device{DeviceType::kCUDA, 0}, nullptr};
  }

  // The worker's "kernel": writes the push tensor on the user's stream, which is held so
  // the data does not exist yet.
  void ProduceHeld() {
    be_.HoldStream(user_stream_);
    ASSERT_TRUE(be_.CopyAsync(push_dev_, host_.data(), kBytes, user_stream_).ok());
  }

  // Serves one request: checks the pushed values and answers value * 2 from GPU memory
  // produced on a held server stream, with need_event.
  void ServeOne(DeviceStream server_stream) {
    auto batch = cluster_.server()->GetBatch(kWaitMs);
    ASSERT_TRUE(batch.ok()) << batch.status();
    ASSERT_EQ(batch->size(), 1u);
    const BatchRequest& req = (*batch)[0];
    ASSERT_EQ(req.push.size(), 1u);
    ASSERT_EQ(req.push[0].tensor.nbytes(), kBytes);
    const float* got = static_cast<const float*>(req.push[0].tensor.data);
    for (int64_t i = 0; i < kElems; ++i) ASSERT_EQ(got[i], host_[i]) << "element " << i;
    doubled_.resize(kElems);
    for (int64_t i = 0; i < kElems; ++i) doubled_[i] = got[i] * 2.f;
    be_.HoldStream(server_stream);
    ASSERT_TRUE(be_.CopyAsync(answer_dev_, doubled_.data(), kBytes, server_stream).ok());
    Status s = cluster_.server()->Respond(req.handle, {DeviceView(answer_dev_)},
                                          StreamSync{true, server_stream});
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_TRUE(be_.WaitIdle(kWaitMs));
    be_.ReleaseStream(server_stream);
  }

  FakeBackend be_;
  Cluster cluster_{&be_, GetParam()};
  DeviceStream user_stream_ = 0;
  float* push_dev_ = nullptr;
  float* pull_dev_ = nullptr;
  float* answer_dev_ = nullptr;
  std::vector<float> host_, doubled_;
};

TEST_P(FakeDeviceClusterTest, NeedEventOrdersPushAndResponseWithTheCallersStreams) {
  ProduceHeld();
  auto handle = cluster_.worker()->ZBatchPushPull(
      {{7, DeviceView(push_dev_)}}, {{9, DeviceView(pull_dev_)}}, StreamSync{true, user_stream_});
  ASSERT_TRUE(handle.ok()) << handle.status();
  // The push tensor is not produced yet: nothing may reach the server.
  ASSERT_TRUE(be_.WaitIdle(kWaitMs));
  auto early = cluster_.server()->GetBatch(200);
  EXPECT_EQ(early.status().code(), StatusCode::kDeadlineExceeded) << early.status();
  // A consumer on another stream waits for the pull on the GPU, not on the CPU.
  DeviceStream consumer = *be_.CreateStream(0);
  std::vector<float> seen(kElems, -1.f);
  ASSERT_TRUE(cluster_.worker()->WaitOnStream(*handle, consumer).ok());
  ASSERT_TRUE(be_.CopyAsync(seen.data(), pull_dev_, kBytes, consumer).ok());
  be_.ReleaseStream(user_stream_);

  DeviceStream server_stream = *be_.CreateStream(0);
  ServeOne(server_stream);
  ASSERT_TRUE(cluster_.worker()->Wait(*handle, kWaitMs).ok());
  DeviceEvent drained = *be_.CreateEvent(0);
  ASSERT_TRUE(be_.RecordEvent(drained, consumer).ok());
  ASSERT_TRUE(be_.SyncEvent(drained, kWaitMs).ok());
  for (int64_t i = 0; i < kElems; ++i) ASSERT_EQ(seen[i], host_[i] * 2.f) << "element " << i;
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

TEST_P(FakeDeviceClusterTest, WithoutNeedEventTheStagingReadIsUnorderedAndReported) {
  ProduceHeld();
  // need_event=false promises the tensor is ready; here it is not, and the checker says so.
  auto handle = cluster_.worker()->ZBatchPushPull({{7, DeviceView(push_dev_)}},
                                                  {{9, DeviceView(pull_dev_)}}, StreamSync{});
  ASSERT_TRUE(handle.ok()) << handle.status();
  auto batch = cluster_.server()->GetBatch(kWaitMs);
  ASSERT_TRUE(batch.ok()) << batch.status();
  be_.ReleaseStream(user_stream_);
  ASSERT_TRUE(cluster_.server()->Respond((*batch)[0].handle, {(*batch)[0].push[0].tensor}).ok());
  ASSERT_TRUE(cluster_.worker()->Wait(*handle, kWaitMs).ok());
  ASSERT_TRUE(be_.WaitIdle(kWaitMs));
  EXPECT_THAT(be_.Hazards(), Not(IsEmpty()));
}

TEST_P(FakeDeviceClusterTest, MixedCpuAndGpuTensorsAndRepeatedRounds) {
  std::vector<float> cpu_push(kElems, 3.f), cpu_pull(kElems, 0.f);
  TensorView cpu_in{cpu_push.data(), DType::kFloat32, {kElems}, {}, nullptr};
  TensorView cpu_out{cpu_pull.data(), DType::kFloat32, {kElems}, {}, nullptr};
  ASSERT_TRUE(be_.CopyAsync(push_dev_, host_.data(), kBytes, user_stream_).ok());
  for (int round = 0; round < 5; ++round) {
    auto handle = cluster_.worker()->ZBatchPushPull({{1, DeviceView(push_dev_)}, {2, cpu_in}},
                                                    {{3, cpu_out}, {4, DeviceView(pull_dev_)}},
                                                    StreamSync{true, user_stream_});
    ASSERT_TRUE(handle.ok()) << handle.status();
    auto batch = cluster_.server()->GetBatch(kWaitMs);
    ASSERT_TRUE(batch.ok()) << batch.status();
    const BatchRequest& req = (*batch)[0];
    ASSERT_EQ(req.push.size(), 2u);
    EXPECT_EQ(static_cast<const float*>(req.push[0].tensor.data)[kElems - 1], host_[kElems - 1]);
    EXPECT_EQ(static_cast<const float*>(req.push[1].tensor.data)[0], 3.f);
    // Answer slot 0 (cpu) with the cpu push and slot 1 (gpu) from device memory.
    ASSERT_TRUE(
        cluster_.server()->Respond(req.handle, {req.push[1].tensor, DeviceView(push_dev_)}).ok());
    ASSERT_TRUE(cluster_.worker()->Wait(*handle, kWaitMs).ok());
    EXPECT_EQ(cpu_pull[5], 3.f);
    std::vector<float> back(kElems);
    DeviceStream s = user_stream_;
    ASSERT_TRUE(cluster_.worker()->WaitOnStream(*handle, s).ok());  // already done: no-op
    ASSERT_TRUE(be_.CopyAsync(back.data(), pull_dev_, kBytes, s).ok());
    DeviceEvent e = *be_.CreateEvent(0);
    ASSERT_TRUE(be_.RecordEvent(e, s).ok());
    ASSERT_TRUE(be_.SyncEvent(e, kWaitMs).ok());
    EXPECT_EQ(back[kElems - 1], host_[kElems - 1]);
  }
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

TEST_P(FakeDeviceClusterTest, UnusableBackendRefusesGpuTensorsAndSaysWhy) {
  be_.SetUnavailable(UnavailableError("CUDA driver not found (test)"));
  auto handle =
      cluster_.worker()->ZBatchPushPull({{7, DeviceView(push_dev_)}}, {{9, DeviceView(pull_dev_)}});
  ASSERT_FALSE(handle.ok());
  EXPECT_THAT(handle.status().message(), HasSubstr("push[0]"));
  EXPECT_THAT(handle.status().message(), HasSubstr("CUDA driver not found (test)"));
  // CPU tensors still work.
  std::vector<float> in(16, 1.f), out(16, 0.f);
  auto ok = cluster_.worker()->ZBatchPushPull(
      {{1, TensorView{in.data(), DType::kFloat32, {16}, {}, nullptr}}},
      {{2, TensorView{out.data(), DType::kFloat32, {16}, {}, nullptr}}});
  ASSERT_TRUE(ok.ok()) << ok.status();
  auto batch = cluster_.server()->GetBatch(kWaitMs);
  ASSERT_TRUE(batch.ok());
  ASSERT_TRUE(cluster_.server()->Respond((*batch)[0].handle, {(*batch)[0].push[0].tensor}).ok());
  ASSERT_TRUE(cluster_.worker()->Wait(*ok, kWaitMs).ok());
  EXPECT_EQ(out[15], 1.f);
}

// A server's CUDA receive buffer: pushes land in pinned staging and are copied to the
// registered device chunk before GetBatch hands the request out (as a cuda:0 tensor).
// Copies are slowed down so a GetBatch that did not wait for them would read stale bytes
// and the race checker would report it. Requests keep their arrival order whether or not
// they needed a copy.
TEST_P(FakeDeviceClusterTest, CudaReceiveBufferIsFilledBeforeGetBatchReturns) {
  be_.SetCopyCost(200'000);  // 200 ns per byte: 3.3 ms per 16 KiB copy
  float* recv_dev = static_cast<float*>(*be_.AllocDevice(0, 2 * kBytes));
  TensorView recv{recv_dev, DType::kFloat32, {2 * kElems}, Device{DeviceType::kCUDA, 0}, nullptr};
  ASSERT_TRUE(cluster_.server()->RegisterRecvBuffer(recv, {0, 0}, {7, 8}).ok());

  std::vector<std::vector<float>> in(3, std::vector<float>(kElems));
  std::vector<std::vector<float>> out(3, std::vector<float>(kElems, 0.f));
  const int64_t keys[3] = {7, 9, 8};  // 9 has no receive buffer: a plain CPU request
  std::vector<uint64_t> handles;
  for (int r = 0; r < 3; ++r) {
    for (int64_t i = 0; i < kElems; ++i) in[r][i] = static_cast<float>(r * 100000 + i);
    auto h = cluster_.worker()->ZBatchPushPull(
        {{keys[r], TensorView{in[r].data(), DType::kFloat32, {kElems}, {}, nullptr}}},
        {{1, TensorView{out[r].data(), DType::kFloat32, {kElems}, {}, nullptr}}});
    ASSERT_TRUE(h.ok()) << h.status();
    handles.push_back(*h);
  }
  for (int r = 0; r < 3; ++r) {
    auto batch = cluster_.server()->GetBatch(kWaitMs);
    ASSERT_TRUE(batch.ok()) << batch.status();
    ASSERT_EQ(batch->size(), 1u);
    const KeyTensor& got = (*batch)[0].push[0];
    ASSERT_EQ(got.key, keys[r]) << "request " << r << " out of order";
    if (keys[r] == 9) {
      EXPECT_EQ(got.tensor.device.type, DeviceType::kCPU);
    } else {
      EXPECT_EQ(got.tensor.device, (Device{DeviceType::kCUDA, 0}));
      EXPECT_EQ(got.tensor.data, recv_dev + (keys[r] == 7 ? 0 : kElems));
    }
    be_.HostAccess(got.tensor.data, kBytes, /*write=*/false);
    const float* v = static_cast<const float*>(got.tensor.data);
    for (int64_t i = 0; i < kElems; ++i)
      ASSERT_EQ(v[i], in[r][i]) << "request " << r << " [" << i << "]";
    // Answer from a CPU copy of the received values.
    ASSERT_TRUE(cluster_.server()
                    ->Respond((*batch)[0].handle,
                              {TensorView{in[r].data(), DType::kFloat32, {kElems}, {}, nullptr}})
                    .ok());
  }
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(cluster_.worker()->Wait(handles[r], kWaitMs).ok());
    EXPECT_EQ(out[r][kElems - 1], in[r][kElems - 1]);
  }
  be_.SetCopyCost(0);
  ASSERT_TRUE(be_.WaitIdle(kWaitMs));
  EXPECT_THAT(be_.Hazards(), IsEmpty());
  be_.FreeDevice(recv_dev);
}

TEST_P(FakeDeviceClusterTest, CudaReceiveBufferOnAnUnusableBackendIsRefusedWithTheReason) {
  float* recv_dev = static_cast<float*>(*be_.AllocDevice(0, kBytes));
  be_.SetUnavailable(UnavailableError("CUDA driver not found (test)"));
  TensorView recv{recv_dev, DType::kFloat32, {kElems}, Device{DeviceType::kCUDA, 0}, nullptr};
  Status s = cluster_.server()->RegisterRecvBuffer(recv, {0}, {7});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("RegisterRecvBuffer"));
  EXPECT_THAT(s.message(), HasSubstr("CUDA driver not found (test)"));
  be_.SetUnavailable(OkStatus());
  be_.FreeDevice(recv_dev);
}

// The device fails after a CUDA receive buffer was registered: the push cannot reach it,
// the worker's handle fails with the reason instead of hanging, and the next push works
// once the device is back.
TEST_P(FakeDeviceClusterTest, CudaReceiveBufferCopyFailureFailsTheWorkersHandle) {
  float* recv_dev = static_cast<float*>(*be_.AllocDevice(0, kBytes));
  TensorView recv{recv_dev, DType::kFloat32, {kElems}, Device{DeviceType::kCUDA, 0}, nullptr};
  ASSERT_TRUE(cluster_.server()->RegisterRecvBuffer(recv, {0}, {7}).ok());
  std::vector<float> in(kElems, 5.f), out(kElems, 0.f);
  TensorView cpu_in{in.data(), DType::kFloat32, {kElems}, {}, nullptr};
  TensorView cpu_out{out.data(), DType::kFloat32, {kElems}, {}, nullptr};

  be_.SetUnavailable(UnavailableError("CUDA driver not found (test)"));
  auto failed = cluster_.worker()->ZBatchPushPull({{7, cpu_in}}, {{1, cpu_out}});
  ASSERT_TRUE(failed.ok()) << failed.status();
  Status s = cluster_.worker()->Wait(*failed, kWaitMs);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.code(), StatusCode::kDeadlineExceeded) << s;
  EXPECT_THAT(s.message(), HasSubstr("CUDA driver not found (test)"));

  be_.SetUnavailable(OkStatus());
  auto ok = cluster_.worker()->ZBatchPushPull({{7, cpu_in}}, {{1, cpu_out}});
  ASSERT_TRUE(ok.ok()) << ok.status();
  auto batch = cluster_.server()->GetBatch(kWaitMs);
  ASSERT_TRUE(batch.ok()) << batch.status();
  const KeyTensor& got = (*batch)[0].push[0];
  EXPECT_EQ(got.tensor.device, (Device{DeviceType::kCUDA, 0}));
  be_.HostAccess(got.tensor.data, kBytes, /*write=*/false);
  EXPECT_EQ(static_cast<const float*>(got.tensor.data)[kElems - 1], 5.f);
  ASSERT_TRUE(cluster_.server()->Respond((*batch)[0].handle, {cpu_in}).ok());
  ASSERT_TRUE(cluster_.worker()->Wait(*ok, kWaitMs).ok());
  EXPECT_EQ(out[0], 5.f);
  ASSERT_TRUE(be_.WaitIdle(kWaitMs));
  EXPECT_THAT(be_.Hazards(), IsEmpty());
  be_.FreeDevice(recv_dev);
}

// Over tcp, staged tensors of several chunks are streamed (van/streamed_bytes.h): the
// request and the response leave before their staging copies finished, each chunk as it
// lands. With slow copies and need_event on both ends, the bytes must still arrive intact
// and in order, with no hazard (a chunk sent before it was copied would be one).
TEST(FakeDeviceStreamTest, MultiChunkStagedTensorsStreamOverTcpIntact) {
  FakeBackend be;
  Cluster cluster(&be, "tcp");
  cluster.staging_chunk = 65536;
  ASSERT_TRUE(cluster.Start().ok());
  constexpr int64_t kBig = 256 * 1024;  // floats: 1 MiB, 16 chunks
  constexpr size_t kBigBytes = kBig * sizeof(float);
  float* push = static_cast<float*>(*be.AllocDevice(0, kBigBytes));
  float* pull = static_cast<float*>(*be.AllocDevice(0, kBigBytes));
  float* answer = static_cast<float*>(*be.AllocDevice(0, kBigBytes));
  const DeviceStream user = *be.CreateStream(0), server_stream = *be.CreateStream(0);
  auto view = [](float* p) {
    return TensorView{p, DType::kFloat32, {kBig}, Device{DeviceType::kCUDA, 0}, nullptr};
  };
  std::vector<float> host(kBig), doubled(kBig);
  be.SetCopyCost(2'000);  // 2 ns per byte: about 2 ms per MiB, chunks land one by one
  for (int round = 0; round < 3; ++round) {
    for (int64_t i = 0; i < kBig; ++i) host[i] = static_cast<float>(round * 1000003 + i);
    ASSERT_TRUE(be.CopyAsync(push, host.data(), kBigBytes, user).ok());
    auto h = cluster.worker()->ZBatchPushPull({{7, view(push)}}, {{9, view(pull)}},
                                              StreamSync{true, user});
    ASSERT_TRUE(h.ok()) << h.status();
    auto batch = cluster.server()->GetBatch(kWaitMs);
    ASSERT_TRUE(batch.ok()) << batch.status();
    const float* got = static_cast<const float*>((*batch)[0].push[0].tensor.data);
    int bad = 0;
    for (int64_t i = 0; i < kBig; ++i) bad += got[i] != host[i];
    ASSERT_EQ(bad, 0) << "round " << round;
    for (int64_t i = 0; i < kBig; ++i) doubled[i] = got[i] * 2.f;
    ASSERT_TRUE(be.CopyAsync(answer, doubled.data(), kBigBytes, server_stream).ok());
    ASSERT_TRUE(cluster.server()
                    ->Respond((*batch)[0].handle, {view(answer)}, StreamSync{true, server_stream})
                    .ok());
    ASSERT_TRUE(cluster.worker()->Wait(*h, kWaitMs).ok());
    be.HostAccess(pull, kBigBytes, /*write=*/false);
    bad = 0;
    for (int64_t i = 0; i < kBig; ++i) bad += pull[i] != doubled[i];
    EXPECT_EQ(bad, 0) << "round " << round;
  }
  be.SetCopyCost(0);
  ASSERT_TRUE(be.WaitIdle(kWaitMs));
  EXPECT_THAT(be.Hazards(), IsEmpty());
  ASSERT_TRUE(cluster.Stop().ok());
  be.FreeDevice(push);
  be.FreeDevice(pull);
  be.FreeDevice(answer);
}

// The device fails while a response streams in (the server's copies out, the worker's
// early copies to the pull tensor): the worker's handle fails with the reason instead of
// waiting or completing with half the bytes, and the next round works. (Which copy fails
// first is timing; the van test ProducerFailureDropsTheMessageWithTheReason covers the
// sender's abort.)
TEST(FakeDeviceStreamTest, DeviceFailureWhileAResponseStreamsFailsTheHandle) {
  FakeBackend be;
  Cluster cluster(&be, "tcp");
  cluster.staging_chunk = 65536;
  ASSERT_TRUE(cluster.Start().ok());
  constexpr int64_t kBig = 256 * 1024;
  constexpr size_t kBigBytes = kBig * sizeof(float);
  float* pull = static_cast<float*>(*be.AllocDevice(0, kBigBytes));
  float* answer = static_cast<float*>(*be.AllocDevice(0, kBigBytes));
  std::vector<float> in(kBig, 1.f);
  TensorView cpu_in{in.data(), DType::kFloat32, {kBig}, {}, nullptr};
  TensorView gpu_pull{pull, DType::kFloat32, {kBig}, Device{DeviceType::kCUDA, 0}, nullptr};
  TensorView gpu_answer{answer, DType::kFloat32, {kBig}, Device{DeviceType::kCUDA, 0}, nullptr};
  auto h = cluster.worker()->ZBatchPushPull({{7, cpu_in}}, {{9, gpu_pull}});
  ASSERT_TRUE(h.ok()) << h.status();
  auto batch = cluster.server()->GetBatch(kWaitMs);
  ASSERT_TRUE(batch.ok()) << batch.status();
  be.SetCopyCost(200'000);  // 200 ns per byte: each 64 KiB chunk takes 13 ms
  ASSERT_TRUE(cluster.server()->Respond((*batch)[0].handle, {gpu_answer}).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(30));  // a chunk or two went out
  be.SetUnavailable(UnavailableError("the GPU fell off the bus (test)"));
  Status s = cluster.worker()->Wait(*h, kWaitMs);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.code(), StatusCode::kDeadlineExceeded) << s;
  EXPECT_THAT(s.message(), HasSubstr("the GPU fell off the bus (test)"));
  be.SetUnavailable(OkStatus());
  be.SetCopyCost(0);
  ASSERT_TRUE(be.WaitIdle(kWaitMs));
  // The next round works.
  ASSERT_TRUE(be.CopyAsync(answer, in.data(), kBigBytes, 0).ok());
  ASSERT_TRUE(be.WaitIdle(kWaitMs));
  auto again = cluster.worker()->ZBatchPushPull({{7, cpu_in}}, {{9, gpu_pull}});
  ASSERT_TRUE(again.ok()) << again.status();
  batch = cluster.server()->GetBatch(kWaitMs);
  ASSERT_TRUE(batch.ok()) << batch.status();
  ASSERT_TRUE(cluster.server()->Respond((*batch)[0].handle, {gpu_answer}).ok());
  ASSERT_TRUE(cluster.worker()->Wait(*again, kWaitMs).ok());
  be.HostAccess(pull, kBigBytes, /*write=*/false);
  EXPECT_EQ(pull[kBig - 1], 1.f);
  ASSERT_TRUE(cluster.Stop().ok());
  be.FreeDevice(pull);
  be.FreeDevice(answer);
}

INSTANTIATE_TEST_SUITE_P(Transports, FakeDeviceClusterTest,
                         ::testing::Values("tcp", "cma", "cma@staging"), [](const auto& info) {
                           std::string name = info.param;
                           for (char& ch : name) ch = ch == '@' ? '_' : ch;
                           return name;
                         });

// CUDA IPC on the same-host van (docs/gpu.md): device tensors are named, not staged. The
// fake backend counts the copies it ran, so these tests see that no pinned staging copy
// happens and that a server computing into the mapped pull slot costs no response copy.
class CmaIpcClusterTest : public FakeDeviceClusterTest {};

TEST_P(CmaIpcClusterTest, ResponseIsOneDeviceToDeviceCopyIntoThePullTensor) {
  ASSERT_TRUE(be_.CopyAsync(push_dev_, host_.data(), kBytes, user_stream_).ok());
  ASSERT_TRUE(be_.WaitIdle(kWaitMs));
  DeviceStream server_stream = *be_.CreateStream(0);
  for (int round = 0; round < 3; ++round) {
    const uint64_t before = be_.copies_executed();
    auto handle = cluster_.worker()->ZBatchPushPull(
        {{7, DeviceView(push_dev_)}}, {{9, DeviceView(pull_dev_)}}, StreamSync{true, user_stream_});
    ASSERT_TRUE(handle.ok()) << handle.status();
    ServeOne(server_stream);  // checks the push; answers from answer_dev_ (1 producer copy)
    ASSERT_TRUE(cluster_.worker()->Wait(*handle, kWaitMs).ok());
    be_.HostAccess(pull_dev_, kBytes, /*write=*/false);
    for (int64_t i = 0; i < kElems; ++i) ASSERT_EQ(pull_dev_[i], host_[i] * 2.f) << i;
    // The push read device to host by the server's van, the server's producer, the
    // response device to device by the worker's van: nothing through pinned buffers.
    EXPECT_EQ(be_.copies_executed() - before, 3u) << "round " << round;
  }
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

TEST_P(CmaIpcClusterTest, ServerComputingIntoTheMappedPullSlotSendsOnlyTheCompletion) {
  ASSERT_TRUE(be_.CopyAsync(push_dev_, host_.data(), kBytes, user_stream_).ok());
  ASSERT_TRUE(be_.WaitIdle(kWaitMs));
  DeviceStream server_stream = *be_.CreateStream(0);
  doubled_.assign(kElems, 0.f);
  for (int64_t i = 0; i < kElems; ++i) doubled_[i] = host_[i] * 2.f;
  const uint64_t before = be_.copies_executed();
  auto handle = cluster_.worker()->ZBatchPushPull(
      {{7, DeviceView(push_dev_)}}, {{9, DeviceView(pull_dev_)}}, StreamSync{true, user_stream_});
  ASSERT_TRUE(handle.ok()) << handle.status();
  auto batch = cluster_.server()->GetBatch(kWaitMs);
  ASSERT_TRUE(batch.ok()) << batch.status();
  const BatchRequest& req = (*batch)[0];
  ASSERT_EQ(req.outputs.size(), 1u);
  const TensorView& out = req.outputs[0];
  ASSERT_NE(out.data, nullptr) << "the CUDA pull slot should be mapped at the server";
  EXPECT_EQ(out.device, (Device{DeviceType::kCUDA, 0}));
  EXPECT_EQ(out.nbytes(), kBytes);
  // The "FFN" writes its result into the worker's pull tensor on a held stream; respond
  // with need_event must not complete the handle before that write ran.
  be_.HoldStream(server_stream);
  ASSERT_TRUE(be_.CopyAsync(out.data, doubled_.data(), kBytes, server_stream).ok());
  ASSERT_TRUE(cluster_.server()->Respond(req.handle, {out}, StreamSync{true, server_stream}).ok());
  Status early = cluster_.worker()->Wait(*handle, 200);
  EXPECT_EQ(early.code(), StatusCode::kDeadlineExceeded) << early;
  be_.ReleaseStream(server_stream);
  ASSERT_TRUE(cluster_.worker()->Wait(*handle, kWaitMs).ok());
  be_.HostAccess(pull_dev_, kBytes, /*write=*/false);
  for (int64_t i = 0; i < kElems; ++i) ASSERT_EQ(pull_dev_[i], doubled_[i]) << i;
  // The push read by the server's van and the server's own compute: no response copy.
  EXPECT_EQ(be_.copies_executed() - before, 2u);
  ASSERT_TRUE(be_.WaitIdle(kWaitMs));
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

TEST_P(CmaIpcClusterTest, CpuResponseLandsInTheCudaPullTensor) {
  ASSERT_TRUE(be_.CopyAsync(push_dev_, host_.data(), kBytes, user_stream_).ok());
  ASSERT_TRUE(be_.WaitIdle(kWaitMs));
  std::vector<float> answer(kElems);
  for (int64_t i = 0; i < kElems; ++i) answer[i] = -static_cast<float>(i);
  for (int round = 0; round < 3; ++round) {
    auto handle = cluster_.worker()->ZBatchPushPull(
        {{7, DeviceView(push_dev_)}}, {{9, DeviceView(pull_dev_)}}, StreamSync{true, user_stream_});
    ASSERT_TRUE(handle.ok()) << handle.status();
    auto batch = cluster_.server()->GetBatch(kWaitMs);
    ASSERT_TRUE(batch.ok()) << batch.status();
    answer[0] = static_cast<float>(round);
    ASSERT_TRUE(cluster_.server()
                    ->Respond((*batch)[0].handle,
                              {TensorView{answer.data(), DType::kFloat32, {kElems}, {}, nullptr}})
                    .ok());
    ASSERT_TRUE(cluster_.worker()->Wait(*handle, kWaitMs).ok());
    be_.HostAccess(pull_dev_, kBytes, /*write=*/false);
    EXPECT_EQ(pull_dev_[0], static_cast<float>(round));
    EXPECT_EQ(pull_dev_[kElems - 1], answer[kElems - 1]);
  }
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

// StepMesh's FFN layout: the server registers a CUDA receive buffer, the worker pushes a
// CUDA tensor. The worker's push is copied device to device straight into the chunk by the
// server's van (no pinned landing, no host copy), before GetBatch hands it out; a CPU push
// into a CUDA chunk is one host-to-device copy.
TEST_P(CmaIpcClusterTest, CudaPushLandsInTheCudaReceiveBufferDeviceToDevice) {
  float* recv_dev = static_cast<float*>(*be_.AllocDevice(0, 2 * kBytes));
  TensorView recv{recv_dev, DType::kFloat32, {2 * kElems}, Device{DeviceType::kCUDA, 0}, nullptr};
  ASSERT_TRUE(cluster_.server()->RegisterRecvBuffer(recv, {0, 0}, {7, 8}).ok());
  ASSERT_TRUE(be_.CopyAsync(push_dev_, host_.data(), kBytes, user_stream_).ok());
  ASSERT_TRUE(be_.WaitIdle(kWaitMs));  // the producer's copy is not counted below
  std::vector<float> cpu(kElems, 4.f), out(kElems, 0.f);
  for (int round = 0; round < 3; ++round) {
    const uint64_t before = be_.copies_executed();
    auto handle = cluster_.worker()->ZBatchPushPull(
        {{7, DeviceView(push_dev_)},
         {8, TensorView{cpu.data(), DType::kFloat32, {kElems}, {}, nullptr}}},
        {{1, TensorView{out.data(), DType::kFloat32, {kElems}, {}, nullptr}}},
        StreamSync{true, user_stream_});
    ASSERT_TRUE(handle.ok()) << handle.status();
    auto batch = cluster_.server()->GetBatch(kWaitMs);
    ASSERT_TRUE(batch.ok()) << batch.status();
    const BatchRequest& req = (*batch)[0];
    ASSERT_EQ(req.push.size(), 2u);
    EXPECT_EQ(req.push[0].tensor.device, (Device{DeviceType::kCUDA, 0}));
    EXPECT_EQ(req.push[0].tensor.data, recv_dev);
    EXPECT_EQ(req.push[1].tensor.device, (Device{DeviceType::kCUDA, 0}));
    EXPECT_EQ(req.push[1].tensor.data, recv_dev + kElems);
    be_.HostAccess(recv_dev, 2 * kBytes, /*write=*/false);
    for (int64_t i = 0; i < kElems; ++i) ASSERT_EQ(recv_dev[i], host_[i]) << i;
    EXPECT_EQ(recv_dev[2 * kElems - 1], 4.f);
    // One device-to-device and one host-to-device copy by the server's van.
    EXPECT_EQ(be_.copies_executed() - before, 2u) << "round " << round;
    ASSERT_TRUE(
        cluster_.server()
            ->Respond(req.handle, {TensorView{cpu.data(), DType::kFloat32, {kElems}, {}, nullptr}})
            .ok());
    ASSERT_TRUE(cluster_.worker()->Wait(*handle, kWaitMs).ok());
    EXPECT_EQ(out[kElems - 1], 4.f);
  }
  ASSERT_TRUE(be_.WaitIdle(kWaitMs));
  EXPECT_THAT(be_.Hazards(), IsEmpty());
  be_.FreeDevice(recv_dev);
}

INSTANTIATE_TEST_SUITE_P(Cma, CmaIpcClusterTest, ::testing::Values("cma"));

}  // namespace
}  // namespace meshpost
