// Data-path cost of trace capture: nanoseconds per TraceRecorder::Record() while the writer
// thread drains to a real file, the number that decides MESHPOST_TRACE=all overhead (a
// worker records one record per server per round trip plus one wake-up; a server one per
// request). Prints one JSON line. Usage: meshpost_trace_bench [records] [dir]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/clock.h"
#include "ps/trace_recorder.h"

int main(int argc, char** argv) {
  const long total = argc > 1 ? std::atol(argv[1]) : 2000000;
  const std::string dir = argc > 2 ? argv[2] : "/tmp/meshpost-trace-bench";
  meshpost::TraceOptions o;
  o.mode = meshpost::TraceOptions::Mode::kAll;
  o.dir = dir;
  o.max_files = 2;
  auto rec = meshpost::TraceRecorder::Create(o, meshpost::TraceFileInfo{1, 0, 1, 2}, nullptr, {});
  if (!rec.ok()) {
    std::fprintf(stderr, "meshpost_trace_bench: %s\n", rec.status().ToString().c_str());
    return 1;
  }
  // Batches of 1000 calls, then 1 ms of spinning: 1 M records/s, ten times what a 2x2 AFD
  // cluster at 36 us per round trip records, so the writer keeps up as in real use.
  std::vector<double> per_call;
  meshpost::TraceRecord r;
  long done = 0;
  while (done < total) {
    const uint64_t t0 = meshpost::GetNanosecond();
    for (int i = 0; i < 1000; ++i) {
      r.handle = static_cast<uint64_t>(done + i);
      r.stamps[0] = t0;
      r.tids[0] = meshpost::TraceThreadId();  // as the data path stamps it
      (*rec)->Record(r);
    }
    const uint64_t t1 = meshpost::GetNanosecond();
    per_call.push_back((t1 - t0) / 1000.0);
    done += 1000;
    const uint64_t until = meshpost::GetNanosecond() + 1000000;  // 1 ms
    while (meshpost::GetNanosecond() < until) {
    }
  }
  std::sort(per_call.begin(), per_call.end());
  const uint64_t dropped = (*rec)->dropped();
  rec->reset();
  std::printf(
      "{\"records\": %ld, \"ns_per_record_p50\": %.1f, \"ns_per_record_p99\": %.1f, "
      "\"dropped\": %llu}\n",
      total, per_call[per_call.size() / 2], per_call[per_call.size() * 99 / 100],
      static_cast<unsigned long long>(dropped));
  return 0;
}
