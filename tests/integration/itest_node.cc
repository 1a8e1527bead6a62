// One program for every role of the multi-process integration tests. The scenario comes
// from MESHPOST_ITEST_SCENARIO; each scenario asserts its data and exits non-zero (with
// the reason on stderr) on the first mismatch, so the launching test only checks exits.
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "common/clock.h"
#include "ps/postoffice.h"
#include "tensor/shared_memory.h"
#include "tests/support/die.h"

using namespace meshpost;

namespace {

using meshpost::support::Die;

#define EXPECT_OR_DIE(cond, msg)                                                                \
  do {                                                                                          \
    if (!(cond))                                                                                \
      Die(std::string(__FILE__ ":") + std::to_string(__LINE__) + " " + #cond + " -- " + (msg)); \
  } while (0)
#define OK_OR_DIE(expr)                                   \
  do {                                                    \
    ::meshpost::Status _s = (expr);                       \
    EXPECT_OR_DIE(_s.ok(), #expr " -> " + _s.ToString()); \
  } while (0)

template <typename T>
T ValueOrDie(Result<T> r, const char* what) {
  if (!r.ok()) Die(std::string(what) + " -> " + r.status().ToString());
  return std::move(r).value();
}

// Owned host buffer exposed as a TensorView whose owner keeps it alive.
struct Buf {
  std::shared_ptr<std::vector<char>> bytes;
  TensorView view;
  Buf(DType dtype, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    bytes = std::make_shared<std::vector<char>>(n * DTypeSize(dtype));
    view = TensorView{bytes->data(), dtype, shape, {}, bytes};
  }
  template <typename T>
  T* as() {
    return reinterpret_cast<T*>(bytes->data());
  }
  template <typename T>
  int64_t count() const {
    return static_cast<int64_t>(bytes->size() / sizeof(T));
  }
};

TensorView ViewOf(const TensorView& t, DType dtype, std::vector<int64_t> shape) {
  TensorView v = t;
  v.dtype = dtype;
  v.shape = std::move(shape);
  return v;
}

struct Ctx {
  Postoffice* po;
  const Options& o;
  int W() const { return o.num_workers; }
  int S() const { return o.num_servers; }
  int rank() const { return po->rank(); }
};

// One pull tensor per server (server-major, one slot each) and the batch naming them.
struct Pulls {
  std::vector<Buf> bufs;
  KeyTensorBatch batch;
};

Pulls MakePulls(const Ctx& c, int64_t key, DType dtype, const std::vector<int64_t>& shape) {
  Pulls p;
  p.bufs.reserve(c.S());
  for (int s = 0; s < c.S(); ++s) {
    p.bufs.emplace_back(dtype, shape);
    p.batch.push_back({key, p.bufs.back().view});
  }
  return p;
}

// ---------------- sum: round trip, per-slot routing, get_batch order, traces ----------------
constexpr int64_t kSumCols = 64;

void SumServer(Ctx& c) {
  for (int it = 0; it < 20; ++it) {
    auto batch = ValueOrDie(c.po->server()->GetBatch(30000), "GetBatch");
    EXPECT_OR_DIE(static_cast<int>(batch.size()) == c.W(), "one request per worker");
    Buf sum(DType::kFloat32, {4, kSumCols});
    for (int w = 0; w < c.W(); ++w) {
      EXPECT_OR_DIE(batch[w].worker_rank == w, "batch in worker-rank order");
      EXPECT_OR_DIE(batch[w].push.size() == 1 && batch[w].push[0].key == 0, "one push, key 0");
      const TensorView& t = batch[w].push[0].tensor;
      EXPECT_OR_DIE(t.dtype == DType::kFloat32 && t.shape == std::vector<int64_t>({4, kSumCols}),
                    "push dtype/shape " + t.Describe());
      const float* p = static_cast<const float*>(t.data);
      EXPECT_OR_DIE(p[0] == static_cast<float>(w + 1 + it), "push value names worker");
      for (int i = 0; i < 4 * kSumCols; ++i) sum.as<float>()[i] += p[i];
      EXPECT_OR_DIE(batch[w].pull_slots.size() == 1 && batch[w].pull_slots[0].key == 100 + c.rank(),
                    "pull slot key for this server");
    }
    // Tag the answer with this server's rank so workers can check slot routing.
    for (int i = 0; i < 4 * kSumCols; ++i) sum.as<float>()[i] += 1000.0f * c.rank();
    for (auto& req : batch) OK_OR_DIE(c.po->server()->Respond(req.handle, {sum.view}));
  }
}

// ---------------- shared: pushes and pull slots in shared memory ----------------
// Workers allocate push and pull tensors with AllocateSharedTensor. On the same-host van
// the server sees views of the worker's memory and writable outputs (the worker's pull
// slots); it answers by computing into them and responding with nothing, with the outputs
// themselves, or with its own buffer (one memcpy into the slot). Elsewhere (tcp) the
// outputs are absent and the ordinary path runs. Either way every byte is checked.
constexpr int kSharedIters = 30;
constexpr int64_t kSharedRows = 16, kSharedCols = 256;

bool SameHostShared() {
  const char* t = std::getenv("MESHPOST_ITEST_TRANSPORT");
  return t != nullptr && std::string(t).rfind("cma", 0) == 0;
}

float SharedValue(int w, int it, int i) {
  return static_cast<float>(w * 100000 + it * 1000 + i % 997);
}

void SharedServer(Ctx& c) {
  std::vector<BatchRequest> held;  // views kept past the worker freeing its blocks
  for (int it = 0; it <= kSharedIters; ++it) {
    auto batch = ValueOrDie(c.po->server()->GetBatch(30000), "GetBatch");
    for (int w = 0; w < c.W(); ++w) {
      BatchRequest& req = batch[w];
      EXPECT_OR_DIE(req.push.size() == 2, "two push tensors");
      const float* p = static_cast<const float*>(req.push[0].tensor.data);
      const int32_t* meta = static_cast<const int32_t*>(req.push[1].tensor.data);
      EXPECT_OR_DIE(meta[0] == w && meta[1] == it, "int32 push names worker and iteration");
      for (int i = 0; i < kSharedRows * kSharedCols; ++i) {
        EXPECT_OR_DIE(p[i] == SharedValue(w, it, i), "push byte " + std::to_string(i));
      }
      EXPECT_OR_DIE(req.outputs.size() == 1, "one output per pull slot");
      const bool shared_slot = it < kSharedIters;  // the last round pulls into ordinary memory
      EXPECT_OR_DIE((req.outputs[0].data != nullptr) == (SameHostShared() && shared_slot),
                    "outputs present exactly on the same-host van for shared slots");
      const float tag = 1000.0f * c.rank() + 7.0f;
      if (req.outputs[0].data != nullptr && it % 3 != 2) {
        float* out = static_cast<float*>(req.outputs[0].data);
        for (int i = 0; i < kSharedRows * kSharedCols; ++i) out[i] = p[i] + tag;
        if (it % 3 == 0) {
          OK_OR_DIE(c.po->server()->Respond(req.handle, {}));
        } else {
          OK_OR_DIE(c.po->server()->Respond(req.handle, {req.outputs[0]}));
        }
      } else {
        Buf ans(DType::kFloat32, {kSharedRows, kSharedCols});
        for (int i = 0; i < kSharedRows * kSharedCols; ++i) ans.as<float>()[i] = p[i] + tag;
        OK_OR_DIE(c.po->server()->Respond(req.handle, {ans.view}));
      }
      // Responding with nothing where a slot is not shared is refused, not sent.
      if (req.outputs[0].data == nullptr) {
        EXPECT_OR_DIE(!c.po->server()->Respond(req.handle, {}).ok(), "answered twice");
      }
    }
    if (it == kSharedIters - 1) held = batch;
  }
  // The workers freed the blocks behind `held` (and told us with their last request): the
  // views still read without faulting.
  volatile float sink = 0;
  for (auto& req : held) sink = sink + static_cast<const float*>(req.push[0].tensor.data)[5];
  (void)sink;
}

void SharedWorker(Ctx& c) {
  auto push = ValueOrDie(AllocateSharedTensor(DType::kFloat32, {kSharedRows, kSharedCols}), "push");
  auto meta = ValueOrDie(AllocateSharedTensor(DType::kInt32, {4}), "meta");
  std::vector<TensorView> pulls;
  for (int s = 0; s < c.S(); ++s) {
    pulls.push_back(
        ValueOrDie(AllocateSharedTensor(DType::kFloat32, {kSharedRows, kSharedCols}), "pull"));
  }
  for (int it = 0; it <= kSharedIters; ++it) {
    if (it == kSharedIters) {
      // Free every shared block (the server still holds views of the previous push) and
      // run the last round from ordinary memory.
      Buf p2(DType::kFloat32, {kSharedRows, kSharedCols});
      Buf m2(DType::kInt32, {4});
      std::memcpy(p2.bytes->data(), push.data, push.nbytes());
      push = p2.view;
      meta = m2.view;
      pulls.clear();
      for (int s = 0; s < c.S(); ++s)
        pulls.push_back(Buf(DType::kFloat32, {kSharedRows, kSharedCols}).view);
    }
    float* p = static_cast<float*>(push.data);
    for (int i = 0; i < kSharedRows * kSharedCols; ++i) p[i] = SharedValue(c.rank(), it, i);
    int32_t* m = static_cast<int32_t*>(meta.data);
    m[0] = c.rank();
    m[1] = it;
    KeyTensorBatch pull;
    for (int s = 0; s < c.S(); ++s) {
      std::memset(pulls[s].data, 0, pulls[s].nbytes());
      pull.push_back({200, pulls[s]});
    }
    const uint64_t h =
        ValueOrDie(c.po->worker()->ZBatchPushPull({{0, push}, {1, meta}}, pull), "ZBatchPushPull");
    OK_OR_DIE(c.po->worker()->Wait(h, 30000));
    for (int s = 0; s < c.S(); ++s) {
      const float* got = static_cast<const float*>(pulls[s].data);
      for (int i = 0; i < kSharedRows * kSharedCols; ++i) {
        EXPECT_OR_DIE(got[i] == SharedValue(c.rank(), it, i) + 1000.0f * s + 7.0f,
                      "pull from server " + std::to_string(s) + " element " + std::to_string(i) +
                          " in round " + std::to_string(it));
      }
    }
  }
}

// ---------------- staged: ordinary pushes copied into shared memory ----------------
// Workers push ordinary (malloc'd) float tensors: one of exactly MESHPOST_SHARED_PUSH_MIN
// (64 KiB, the default) and one 4 bytes short of it, plus a small int32 tensor. On the
// same-host van the large one travels from the worker's shared copy, so the server's
// tensor is a view of a memfd mapping and the worker may overwrite its own tensor as soon
// as ZBatchPushPull returns; the short one is read across processes as before. Rounds
// alternate two sizes of the large tensor, so copies come from reused blocks of either size;
// the server keeps one round's tensors to the end, and they must not change meanwhile.
constexpr int kStagedIters = 24;
constexpr int64_t kStagedBig = (64 << 10) / 4, kStagedShort = kStagedBig - 1;

int64_t StagedBigElems(int it) { return it % 2 == 0 ? kStagedBig : 4 * kStagedBig; }

float StagedValue(int w, int it, int64_t i, int which) {
  return static_cast<float>(w * 1000003 + it * 1009 + which * 7 + i % 4093);
}

// Whether `p` lies in a memfd mapping of this process (/proc/self/maps).
bool InMemfdMapping(const void* p) {
  std::ifstream maps("/proc/self/maps");
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::string line;
  while (std::getline(maps, line)) {
    uintptr_t lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) != 2 || a < lo || a >= hi) continue;
    return line.find("/memfd:") != std::string::npos;
  }
  return false;
}

void StagedServer(Ctx& c) {
  constexpr int kHeldRound = 3;
  std::vector<BatchRequest> held;  // kept past respond, as a training FFN keeps activations
  for (int it = 0; it < kStagedIters; ++it) {
    auto batch = ValueOrDie(c.po->server()->GetBatch(30000), "GetBatch");
    if (it == kHeldRound) held = batch;
    for (int w = 0; w < c.W(); ++w) {
      BatchRequest& req = batch[w];
      EXPECT_OR_DIE(req.push.size() == 3, "three push tensors");
      const int32_t* meta = static_cast<const int32_t*>(req.push[2].tensor.data);
      EXPECT_OR_DIE(meta[0] == w && meta[1] == it, "int32 push names worker and iteration");
      const int64_t sizes[2] = {StagedBigElems(it), kStagedShort};
      for (int k = 0; k < 2; ++k) {
        const TensorView& t = req.push[k].tensor;
        EXPECT_OR_DIE(t.numel() == sizes[k], "push " + std::to_string(k) + " size");
        const float* p = static_cast<const float*>(t.data);
        for (int64_t i = 0; i < sizes[k]; ++i) {
          EXPECT_OR_DIE(p[i] == StagedValue(w, it, i, k), "push " + std::to_string(k) +
                                                              " element " + std::to_string(i) +
                                                              " in round " + std::to_string(it));
        }
      }
      if (SameHostShared()) {
        EXPECT_OR_DIE(InMemfdMapping(req.push[0].tensor.data),
                      "a push of MESHPOST_SHARED_PUSH_MIN bytes is a view of shared memory");
        EXPECT_OR_DIE(!InMemfdMapping(req.push[1].tensor.data),
                      "a shorter push is read into the server's own memory");
      }
      Buf ans(DType::kFloat32, {4});
      for (int i = 0; i < 4; ++i) {
        ans.as<float>()[i] = static_cast<const float*>(req.push[0].tensor.data)[i] + 1.0f;
      }
      OK_OR_DIE(c.po->server()->Respond(req.handle, {ans.view}));
    }
  }
  // The worker pushed many times since: a get_batch tensor still referenced is unchanged.
  for (int w = 0; w < c.W(); ++w) {
    const float* p = static_cast<const float*>(held[w].push[0].tensor.data);
    for (int64_t i = 0; i < StagedBigElems(kHeldRound); ++i) {
      EXPECT_OR_DIE(p[i] == StagedValue(w, kHeldRound, i, 0),
                    "a push kept past respond changed at element " + std::to_string(i));
    }
  }
}

void StagedWorker(Ctx& c) {
  Buf small(DType::kFloat32, {kStagedShort});
  Buf meta(DType::kInt32, {4});
  for (int it = 0; it < kStagedIters; ++it) {
    Buf big(DType::kFloat32, {StagedBigElems(it)});
    for (int64_t i = 0; i < StagedBigElems(it); ++i)
      big.as<float>()[i] = StagedValue(c.rank(), it, i, 0);
    for (int64_t i = 0; i < kStagedShort; ++i)
      small.as<float>()[i] = StagedValue(c.rank(), it, i, 1);
    meta.as<int32_t>()[0] = c.rank();
    meta.as<int32_t>()[1] = it;
    KeyTensorBatch pull;
    std::vector<Buf> outs;
    for (int s = 0; s < c.S(); ++s) {
      outs.emplace_back(DType::kFloat32, std::vector<int64_t>{4});
      pull.push_back({300, outs.back().view});
    }
    const uint64_t h = ValueOrDie(
        c.po->worker()->ZBatchPushPull({{0, big.view}, {1, small.view}, {2, meta.view}}, pull),
        "ZBatchPushPull");
    // The same-host path sends a snapshot: the caller's tensor is free again at once.
    if (SameHostShared()) std::memset(big.bytes->data(), 0xff, big.bytes->size());
    OK_OR_DIE(c.po->worker()->Wait(h, 30000));
    for (int s = 0; s < c.S(); ++s) {
      EXPECT_OR_DIE(outs[s].as<float>()[3] == StagedValue(c.rank(), it, 3, 0) + 1.0f,
                    "answer from server " + std::to_string(s));
    }
  }
}

void SumWorker(Ctx& c) {
  const std::string want =
      std::getenv("MESHPOST_ITEST_TRANSPORT") ? std::getenv("MESHPOST_ITEST_TRANSPORT") : "tcp";
  // A cluster split across hosts (scripts/rdma_vm/) expects a transport per peer:
  // MESHPOST_ITEST_PEER_TRANSPORTS="server 0=cma;server 1=rdma" overrides `want`.
  std::map<std::string, std::string> want_for;
  if (const char* map = std::getenv("MESHPOST_ITEST_PEER_TRANSPORTS")) {
    std::string rest = map;
    while (!rest.empty()) {
      const size_t end = rest.find(';');
      const std::string item = rest.substr(0, end);
      const size_t eq = item.find('=');
      EXPECT_OR_DIE(eq != std::string::npos, "MESHPOST_ITEST_PEER_TRANSPORTS item '" + item +
                                                 "': expected 'server N=transport'");
      want_for[item.substr(0, eq)] = item.substr(eq + 1);
      rest = end == std::string::npos ? "" : rest.substr(end + 1);
    }
  }
  const auto transports = c.po->Transports();
  EXPECT_OR_DIE(static_cast<int>(transports.size()) == c.S(), "one transport per server");
  for (const auto& [peer, name] : transports) {
    const auto it = want_for.find(peer);
    const std::string& expected = it == want_for.end() ? want : it->second;
    EXPECT_OR_DIE(name == expected, peer + " via " + name + ", expected " + expected);
  }
  for (int it = 0; it < 20; ++it) {
    Buf push(DType::kFloat32, {4, kSumCols});
    for (int i = 0; i < 4 * kSumCols; ++i) push.as<float>()[i] = c.rank() + 1 + it + i % 3;
    std::vector<Buf> pulls;
    KeyTensorBatch pull;
    for (int s = 0; s < c.S(); ++s) {
      pulls.emplace_back(DType::kFloat32, std::vector<int64_t>{4, kSumCols});
      pull.push_back({100 + s, pulls.back().view});
    }
    uint64_t h = ValueOrDie(c.po->worker()->ZBatchPushPull({{0, push.view}}, pull), "push_pull");
    OK_OR_DIE(c.po->worker()->Wait(h, 30000));
    for (int s = 0; s < c.S(); ++s) {
      for (int i = 0; i < 4 * kSumCols; ++i) {
        float expect = 1000.0f * s;
        for (int w = 0; w < c.W(); ++w) expect += w + 1 + it + i % 3;
        EXPECT_OR_DIE(pulls[s].as<float>()[i] == expect,
                      "server " + std::to_string(s) + " elem " + std::to_string(i) + " = " +
                          std::to_string(pulls[s].as<float>()[i]) + ", want " +
                          std::to_string(expect));
      }
    }
    // StepMesh's contract: one id per push tensor and per pull slot position, h first,
    // each accepted by Wait and FetchRequestTrace.
    auto ids = ValueOrDie(c.po->worker()->GetAllHandlers(h), "GetAllHandlers");
    EXPECT_OR_DIE(ids.size() == 2 && ids[0] == h, "ids: 1 push + 1 pull slot, h first");
    for (uint64_t id : ids) {
      OK_OR_DIE(c.po->worker()->Wait(id, 0));
      auto t = ValueOrDie(c.po->worker()->FetchRequestTrace(id), "FetchRequestTrace");
      EXPECT_OR_DIE(t.request_start > 0 && t.response_processed >= t.request_start,
                    "per-id trace is a completed request's");
    }
    auto traces = ValueOrDie(c.po->worker()->FetchTrace(h), "FetchTrace");
    EXPECT_OR_DIE(static_cast<int>(traces.size()) == c.S(), "one trace per server");
    for (const Trace& t : traces) {
      EXPECT_OR_DIE(t.request_start > 0 && t.request_start <= t.request_posted,
                    "worker send stamps");
      EXPECT_OR_DIE(t.request_posted <= t.response_received, "posted before received");
      EXPECT_OR_DIE(t.response_received <= t.response_processed, "received before processed");
      EXPECT_OR_DIE(t.request_received > 0 && t.request_received <= t.request_processed &&
                        t.request_processed <= t.response_start &&
                        t.response_start <= t.response_posted,
                    "server stamps ordered");
    }
  }
}

// ---------------- microbatch: 3 requests in flight with different keys ----------------
void MicroServer(Ctx& c) {
  for (int round = 0; round < 5; ++round) {
    for (int mb = 0; mb < 3; ++mb) {
      auto batch = ValueOrDie(c.po->server()->GetBatch(30000), "GetBatch");
      for (auto& req : batch) {
        EXPECT_OR_DIE(req.push[0].key == 10 + mb, "micro-batches arrive in order per worker");
        const int32_t* p = static_cast<const int32_t*>(req.push[0].tensor.data);
        Buf out(DType::kInt32, {8});
        for (int i = 0; i < 8; ++i) out.as<int32_t>()[i] = p[i] * 2 + c.rank();
        OK_OR_DIE(c.po->server()->Respond(req.handle, {out.view}));
      }
    }
  }
}

void MicroWorker(Ctx& c) {
  for (int round = 0; round < 5; ++round) {
    std::vector<Buf> pushes, pulls;
    std::vector<uint64_t> handles;
    pushes.reserve(3);
    pulls.reserve(3 * c.S());
    for (int mb = 0; mb < 3; ++mb) {
      pushes.emplace_back(DType::kInt32, std::vector<int64_t>{8});
      for (int i = 0; i < 8; ++i)
        pushes.back().as<int32_t>()[i] = 100 * mb + 10 * c.rank() + i + round;
      KeyTensorBatch pull;
      for (int s = 0; s < c.S(); ++s) {
        pulls.emplace_back(DType::kInt32, std::vector<int64_t>{8});
        pull.push_back({20 + mb, pulls.back().view});
      }
      handles.push_back(ValueOrDie(
          c.po->worker()->ZBatchPushPull({{10 + mb, pushes.back().view}}, pull), "push_pull"));
    }
    for (int mb = 2; mb >= 0; --mb) OK_OR_DIE(c.po->worker()->Wait(handles[mb], 30000));
    for (int mb = 0; mb < 3; ++mb) {
      for (int s = 0; s < c.S(); ++s) {
        for (int i = 0; i < 8; ++i) {
          int32_t want = (100 * mb + 10 * c.rank() + i + round) * 2 + s;
          EXPECT_OR_DIE(pulls[mb * c.S() + s].as<int32_t>()[i] == want, "micro-batch result");
        }
      }
    }
  }
}

// ---------------- dtypes: bf16/fp32/int32 payloads, rows changing on one key ----------------
const DType kDTypes[] = {DType::kBFloat16, DType::kFloat32, DType::kInt32};
int64_t RowsFor(int it) { return 1 + (it * 37) % 128; }

void DTypeServer(Ctx& c) {
  for (int it = 0; it < 24; ++it) {
    auto batch = ValueOrDie(c.po->server()->GetBatch(30000), "GetBatch");
    for (auto& req : batch) {
      const TensorView& t = req.push[0].tensor;
      EXPECT_OR_DIE(req.push[0].key == 5, "reused key");
      EXPECT_OR_DIE(t.dtype == kDTypes[it % 3], "dtype round trip");
      EXPECT_OR_DIE(t.shape == std::vector<int64_t>({RowsFor(it), 32}),
                    "rows change per iteration");
      // Echo the push back; bytes and dtype match the pull slot.
      auto copy = std::make_shared<std::vector<char>>(
          static_cast<const char*>(t.data), static_cast<const char*>(t.data) + t.nbytes());
      TensorView v{copy->data(), t.dtype, t.shape, {}, copy};
      OK_OR_DIE(c.po->server()->Respond(req.handle, {v}));
    }
  }
}

void DTypeWorker(Ctx& c) {
  for (int it = 0; it < 24; ++it) {
    const DType dt = kDTypes[it % 3];
    Buf push(dt, {RowsFor(it), 32});
    for (size_t i = 0; i < push.bytes->size(); ++i)
      (*push.bytes)[i] = static_cast<char>(i * 7 + it + c.rank());
    Pulls pl = MakePulls(c, 6, dt, {RowsFor(it), 32});
    std::vector<Buf>& pulls = pl.bufs;
    KeyTensorBatch& pull = pl.batch;
    uint64_t h = ValueOrDie(c.po->worker()->ZBatchPushPull({{5, push.view}}, pull), "push_pull");
    OK_OR_DIE(c.po->worker()->Wait(h, 30000));
    for (int s = 0; s < c.S(); ++s) {
      EXPECT_OR_DIE(*pulls[s].bytes == *push.bytes,
                    "echoed bytes equal for " + std::string(DTypeName(dt)));
    }
  }
}

// ---------------- recvbuf: registered receive buffer lands in place ----------------
void RecvBufServer(Ctx& c) {
  Buf reg(DType::kFloat32, {c.W() * 16, 8});
  std::vector<int> ranks;
  std::vector<int64_t> keys;
  for (int w = 0; w < c.W(); ++w) {
    ranks.push_back(w);
    keys.push_back(7);
  }
  OK_OR_DIE(c.po->server()->RegisterRecvBuffer(reg.view, ranks, keys));
  // Registration before any worker pushes: the start barrier of this scenario.
  OK_OR_DIE(c.po->Barrier(kServerGroup | kWorkerGroup, 30000));
  for (int it = 0; it < 5; ++it) {
    auto batch = ValueOrDie(c.po->server()->GetBatch(30000), "GetBatch");
    for (auto& req : batch) {
      const char* expect_at = reg.bytes->data() + req.worker_rank * 16 * 8 * sizeof(float);
      EXPECT_OR_DIE(req.push[0].tensor.data == expect_at, "push viewed in its registered chunk");
      const float* chunk = reinterpret_cast<const float*>(expect_at);
      EXPECT_OR_DIE(
          chunk[0] == req.worker_rank * 100 + it && chunk[16 * 8 - 1] == req.worker_rank * 100 + it,
          "registered chunk holds the pushed data");
      Buf out(DType::kFloat32, {1});
      out.as<float>()[0] = chunk[5] + 0.5f;
      OK_OR_DIE(c.po->server()->Respond(req.handle, {out.view}));
    }
  }
}

void RecvBufWorker(Ctx& c) {
  OK_OR_DIE(c.po->Barrier(kServerGroup | kWorkerGroup, 30000));
  for (int it = 0; it < 5; ++it) {
    Buf push(DType::kFloat32, {16, 8});
    for (int i = 0; i < 16 * 8; ++i) push.as<float>()[i] = c.rank() * 100 + it;
    Pulls pl = MakePulls(c, 8, DType::kFloat32, {1});
    std::vector<Buf>& pulls = pl.bufs;
    KeyTensorBatch& pull = pl.batch;
    uint64_t h = ValueOrDie(c.po->worker()->ZBatchPushPull({{7, push.view}}, pull), "push_pull");
    OK_OR_DIE(c.po->worker()->Wait(h, 30000));
    for (auto& p : pulls) EXPECT_OR_DIE(p.as<float>()[0] == c.rank() * 100 + it + 0.5f, "reply");
  }
}

// ---------------- respondvec: running offsets across workers ----------------
int64_t VecRows(int w) { return 3 + 2 * w; }

void RespondVecServer(Ctx& c) {
  for (int it = 0; it < 5; ++it) {
    auto batch = ValueOrDie(c.po->server()->GetBatch(30000), "GetBatch");
    int64_t total = 0;
    for (int w = 0; w < c.W(); ++w) total += VecRows(w);
    Buf ret(DType::kInt32, {total + 3, 4});  // spare rows at the end stay unused
    std::vector<TensorView> tensors;
    std::vector<uint64_t> handles;
    int64_t row = 0;
    for (auto& req : batch) {
      EXPECT_OR_DIE(req.push[0].tensor.shape[0] == VecRows(req.worker_rank), "rows per worker");
      for (int64_t r = 0; r < VecRows(req.worker_rank); ++r, ++row) {
        for (int k = 0; k < 4; ++k)
          ret.as<int32_t>()[row * 4 + k] = req.worker_rank * 1000 + r * 10 + k + it;
      }
      tensors.push_back(req.push[0].tensor);
      handles.push_back(req.handle);
    }
    OK_OR_DIE(c.po->server()->RespondVec(ret.view, tensors, handles));
  }
}

void RespondVecWorker(Ctx& c) {
  for (int it = 0; it < 5; ++it) {
    const int64_t rows = VecRows(c.rank());
    Buf push(DType::kInt32, {rows, 4});
    Pulls pl = MakePulls(c, 3, DType::kInt32, {rows, 4});
    std::vector<Buf>& pulls = pl.bufs;
    KeyTensorBatch& pull = pl.batch;
    uint64_t h = ValueOrDie(c.po->worker()->ZBatchPushPull({{2, push.view}}, pull), "push_pull");
    OK_OR_DIE(c.po->worker()->Wait(h, 30000));
    for (auto& p : pulls) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int k = 0; k < 4; ++k) {
          EXPECT_OR_DIE(p.as<int32_t>()[r * 4 + k] == c.rank() * 1000 + r * 10 + k + it,
                        "respond_vec slice row " + std::to_string(r));
        }
      }
    }
  }
}

