// Overlap of the chunked staging pipeline (tensor/device_staging.h), measured on the fake
// device backend: copies cost `copy_ps` picoseconds per byte (a copy engine of 1e12 /
// copy_ps bytes/s) and the consumer of each chunk — standing in for a transport sending
// it — costs `send_ps` per byte. With one chunk (no pipelining) the batch takes
// copy + send; with chunks of C bytes, about max(copy, send) + one chunk of the other.
// Runs every chunk size interleaved, `reps` times, and prints the median per size as
// JSON lines. Usage: meshpost_gpu_staging_bench [MiB=32] [copy_ps=2000] [send_ps=2000] [reps=5]
// (the defaults model 0.5 GB/s both ways, slow enough that the fake backend's own
// bookkeeping and memmove stay small against the modelled costs)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "tensor/backend/fake_backend.h"
#include "tensor/device_staging.h"

using namespace meshpost;

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 32;
  const int64_t copy_ps = argc > 2 ? std::atoll(argv[2]) : 2000;
  const int64_t send_ps = argc > 3 ? std::atoll(argv[3]) : 2000;
  const int reps = argc > 4 ? std::atoi(argv[4]) : 5;
  const size_t total = mib << 20;
  FakeBackend be;
  be.SetCopyCost(copy_ps);
  auto src = be.AllocDevice(0, total);
  if (!src.ok()) {
    std::fprintf(stderr, "gpu_staging_bench: %s\n", src.status().ToString().c_str());
    return 1;
  }
  const std::vector<size_t> chunks = {total, 16 << 20, 4 << 20, 2 << 20, 1 << 20};
  std::vector<std::unique_ptr<DeviceStager>> stagers;
  for (size_t c : chunks) {
    auto st = DeviceStager::Create(&be, StagerOptions::Chunked(c));
    if (!st.ok()) {
      std::fprintf(stderr, "gpu_staging_bench: %s\n", st.status().ToString().c_str());
      return 1;
    }
    stagers.push_back(std::move(st).value());
  }
  std::vector<std::vector<double>> ms(chunks.size());
  for (int r = 0; r < reps; ++r) {
    for (size_t i = 0; i < chunks.size(); ++i) {
      DeviceStager* st = stagers[i].get();
      auto buf = st->Acquire(total);
      if (!buf.ok()) return 1;
      std::promise<Status> done;
      const uint64_t t0 = GetNanosecond();
      size_t sent = 0;
      Status q = st->Submit(
          {{buf->data, *src, total}}, nullptr, [&done](const Status& s) { done.set_value(s); },
          [&](size_t, size_t bytes_done) {
            // "Send" the bytes this chunk completed.
            const int64_t ns = static_cast<int64_t>(bytes_done - sent) * send_ps / 1000;
            std::this_thread::sleep_for(std::chrono::nanoseconds(ns));
            sent = bytes_done;
          });
      if (!q.ok() || !done.get_future().get().ok()) return 1;
      ms[i].push_back((GetNanosecond() - t0) / 1e6);
    }
  }
  const double copy_ms = total * copy_ps / 1e9, send_ms = total * send_ps / 1e9;
  for (size_t i = 0; i < chunks.size(); ++i) {
    std::sort(ms[i].begin(), ms[i].end());
    std::printf(
        "{\"bytes\": %zu, \"chunk_bytes\": %zu, \"median_ms\": %.2f, "
        "\"copy_ms\": %.2f, \"send_ms\": %.2f, \"serial_ms\": %.2f}\n",
        total, chunks[i], ms[i][ms[i].size() / 2], copy_ms, send_ms, copy_ms + send_ms);
  }
  be.FreeDevice(*src);
  return 0;
}
