// End-to-end effect of streaming staged GPU tensors over tcp (van/streamed_bytes.h), on
// the fake device backend: copies cost `copy_ps` picoseconds per byte. Two in-process
// clusters (scheduler, server, worker over tcp on loopback) run interleaved: one with
// MESHPOST_GPU_STAGING_CHUNK = 4 MiB, whose multi-chunk pushes and responses stream
// (each chunk on the wire as it is copied), and one with 1 GiB chunks, which send after
// the whole copy. A round: push_pull of a CUDA tensor into a CUDA pull slot, the server
// answering from a CUDA tensor (both staged through pinned memory). Prints the median
// round trip per cluster as JSON lines.
// Usage: meshpost_gpu_stream_bench [MiB=32] [copy_ps=300] [reps=7]
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "ps/postoffice.h"
#include "tensor/backend/fake_backend.h"

using namespace meshpost;

namespace {

struct Cluster {
  std::unique_ptr<Postoffice> scheduler, server, worker;

  Status Start(DeviceBackend* be, int64_t chunk) {
    int fds[2];
    if (pipe(fds) != 0) return UnavailableError("pipe");
    auto base = [&](Role role, int port) {
      Options o;
      o.role = role;
      o.root_uri = "127.0.0.1";
      o.root_port = port;
      o.num_servers = 1;
      o.num_workers = 1;
      o.transport = "tcp";
      o.gpu_staging_chunk = chunk;
      o.device_backend = be;
      return o;
    };
    Options so = base(Role::kScheduler, 0);
    so.port_fd = fds[1];
    MESHPOST_ASSIGN_OR_RETURN(scheduler, Postoffice::Create(so));
    Status s1, s2, s3;
    std::thread st([&] { s1 = scheduler->Start(); });
    char buf[32] = {};
    ssize_t got = read(fds[0], buf, sizeof(buf) - 1);
    close(fds[0]);
    const int port = got > 0 ? std::atoi(buf) : 0;
    auto srv = Postoffice::Create(base(Role::kServer, port));
    auto wrk = Postoffice::Create(base(Role::kWorker, port));
    if (!srv.ok() || !wrk.ok()) {
      st.join();
      return srv.ok() ? wrk.status() : srv.status();
    }
    server = std::move(srv).value();
    worker = std::move(wrk).value();
    std::thread a([&] { s2 = server->Start(); });
    std::thread b([&] { s3 = worker->Start(); });
    a.join();
    b.join();
    st.join();
    MESHPOST_RETURN_IF_ERROR(s1);
    MESHPOST_RETURN_IF_ERROR(s2);
    return s3;
  }

  void Stop() {
    std::thread a([&] { (void)worker->Stop(10000); });
    std::thread b([&] { (void)server->Stop(10000); });
    a.join();
    b.join();
    (void)scheduler->Stop(10000);
  }
};

}  // namespace

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 32;
  const int64_t copy_ps = argc > 2 ? std::atoll(argv[2]) : 300;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 7;
  const size_t bytes = mib << 20;
  const int64_t elems = static_cast<int64_t>(bytes / sizeof(float));
  FakeBackend be;
  const std::vector<int64_t> chunks = {int64_t{4} << 20, int64_t{1} << 30};
  std::vector<Cluster> clusters(chunks.size());
  for (size_t c = 0; c < chunks.size(); ++c) {
    Status s = clusters[c].Start(&be, chunks[c]);
    if (!s.ok()) {
      std::fprintf(stderr, "gpu_stream_bench: %s\n", s.ToString().c_str());
      return 1;
    }
  }
  auto view = [elems](void* p) {
    return TensorView{p, DType::kFloat32, {elems}, Device{DeviceType::kCUDA, 0}, nullptr};
  };
  void* push = *be.AllocDevice(0, bytes);
  void* pull = *be.AllocDevice(0, bytes);
  void* answer = *be.AllocDevice(0, bytes);
  be.SetCopyCost(copy_ps);
  std::vector<std::vector<double>> ms(chunks.size());
  for (int r = 0; r < reps + 1; ++r) {  // round 0 warms the pinned pools up
    for (size_t c = 0; c < chunks.size(); ++c) {
      Cluster& cl = clusters[c];
      const uint64_t t0 = GetNanosecond();
      auto h = cl.worker->worker()->ZBatchPushPull({{7, view(push)}}, {{9, view(pull)}});
      auto batch = h.ok() ? cl.server->server()->GetBatch(60000) : h.status();
      Status s = batch.ok() ? cl.server->server()->Respond((*batch)[0].handle, {view(answer)})
                            : batch.status();
      if (s.ok()) s = cl.worker->worker()->Wait(*h, 60000);
      if (!s.ok()) {
        std::fprintf(stderr, "gpu_stream_bench: %s\n", s.ToString().c_str());
        return 1;
      }
      if (r > 0) ms[c].push_back((GetNanosecond() - t0) / 1e6);
    }
  }
  be.SetCopyCost(0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    std::sort(ms[c].begin(), ms[c].end());
    std::printf(
        "{\"bytes\": %zu, \"chunk_bytes\": %lld, \"streams\": %s, \"median_ms\": %.2f, "
        "\"copy_ms_each\": %.2f}\n",
        bytes, static_cast<long long>(chunks[c]),
        chunks[c] < static_cast<int64_t>(bytes) ? "true" : "false", ms[c][ms[c].size() / 2],
        bytes * copy_ps / 1e9);
  }
  for (auto& cl : clusters) cl.Stop();
  be.FreeDevice(push);
  be.FreeDevice(pull);
  be.FreeDevice(answer);
  return 0;
}