// ---------------- barrier: every group combination, scheduler included ----------------
void BarrierAny(Ctx& c) {
  const int mine = c.o.role == Role::kScheduler ? kSchedulerGroup
                   : c.o.role == Role::kServer  ? kServerGroup
                                                : kWorkerGroup;
  for (int round = 0; round < 3; ++round) {
    for (int mask = 1; mask <= kAllGroups; ++mask) {
      if (mask & mine) OK_OR_DIE(c.po->Barrier(mask, 30000));
    }
  }
  Status bad = c.po->Barrier(0, 1000);
  EXPECT_OR_DIE(bad.code() == StatusCode::kInvalidArgument, bad.ToString());
  const int other = mine == kWorkerGroup ? kServerGroup : kWorkerGroup;
  bad = c.po->Barrier(other, 1000);
  EXPECT_OR_DIE(bad.code() == StatusCode::kInvalidArgument &&
                    bad.message().find("does not include") != std::string::npos,
                bad.ToString());
}

// ---------------- timeout: Wait times out, then completes ----------------
void TimeoutServer(Ctx& c) {
  auto batch = ValueOrDie(c.po->server()->GetBatch(30000), "GetBatch");
  // Answer only after the workers saw their wait time out.
  OK_OR_DIE(c.po->Barrier(kServerGroup | kWorkerGroup, 30000));
  Buf out(DType::kInt64, {2});
  out.as<int64_t>()[0] = 42;
  for (auto& req : batch) OK_OR_DIE(c.po->server()->Respond(req.handle, {out.view}));
  auto none = c.po->server()->GetBatch(200);
  EXPECT_OR_DIE(none.status().code() == StatusCode::kDeadlineExceeded, none.status().ToString());
  OK_OR_DIE(c.po->Barrier(kServerGroup | kWorkerGroup, 30000));
}

