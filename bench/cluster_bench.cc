// meshpost_cluster_bench: round trips through the real cluster (Postoffice +
// AFTensorWorker / AFTensorServer), driven by scripts/bench.py. One invocation
// launches a scheduler, N servers and M workers as separate processes on this
// machine (LocalCluster) and prints one JSON line with the round-trip
// statistics of the run:
//
//   meshpost_cluster_bench --workers M --servers N --transport tcp|cma|cma-shm|rdma
//       --push B --push-extra B --pull B --iters I --warmup W [--spin-us U]
//       [--recv-buffer 0|1] [--hugepages 0|1] [--shared 0|1]
// --shared 1: workers allocate push and pull tensors in shared memory
// (AllocateSharedTensor); servers answer through BatchRequest::outputs with
// Respond(handle, {}) (no receive buffers: the push is a view of the worker's memory).
//
// Each iteration a worker calls ZBatchPushPull(push, pull) + Wait: push =
// uint8[B] (AFD: [128, 7168]) + int32[B/4] (AFD: [4]) to every server, pull =
// one bf16[B/2] (AFD: [128, 7168]) slot per server. A server loops GetBatch +
// Respond. Worker 0's FetchTrace stamps give the per-stage breakdown (medians
// over iterations, see docs/performance.md). With DMLC_ROLE set the binary
// plays that role (the launcher re-runs itself per role).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/clock.h"
#include "launch/local_cluster.h"
#include "ps/postoffice.h"
#include "tensor/shared_memory.h"
#include "tests/support/die.h"

namespace meshpost {
namespace {

constexpr int64_t kHidden = 7168;
constexpr int64_t kTokenKey = 0;
constexpr int64_t kExtraKey = 1;
constexpr int64_t kPullKey = 100;
constexpr int64_t kTimeoutMs = 60000;

// Run parameters: flags in the launcher, MESHPOST_BENCH_* variables in the
// roles.
struct Params {
  int workers = 1;
  int servers = 1;
  std::string transport =
      "cma";                    // tcp | cma | cma-shm | rdma (forced: start fails without a device)
  size_t push = 128 * kHidden;  // uint8 bytes
  size_t push_extra = 16;       // int32 bytes (0: no second tensor)
  size_t pull = 128 * kHidden * 2;  // bf16 bytes per server
  int iters = 300;
  int warmup = 30;
  int64_t spin_us = -1;     // < 0: the library default (MESHPOST_SPIN_US unset)
  bool recv_buffer = true;  // servers register receive buffers for the push keys
  bool hugepages = true;
  bool shared = false;  // push / pull tensors in shared memory, answers via outputs
  std::string out_dir;  // where workers write their JSON
};

using support::Die;

Params ParseFlags(int argc, char** argv) {
  Params p;
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i];
    if (i + 1 >= argc) Die("flag " + k + " needs a value");
    const std::string v = argv[i + 1];
    if (k == "--workers")
      p.workers = std::stoi(v);
    else if (k == "--servers")
      p.servers = std::stoi(v);
    else if (k == "--transport")
      p.transport = v;
    else if (k == "--push")
      p.push = std::stoull(v);
    else if (k == "--push-extra")
      p.push_extra = std::stoull(v);
    else if (k == "--pull")
      p.pull = std::stoull(v);
    else if (k == "--iters")
      p.iters = std::stoi(v);
    else if (k == "--warmup")
      p.warmup = std::stoi(v);
    else if (k == "--spin-us")
      p.spin_us = std::stoll(v);
    else if (k == "--recv-buffer")
      p.recv_buffer = v == "1";
    else if (k == "--hugepages")
      p.hugepages = v == "1";
    else if (k == "--shared")
      p.shared = v == "1";
    else
      Die("unknown flag " + k);
  }
  if (p.transport != "tcp" && p.transport != "cma" && p.transport != "cma-shm" &&
      p.transport != "rdma") {
    Die("--transport " + p.transport + ": expected tcp, cma, cma-shm or rdma");
  }
  if (p.workers < 1 || p.servers < 1 || p.iters < 1 || p.warmup < 0) Die("bad counts");
  if (p.push == 0 || p.pull == 0 || p.pull % 2 != 0 || p.push_extra % 4 != 0) {
    Die("--push and --pull must be > 0, --pull even (bf16), --push-extra a "
        "multiple of 4");
  }
  return p;
}

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

