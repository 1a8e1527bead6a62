// Trace capture to disk. Every traced worker and server owns one TraceRecorder that appends
// fixed-size binary records (docs/profiling.md, "File format") to its own files in
// TraceOptions::dir. Record() is called on the data path: it never blocks, allocates or
// makes a system call; it claims a slot in a bounded lock-free ring (TraceRing) or, when
// the ring is full, drops the record and counts it. One background thread drains the ring,
// writes, rotates files at max_file_bytes and keeps the newest max_files files.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/result.h"
#include "ps/clock_sync.h"
#include "ps/trace.h"
#include "ps/trace_options.h"

namespace meshpost {

// Versioned file layout; bump kTraceFileVersion on any change (the reader checks it).
constexpr char kTraceFileMagic[8] = {'M', 'P', 'T', 'R', 'A', 'C', 'E', '\0'};
// Version 2 added the OS thread id of each stamp (records grew from 128 to 160 bytes);
// the Python reader still reads version 1 files.
constexpr uint32_t kTraceFileVersion = 2;
constexpr uint32_t kTraceHeaderBytes = 256;
constexpr uint32_t kTraceRecordBytes = 160;
constexpr int kTraceRecordKeys = 3;

enum class TraceRecordKind : uint8_t {
  kWorkerRequest = 1,  // worker's view of one request to one server: all 8 stamps
  kServerRequest = 2,  // server's view: stamps[2..5] (received .. response posted)
  kWake = 3,           // worker: Wait() returned for `handle`; stamps[0] = when
  kClock = 4,          // stamps: [0] measured_at, [1] offset_ns (int64), [2] error_ns,
                       //         [3] rtt_ns, [4] samples
  kStats = 5,          // stamps: [0] now, [1] records dropped so far, [2] records written
};

// Transport codes in a record (0 = not known).
enum class TraceTransport : uint8_t { kUnknown = 0, kCma = 1, kShm = 2, kTcp = 3, kRdma = 4 };
TraceTransport TraceTransportFromName(const std::string& name);

struct TraceRecord {
  TraceRecordKind kind = TraceRecordKind::kWorkerRequest;
  TraceTransport transport = TraceTransport::kUnknown;
  uint16_t num_keys = 0;  // keys pushed; the first kTraceRecordKeys are kept in keys
  int32_t peer = -1;      // server rank (worker records) or worker rank (server records)
  uint64_t request_id = 0;
  uint64_t handle = 0;  // the recording side's handle
  uint64_t push_bytes = 0;
  uint64_t pull_bytes = 0;
  int64_t keys[kTraceRecordKeys] = {0, 0, 0};
  uint64_t stamps[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  uint32_t tids[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // OS thread that took stamps[k]; 0 = none
};

// Bounded multi-producer queue of TraceRecords (a sequence number per cell: a producer
// claims a cell by CAS on the enqueue position and publishes it by storing the cell's
// sequence with release ordering; the consumer reads cells in order). Capacity is rounded
// up to a power of two. TryPush fails instead of waiting when the ring is full.
class TraceRing {
 public:
  explicit TraceRing(uint32_t capacity);
  bool TryPush(const TraceRecord& r);
  bool TryPop(TraceRecord* r);  // one consumer at a time
  uint32_t capacity() const { return static_cast<uint32_t>(mask_ + 1); }

 private:
  struct alignas(64) Cell {
    std::atomic<uint64_t> seq;
    TraceRecord record;
  };
  std::unique_ptr<Cell[]> cells_;
  uint64_t mask_;
  alignas(64) std::atomic<uint64_t> enqueue_{0};
  alignas(64) std::atomic<uint64_t> dequeue_{0};
};

// Who writes the file; goes into its header.
struct TraceFileInfo {
  uint8_t role = 0;  // 1 worker, 2 server
  int32_t rank = 0;
  int32_t num_workers = 0;
  int32_t num_servers = 0;
};

class TraceRecorder {
 public:
  // Creates DIR if needed and opens the first file. `clock` (may be null) is polled by the
  // writer thread; each change of its estimate is written as a kClock record.
  // `transport_of(peer rank)` (may be empty) fills records whose transport is unknown; it
  // runs on the writer thread, never on the data path.
  static Result<std::unique_ptr<TraceRecorder>> Create(
      const TraceOptions& options, const TraceFileInfo& info, const ClockSync* clock,
      std::function<TraceTransport(int peer)> transport_of);
  ~TraceRecorder();  // drains the ring, writes a final kStats record, closes the file
  TraceRecorder(const TraceRecorder&) = delete;
  TraceRecorder& operator=(const TraceRecorder&) = delete;

  bool Sampled(uint64_t handle) const { return options_.Sampled(handle); }
  // Data path: never blocks. Returns false when the record was dropped (ring full).
  bool Record(const TraceRecord& r) {
    if (ring_.TryPush(r)) return true;
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  // Blocks until everything recorded before the call is written (tests, shutdown).
  Status Flush();

  uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }
  uint64_t written() const { return written_.load(std::memory_order_relaxed); }
  // Path of the file being written now.
  std::string current_path() const;
  // The first write error, if any (writing stops after it; the data path is unaffected).
  Status status() const;

 private:
  TraceRecorder(const TraceOptions& options, const TraceFileInfo& info, const ClockSync* clock,
                std::function<TraceTransport(int)> transport_of);
  Status OpenNext();  // writer thread (or Create)
  Status WriteBytes(const char* data, size_t n);
  void WriterLoop();
  bool DrainOnce();  // true when records were taken from the ring
  bool Rotate();
  void AppendRecord(const TraceRecord& r);
  void AppendClockIfChanged();
  void AppendStats();

  const TraceOptions options_;
  const TraceFileInfo info_;
  const ClockSync* clock_;
  std::function<TraceTransport(int)> transport_of_;
  std::vector<TraceTransport> transport_cache_;
  TraceRing ring_;
  std::atomic<uint64_t> dropped_{0};
  std::atomic<uint64_t> written_{0};

  // File state, guarded by io_mu_: the writer thread and Flush() both drain under it, which
  // also makes them the ring's one consumer at a time.
  mutable std::mutex io_mu_;
  int fd_ = -1;
  uint32_t seq_ = 0;
  uint64_t file_bytes_ = 0;
  std::string path_;
  std::string prefix_;
  std::vector<std::string> files_;  // kept files, oldest first
  std::vector<char> buffer_;
  Status status_;
  uint64_t last_clock_samples_ = 0;

  std::mutex wake_mu_;
  std::condition_variable wake_cv_;
  bool stop_ = false;
  std::thread writer_;
};

struct Options;
// The recorder of a worker (role 1) or server (role 2) started with `options`, or null when
// tracing is off or cannot start; the reason is logged, because capture must never keep the
// data path from running.
std::unique_ptr<TraceRecorder> StartNodeTraceRecorder(
    const Options& options, uint8_t role, const ClockSync* clock,
    std::function<TraceTransport(int peer)> transport_of);

}  // namespace meshpost
