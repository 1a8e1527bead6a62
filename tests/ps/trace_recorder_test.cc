#include "ps/trace_recorder.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include "ps/clock_sync.h"
#include "ps/options.h"

namespace meshpost {
namespace {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/meshpost_trace_test_XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    for (const std::string& f : Files()) unlink((path_ + "/" + f).c_str());
    rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }
  std::vector<std::string> Files() const {
    std::vector<std::string> out;
    DIR* d = opendir(path_.c_str());
    if (d == nullptr) return out;
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] != '.') out.push_back(e->d_name);
    }
    closedir(d);
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  std::string path_;
};

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

uint64_t U64(const std::string& b, size_t off) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(b[off + i]);
  return v;
}
uint32_t U32(const std::string& b, size_t off) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(b[off + i]);
  return v;
}

// Decoded records of one file, after checking its header.
std::vector<TraceRecord> ReadRecords(const std::string& path, uint32_t* rank = nullptr) {
  const std::string b = ReadAll(path);
  EXPECT_GE(b.size(), kTraceHeaderBytes);
  EXPECT_EQ(std::memcmp(b.data(), kTraceFileMagic, 8), 0);
  EXPECT_EQ(U32(b, 8), kTraceFileVersion);
  EXPECT_EQ(U32(b, 12), kTraceHeaderBytes);
  EXPECT_EQ(U32(b, 16), kTraceRecordBytes);
  EXPECT_EQ((b.size() - kTraceHeaderBytes) % kTraceRecordBytes, 0u);
  if (rank) *rank = U32(b, 24);
  std::vector<TraceRecord> out;
  for (size_t off = kTraceHeaderBytes; off + kTraceRecordBytes <= b.size();
       off += kTraceRecordBytes) {
    TraceRecord r;
    r.kind = static_cast<TraceRecordKind>(b[off]);
    r.transport = static_cast<TraceTransport>(b[off + 1]);
    r.peer = static_cast<int32_t>(U32(b, off + 4));
    r.request_id = U64(b, off + 8);
    r.handle = U64(b, off + 16);
    r.push_bytes = U64(b, off + 24);
    r.pull_bytes = U64(b, off + 32);
    for (int k = 0; k < 8; ++k) r.stamps[k] = U64(b, off + 64 + 8 * k);
    for (int k = 0; k < 8; ++k) r.tids[k] = U32(b, off + 128 + 4 * k);
    out.push_back(r);
  }
  return out;
}

TraceOptions AllTo(const std::string& dir) {
  TraceOptions o;
  o.mode = TraceOptions::Mode::kAll;
  o.dir = dir;
  return o;
}

TEST(TraceRingTest, FifoAndBounded) {
  TraceRing ring(5);  // rounded up to 8
  EXPECT_EQ(ring.capacity(), 8u);
  TraceRecord r;
  for (uint64_t i = 0; i < 8; ++i) {
    r.handle = i;
    EXPECT_TRUE(ring.TryPush(r));
  }
  EXPECT_FALSE(ring.TryPush(r)) << "a full ring must refuse, not wait";
  for (uint64_t i = 0; i < 8; ++i) {
    ASSERT_TRUE(ring.TryPop(&r));
    EXPECT_EQ(r.handle, i);
  }
  EXPECT_FALSE(ring.TryPop(&r));
  r.handle = 42;
  EXPECT_TRUE(ring.TryPush(r));  // cells are reused after a pop
  ASSERT_TRUE(ring.TryPop(&r));
  EXPECT_EQ(r.handle, 42u);
}