Params ParamsFromEnv() {
  Params p;
  p.workers = std::stoi(Env("DMLC_NUM_WORKER"));
  p.servers = std::stoi(Env("DMLC_NUM_SERVER"));
  p.push = std::stoull(Env("MESHPOST_BENCH_PUSH"));
  p.push_extra = std::stoull(Env("MESHPOST_BENCH_PUSH_EXTRA"));
  p.pull = std::stoull(Env("MESHPOST_BENCH_PULL"));
  p.iters = std::stoi(Env("MESHPOST_BENCH_ITERS"));
  p.warmup = std::stoi(Env("MESHPOST_BENCH_WARMUP"));
  p.recv_buffer = Env("MESHPOST_BENCH_RECV_BUFFER") == "1";
  p.hugepages = Env("MESHPOST_BENCH_HUGEPAGES") == "1";
  p.shared = Env("MESHPOST_BENCH_SHARED") == "1";
  p.out_dir = Env("MESHPOST_BENCH_OUT");
  return p;
}

// 2 MiB aligned, optionally transparent-huge-page backed: the same buffers
// van_bench uses, so cluster and van numbers differ only by the ps layer. Owned
// through a shared_ptr so a TensorView can name it as its owner.
std::shared_ptr<char> Alloc(size_t size, int fill, bool hugepages) {
  constexpr size_t kHuge = 2u << 20;
  const size_t cap = std::max(kHuge, (size + kHuge - 1) / kHuge * kHuge);
  char* p = static_cast<char*>(std::aligned_alloc(kHuge, cap));
  if (p == nullptr) Die("out of memory");
  if (hugepages) ::madvise(p, cap, MADV_HUGEPAGE);
  std::memset(p, fill, cap);
  return std::shared_ptr<char>(p, [](char* q) { std::free(q); });
}

// AFD tensors are [rows, 7168]; other sizes are 1-D.
std::vector<int64_t> ShapeOf(size_t elems) {
  const int64_t n = static_cast<int64_t>(elems);
  if (n % kHidden == 0) return {n / kHidden, kHidden};
  return {n};
}

double Percentile(const std::vector<double>& sorted, double q) {
  return sorted[std::min(sorted.size() - 1, static_cast<size_t>(q * sorted.size()))];
}

struct Stats {
  double p50 = 0, p99 = 0, mean = 0, min = 0;
};

Stats Summarize(std::vector<double> v) {
  Stats s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  s.p50 = Percentile(v, 0.5);
  s.p99 = Percentile(v, 0.99);
  s.mean = sum / v.size();
  s.min = v.front();
  return s;
}

int Fail(const std::string& what, const Status& s) {
  std::fprintf(stderr, "meshpost_cluster_bench: %s: %s\n", what.c_str(), s.ToString().c_str());
  return 1;
}

// ---- server ----

int RunServer(Postoffice& po, const Params& p) {
  AFTensorServer* server = po.server();
  const int M = p.workers;
  std::shared_ptr<char> tokens, extras;
  if (p.recv_buffer && !p.shared) {
    // One chunk per worker for each push key: pushes land here directly, as an
    // FFN rank that registered its input buffers would run.
    tokens = Alloc(p.push * M, 0, p.hugepages);
    std::vector<int> ranks;
    for (int w = 0; w < M; ++w) ranks.push_back(w);
    std::vector<int64_t> shape = ShapeOf(p.push);
    shape[0] *= M;
    Status s = server->RegisterRecvBuffer({tokens.get(), DType::kUInt8, shape, {}, tokens}, ranks,
                                          std::vector<int64_t>(M, kTokenKey));
    if (!s.ok()) return Fail("RegisterRecvBuffer(tokens)", s);
    if (p.push_extra) {
      extras = Alloc(p.push_extra * M, 0, p.hugepages);
      const int64_t n = static_cast<int64_t>(p.push_extra / 4);
      s = server->RegisterRecvBuffer({extras.get(), DType::kInt32, {M * n}, {}, extras}, ranks,
                                     std::vector<int64_t>(M, kExtraKey));
      if (!s.ok()) return Fail("RegisterRecvBuffer(extras)", s);
    }
  }
  // Workers push only after every server registered.
  Status b = po.Barrier(kServerGroup | kWorkerGroup, kTimeoutMs);
  if (!b.ok()) return Fail("Barrier(registered)", b);

  // The "FFN output": bf16 words naming this server, so workers can check the
  // slot.
  const size_t words = p.pull / 2;
  auto out = Alloc(p.pull, 0, p.hugepages);
  auto* w16 = reinterpret_cast<uint16_t*>(out.get());
  std::fill(w16, w16 + words, static_cast<uint16_t>(0x3f80 + po.rank()));
  const TensorView out_view{out.get(), DType::kBFloat16, ShapeOf(words), {}, out};
  const std::vector<TensorView> response{out_view};
  for (int i = 0; i < p.warmup + p.iters; ++i) {
    auto batch = server->GetBatch(kTimeoutMs);
    if (!batch.ok()) return Fail("GetBatch", batch.status());
    for (const BatchRequest& req : *batch) {
      const bool in_place = !req.outputs.empty() && req.outputs[0].data != nullptr;
      if (in_place && i == 0) std::memcpy(req.outputs[0].data, out.get(), p.pull);
      // The worker's slot already holds the answer: only the completion travels.
      Status s = in_place ? server->Respond(req.handle, {}) : server->Respond(req.handle, response);
      if (!s.ok()) return Fail("Respond", s);
    }
  }
  b = po.Barrier(kServerGroup | kWorkerGroup, kTimeoutMs);
  if (!b.ok()) return Fail("Barrier(done)", b);
  return 0;
}

