// Server-side request bookkeeping, separated from the transport so it can be unit-tested:
// per-worker FIFO queues with a signal mask of which workers have a request pending, and
// the running-offset slicing that RespondVec uses. Not thread-safe; the caller locks.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "common/result.h"

namespace meshpost {

template <typename T>
class RequestQueues {
 public:
  explicit RequestQueues(int num_workers) : queues_(num_workers), mask_(num_workers, 0) {}

  void Push(int worker, T item) {
    queues_[worker].push_back(std::move(item));
    if (!mask_[worker]) {
      mask_[worker] = 1;
      ++ready_;
    }
  }
  // True when every worker has at least one request queued.
  bool BatchReady() const { return ready_ == static_cast<int>(queues_.size()); }
  int ready_workers() const { return ready_; }
  bool HasPending(int worker) const { return mask_[worker] != 0; }
  size_t Depth(int worker) const { return queues_[worker].size(); }
  // Drops the queued requests of `worker` matching `pred`; returns how many.
  template <typename Pred>
  size_t RemoveIf(int worker, Pred pred) {
    auto& q = queues_[worker];
    const size_t before = q.size();
    for (auto it = q.begin(); it != q.end();) it = pred(*it) ? q.erase(it) : it + 1;
    if (q.empty() && mask_[worker]) {
      mask_[worker] = 0;
      --ready_;
    }
    return before - q.size();
  }
  // Drops every request queued for `worker` (its process was replaced).
  void Clear(int worker) {
    queues_[worker].clear();
    if (mask_[worker]) {
      mask_[worker] = 0;
      --ready_;
    }
  }

  // Pops the oldest request of every worker, in worker-rank order. Requires BatchReady().
  std::vector<T> PopBatch() {
    std::vector<T> batch;
    batch.reserve(queues_.size());
    for (size_t w = 0; w < queues_.size(); ++w) {
      batch.push_back(std::move(queues_[w].front()));
      queues_[w].pop_front();
      if (queues_[w].empty()) {
        mask_[w] = 0;
        --ready_;
      }
    }
    return batch;
  }

 private:
  std::vector<std::deque<T>> queues_;
  std::vector<uint8_t> mask_;
  int ready_ = 0;
};

struct RowSlice {
  int64_t begin = 0;  // first row
  int64_t rows = 0;
};

// Row ranges for RespondVec: slice i starts where slice i-1 ended.
inline Result<std::vector<RowSlice>> RunningOffsetSlices(const std::vector<int64_t>& rows,
                                                         int64_t total_rows) {
  std::vector<RowSlice> out;
  out.reserve(rows.size());
  int64_t off = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] < 0) {
      return InvalidArgumentError("RespondVec: tensors_vec[" + std::to_string(i) + "] has " +
                                  std::to_string(rows[i]) + " rows; expected >= 0");
    }
    if (off + rows[i] > total_rows) {
      return InvalidArgumentError("RespondVec: tensors_vec[0.." + std::to_string(i) + "] need " +
                                  std::to_string(off + rows[i]) + " rows but ret_buffer has " +
                                  std::to_string(total_rows) +
                                  "; expected sum of row counts <= ret_buffer.shape[0]");
    }
    out.push_back({off, rows[i]});
    off += rows[i];
  }
  return out;
}

}  // namespace meshpost