TEST(TraceRingTest, ManyProducersLoseNothingTheyWereToldWasKept) {
  TraceRing ring(1024);
  constexpr int kProducers = 4;
  constexpr uint64_t kEach = 20000;
  std::atomic<uint64_t> accepted{0};
  std::atomic<bool> producing{true};
  std::vector<std::thread> threads;
  for (int p = 0; p < kProducers; ++p) {
    threads.emplace_back([&, p] {
      TraceRecord r;
      r.peer = p;
      for (uint64_t i = 0; i < kEach; ++i) {
        r.handle = i;
        if (ring.TryPush(r)) accepted.fetch_add(1);
      }
    });
  }
  std::map<int, uint64_t> last;  // per producer, handles must arrive in order
  uint64_t popped = 0;
  std::thread done_watch([&] {
    for (auto& t : threads) t.join();
    producing = false;
  });
  TraceRecord r;
  for (;;) {
    if (ring.TryPop(&r)) {
      auto it = last.find(r.peer);
      if (it != last.end()) {
        EXPECT_GT(r.handle, it->second);
      }
      last[r.peer] = r.handle;
      ++popped;
    } else if (!producing.load()) {
      if (!ring.TryPop(&r)) break;
      last[r.peer] = r.handle;
      ++popped;
    }
  }
  done_watch.join();
  EXPECT_EQ(popped, accepted.load());
  EXPECT_GT(popped, 0u);
}

TEST(TraceThreadIdTest, IsTheCallingThreadsOsId) {
  EXPECT_EQ(TraceThreadId(), static_cast<uint32_t>(syscall(SYS_gettid)));
  EXPECT_EQ(TraceThreadId(), TraceThreadId()) << "cached, stable";
  uint32_t other = 0;
  std::thread t([&other] { other = TraceThreadId(); });
  t.join();
  EXPECT_NE(other, 0u);
  EXPECT_NE(other, TraceThreadId());
  if (getpid() == static_cast<pid_t>(syscall(SYS_gettid))) {
    EXPECT_EQ(TraceThreadId(), static_cast<uint32_t>(getpid()));  // gtest's main thread
  }
}

TEST(TraceOptionsTest, ParsesModes) {
  TraceOptions t;
  ASSERT_TRUE(ParseTraceMode("MESHPOST_TRACE", "sample:10", &t).ok());
  EXPECT_EQ(t.mode, TraceOptions::Mode::kSample);
  EXPECT_EQ(t.sample_every, 10u);
  // About one in ten for any stride of handle ids (StepMesh's ids advance by the number of
  // tensors of a push_pull): strides 1, 2 and 3 over 3000 push_pulls.
  for (uint64_t stride : {1u, 2u, 3u}) {
    int sampled = 0;
    for (uint64_t i = 0; i < 3000; ++i) sampled += t.Sampled(1 + i * stride) ? 1 : 0;
    EXPECT_GT(sampled, 200) << "stride " << stride;
    EXPECT_LT(sampled, 400) << "stride " << stride;
  }
  ASSERT_TRUE(ParseTraceMode("MESHPOST_TRACE", "all", &t).ok());
  EXPECT_TRUE(t.Sampled(21));
  ASSERT_TRUE(ParseTraceMode("MESHPOST_TRACE", "off", &t).ok());
  EXPECT_FALSE(t.enabled());
  EXPECT_FALSE(t.Sampled(1));
  Status bad = ParseTraceMode("MESHPOST_TRACE", "sometimes", &t);
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("sometimes"), std::string::npos) << bad;
  EXPECT_NE(bad.message().find("sample:N"), std::string::npos) << bad;
  ASSERT_TRUE(ParseTraceMode("MESHPOST_TRACE", "alternate:3", &t).ok());
  EXPECT_EQ(t.mode, TraceOptions::Mode::kAlternate);
  for (uint64_t h = 0; h < 12; ++h) EXPECT_EQ(t.Sampled(h), (h / 3) % 2 == 0) << h;
  EXPECT_STREQ(TraceModeName(t.mode), "alternate");
  EXPECT_FALSE(ParseTraceMode("MESHPOST_TRACE", "alternate:0", &t).ok());
  bad = ParseTraceMode("MESHPOST_TRACE", "alternate:x", &t);
  EXPECT_NE(bad.message().find("alternate:N"), std::string::npos) << bad;
  EXPECT_FALSE(ParseTraceMode("MESHPOST_TRACE", "sample:0", &t).ok());
  EXPECT_FALSE(ParseTraceMode("MESHPOST_TRACE", "sample:x", &t).ok());
}