// ---- worker ----

// Trace stages, in the order a round trip passes them (stamps of one host each;
// on one machine every process reads the same CLOCK_MONOTONIC, so the
// cross-process stages are direct differences too).
const char* const kStages[] = {
    "worker_send",        // ZBatchPushPull entered -> request handed to the van
    "request_transfer",   // -> server has the request (van send, copy, server
                          // receive thread)
    "server_queue_wait",  // request received -> returned by GetBatch (wake-up of
                          // the server)
    "server_app",         // GetBatch returned -> Respond entered (the benchmark:
                          // nothing)
    "server_respond",     // Respond entered -> response handed to the van
    "response_transfer",  // -> worker receive thread has the response header
    "response_payload",   // header -> payload in the pull tensor, handle complete
    "worker_wakeup",      // handle complete -> Wait returned in the calling thread
};
constexpr int kNumStages = 8;

int RunWorker(Postoffice& po, const Params& p, const TraceOptions& trace) {
  AFTensorWorker* worker = po.worker();
  const int S = worker->num_servers();
  Status b = po.Barrier(kServerGroup | kWorkerGroup, kTimeoutMs);
  if (!b.ok()) return Fail("Barrier(registered)", b);

  // Buffers: 2 MiB aligned heap memory, or shared blocks (--shared). Kept alive here;
  // the views carry no owner, so the van holds nothing per request.
  std::vector<std::shared_ptr<const void>> keep;
  auto buffer = [&](size_t size, int fill, DType dtype, std::vector<int64_t> shape) {
    if (p.shared) {
      auto v = AllocateSharedTensor(dtype, shape);
      if (!v.ok()) Die("AllocateSharedTensor: " + v.status().ToString());
      std::memset(v->data, fill, size);
      keep.push_back(v->owner);
      v->owner = nullptr;
      return *v;
    }
    auto mem = Alloc(size, fill, p.hugepages);
    keep.push_back(mem);
    return TensorView{mem.get(), dtype, shape, {}, nullptr};
  };
  KeyTensorBatch push{{kTokenKey, buffer(p.push, po.rank() + 1, DType::kUInt8, ShapeOf(p.push))}};
  if (p.push_extra) {
    push.push_back({kExtraKey, buffer(p.push_extra, 0, DType::kInt32,
                                      {static_cast<int64_t>(p.push_extra / 4)})});
  }
  KeyTensorBatch pull;
  std::vector<TensorView> outs;
  for (int s = 0; s < S; ++s) {
    outs.push_back(buffer(p.pull, 0, DType::kBFloat16, ShapeOf(p.pull / 2)));
    pull.push_back({kPullKey, outs[s]});
  }

  std::vector<double> rtt;
  // MESHPOST_TRACE=alternate:N: whether each measured round trip was captured, for the
  // trace overhead A/B (scripts/trace_overhead.py).
  std::vector<bool> captured;
  std::vector<std::vector<double>> stage(kNumStages);
  rtt.reserve(p.iters);
  uint64_t wall_start = GetNanosecond();
  for (int i = 0; i < p.warmup + p.iters; ++i) {
    if (i == p.warmup) wall_start = GetNanosecond();
    const uint64_t t0 = GetNanosecond();
    auto h = worker->ZBatchPushPull(push, pull);
    if (!h.ok()) return Fail("ZBatchPushPull", h.status());
    Status w = worker->Wait(*h, kTimeoutMs);
    if (!w.ok()) return Fail("Wait", w);
    const uint64_t t1 = GetNanosecond();
    // Outside the timed region: check the data and collect the stamps.
    for (int s = 0; s < S; ++s) {
      const auto* w16 = reinterpret_cast<const uint16_t*>(outs[s].data);
      if (w16[0] != 0x3f80 + s || w16[p.pull / 2 - 1] != 0x3f80 + s) {
        std::fprintf(stderr, "meshpost_cluster_bench: pull slot of server %d holds wrong data\n",
                     s);
        return 1;
      }
    }
    if (i < p.warmup) continue;
    rtt.push_back((t1 - t0) / 1e3);
    captured.push_back(trace.Sampled(*h));
    auto traces = worker->FetchTrace(*h);
    if (!traces.ok()) return Fail("FetchTrace", traces.status());
    // The server that answered last decides the round trip.
    const Trace* t = &(*traces)[0];
    for (const Trace& x : *traces) {
      if (x.response_processed > t->response_processed) t = &x;
    }
    const uint64_t st[] = {t->request_start,     t->request_posted,     t->request_received,
                           t->request_processed, t->response_start,     t->response_posted,
                           t->response_received, t->response_processed, t1};
    for (int k = 0; k < kNumStages; ++k) {
      stage[k].push_back((static_cast<int64_t>(st[k + 1]) - static_cast<int64_t>(st[k])) / 1e3);
    }
  }
  const double wall = (GetNanosecond() - wall_start) / 1e9;
  b = po.Barrier(kServerGroup | kWorkerGroup, kTimeoutMs);
  if (!b.ok()) return Fail("Barrier(done)", b);

  const Stats r = Summarize(rtt);
  const size_t bytes = (p.push + p.push_extra + p.pull) * S;
  std::ostringstream js;
  js.setf(std::ios::fixed);
  js.precision(2);
  js << "{\"worker\": " << po.rank() << ", \"iters\": " << rtt.size() << ", \"p50_us\": " << r.p50
     << ", \"p99_us\": " << r.p99 << ", \"mean_us\": " << r.mean << ", \"min_us\": " << r.min
     << ", \"bytes_per_iter\": " << bytes
     << ", \"throughput_gbps\": " << bytes * rtt.size() / wall / 1e9 << ", \"transports\": {";
  bool first = true;
  for (const auto& [peer, name] : po.Transports()) {
    js << (first ? "" : ", ") << "\"" << peer << "\": \"" << name << "\"";
    first = false;
  }
  js << "}, \"breakdown_p50_us\": {";
  for (int k = 0; k < kNumStages; ++k) {
    js << (k ? ", " : "") << "\"" << kStages[k] << "\": " << Summarize(stage[k]).p50;
  }
  js << "}, \"breakdown_mean_us\": {";
  for (int k = 0; k < kNumStages; ++k) {
    js << (k ? ", " : "") << "\"" << kStages[k] << "\": " << Summarize(stage[k]).mean;
  }
  js << "}";
  if (trace.mode == TraceOptions::Mode::kAlternate) {
    // Consecutive round trips with the same capture state form a block: [captured, median
    // us, count] per block, in order.
    js << ", \"trace_ab_blocks\": [";
    for (size_t i = 0, n = 0; i < rtt.size(); i = n) {
      for (n = i; n < rtt.size() && captured[n] == captured[i]; ++n) {
      }
      std::vector<double> block(rtt.begin() + i, rtt.begin() + n);
      js << (i ? ", " : "") << "[" << (captured[i] ? 1 : 0) << ", " << Summarize(block).p50 << ", "
         << n - i << "]";
    }
    js << "]";
  }
  js << "}";
  const std::string path = p.out_dir + "/worker-" + std::to_string(po.rank()) + ".json";
  std::ofstream f(path);
  f << js.str() << "\n";
  if (!f.good()) Die("cannot write " + path);
  return 0;
}

