// A scripted, in-process fake of VerbsApi for unit tests: a FakeFabric joins the fake
// devices of several "hosts"; an RDMA WRITE is a memcpy checked against the target's
// registered rkey ranges, WRITE_WITH_IMM consumes a posted receive on the peer QP, and
// completions appear on the CQs synchronously at post time. Tests inject completion
// errors, shrink the inline limit, make registration fail, and read every posted WR.
// Thread-safe: one fabric-wide mutex guards every fake object, so whole clusters (several
// RdmaVans with their poller threads) can share a fabric; WaitNotify really blocks.
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "van/rdma/verbs_api.h"

namespace meshpost {
namespace rdma {
namespace testing {

struct FakeDeviceSpec {
  std::string name = "mlx5_0";
  std::string netdev = "eth0";
  LinkLayer link_layer = LinkLayer::kEthernet;
  uint16_t lid = 0;
  uint32_t mtu = 4096;
  bool port_active = true;
  int ports = 1;
  uint32_t max_inline = 220;   // what a QP is granted at most
  std::vector<GidEntry> gids;  // index = position
};

struct PostedWrite {
  uint32_t qpn = 0;
  WriteRequest wr;
};

class FakeQp;
class FakeCq;

class FakeFabric {
 public:
  // Adds a host whose VerbsApi lists `devices`; returns the host id.
  int AddHost(std::vector<FakeDeviceSpec> devices);
  std::unique_ptr<VerbsApi> Api(int host);

  // The next `count` write work requests posted anywhere complete with `status`
  // (and put their QP into the error state, as hardware does).
  void FailNextWrites(int status, int count = 1) {
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < count; ++i) injected_.push_back(status);
  }
  // Writes that were injected with FailNextWrites and not yet consumed.
  size_t injected_pending() {
    std::lock_guard<std::mutex> lock(mu);
    return injected_.size();
  }
  // Withhold completions/deliveries: writes are applied but completions queue here
  // until Release() (to observe in-flight state).
  void set_hold(bool hold) {
    std::lock_guard<std::mutex> lock(mu);
    hold_ = hold;
  }
  void Release();
  void set_fail_registrations(int n) {
    std::lock_guard<std::mutex> lock(mu);
    fail_registrations_ = n;
  }

  const std::vector<PostedWrite>& writes() const { return writes_; }
  // A copy of writes(), safe while other threads post.
  std::vector<PostedWrite> WritesSnapshot() {
    std::lock_guard<std::mutex> lock(mu);
    return writes_;
  }
  void clear_writes() { writes_.clear(); }
  int registrations() const { return registrations_; }
  int deregistrations() const { return deregistrations_; }
  int inline_violations() const { return inline_violations_; }
  // Destroys the QP of a host-side peer as if the process died: later writes to it fail
  // with retry-exceeded.
  void KillQp(uint32_t qpn);

  // Internal to the fake; everything below is guarded by mu.
  std::mutex mu;
  std::condition_variable cv;  // notified by Complete (wakes FakeCq::WaitNotify)
  struct Mr {
    uint64_t addr, len;
    uint32_t access;
    bool alive;
  };
  std::map<uint32_t, Mr> mrs;  // by rkey (== lkey)
  std::map<uint32_t, FakeQp*> qps;
  uint32_t next_key = 0x100;
  uint32_t next_qpn = 0x40;
  std::vector<int> injected_;
  bool hold_ = false;
  std::vector<std::pair<FakeCq*, Completion>> held_;
  int fail_registrations_ = 0;
  int registrations_ = 0;
  int deregistrations_ = 0;
  int inline_violations_ = 0;
  std::vector<PostedWrite> writes_;
  std::vector<std::vector<FakeDeviceSpec>> hosts_;
  void Complete(FakeCq* cq, const Completion& c);  // requires mu
};

}  // namespace testing
}  // namespace rdma
}  // namespace meshpost
