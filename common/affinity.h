// Optional CPU pinning of meshpost's own threads (StepMesh's STEPMESH_BIND_CPU_CORE with
// STEPMESH_CPU_START_OFFSET). Every thread meshpost starts (receive loops, progress and
// heartbeat threads) calls PinCurrentThread() once; they get consecutive cores from the
// start offset. Pinning is a performance hint, never a reason to fail: a core this process
// may not run on gets one warning and no thread is pinned.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>

namespace meshpost {

class CorePinner {
 public:
  CorePinner(bool enabled, int start_core) : enabled_(enabled), next_(start_core) {}

  // Pins the calling thread to the next core; returns it, or -1 when pinning is off or
  // the core is not available (then nothing is pinned from here on).
  int PinCurrentThread(const char* thread_name);
  bool enabled() const { return enabled_; }

 private:
  const bool enabled_;
  std::atomic<int> next_;
  std::atomic<bool> gave_up_{false};
  std::once_flag warned_;
};

// Pins through `pinner` when there is one (vans get a null pinner in tests).
inline void PinCurrentThread(const std::shared_ptr<CorePinner>& pinner, const char* name) {
  if (pinner) pinner->PinCurrentThread(name);
}

}  // namespace meshpost