void TimeoutWorker(Ctx& c) {
  Buf push(DType::kInt64, {2});
  Pulls pl = MakePulls(c, 1, DType::kInt64, {2});
  std::vector<Buf>& pulls = pl.bufs;
  KeyTensorBatch& pull = pl.batch;
  uint64_t h = ValueOrDie(c.po->worker()->ZBatchPushPull({{1, push.view}}, pull), "push_pull");
  const uint64_t t0 = GetNanosecond();
  Status w = c.po->worker()->Wait(h, 300);
  const uint64_t waited_ms = (GetNanosecond() - t0) / 1000000;
  EXPECT_OR_DIE(w.code() == StatusCode::kDeadlineExceeded, w.ToString());
  EXPECT_OR_DIE(waited_ms >= 300, "returned before its timeout: " + std::to_string(waited_ms));
  EXPECT_OR_DIE(!ValueOrDie(c.po->worker()->Done(h), "Done"), "not done yet");
  OK_OR_DIE(c.po->Barrier(kServerGroup | kWorkerGroup, 30000));
  OK_OR_DIE(c.po->worker()->Wait(h, 30000));
  for (auto& p : pulls) EXPECT_OR_DIE(p.as<int64_t>()[0] == 42, "late answer arrives");
  OK_OR_DIE(c.po->Barrier(kServerGroup | kWorkerGroup, 30000));  // server's GetBatch timed out
}