TEST(TraceOptionsTest, FromEnvRequiresADirectory) {
  std::map<std::string, std::string> vars = {
      {"DMLC_ROLE", "worker"},  {"DMLC_PS_ROOT_URI", "127.0.0.1"}, {"DMLC_PS_ROOT_PORT", "9000"},
      {"DMLC_NUM_WORKER", "1"}, {"DMLC_NUM_SERVER", "1"},          {"MESHPOST_TRACE", "all"}};
  auto env = [&vars](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
  auto o = OptionsFromEnv(env);
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("MESHPOST_TRACE_DIR"), std::string::npos) << o.status();
  vars["MESHPOST_TRACE_DIR"] = "/tmp/x";
  vars["MESHPOST_TRACE_FILE_MB"] = "2";
  o = OptionsFromEnv(env);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->trace.dir, "/tmp/x");
  EXPECT_EQ(o->trace.max_file_bytes, 2ull << 20);
  vars["MESHPOST_TRACE_FILE_MB"] = "0";
  o = OptionsFromEnv(env);
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("MESHPOST_TRACE_FILE_MB"), std::string::npos);
}

TEST(TraceRecorderTest, WritesHeaderRecordsAndStats) {
  TempDir dir;
  TraceFileInfo info{1, 3, 2, 2};
  auto rec = TraceRecorder::Create(AllTo(dir.path() + "/sub/dir"), info, nullptr,
                                   [](int peer) { return TraceTransport::kTcp; });
  ASSERT_TRUE(rec.ok()) << rec.status();
  for (uint64_t i = 1; i <= 100; ++i) {
    TraceRecord r;
    r.peer = static_cast<int>(i % 2);
    r.handle = i;
    r.request_id = i << 12;
    r.push_bytes = 4096;
    for (int k = 0; k < 8; ++k) r.stamps[k] = i * 1000 + k;
    for (int k = 0; k < 8; ++k) r.tids[k] = static_cast<uint32_t>(4000000 + 10 * i + k);
    EXPECT_TRUE((*rec)->Record(r));
  }
  ASSERT_TRUE((*rec)->Flush().ok());
  const std::string path = (*rec)->current_path();
  rec->reset();  // closes with a stats record
  uint32_t rank = 0;
  auto records = ReadRecords(path, &rank);
  EXPECT_EQ(rank, 3u);
  ASSERT_EQ(records.size(), 101u);
  for (uint64_t i = 1; i <= 100; ++i) {
    const TraceRecord& r = records[i - 1];
    EXPECT_EQ(r.kind, TraceRecordKind::kWorkerRequest);
    EXPECT_EQ(r.handle, i);
    EXPECT_EQ(r.transport, TraceTransport::kTcp) << "filled by the writer from transport_of";
    EXPECT_EQ(r.stamps[7], i * 1000 + 7);
    for (int k = 0; k < 8; ++k) EXPECT_EQ(r.tids[k], 4000000 + 10 * i + k) << "tid " << k;
  }
  EXPECT_EQ(records.back().kind, TraceRecordKind::kStats);
  EXPECT_EQ(records.back().stamps[1], 0u);    // dropped
  EXPECT_EQ(records.back().stamps[2], 100u);  // written
}

TEST(TraceRecorderTest, RotatesAndKeepsTheNewestFiles) {
  TempDir dir;
  TraceOptions o = AllTo(dir.path());
  o.max_file_bytes = 1 << 20;  // 6551 records per file
  o.max_files = 2;
  o.ring_records = 1 << 15;
  auto rec = TraceRecorder::Create(o, TraceFileInfo{2, 0, 1, 1}, nullptr, {});
  ASSERT_TRUE(rec.ok()) << rec.status();
  uint64_t kept = 0;
  for (uint64_t i = 0; i < 30000; ++i) {
    TraceRecord r;
    r.kind = TraceRecordKind::kServerRequest;
    r.handle = i;
    if ((*rec)->Record(r)) ++kept;
    if (i % 4096 == 0) {
      ASSERT_TRUE((*rec)->Flush().ok());
    }
  }
  rec->reset();
  std::vector<std::string> files = dir.Files();
  ASSERT_EQ(files.size(), 2u) << "only max_files newest files are kept";
  uint64_t last = 0;
  bool first = true;
  for (const std::string& f : files) {
    EXPECT_NE(f.find("server0-p"), std::string::npos) << f;
    const std::string path = dir.path() + "/" + f;
    EXPECT_LE(ReadAll(path).size(), o.max_file_bytes);
    for (const TraceRecord& r : ReadRecords(path)) {
      if (r.kind != TraceRecordKind::kServerRequest) continue;
      if (!first) {
        EXPECT_GT(r.handle, last);
      }
      last = r.handle;
      first = false;
    }
  }
  EXPECT_EQ(last, 29999u) << "the newest record is in the newest file";
  EXPECT_EQ(kept, 30000u);
}

