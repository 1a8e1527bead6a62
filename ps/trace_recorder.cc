#include "ps/trace_recorder.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "common/clock.h"
#include "common/logging.h"
#include "ps/options.h"

namespace meshpost {
namespace {

constexpr const char* kLog = "ps";
// How often the writer wakes to drain the ring. With the default 65536-record ring this
// absorbs bursts of ~13 M records/s before anything is dropped, and the data path never
// has to signal the writer (a futex wake per record would cost more than the record).
constexpr auto kDrainPeriod = std::chrono::milliseconds(5);

uint64_t RoundUpPow2(uint64_t v) {
  uint64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Little-endian encoders: the file layout is fixed, whatever the host's struct layout.
void PutU8(std::vector<char>* b, uint8_t v) { b->push_back(static_cast<char>(v)); }
void PutU16(std::vector<char>* b, uint16_t v) {
  for (int i = 0; i < 2; ++i) b->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutU32(std::vector<char>* b, uint32_t v) {
  for (int i = 0; i < 4; ++i) b->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutU64(std::vector<char>* b, uint64_t v) {
  for (int i = 0; i < 8; ++i) b->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

Status MakeDirs(const std::string& dir) {
  std::string partial;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = dir.find('/', pos + 1);
    partial = dir.substr(0, pos);
    if (partial.empty()) continue;
    if (mkdir(partial.c_str(), 0777) != 0 && errno != EEXIST) {
      return InvalidArgumentError(
          Errno("MESHPOST_TRACE_DIR='" + dir + "': cannot create '" + partial + "'"));
    }
  }
  struct stat st;
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return InvalidArgumentError("MESHPOST_TRACE_DIR='" + dir + "' is not a directory");
  }
  return OkStatus();
}

}  // namespace

TraceTransport TraceTransportFromName(const std::string& name) {
  if (name.compare(0, 3, "cma") == 0) return TraceTransport::kCma;
  if (name.compare(0, 3, "shm") == 0) return TraceTransport::kShm;
  if (name.compare(0, 3, "tcp") == 0) return TraceTransport::kTcp;
  if (name.compare(0, 4, "rdma") == 0) return TraceTransport::kRdma;
  return TraceTransport::kUnknown;
}

// ---- TraceRing ----

TraceRing::TraceRing(uint32_t capacity) {
  const uint64_t n = RoundUpPow2(capacity < 2 ? 2 : capacity);
  cells_.reset(new Cell[n]);
  for (uint64_t i = 0; i < n; ++i) cells_[i].seq.store(i, std::memory_order_relaxed);
  mask_ = n - 1;
}

bool TraceRing::TryPush(const TraceRecord& r) {
  uint64_t pos = enqueue_.load(std::memory_order_relaxed);
  for (;;) {
    Cell& c = cells_[pos & mask_];
    const uint64_t seq = c.seq.load(std::memory_order_acquire);
    const int64_t diff = static_cast<int64_t>(seq) - static_cast<int64_t>(pos);
    if (diff == 0) {
      if (enqueue_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
        c.record = r;
        c.seq.store(pos + 1, std::memory_order_release);
        return true;
      }
    } else if (diff < 0) {
      return false;  // the consumer has not freed this cell yet: full
    } else {
      pos = enqueue_.load(std::memory_order_relaxed);
    }
  }
}

bool TraceRing::TryPop(TraceRecord* r) {
  const uint64_t pos = dequeue_.load(std::memory_order_relaxed);
  Cell& c = cells_[pos & mask_];
  const uint64_t seq = c.seq.load(std::memory_order_acquire);
  if (static_cast<int64_t>(seq) - static_cast<int64_t>(pos + 1) < 0) return false;  // empty
  *r = c.record;
  dequeue_.store(pos + 1, std::memory_order_relaxed);
  c.seq.store(pos + mask_ + 1, std::memory_order_release);
  return true;
}

// ---- TraceRecorder ----

TraceRecorder::TraceRecorder(const TraceOptions& options, const TraceFileInfo& info,
                             const ClockSync* clock,
                             std::function<TraceTransport(int)> transport_of)
    : options_(options),
      info_(info),
      clock_(clock),
      transport_of_(std::move(transport_of)),
      ring_(options.ring_records) {
  prefix_ = options_.dir + "/" + (info_.role == 1 ? "worker" : "server") +
            std::to_string(info_.rank) + "-p" + std::to_string(getpid());
}

Result<std::unique_ptr<TraceRecorder>> TraceRecorder::Create(
    const TraceOptions& options, const TraceFileInfo& info, const ClockSync* clock,
    std::function<TraceTransport(int)> transport_of) {
  MESHPOST_RETURN_IF_ERROR(ValidateTraceOptions(options));
  if (!options.enabled()) {
    return InvalidArgumentError("TraceRecorder::Create: MESHPOST_TRACE=off; nothing to record");
  }
  if (info.role != 1 && info.role != 2) {
    return InvalidArgumentError("TraceRecorder::Create: role " + std::to_string(info.role) +
                                "; expected 1 (worker) or 2 (server)");
  }
  MESHPOST_RETURN_IF_ERROR(MakeDirs(options.dir));
  std::unique_ptr<TraceRecorder> r(
      new TraceRecorder(options, info, clock, std::move(transport_of)));
  {
    std::lock_guard<std::mutex> lock(r->io_mu_);
    MESHPOST_RETURN_IF_ERROR(r->OpenNext());
  }
  TraceRecorder* raw = r.get();
  r->writer_ = std::thread([raw] { raw->WriterLoop(); });
  MP_LOG_INFO(
      kLog, "tracing ({}{}) to {}", TraceModeName(options.mode),
      options.mode == TraceOptions::Mode::kSample || options.mode == TraceOptions::Mode::kAlternate
          ? ":" + std::to_string(options.sample_every)
          : std::string(),
      r->path_);
  return r;
}

TraceRecorder::~TraceRecorder() {
  {
    std::lock_guard<std::mutex> lock(wake_mu_);
    stop_ = true;
  }
  wake_cv_.notify_all();
  if (writer_.joinable()) writer_.join();
  std::lock_guard<std::mutex> lock(io_mu_);
  while (DrainOnce()) {
  }
  AppendStats();
  if (!buffer_.empty() && status_.ok()) (void)WriteBytes(buffer_.data(), buffer_.size());
  buffer_.clear();
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  if (dropped() > 0) {
    MP_LOG_WARN(kLog,
                "trace: {} records dropped because the ring ({} records) was full; "
                "raise MESHPOST_TRACE_RING or sample (MESHPOST_TRACE=sample:N)",
                dropped(), ring_.capacity());
  }
}

Status TraceRecorder::OpenNext() {
  if (fd_ >= 0) {
    close(fd_);
    fd_ = -1;
  }
  char name[32];
  snprintf(name, sizeof(name), ".%04u.mptrace", seq_);
  path_ = prefix_ + name;
  fd_ = open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) return UnavailableError(Errno("trace: cannot open '" + path_ + "'"));
  files_.push_back(path_);
  while (files_.size() > static_cast<size_t>(options_.max_files)) {
    unlink(files_.front().c_str());
    files_.erase(files_.begin());
  }
  std::vector<char> h;
  h.reserve(kTraceHeaderBytes);
  h.insert(h.end(), kTraceFileMagic, kTraceFileMagic + 8);
  PutU32(&h, kTraceFileVersion);
  PutU32(&h, kTraceHeaderBytes);
  PutU32(&h, kTraceRecordBytes);
  PutU8(&h, info_.role);
  PutU8(&h, static_cast<uint8_t>(options_.mode));
  PutU16(&h, 0);
  PutU32(&h, static_cast<uint32_t>(info_.rank));
  PutU32(&h, static_cast<uint32_t>(info_.num_workers));
  PutU32(&h, static_cast<uint32_t>(info_.num_servers));
  PutU32(&h, static_cast<uint32_t>(getpid()));
  PutU32(&h, options_.sample_every);
  PutU32(&h, seq_);
  PutU64(&h, GetNanosecond());
  timespec wall;
  clock_gettime(CLOCK_REALTIME, &wall);
  PutU64(&h, static_cast<uint64_t>(wall.tv_sec) * 1000000000ull + wall.tv_nsec);
  char host[64] = {0};
  gethostname(host, sizeof(host) - 1);
  h.insert(h.end(), host, host + sizeof(host));
  h.resize(kTraceHeaderBytes, 0);
  ++seq_;
  file_bytes_ = 0;
  MESHPOST_RETURN_IF_ERROR(WriteBytes(h.data(), h.size()));
  // Each file stands alone: it repeats the clock estimate it needs.
  last_clock_samples_ = 0;
  return OkStatus();
}

Status TraceRecorder::WriteBytes(const char* data, size_t n) {
  while (n > 0) {
    const ssize_t w = write(fd_, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return UnavailableError(Errno("trace: writing '" + path_ + "'"));
    }
    data += w;
    n -= static_cast<size_t>(w);
    file_bytes_ += static_cast<uint64_t>(w);
  }
  return OkStatus();
}

void TraceRecorder::AppendRecord(const TraceRecord& in) {
  TraceRecord r = in;
  if (r.transport == TraceTransport::kUnknown && transport_of_ && r.peer >= 0 &&
      (r.kind == TraceRecordKind::kWorkerRequest || r.kind == TraceRecordKind::kServerRequest)) {
    const size_t peer = static_cast<size_t>(r.peer);
    if (peer < 65536) {
      if (transport_cache_.size() <= peer)
        transport_cache_.resize(peer + 1, TraceTransport::kUnknown);
      if (transport_cache_[peer] == TraceTransport::kUnknown)
        transport_cache_[peer] = transport_of_(r.peer);
      r.transport = transport_cache_[peer];
    }
  }
  PutU8(&buffer_, static_cast<uint8_t>(r.kind));
  PutU8(&buffer_, static_cast<uint8_t>(r.transport));
  PutU16(&buffer_, r.num_keys);
  PutU32(&buffer_, static_cast<uint32_t>(r.peer));
  PutU64(&buffer_, r.request_id);
  PutU64(&buffer_, r.handle);
  PutU64(&buffer_, r.push_bytes);
  PutU64(&buffer_, r.pull_bytes);
  for (int i = 0; i < kTraceRecordKeys; ++i) PutU64(&buffer_, static_cast<uint64_t>(r.keys[i]));
  for (int i = 0; i < 8; ++i) PutU64(&buffer_, r.stamps[i]);
  for (int i = 0; i < 8; ++i) PutU32(&buffer_, r.tids[i]);
  // 1 + 1 + 2 + 4 + 4 * 8 + 3 * 8 + 8 * 8 + 8 * 4 = 160 = kTraceRecordBytes
  written_.fetch_add(1, std::memory_order_relaxed);
}

void TraceRecorder::AppendClockIfChanged() {
  if (clock_ == nullptr) return;
  const ClockOffset c = clock_->Get();
  if (c.samples == 0 || c.samples == last_clock_samples_) return;
  last_clock_samples_ = c.samples;
  TraceRecord r;
  r.kind = TraceRecordKind::kClock;
  r.stamps[0] = c.measured_at;
  r.stamps[1] = static_cast<uint64_t>(c.offset_ns);
  r.stamps[2] = c.error_ns;
  r.stamps[3] = c.rtt_ns;
  r.stamps[4] = c.samples;
  AppendRecord(r);
  written_.fetch_sub(1, std::memory_order_relaxed);  // bookkeeping, not a captured request
}

void TraceRecorder::AppendStats() {
  TraceRecord r;
  r.kind = TraceRecordKind::kStats;
  r.stamps[0] = GetNanosecond();
  r.stamps[1] = dropped();
  r.stamps[2] = written();
  AppendRecord(r);
  written_.fetch_sub(1, std::memory_order_relaxed);
}

// Requires io_mu_. Closes the current file with a kStats record and opens the next.
bool TraceRecorder::Rotate() {
  AppendStats();
  Status s = WriteBytes(buffer_.data(), buffer_.size());
  buffer_.clear();
  if (s.ok()) s = OpenNext();
  if (!s.ok()) {
    status_ = s;
    MP_LOG_ERROR(kLog, "{}; trace capture stopped, the data path continues", s.ToString());
    return false;
  }
  AppendClockIfChanged();
  return true;
}

// Requires io_mu_.
bool TraceRecorder::DrainOnce() {
  TraceRecord r;
  if (!status_.ok()) {
    // Writing failed before: keep emptying the ring so producers see room; count as dropped.
    bool any = false;
    while (ring_.TryPop(&r)) {
      dropped_.fetch_add(1, std::memory_order_relaxed);
      any = true;
    }
    return any;
  }
  AppendClockIfChanged();
  size_t n = 0;
  constexpr size_t kBatch = 4096;
  while (n < kBatch && ring_.TryPop(&r)) {
    // Room for this record and the kStats record that closes the file.
    if (file_bytes_ + buffer_.size() + 2 * kTraceRecordBytes > options_.max_file_bytes) {
      if (!Rotate()) return true;
    }
    AppendRecord(r);
    ++n;
  }
  if (buffer_.empty()) return false;
  Status s = WriteBytes(buffer_.data(), buffer_.size());
  buffer_.clear();
  if (!s.ok()) {
    status_ = s;
    MP_LOG_ERROR(kLog, "{}; trace capture stopped, the data path continues", s.ToString());
  }
  return n > 0;
}

void TraceRecorder::WriterLoop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(wake_mu_);
      if (stop_) return;
      wake_cv_.wait_for(lock, kDrainPeriod, [this] { return stop_; });
      if (stop_) return;
    }
    std::lock_guard<std::mutex> lock(io_mu_);
    while (DrainOnce()) {
    }
  }
}

Status TraceRecorder::Flush() {
  std::lock_guard<std::mutex> lock(io_mu_);
  while (DrainOnce()) {
  }
  return status_;
}

std::string TraceRecorder::current_path() const {
  std::lock_guard<std::mutex> lock(io_mu_);
  return path_;
}

Status TraceRecorder::status() const {
  std::lock_guard<std::mutex> lock(io_mu_);
  return status_;
}

std::unique_ptr<TraceRecorder> StartNodeTraceRecorder(
    const Options& options, uint8_t role, const ClockSync* clock,
    std::function<TraceTransport(int peer)> transport_of) {
  if (!options.trace.enabled()) return nullptr;
  TraceFileInfo info;
  info.role = role;
  info.rank = options.Rank();
  info.num_workers = options.num_workers;
  info.num_servers = options.num_servers;
  auto r = TraceRecorder::Create(options.trace, info, clock, std::move(transport_of));
  if (!r.ok()) {
    MP_LOG_ERROR(kLog, "trace capture disabled: {}", r.status().ToString());
    return nullptr;
  }
  return std::move(*r);
}

}  // namespace meshpost