// ---------------- kill: a server dies mid-request; the worker's wait fails ----------------
void KillServer(Ctx& c) {
  auto batch = ValueOrDie(c.po->server()->GetBatch(30000), "GetBatch");
  if (c.rank() == c.S() - 1) {
    raise(SIGKILL);  // kill -9 of ourselves, mid-request
  }
  Buf out(DType::kFloat32, {4});
  for (auto& req : batch) OK_OR_DIE(c.po->server()->Respond(req.handle, {out.view}));
  // The workers stop after their failed wait: the next GetBatch must fail, not hang.
  auto next = c.po->server()->GetBatch(60000);
  EXPECT_OR_DIE(next.status().code() == StatusCode::kUnavailable, next.status().ToString());
}

void KillWorker(Ctx& c) {
  Buf push(DType::kFloat32, {4});
  Pulls pl = MakePulls(c, 1, DType::kFloat32, {4});
  KeyTensorBatch& pull = pl.batch;
  uint64_t h = ValueOrDie(c.po->worker()->ZBatchPushPull({{1, push.view}}, pull), "push_pull");
  Status w = c.po->worker()->Wait(h, 60000);
  EXPECT_OR_DIE(w.code() == StatusCode::kUnavailable, w.ToString());
  const std::string dead = "server " + std::to_string(c.S() - 1);
  EXPECT_OR_DIE(w.message().find(dead) != std::string::npos,
                "error names the dead server: " + w.ToString());
  auto again = c.po->worker()->ZBatchPushPull({{1, push.view}}, pull);
  EXPECT_OR_DIE(again.status().code() == StatusCode::kUnavailable, "new requests fail fast");
}

