// meshpost demo: a local AFD cluster (1 scheduler, 2 FFN servers, 2 attention workers)
// exchanging AFD-shaped tensors — uint8 [128, 7168] pushed to every server, bf16
// [128, 7168] pulled back from each — and a latency table with p50/p99.
//
// Run without DMLC_ROLE and it launches the cluster (re-running itself per role);
// with DMLC_ROLE set it plays that role, so the same binary works under any launcher.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/clock.h"
#include "launch/local_cluster.h"
#include "ps/postoffice.h"

using namespace meshpost;

namespace {

constexpr int64_t kRows = 128;
constexpr int64_t kCols = 7168;

int Iterations() {
  const char* v = std::getenv("MESHPOST_DEMO_ITERS");
  return v ? std::max(1, std::atoi(v)) : 500;
}
constexpr int kWarmup = 50;

int Fail(const std::string& what, const Status& s) {
  std::fprintf(stderr, "demo: %s: %s\n", what.c_str(), s.ToString().c_str());
  return 1;
}

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p / 100.0 * (v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

int RunServer(Postoffice& po) {
  AFTensorServer* server = po.server();
  // The "FFN output": bf16 rows whose bit pattern names this server, so workers can check
  // each pull slot came from the right server.
  // The owner keeps the buffer alive until ZeroMQ has sent the last response.
  auto out = std::make_shared<std::vector<uint16_t>>(kRows * kCols,
                                                     static_cast<uint16_t>(0x3f80 + po.rank()));
  TensorView out_view{out->data(), DType::kBFloat16, {kRows, kCols}, {}, out};
  const int total = Iterations() + kWarmup;
  for (int i = 0; i < total; ++i) {
    auto batch = server->GetBatch(60000);
    if (!batch.ok()) return Fail("GetBatch", batch.status());
    for (const BatchRequest& req : *batch) {
      Status s = server->Respond(req.handle, {out_view});
      if (!s.ok()) return Fail("Respond", s);
    }
  }
  return 0;
}

int RunWorker(Postoffice& po) {
  AFTensorWorker* worker = po.worker();
  const int S = worker->num_servers();
  std::vector<uint8_t> tokens(kRows * kCols, static_cast<uint8_t>(po.rank() + 1));
  std::vector<std::vector<uint16_t>> outs(S, std::vector<uint16_t>(kRows * kCols));
  KeyTensorBatch push{{0, {tokens.data(), DType::kUInt8, {kRows, kCols}, {}, nullptr}}};
  KeyTensorBatch pull;
  for (int s = 0; s < S; ++s) {
    pull.push_back({100, {outs[s].data(), DType::kBFloat16, {kRows, kCols}, {}, nullptr}});
  }
  std::vector<double> rtt, send, remote, recv;
  const int total = Iterations() + kWarmup;
  for (int i = 0; i < total; ++i) {
    const uint64_t t0 = GetNanosecond();
    auto h = worker->ZBatchPushPull(push, pull);
    if (!h.ok()) return Fail("ZBatchPushPull", h.status());
    Status w = worker->Wait(*h, 30000);
    if (!w.ok()) return Fail("Wait", w);
    const uint64_t t1 = GetNanosecond();
    for (int s = 0; s < S; ++s) {
      if (outs[s][0] != 0x3f80 + s || outs[s][kRows * kCols - 1] != 0x3f80 + s) {
        std::fprintf(stderr, "demo: pull slot of server %d holds the wrong data\n", s);
        return 1;
      }
    }
    if (i < kWarmup) continue;
    rtt.push_back((t1 - t0) / 1e3);
    auto traces = worker->FetchTrace(*h);
    if (!traces.ok()) return Fail("FetchTrace", traces.status());
    const Trace& t = (*traces)[S - 1];
    send.push_back((t.request_posted - t.request_start) / 1e3);
    remote.push_back((t.response_received - t.request_posted) / 1e3);
    recv.push_back((t.response_processed - t.response_received) / 1e3);
  }
  Status b = po.Barrier(kWorkerGroup, 60000);
  if (!b.ok()) return Fail("Barrier", b);
  if (po.rank() == 0) {
    std::printf("\nmeshpost demo: %d workers x %d servers over %s, %d iterations\n",
                po.options().num_workers, S, po.Transports().begin()->second.c_str(), Iterations());
    std::printf("push uint8[%lld, %lld] to every server, pull bf16[%lld, %lld] from each\n\n",
                (long long)kRows, (long long)kCols, (long long)kRows, (long long)kCols);
    std::printf("%-34s %10s %10s %10s\n", "worker 0 (microseconds)", "p50", "p99", "mean");
    auto row = [](const char* name, const std::vector<double>& v) {
      double mean = 0;
      for (double x : v) mean += x;
      mean /= v.size();
      std::printf("%-34s %10.1f %10.1f %10.1f\n", name, Percentile(v, 50), Percentile(v, 99), mean);
    };
    row("round trip (push_pull -> wait)", rtt);
    row("  send to last server", send);
    row("  posted -> response received", remote);
    row("  response received -> in tensor", recv);
    std::printf("\n");
  }
  return 0;
}

int RunRole() {
  auto opts = OptionsFromEnv();
  if (!opts.ok()) return Fail("options", opts.status());
  auto po = Postoffice::Create(*opts);
  if (!po.ok()) return Fail("Create", po.status());
  Status s = (*po)->Start();
  if (!s.ok()) return Fail("Start", s);
  int rc = 0;
  if (opts->role == Role::kServer) rc = RunServer(**po);
  if (opts->role == Role::kWorker) rc = RunWorker(**po);
  s = (*po)->Stop(60000);
  if (!s.ok() && rc == 0) return Fail("Stop", s);
  return rc;
}

}  // namespace

int main() {
  if (std::getenv("DMLC_ROLE") != nullptr) return RunRole();
  char self[4096];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return 1;
  self[n] = 0;
  LocalCluster cluster;
  ClusterSpec spec;
  spec.argv = {self};
  spec.num_workers = 2;
  spec.num_servers = 2;
  Status s = cluster.Start(spec);
  if (!s.ok()) return Fail("launch", s);
  int rc = 0;
  for (const ProcessExit& e : cluster.WaitAll(600000)) {
    if (!e.ok()) {
      std::fprintf(stderr, "demo: %s\n", e.Describe().c_str());
      rc = 1;
    }
  }
  return rc;
}