int RunRole() {
  const Params p = ParamsFromEnv();
  auto opts = OptionsFromEnv();
  if (!opts.ok()) return Fail("options", opts.status());
  auto po = Postoffice::Create(*opts);
  if (!po.ok()) return Fail("Create", po.status());
  Status s = (*po)->Start();
  if (!s.ok()) return Fail("Start", s);
  int rc = 0;
  if (opts->role == Role::kServer) rc = RunServer(**po, p);
  if (opts->role == Role::kWorker) rc = RunWorker(**po, p, opts->trace);
  s = (*po)->Stop(kTimeoutMs);
  if (!s.ok() && rc == 0) return Fail("Stop", s);
  return rc;
}

// ---- launcher ----

// Pulls `"key": value` out of a worker's one-line JSON (we wrote it; no general
// parser).
double NumberField(const std::string& js, const std::string& key) {
  const size_t at = js.find("\"" + key + "\": ");
  if (at == std::string::npos) Die("worker JSON lacks " + key);
  return std::stod(js.substr(at + key.size() + 4));
}

int Launch(int argc, char** argv) {
  const Params p = ParseFlags(argc, argv);
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) Die("readlink /proc/self/exe");
  self[n] = 0;
  char dir[] = "/tmp/meshpost-cluster-bench-XXXXXX";
  if (mkdtemp(dir) == nullptr) Die("mkdtemp");

  ClusterSpec spec;
  spec.argv = {self};
  spec.num_workers = p.workers;
  spec.num_servers = p.servers;
  spec.env = {
      {"MESHPOST_TRANSPORT", p.transport == "cma-shm" ? "cma" : p.transport},
      {"MESHPOST_CMA_DISABLE", p.transport == "cma-shm" ? "1" : "0"},
      {"MESHPOST_BENCH_PUSH", std::to_string(p.push)},
      {"MESHPOST_BENCH_PUSH_EXTRA", std::to_string(p.push_extra)},
      {"MESHPOST_BENCH_PULL", std::to_string(p.pull)},
      {"MESHPOST_BENCH_ITERS", std::to_string(p.iters)},
      {"MESHPOST_BENCH_WARMUP", std::to_string(p.warmup)},
      {"MESHPOST_BENCH_RECV_BUFFER", p.recv_buffer ? "1" : "0"},
      {"MESHPOST_BENCH_HUGEPAGES", p.hugepages ? "1" : "0"},
      {"MESHPOST_BENCH_SHARED", p.shared ? "1" : "0"},
      {"MESHPOST_BENCH_OUT", dir},
  };
  if (p.spin_us >= 0) spec.env["MESHPOST_SPIN_US"] = std::to_string(p.spin_us);
  LocalCluster cluster;
  Status s = cluster.Start(spec);
  if (!s.ok()) Die("launch: " + s.ToString());
  int rc = 0;
  for (const ProcessExit& e : cluster.WaitAll(1800000)) {
    if (!e.ok()) {
      std::fprintf(stderr, "meshpost_cluster_bench: %s\n", e.Describe().c_str());
      rc = 1;
    }
  }
  std::vector<std::string> results;
  for (int w = 0; w < p.workers; ++w) {
    const std::string path = std::string(dir) + "/worker-" + std::to_string(w) + ".json";
    std::ifstream f(path);
    std::string line;
    if (std::getline(f, line)) results.push_back(line);
    std::remove(path.c_str());
  }
  rmdir(dir);
  if (rc != 0 || static_cast<int>(results.size()) != p.workers) {
    Die("run failed: " + std::to_string(results.size()) + " of " + std::to_string(p.workers) +
        " workers reported");
  }
  // Cluster summary: median of the workers' p50s, worst p99, mean of means,
  // aggregate throughput; worker 0's line (with its trace breakdown and
  // transports) rides along.
  std::vector<double> p50s;
  double p99 = 0, mean = 0, gbps = 0;
  for (const std::string& js : results) {
    p50s.push_back(NumberField(js, "p50_us"));
    p99 = std::max(p99, NumberField(js, "p99_us"));
    mean += NumberField(js, "mean_us") / results.size();
    gbps += NumberField(js, "throughput_gbps");
  }
  std::sort(p50s.begin(), p50s.end());
  const double p50 = p50s.size() % 2 ? p50s[p50s.size() / 2]
                                     : (p50s[p50s.size() / 2 - 1] + p50s[p50s.size() / 2]) / 2;
  std::printf(
      "{\"system\": \"meshpost-cluster-%s\", \"cluster\": \"%dx%d\", \"push\": "
      "%zu, \"pull\": %zu, "
      "\"iters\": %d, \"p50_us\": %.2f, \"p99_us\": %.2f, \"mean_us\": %.2f, "
      "\"bytes_per_iter\": %zu, \"throughput_gbps\": %.3f, \"spin_us\": %lld, "
      "\"worker0\": %s}\n",
      p.transport.c_str(), p.workers, p.servers, p.push + p.push_extra, p.pull, p.iters, p50, p99,
      mean, (p.push + p.push_extra + p.pull) * p.servers, gbps, static_cast<long long>(p.spin_us),
      results[0].c_str());
  return 0;
}

}  // namespace
}  // namespace meshpost

int main(int argc, char** argv) {
  if (std::getenv("DMLC_ROLE") != nullptr) return meshpost::RunRole();
  return meshpost::Launch(argc, argv);
}
