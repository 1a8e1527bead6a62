// Node program for the attack tests (security_test.cc). Every role writes the port it
// listens on to $MESHPOST_SEC_DIR/<role>:<rank>.port once started, then runs a traffic loop
// until $MESHPOST_SEC_DIR/stop names the last round: workers push a value that names them and check
// every answer exactly, servers check every request (a forged request or response is a
// wrong value here) and answer. Each worker records its completed rounds in
// <role>:<rank>.rounds so the test can see that traffic keeps flowing after an attack.
// Any error or mismatch exits non-zero with the reason on stderr.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "ps/postoffice.h"

using namespace meshpost;

namespace {

constexpr int64_t kCols = 16;

[[noreturn]] void Die(const std::string& why) {
  std::fprintf(stderr, "SECURITY NODE FAILURE: %s\n", why.c_str());
  std::fflush(stderr);
  _exit(1);
}

std::string Dir() {
  const char* d = std::getenv("MESHPOST_SEC_DIR");
  if (d == nullptr) Die("MESHPOST_SEC_DIR is not set");
  return d;
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

void WriteFile(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    f << text << "\n";
  }
  std::rename(tmp.c_str(), path.c_str());
}

struct Buf {
  std::shared_ptr<std::vector<float>> v;
  TensorView view;
  explicit Buf(int64_t n) : v(std::make_shared<std::vector<float>>(n)) {
    view = TensorView{v->data(), DType::kFloat32, {n}, {}, v};
  }
};

// The value worker w pushes in round `it`.
float PushValue(int w, int64_t it) { return static_cast<float>(w * 100000 + it % 50000); }

bool WorkersDone(const std::string& dir, int W) {
  for (int w = 0; w < W; ++w) {
    if (!Exists(dir + "/worker:" + std::to_string(w) + ".done")) return false;
  }
  return true;
}

// Serves until every worker finished its last round (workers stop at the stop file).
void RunServer(Postoffice& po, const std::string& dir) {
  AFTensorServer* s = po.server();
  const int W = po.options().num_workers;
  std::vector<int64_t> next_round(W, -1);
  bool checked_foreign_handle = false;
  for (;;) {
    auto batch = s->GetBatch(300);
    if (!batch.ok()) {
      if (WorkersDone(dir, W)) break;
      // After the stop round, a worker that finished leaves (orderly) while another may
      // still be writing its done file: its last answer already went out in that batch.
      if (Exists(dir + "/stop") && batch.status().code() == StatusCode::kUnavailable &&
          batch.status().message().find("stopped") != std::string::npos) {
        break;
      }
      if (batch.status().code() == StatusCode::kDeadlineExceeded) continue;
      Die("GetBatch: " + batch.status().ToString());
    }
    Buf sum(kCols);
    for (const auto& req : *batch) {
      if (req.worker_rank < 0 || req.worker_rank >= W) Die("request from an unknown worker");
      if (req.push.size() != 1 || req.push[0].tensor.dtype != DType::kFloat32 ||
          req.push[0].tensor.shape != std::vector<int64_t>{kCols}) {
        Die("forged request accepted: unexpected push from worker " +
            std::to_string(req.worker_rank));
      }
      const float* p = static_cast<const float*>(req.push[0].tensor.data);
      const int64_t it = static_cast<int64_t>(p[1]);
      if (p[0] != PushValue(req.worker_rank, it) || it <= next_round[req.worker_rank] - 1) {
        Die("forged request accepted: worker " + std::to_string(req.worker_rank) + " pushed " +
            std::to_string(p[0]));
      }
      next_round[req.worker_rank] = it + 1;
      for (int64_t i = 0; i < kCols; ++i) sum.v->at(i) += p[0];
    }
    for (int64_t i = 0; i < kCols; ++i) sum.v->at(i) += 7.0f * static_cast<float>(po.rank());
    if (po.rank() == 1 && !checked_foreign_handle) {
      // The same request number as issued by server 0: must not answer one of ours.
      const uint64_t foreign = (*batch)[0].handle & ((uint64_t{1} << 40) - 1);
      Status r = s->Respond(foreign, {sum.view});
      if (r.ok() || r.code() != StatusCode::kNotFound) {
        Die("server 1 accepted handle " + std::to_string(foreign) +
            " of server 0: " + r.ToString());
      }
      checked_foreign_handle = true;
    }
    for (const auto& req : *batch) {
      Status r = s->Respond(req.handle, {sum.view});
      if (!r.ok()) Die("Respond: " + r.ToString());
    }
  }
}

// The round to finish at, once the test wrote it into the stop file (-1 before). Workers
// run in lockstep (a server answers one request per worker at a time), so they all stop
// after the same round.
int64_t StopRound(const std::string& stop) {
  std::ifstream f(stop);
  int64_t r = -1;
  if (f && (f >> r)) return r;
  return -1;
}

void RunWorker(Postoffice& po, const std::string& stop, const std::string& rounds_file) {
  AFTensorWorker* w = po.worker();
  const int S = po.options().num_servers;
  const int W = po.options().num_workers;
  for (int64_t it = 0;; ++it) {
    const int64_t last = StopRound(stop);
    if (last >= 0 && it > last) break;
    Buf push(kCols);
    push.v->at(0) = PushValue(po.rank(), it);
    push.v->at(1) = static_cast<float>(it);
    for (int64_t i = 2; i < kCols; ++i) push.v->at(i) = PushValue(po.rank(), it);
    std::vector<Buf> pulls;
    KeyTensorBatch pull;
    for (int s = 0; s < S; ++s) {
      pulls.emplace_back(kCols);
      pull.push_back({100 + s, pulls.back().view});
    }
    auto h = w->ZBatchPushPull({{0, push.view}}, pull);
    if (!h.ok()) Die("push_pull: " + h.status().ToString());
    Status st = w->Wait(*h, 60000);
    if (!st.ok()) Die("Wait: " + st.ToString());
    // Each server sums one push per worker of the same round index only when workers run
    // in lockstep, which servers' batching guarantees: one request per worker per batch.
    for (int s = 0; s < S; ++s) {
      float expect = 7.0f * s;
      for (int k = 0; k < W; ++k) expect += PushValue(k, it);
      if (pulls[s].v->at(0) != expect) {
        Die("forged or wrong response accepted: server " + std::to_string(s) + " answered " +
            std::to_string(pulls[s].v->at(0)) + ", want " + std::to_string(expect));
      }
    }
    if (it % 10 == 0) WriteFile(rounds_file, std::to_string(it));
  }
}

std::string Scenario() {
  const char* v = std::getenv("MESHPOST_SEC_SCENARIO");
  return v ? v : "traffic";
}

// "evict": the test pauses server 1 past the heartbeat timeout. Workers run rounds until a
// wait fails because server 1 is gone, then stop. Server 1 blocks in GetBatch without a
// timeout; once resumed it must learn at once that it was evicted, and every later call
// must say so too.
void EvictWorker(Postoffice& po, const std::string& dir, const std::string& me) {
  AFTensorWorker* w = po.worker();
  const int S = po.options().num_servers;
  for (int64_t it = 0;; ++it) {
    Buf push(kCols);
    push.v->at(0) = PushValue(po.rank(), it);
    push.v->at(1) = static_cast<float>(it);
    std::vector<Buf> pulls;
    KeyTensorBatch pull;
    for (int s = 0; s < S; ++s) {
      pulls.emplace_back(kCols);
      pull.push_back({100 + s, pulls.back().view});
    }
    auto h = w->ZBatchPushPull({{0, push.view}}, pull);
    Status st = h.ok() ? w->Wait(*h, 60000) : h.status();
    if (!st.ok()) {
      if (st.message().find("server 1") == std::string::npos)
        Die("unexpected failure: " + st.ToString());
      break;
    }
    if (it % 10 == 0) WriteFile(dir + "/" + me + ".rounds", std::to_string(it));
  }
  WriteFile(dir + "/" + me + ".done", "1");
}

void EvictServer(Postoffice& po, const std::string& dir) {
  AFTensorServer* s = po.server();
  if (po.rank() == 0) {
    // Serves what arrives until both workers gave up on server 1.
    for (;;) {
      auto batch = s->GetBatch(300);
      if (!batch.ok()) {
        if (WorkersDone(dir, po.options().num_workers)) return;
        continue;
      }
      Buf sum(kCols);
      for (const auto& req : *batch) (void)s->Respond(req.handle, {sum.view});
    }
  }
  for (;;) {
    auto batch = s->GetBatch(-1);
    if (!batch.ok()) {
      const Status first = batch.status();
      if (first.message().find("evicted") == std::string::npos) {
        Die("GetBatch after the pause: " + first.ToString() + "; expected it to say evicted");
      }
      auto again = s->GetBatch(100);
      if (again.ok() || again.status().message().find("evicted") == std::string::npos) {
        Die("a later GetBatch does not report the eviction: " +
            (again.ok() ? std::string("OK") : again.status().ToString()));
      }
      WriteFile(dir + "/server:1.evicted", first.message());
      return;
    }
    Buf sum(kCols);
    for (const auto& req : *batch) (void)s->Respond(req.handle, {sum.view});
  }
}

// "replace": the test kills (or pauses) server 1 and starts a new process with its rank.
// Workers answer-check every round (each request gets 2 * push + 7 * server rank back, so
// no pairing between workers is assumed), count failures that name server 1 and retry
// until the replacement serves; any other failure or wrong value exits non-zero. After
// the stop file every live node passes one more all-groups barrier (sequence numbers
// continue across the replacement) and leaves. A former holder that resumes must learn it
// was replaced, from its next call and every later one; it writes replaced.<pid>.
// Returns false when this process learned it was replaced (and checked it says so).
bool ReplaceWorker(Postoffice& po, const std::string& dir, const std::string& me) {
  AFTensorWorker* w = po.worker();
  const int S = po.options().num_servers;
  int64_t done = 0;
  for (int64_t it = 0; !Exists(dir + "/stop"); ++it) {
    Buf push(kCols);
    for (int64_t i = 0; i < kCols; ++i) push.v->at(i) = PushValue(po.rank(), it) + i;
    std::vector<Buf> pulls;
    KeyTensorBatch pull;
    for (int s = 0; s < S; ++s) {
      pulls.emplace_back(kCols);
      pull.push_back({100 + s, pulls.back().view});
    }
    auto h = w->ZBatchPushPull({{0, push.view}}, pull);
    Status st = h.status();
    if (h.ok()) {
      // Servers batch one request per worker: once the other worker saw the stop file and
      // quit, this last request has no partner and is never answered. That (only) ends
      // the loop; before the stop file a minute without an answer is a failure.
      for (int waited_ms = 0;; waited_ms += 500) {
        st = w->Wait(*h, 500);
        if (st.code() != StatusCode::kDeadlineExceeded || waited_ms >= 60000) break;
        if (Exists(dir + "/stop")) break;
      }
      if (st.code() == StatusCode::kDeadlineExceeded && Exists(dir + "/stop")) break;
    }
    if (!st.ok() && st.message().find("was replaced") != std::string::npos) {
      auto again = w->ZBatchPushPull({{0, push.view}}, pull);
      if (again.ok() || again.status().message().find("was replaced") == std::string::npos) {
        Die("a later push_pull does not report the replacement: " +
            (again.ok() ? std::string("OK") : again.status().ToString()));
      }
      WriteFile(dir + "/replaced." + std::to_string(getpid()), st.message());
      return false;
    }
    if (!st.ok()) {
      if (st.message().find("server 1") == std::string::npos) Die("push_pull: " + st.ToString());
      if (!Exists(dir + "/" + me + ".failed")) WriteFile(dir + "/" + me + ".failed", st.message());
      usleep(20000);
      continue;
    }
    for (int s = 0; s < S; ++s) {
      for (int64_t i = 0; i < kCols; ++i) {
        const float want = 2.0f * push.v->at(i) + 7.0f * s;
        if (pulls[s].v->at(i) != want) {
          Die("wrong answer from server " + std::to_string(s) + " at " + std::to_string(i) + ": " +
              std::to_string(pulls[s].v->at(i)) + ", want " + std::to_string(want));
        }
      }
    }
    if (++done % 10 == 0) WriteFile(dir + "/" + me + ".rounds", std::to_string(done));
  }
  WriteFile(dir + "/" + me + ".done", "1");
  return true;
}

// Returns false when this process learned it was replaced (and checked it says so).
bool ReplaceServer(Postoffice& po, const std::string& dir) {
  AFTensorServer* s = po.server();
  const int W = po.options().num_workers;
  for (;;) {
    auto batch = s->GetBatch(300);
    if (!batch.ok()) {
      const std::string why = batch.status().message();
      if (why.find("replaced") != std::string::npos) {
        auto again = s->GetBatch(100);
        if (again.ok() || again.status().message().find("replaced") == std::string::npos) {
          Die("a later GetBatch does not report the replacement: " +
              (again.ok() ? std::string("OK") : again.status().ToString()));
        }
        Status b = po.Barrier(kAllGroups, 1000);
        if (b.ok() || b.message().find("replaced") == std::string::npos) {
          Die("Barrier of a replaced node: " + b.ToString());
        }
        WriteFile(dir + "/replaced." + std::to_string(getpid()), why);
        return false;
      }
      if (WorkersDone(dir, W)) return true;
      if (batch.status().code() != StatusCode::kDeadlineExceeded) usleep(20000);
      continue;
    }
    for (const auto& req : *batch) {
      if (req.push.size() != 1 || req.push[0].tensor.shape != std::vector<int64_t>{kCols}) {
        Die("unexpected push from worker " + std::to_string(req.worker_rank));
      }
      const float* p = static_cast<const float*>(req.push[0].tensor.data);
      Buf out(kCols);
      for (int64_t i = 0; i < kCols; ++i) out.v->at(i) = 2.0f * p[i] + 7.0f * po.rank();
      Status r = s->Respond(req.handle, {out.view});
      if (!r.ok()) Die("Respond: " + r.ToString());
    }
  }
}

int RunReplace(Postoffice& po, const std::string& dir, const std::string& me) {
  bool member = true;
  if (po.role() == Role::kServer) member = ReplaceServer(po, dir);
  if (po.role() == Role::kWorker) member = ReplaceWorker(po, dir, me);
  if (po.role() == Role::kScheduler) {
    while (!Exists(dir + "/stop")) usleep(50000);
  }
  if (member) {
    Status b = po.Barrier(kAllGroups, 60000);
    if (!b.ok()) Die("final barrier: " + b.ToString());
  }
  Status s = po.Stop(60000);
  if (!s.ok() && member) Die("Stop: " + s.ToString());
  return 0;
}

// "barrier": worker 0 enters a workers-only barrier at once (writing worker:0.waiting);
// worker 1 enters it only once the test wrote "go", after an attacker sent forged barrier
// completions to worker 0 and forged arrivals as worker 1 to the scheduler. A release
// before "go" exists means a forgery was accepted.
int RunBarrier(Postoffice& po, const std::string& dir, const std::string& me) {
  const std::string go = dir + "/go";
  if (po.role() == Role::kWorker && po.rank() == 0) {
    WriteFile(dir + "/" + me + ".waiting", "1");
    Status b = po.Barrier(kWorkerGroup, -1);
    if (!Exists(go)) Die("barrier released before worker 1 arrived: " + b.ToString());
    if (!b.ok()) Die("barrier: " + b.ToString());
  } else if (po.role() == Role::kWorker) {
    while (!Exists(go)) usleep(20000);
    Status b = po.Barrier(kWorkerGroup, 60000);
    if (!b.ok()) Die("barrier: " + b.ToString());
  }
  if (po.role() == Role::kWorker) WriteFile(dir + "/" + me + ".done", "1");
  while (!Exists(dir + "/stop")) usleep(20000);
  Status s = po.Stop(60000);
  if (!s.ok()) Die("Stop: " + s.ToString());
  return 0;
}

// "barrier_replace": a barrier across servers and workers is in progress when server 1
// dies (worker 0 and server 0 arrived; worker 1 and server 1 wait for "go1"). Each
// node writes the outcome of barrier 1 to <me>.b1: the arrived ones are released with an
// error, worker 1 arriving after the death (and after the replacement joined) gets the
// same error at once instead of waiting for members that moved on. The replacement
// (MESHPOST_SEC_REPLACEMENT=1) joins at barrier 2, which everyone passes after "go2"
// (<me>.b2).
int RunBarrierReplace(Postoffice& po, const std::string& dir, const std::string& me) {
  constexpr int kMask = kServerGroup | kWorkerGroup;
  const bool replacement = std::getenv("MESHPOST_SEC_REPLACEMENT") != nullptr;
  if (po.role() != Role::kScheduler && !replacement) {
    const bool early = po.rank() == 0;
    if (early) {
      WriteFile(dir + "/" + me + ".waiting", "1");
    } else {
      while (!Exists(dir + "/go1")) usleep(20000);
    }
    Status b = po.Barrier(kMask, 120000);
    WriteFile(dir + "/" + me + ".b1", b.ok() ? "OK" : b.ToString());
  }
  if (po.role() != Role::kScheduler) {
    while (!Exists(dir + "/go2")) usleep(20000);
    Status b = po.Barrier(kMask, 60000);
    WriteFile(dir + "/" + me + ".b2", b.ok() ? "OK" : b.ToString());
  }
  while (!Exists(dir + "/stop")) usleep(20000);
  Status s = po.Stop(60000);
  if (!s.ok()) Die("Stop: " + s.ToString());
  return 0;
}

}  // namespace