// ---------------- killwrites: a server dies while bulk writes to it are in flight ----------------
// Workers post several multi-MiB micro-batches back to back; the last server kills itself
// when its first batch arrives, so later payloads are still being written (on rdma: RDMA
// WRITEs on the wire) when it dies. Every handle depends on it and must fail naming it.
constexpr int kKillWritesBatches = 6;
constexpr int64_t kKillWritesRows = 512;  // x 1024 float32 = 2 MiB per push

void KillWritesServer(Ctx& c) {
  for (;;) {
    auto batch = c.po->server()->GetBatch(60000);
    if (!batch.ok()) {
      EXPECT_OR_DIE(batch.status().code() == StatusCode::kUnavailable, batch.status().ToString());
      return;
    }
    if (c.rank() == c.S() - 1) raise(SIGKILL);
    Buf out(DType::kFloat32, {4});
    for (auto& req : *batch) {
      Status s = c.po->server()->Respond(req.handle, {out.view});
      // The worker may already have left after its failed waits.
      EXPECT_OR_DIE(s.ok() || s.code() == StatusCode::kUnavailable, s.ToString());
    }
  }
}

void KillWritesWorker(Ctx& c) {
  std::vector<Buf> pushes;
  std::vector<Pulls> pulls;
  std::vector<uint64_t> handles;
  pushes.reserve(kKillWritesBatches);
  pulls.reserve(kKillWritesBatches);
  for (int i = 0; i < kKillWritesBatches; ++i) {
    pushes.emplace_back(DType::kFloat32, std::vector<int64_t>{kKillWritesRows, 1024});
    pulls.push_back(MakePulls(c, 1, DType::kFloat32, {4}));
    auto h = c.po->worker()->ZBatchPushPull({{1, pushes.back().view}}, pulls.back().batch);
    // A post after the death was noticed fails at once, which is as good as a failed wait.
    if (!h.ok()) {
      EXPECT_OR_DIE(h.status().code() == StatusCode::kUnavailable, h.status().ToString());
      continue;
    }
    handles.push_back(*h);
  }
  EXPECT_OR_DIE(!handles.empty(), "the first micro-batch was accepted");
  // The first handle's batch reached every server, and the victim never answered it: it fails
  // naming the dead server. A later handle may fail naming a surviving server instead: once the
  // other worker has given up, that server's GetBatch fails and it stops cleanly, which a worker
  // that has not yet noticed the death (its link to the victim is heartbeat-only) sees first.
  const std::string dead = "server " + std::to_string(c.S() - 1);
  bool named_dead = false;
  for (uint64_t h : handles) {
    Status w = c.po->worker()->Wait(h, 60000);
    EXPECT_OR_DIE(w.code() == StatusCode::kUnavailable, w.ToString());
    const bool names_dead = w.message().find(dead) != std::string::npos;
    EXPECT_OR_DIE(names_dead || w.message().find("stopped") != std::string::npos,
                  "error names the dead server or one that stopped cleanly: " + w.ToString());
    named_dead = named_dead || names_dead;
  }
  EXPECT_OR_DIE(named_dead, "some handle's error names the dead server");
}