TEST(TraceRecorderTest, FullRingDropsAndCountsWithoutBlocking) {
  TempDir dir;
  TraceOptions o = AllTo(dir.path());
  o.ring_records = 16;
  auto rec = TraceRecorder::Create(o, TraceFileInfo{1, 0, 1, 1}, nullptr, {});
  ASSERT_TRUE(rec.ok()) << rec.status();
  // Far more than the ring holds, faster than a 5 ms drain period: some must be dropped,
  // and each call must return (the test would hang otherwise).
  uint64_t accepted = 0;
  for (int i = 0; i < 100000; ++i) accepted += (*rec)->Record(TraceRecord()) ? 1 : 0;
  EXPECT_GT((*rec)->dropped(), 0u);
  EXPECT_EQ(accepted + (*rec)->dropped(), 100000u);
  ASSERT_TRUE((*rec)->Flush().ok());
  EXPECT_EQ((*rec)->written(), accepted);
}

TEST(TraceRecorderTest, WritesClockEstimates) {
  TempDir dir;
  ClockSync clock;
  ASSERT_TRUE(clock.AddSample(1000, 5000, 1200));  // offset (1000+1200)/2-5000 = -3900
  auto rec = TraceRecorder::Create(AllTo(dir.path()), TraceFileInfo{1, 0, 1, 1}, &clock, {});
  ASSERT_TRUE(rec.ok()) << rec.status();
  TraceRecord r;
  (*rec)->Record(r);
  ASSERT_TRUE((*rec)->Flush().ok());
  const std::string path = (*rec)->current_path();
  rec->reset();
  bool found = false;
  for (const TraceRecord& x : ReadRecords(path)) {
    if (x.kind != TraceRecordKind::kClock) continue;
    found = true;
    EXPECT_EQ(static_cast<int64_t>(x.stamps[1]), -3900);
    EXPECT_EQ(x.stamps[2], 100u);
  }
  EXPECT_TRUE(found);
}

TEST(TraceRecorderTest, UnwritableDirectoryIsAnError) {
  TraceOptions o = AllTo("/proc/self/meshpost-cannot-exist");
  auto rec = TraceRecorder::Create(o, TraceFileInfo{1, 0, 1, 1}, nullptr, {});
  ASSERT_FALSE(rec.ok());
  EXPECT_NE(rec.status().message().find("MESHPOST_TRACE_DIR"), std::string::npos) << rec.status();
}

TEST(ClockSyncTest, KeepsTheTightestRoundTrip) {
  ClockSync c;
  EXPECT_EQ(c.Get().samples, 0u);
  EXPECT_FALSE(c.AddSample(100, 50, 90)) << "t3 before t0 is not a sample";
  // Local clock is 1'000'000 ahead of the scheduler's.
  ASSERT_TRUE(c.AddSample(1000000 + 0, 500, 1000000 + 1000));      // rtt 1000, error 500
  ASSERT_TRUE(c.AddSample(1000000 + 2000, 2060, 1000000 + 2100));  // rtt 100 -> 50 err
  ASSERT_TRUE(c.AddSample(1000000 + 5000, 5500, 1000000 + 6000));  // rtt 1000
  ClockOffset o = c.Get();
  EXPECT_EQ(o.rtt_ns, 100u);
  EXPECT_EQ(o.error_ns, 50u);
  EXPECT_EQ(o.offset_ns, 1000000 + 2050 - 2060);
  EXPECT_LE(std::llabs(o.offset_ns - 1000000), static_cast<long long>(o.error_ns));
  EXPECT_EQ(o.samples, 3u);
  for (int i = 0; i < ClockSync::kWindow; ++i) c.AddSample(10000 + i, 9000, 10400 + i);
  EXPECT_EQ(c.Get().rtt_ns, 400u) << "an old tight sample leaves the window";
}

}  // namespace
}  // namespace meshpost