int main() {
  auto opts = OptionsFromEnv();
  if (!opts.ok()) {
    std::fprintf(stderr, "%s\n", opts.status().ToString().c_str());
    return 2;
  }
  auto po = Postoffice::Create(*opts);
  if (!po.ok()) Die("Create: " + po.status().ToString());
  const std::string dir = Dir();
  const std::string me = std::string(RoleName(opts->role)) + ":" + std::to_string((*po)->rank());
  Status s = (*po)->Start();
  if (!s.ok()) {
    WriteFile(dir + "/" + me + ".start_error", s.ToString());
    Die("Start: " + s.ToString());
  }
  WriteFile(dir + "/" + me + ".port", std::to_string((*po)->port()));
  const std::string stop = dir + "/stop";
  if (Scenario() == "replace") return RunReplace(**po, dir, me);
  if (Scenario() == "barrier") return RunBarrier(**po, dir, me);
  if (Scenario() == "barrier_replace") return RunBarrierReplace(**po, dir, me);
  if (Scenario() == "evict") {
    if (opts->role == Role::kServer) EvictServer(**po, dir);
    if (opts->role == Role::kWorker) EvictWorker(**po, dir, me);
    if (opts->role == Role::kScheduler) {
      while (!Exists(stop)) usleep(50000);
    }
    // An evicted node's Stop reports the eviction; everyone else leaves cleanly.
    s = (*po)->Stop(60000);
    if (!s.ok() && !Exists(dir + "/server:1.evicted")) Die("Stop: " + s.ToString());
    return 0;
  }
  if (opts->role == Role::kServer) RunServer(**po, dir);
  if (opts->role == Role::kWorker) {
    RunWorker(**po, stop, dir + "/" + me + ".rounds");
    WriteFile(dir + "/" + me + ".done", "1");
  }
  if (opts->role == Role::kScheduler) {
    while (!Exists(stop)) usleep(50000);  // the scheduler's work happens on its threads
  }
  s = (*po)->Stop(60000);
  if (!s.ok()) Die("Stop: " + s.ToString());
  return 0;
}