// ---------------- schedkill: the scheduler dies; data keeps flowing, barriers fail
// ---------------- The scheduler dies only once every node has passed Start (proved by their
// arrival at a second barrier); the release of that barrier may die with it, so nodes accept
// either.
void SchedKillScheduler(Ctx& c) {
  OK_OR_DIE(c.po->Barrier(kAllGroups, 30000));
  raise(SIGKILL);
}

void PassBarrierOrSeeSchedulerDie(Ctx& c) {
  Status b = c.po->Barrier(kAllGroups, 30000);
  EXPECT_OR_DIE(b.ok() || (b.code() == StatusCode::kUnavailable &&
                           b.message().find("scheduler") != std::string::npos),
                b.ToString());
}

void SchedKillServer(Ctx& c) {
  PassBarrierOrSeeSchedulerDie(c);
  auto batch = ValueOrDie(c.po->server()->GetBatch(30000), "GetBatch");
  Buf out(DType::kInt32, {2});
  out.as<int32_t>()[1] = 5;
  for (auto& req : batch) OK_OR_DIE(c.po->server()->Respond(req.handle, {out.view}));
  Status b = c.po->Barrier(kServerGroup | kWorkerGroup, 30000);
  EXPECT_OR_DIE(
      b.code() == StatusCode::kUnavailable && b.message().find("scheduler") != std::string::npos,
      b.ToString());
}

