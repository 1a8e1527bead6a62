#include "van/device_copy.h"

#include <string>

namespace meshpost {

DeviceCopier::~DeviceCopier() {
  for (auto& [device, lane] : lanes_) {
    if (lane.done != nullptr) backend_->DestroyEvent(lane.done);
    if (lane.stream != 0) backend_->DestroyStream(lane.stream);
  }
}

Status DeviceCopier::Copy(void* dst, const void* src, size_t n, int device) {
  if (n == 0 || dst == src) return OkStatus();
  Lane& lane = lanes_[device];
  if (lane.stream == 0) {
    MESHPOST_ASSIGN_OR_RETURN(lane.stream, backend_->CreateStream(device));
  }
  if (lane.done == nullptr) {
    MESHPOST_ASSIGN_OR_RETURN(lane.done, backend_->CreateEvent(device));
  }
  MESHPOST_RETURN_IF_ERROR(backend_->CopyAsync(dst, src, n, lane.stream));
  lane.queued = true;
  return OkStatus();
}

Status DeviceCopier::Finish() {
  Status first;
  for (auto& [device, lane] : lanes_) {
    if (!lane.queued) continue;
    lane.queued = false;
    Status s = backend_->RecordEvent(lane.done, lane.stream);
    if (s.ok()) s = backend_->SyncEvent(lane.done, kVanDeviceCopyTimeoutMs);
    if (!s.ok() && first.ok()) first = s.Annotate("device copy on cuda:" + std::to_string(device));
  }
  return first;
}

}  // namespace meshpost