void SchedKillWorker(Ctx& c) {
  PassBarrierOrSeeSchedulerDie(c);
  Buf push(DType::kInt32, {2});
  Pulls pl = MakePulls(c, 1, DType::kInt32, {2});
  std::vector<Buf>& pulls = pl.bufs;
  KeyTensorBatch& pull = pl.batch;
  uint64_t h = ValueOrDie(c.po->worker()->ZBatchPushPull({{1, push.view}}, pull), "push_pull");
  OK_OR_DIE(c.po->worker()->Wait(h, 30000));
  for (auto& p : pulls) EXPECT_OR_DIE(p.as<int32_t>()[1] == 5, "data flows without the scheduler");
  Status b = c.po->Barrier(kServerGroup | kWorkerGroup, 30000);
  EXPECT_OR_DIE(
      b.code() == StatusCode::kUnavailable && b.message().find("scheduler") != std::string::npos,
      b.ToString());
}

// ---------------- idle: every role waits ~3 s with nothing to do ----------------
// Reports the process's CPU time on stderr (for docs/performance.md; not asserted: the
// machine is shared and CPU time is a measurement, not a correctness property).
double CpuSeconds() {
  rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
         (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

void ReportCpu(Ctx& c, double cpu, uint64_t wall_ns) {
  std::fprintf(stderr, "IDLE_CPU %s %d: %.3f s CPU over %.3f s idle wait\n", RoleName(c.o.role),
               c.rank(), cpu, wall_ns / 1e9);
}

void IdleServer(Ctx& c) {
  const uint64_t t0 = GetNanosecond();
  const double cpu0 = CpuSeconds();
  auto none = c.po->server()->GetBatch(3000);
  EXPECT_OR_DIE(none.status().code() == StatusCode::kDeadlineExceeded, none.status().ToString());
  ReportCpu(c, CpuSeconds() - cpu0, GetNanosecond() - t0);
  OK_OR_DIE(c.po->Barrier(kServerGroup | kWorkerGroup, 30000));
}

void IdleWorker(Ctx& c) {
  const uint64_t t0 = GetNanosecond();
  const double cpu0 = CpuSeconds();
  OK_OR_DIE(c.po->Barrier(kServerGroup | kWorkerGroup, 30000));
  ReportCpu(c, CpuSeconds() - cpu0, GetNanosecond() - t0);
}

// ---------------- badinput: errors, then the process keeps working ----------------
void BadInputServer(Ctx& c) {
  auto* server = c.po->server();
  Buf reg(DType::kFloat32, {5});
  Status s = server->RegisterRecvBuffer(reg.view, {0, 1}, {1, 2});
  EXPECT_OR_DIE(s.code() == StatusCode::kInvalidArgument, "uneven split: " + s.ToString());
  s = server->RegisterRecvBuffer(reg.view, {0}, {1, 2});
  EXPECT_OR_DIE(s.code() == StatusCode::kInvalidArgument, "length mismatch: " + s.ToString());
  s = server->RegisterRecvBuffer(reg.view, {99}, {1});
  EXPECT_OR_DIE(s.code() == StatusCode::kInvalidArgument, "bad rank: " + s.ToString());
  Buf out(DType::kFloat32, {4});
  s = server->Respond(12345, {out.view});
  EXPECT_OR_DIE(s.code() == StatusCode::kNotFound, "unknown handle: " + s.ToString());

  auto batch = ValueOrDie(server->GetBatch(30000), "GetBatch");
  for (auto& req : batch) {
    Buf wrong_dtype(DType::kInt32, {4});
    s = server->Respond(req.handle, {wrong_dtype.view});
    EXPECT_OR_DIE(
        s.code() == StatusCode::kInvalidArgument && s.message().find("int32") != std::string::npos,
        "dtype mismatch: " + s.ToString());
    Buf wrong_size(DType::kFloat32, {5});
    s = server->Respond(req.handle, {wrong_size.view});
    EXPECT_OR_DIE(s.code() == StatusCode::kInvalidArgument, "size mismatch: " + s.ToString());
    s = server->Respond(req.handle, {out.view, out.view});
    EXPECT_OR_DIE(s.code() == StatusCode::kInvalidArgument, "count mismatch: " + s.ToString());
    Buf small(DType::kFloat32, {1, 4});
    TensorView big_rows = ViewOf(out.view, DType::kFloat32, {4, 1});
    s = server->RespondVec(small.view, {big_rows}, {req.handle});
    EXPECT_OR_DIE(s.code() == StatusCode::kInvalidArgument, "respond_vec rows: " + s.ToString());
    TensorView null_view = out.view;
    null_view.data = nullptr;
    s = server->Respond(req.handle, {null_view});
    EXPECT_OR_DIE(s.code() == StatusCode::kInvalidArgument, "null data: " + s.ToString());
    // After all that, the right answer still goes through.
    for (int i = 0; i < 4; ++i) out.as<float>()[i] = 7.0f + c.rank();
    OK_OR_DIE(server->Respond(req.handle, {out.view}));
    s = server->Respond(req.handle, {out.view});
    EXPECT_OR_DIE(s.code() == StatusCode::kNotFound, "answered twice: " + s.ToString());
  }
}

void BadInputWorker(Ctx& c) {
  auto* worker = c.po->worker();
  Buf push(DType::kFloat32, {4});
  Pulls pl = MakePulls(c, 1, DType::kFloat32, {4});
  std::vector<Buf>& pulls = pl.bufs;
  KeyTensorBatch& pull = pl.batch;
  KeyTensorBatch uneven = pull;
  uneven.push_back(pull[0]);
  auto r = worker->ZBatchPushPull({{1, push.view}}, uneven);
  EXPECT_OR_DIE(r.status().code() == StatusCode::kInvalidArgument &&
                    r.status().message().find("divisible") != std::string::npos,
                r.status().ToString());
  r = worker->ZBatchPushPull({{-3, push.view}}, pull);
  EXPECT_OR_DIE(r.status().code() == StatusCode::kInvalidArgument &&
                    r.status().message().find("-3") != std::string::npos,
                r.status().ToString());
  TensorView null_view = push.view;
  null_view.data = nullptr;
  r = worker->ZBatchPushPull({{1, null_view}}, pull);
  EXPECT_OR_DIE(r.status().code() == StatusCode::kInvalidArgument, r.status().ToString());
  r = worker->ZBatchPushPull({}, {});
  EXPECT_OR_DIE(r.status().code() == StatusCode::kInvalidArgument, r.status().ToString());
  Status w = worker->Wait(987654, 10);
  EXPECT_OR_DIE(w.code() == StatusCode::kNotFound, w.ToString());
  auto t = worker->FetchTrace(987654);
  EXPECT_OR_DIE(t.status().code() == StatusCode::kNotFound, t.status().ToString());
  uint64_t h = ValueOrDie(worker->ZBatchPushPull({{1, push.view}}, pull), "push_pull");
  OK_OR_DIE(worker->Wait(h, 30000));
  for (int s = 0; s < c.S(); ++s)
    EXPECT_OR_DIE(pulls[s].as<float>()[3] == 7.0f + s, "answer after errors");
}

// ---------------- forced: a transport that cannot run here is a clear error ----------------
int Forced(Postoffice& po) {
  Status s = po.Start();
  if (po.role() == Role::kScheduler) return s.code() == StatusCode::kDeadlineExceeded ? 0 : 1;
  const std::string want = std::getenv("MESHPOST_ITEST_FORCED_ERROR");
  if (!s.ok() && s.message().find(want) != std::string::npos) return 0;
  std::fprintf(stderr, "forced: expected an error containing '%s', got %s\n", want.c_str(),
               s.ToString().c_str());
  return 1;
}

// ---------------- clash: two servers claim the same rank ----------------
int Clash(Postoffice& po) {
  Status s = po.Start();
  if (!s.ok() && s.message().find("clashes") != std::string::npos &&
      s.code() == StatusCode::kInvalidArgument) {
    return 0;  // we are the refused node: the expected outcome
  }
  if (!s.ok() && s.code() == StatusCode::kDeadlineExceeded) return 10;
  std::fprintf(stderr, "clash: unexpected Start result %s\n", s.ToString().c_str());
  return 1;
}

struct Scenario {
  std::function<void(Ctx&)> server, worker, scheduler;
};

}  // namespace

int main() {
  const char* name = std::getenv("MESHPOST_ITEST_SCENARIO");
  if (name == nullptr) Die("MESHPOST_ITEST_SCENARIO is not set");
  auto opts = OptionsFromEnv();
  if (!opts.ok()) {
    std::fprintf(stderr, "%s\n", opts.status().ToString().c_str());
    return 2;
  }
  auto po = ValueOrDie(Postoffice::Create(*opts), "Create");
  if (std::string(name) == "clash") return Clash(*po);
  if (std::string(name) == "forced") return Forced(*po);

  std::map<std::string, Scenario> scenarios = {
      {"sum", {SumServer, SumWorker, nullptr}},
      {"microbatch", {MicroServer, MicroWorker, nullptr}},
      {"dtypes", {DTypeServer, DTypeWorker, nullptr}},
      {"recvbuf", {RecvBufServer, RecvBufWorker, nullptr}},
      {"respondvec", {RespondVecServer, RespondVecWorker, nullptr}},
      {"barrier", {BarrierAny, BarrierAny, BarrierAny}},
      {"timeout", {TimeoutServer, TimeoutWorker, nullptr}},
      {"kill", {KillServer, KillWorker, nullptr}},
      {"killwrites", {KillWritesServer, KillWritesWorker, nullptr}},
      {"badinput", {BadInputServer, BadInputWorker, nullptr}},
      {"schedkill", {SchedKillServer, SchedKillWorker, SchedKillScheduler}},
      {"idle", {IdleServer, IdleWorker, nullptr}},
      {"shared", {SharedServer, SharedWorker, nullptr}},
      {"staged", {StagedServer, StagedWorker, nullptr}},
  };
  bool started = false;
  if (std::string(name) == "clash_sum") {
    // A surplus process claims a taken rank: it is refused (and must leave without
    // disturbing the node that owns the rank); everyone else runs the sum scenario.
    Status s = po->Start();
    if (!s.ok() && s.message().find("clashes") != std::string::npos) {
      po.reset();  // Stop + teardown of the refused node, as a real program would do
      return 0;
    }
    OK_OR_DIE(s);
    name = "sum";
    started = true;
  }
  auto it = scenarios.find(name);
  if (it == scenarios.end()) Die(std::string("unknown scenario ") + name);
  if (!started) OK_OR_DIE(po->Start());
  Ctx c{po.get(), po->options()};
  const Scenario& sc = it->second;
  if (opts->role == Role::kServer && sc.server) sc.server(c);
  if (opts->role == Role::kWorker && sc.worker) sc.worker(c);
  if (opts->role == Role::kScheduler && sc.scheduler) sc.scheduler(c);
  OK_OR_DIE(po->Stop(60000));
  return 0;
}
