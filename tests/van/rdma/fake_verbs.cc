#include "fake_verbs.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace meshpost {
namespace rdma {
namespace testing {

class FakeCq : public VerbsCq {
 public:
  explicit FakeCq(FakeFabric* f) : f_(f) {}
  std::deque<Completion> queue;  // guarded by f_->mu
  Result<int> Poll(int max, std::vector<Completion>* out) override {
    std::lock_guard<std::mutex> lock(f_->mu);
    int n = 0;
    while (n < max && !queue.empty()) {
      out->push_back(queue.front());
      queue.pop_front();
      ++n;
    }
    return n;
  }
  Status RequestNotify() override { return OkStatus(); }
  Result<bool> WaitNotify(int timeout_ms) override {
    std::unique_lock<std::mutex> lock(f_->mu);
    return f_->cv.wait_for(lock, std::chrono::milliseconds(timeout_ms),
                           [this] { return !queue.empty(); });
  }

 private:
  FakeFabric* f_;
};

class FakeQp : public VerbsQp {
 public:
  FakeQp(FakeFabric* f, FakeCq* cq, uint32_t qpn, uint32_t max_inline)
      : f_(f), cq_(cq), qpn_(qpn), max_inline_(max_inline) {
    f_->qps[qpn_] = this;  // the creator holds f_->mu
  }
  ~FakeQp() override {
    std::lock_guard<std::mutex> lock(f_->mu);
    f_->qps.erase(qpn_);
  }
  uint32_t qp_num() const override { return qpn_; }
  uint32_t max_inline_data() const override { return max_inline_; }
  Status ToInit(uint8_t) override {
    std::lock_guard<std::mutex> lock(f_->mu);
    state_ = 1;
    return OkStatus();
  }
  Status ToRtr(const QpPeer& peer) override {
    std::lock_guard<std::mutex> lock(f_->mu);
    if (state_ != 1) return InvalidArgumentError("fake: RTR from a non-INIT QP");
    peer_qpn_ = peer.qpn;
    state_ = 2;
    return OkStatus();
  }
  Status ToRts(uint32_t) override {
    std::lock_guard<std::mutex> lock(f_->mu);
    if (state_ != 2) return InvalidArgumentError("fake: RTS from a non-RTR QP");
    state_ = 3;
    return OkStatus();
  }
  Status PostRecv(uint64_t wr_id) override {
    std::lock_guard<std::mutex> lock(f_->mu);
    if (state_ == 4) {
      f_->Complete(cq_, Completion{wr_id, kWcWrFlushErr});
      return OkStatus();
    }
    recvs_.push_back(wr_id);
    return OkStatus();
  }
  Status PostWrite(const WriteRequest& wr) override {
    std::lock_guard<std::mutex> lock(f_->mu);
    if (state_ < 3) return InvalidArgumentError("fake: post_send on a QP that is not RTS");
    if (wr.inline_data && wr.length > max_inline_) {
      ++f_->inline_violations_;
      return InvalidArgumentError("fake: inline " + std::to_string(wr.length) + " > " +
                                  std::to_string(max_inline_));
    }
    f_->writes_.push_back({qpn_, wr});
    if (state_ == 4) {
      f_->Complete(cq_, Completion{wr.wr_id, kWcWrFlushErr});
      return OkStatus();
    }
    int status = kWcSuccess;
    if (!f_->injected_.empty()) {
      status = f_->injected_.front();
      f_->injected_.erase(f_->injected_.begin());
    }
    const uint64_t local = reinterpret_cast<uint64_t>(wr.local_addr);
    if (status == kWcSuccess && !wr.inline_data && wr.length > 0) {
      auto it = f_->mrs.find(wr.lkey);
      if (it == f_->mrs.end() || !it->second.alive || local < it->second.addr ||
          local + wr.length > it->second.addr + it->second.len) {
        status = kWcLocProtErr;
      }
    }
    FakeQp* peer = nullptr;
    if (status == kWcSuccess) {
      auto it = f_->qps.find(peer_qpn_);
      if (it == f_->qps.end() || it->second->state_ == 4) {
        status = kWcRetryExcErr;
      } else {
        peer = it->second;
      }
    }
    if (status == kWcSuccess && wr.length > 0) {
      auto it = f_->mrs.find(wr.rkey);
      if (it == f_->mrs.end() || !it->second.alive || !(it->second.access & kAccessRemoteWrite) ||
          wr.remote_addr < it->second.addr ||
          wr.remote_addr + wr.length > it->second.addr + it->second.len) {
        status = kWcRemAccessErr;
      }
    }
    if (status == kWcSuccess && wr.with_imm && peer->recvs_.empty()) status = kWcRnrRetryExcErr;
    if (status != kWcSuccess) {
      Completion c{wr.wr_id, status};
      c.vendor_err = 0x81;
      f_->Complete(cq_, c);
      GoToError();
      return OkStatus();
    }
    if (wr.length > 0) {
      std::memcpy(reinterpret_cast<void*>(wr.remote_addr), wr.local_addr, wr.length);
    }
    if (wr.with_imm) {
      Completion rc{peer->recvs_.front(), kWcSuccess};
      peer->recvs_.pop_front();
      rc.opcode = WcOpcode::kRecvWithImm;
      rc.has_imm = true;
      rc.imm = wr.imm;
      rc.byte_len = wr.length;
      f_->Complete(peer->cq_, rc);
    }
    if (wr.signaled) {
      Completion sc{wr.wr_id, kWcSuccess};
      sc.opcode = WcOpcode::kRdmaWrite;
      f_->Complete(cq_, sc);
    }
    return OkStatus();
  }
  void GoToError() {  // requires f_->mu
    state_ = 4;
    for (uint64_t id : recvs_) f_->Complete(cq_, Completion{id, kWcWrFlushErr});
    recvs_.clear();
  }

 private:
  FakeFabric* f_;
  FakeCq* cq_;
  uint32_t qpn_;
  uint32_t max_inline_;
  uint32_t peer_qpn_ = 0;
  int state_ = 0;  // 0 reset, 1 init, 2 rtr, 3 rts, 4 error
  std::deque<uint64_t> recvs_;
};

class FakeMr : public VerbsMr {
 public:
  FakeMr(FakeFabric* f, MrInfo info) : f_(f), info_(info) {}
  ~FakeMr() override {
    std::lock_guard<std::mutex> lock(f_->mu);
    f_->mrs[info_.rkey].alive = false;
    ++f_->deregistrations_;
  }
  const MrInfo& info() const override { return info_; }

 private:
  FakeFabric* f_;
  MrInfo info_;
};

class FakeDevice : public VerbsDevice {
 public:
  FakeDevice(FakeFabric* f, FakeDeviceSpec spec) : f_(f), spec_(std::move(spec)) {}
  const std::string& name() const override { return spec_.name; }
  Result<DeviceAttr> QueryDevice() override {
    DeviceAttr a;
    a.name = spec_.name;
    a.node_guid = 0x1234;
    a.phys_port_cnt = spec_.ports;
    a.max_qp_wr = 16384;
    a.max_sge = 30;
    a.max_cqe = 4096;
    return a;
  }
  Result<PortAttr> QueryPort(uint8_t port) override {
    if (port < 1 || port > spec_.ports) return InvalidArgumentError("fake: no such port");
    PortAttr p;
    p.active = spec_.port_active;
    p.state = spec_.port_active ? "PORT_ACTIVE" : "PORT_DOWN";
    p.lid = spec_.lid;
    p.active_mtu_bytes = spec_.mtu;
    p.link_layer = spec_.link_layer;
    p.gid_tbl_len = static_cast<int>(spec_.gids.size());
    return p;
  }
  Result<GidEntry> QueryGid(uint8_t, int index) override {
    if (index < 0 || index >= static_cast<int>(spec_.gids.size())) {
      return InvalidArgumentError("fake: no such GID index");
    }
    return spec_.gids[index];
  }
  Result<std::unique_ptr<VerbsMr>> RegisterMemory(void* addr, size_t length,
                                                  uint32_t access) override {
    std::lock_guard<std::mutex> lock(f_->mu);
    if (f_->fail_registrations_ > 0) {
      --f_->fail_registrations_;
      return ResourceExhaustedError("fake: ibv_reg_mr: Cannot allocate memory");
    }
    ++f_->registrations_;
    MrInfo info;
    info.addr = reinterpret_cast<uint64_t>(addr);
    info.length = length;
    info.lkey = info.rkey = f_->next_key++;
    info.access = access;
    f_->mrs[info.rkey] = {info.addr, length, access, true};
    return std::unique_ptr<VerbsMr>(new FakeMr(f_, info));
  }
  Result<std::unique_ptr<VerbsCq>> CreateCq(int) override {
    return std::unique_ptr<VerbsCq>(new FakeCq(f_));
  }
  Result<std::unique_ptr<VerbsQp>> CreateQp(VerbsCq* cq, const QpCaps& caps) override {
    std::lock_guard<std::mutex> lock(f_->mu);
    return std::unique_ptr<VerbsQp>(new FakeQp(f_, static_cast<FakeCq*>(cq), f_->next_qpn++,
                                               std::min(caps.max_inline_data, spec_.max_inline)));
  }

 private:
  FakeFabric* f_;
  FakeDeviceSpec spec_;
};

class FakeApi : public VerbsApi {
 public:
  FakeApi(FakeFabric* f, int host) : f_(f), host_(host) {}
  Result<std::vector<std::string>> ListDevices() override {
    std::lock_guard<std::mutex> lock(f_->mu);
    std::vector<std::string> names;
    for (const auto& d : f_->hosts_[host_]) names.push_back(d.name);
    return names;
  }
  Result<std::unique_ptr<VerbsDevice>> OpenDevice(const std::string& name) override {
    std::lock_guard<std::mutex> lock(f_->mu);
    for (const auto& d : f_->hosts_[host_]) {
      if (d.name == name) return std::unique_ptr<VerbsDevice>(new FakeDevice(f_, d));
    }
    return NotFoundError("fake: no device " + name);
  }
  Result<std::string> DeviceForInterface(const std::string& netdev) override {
    std::lock_guard<std::mutex> lock(f_->mu);
    for (const auto& d : f_->hosts_[host_]) {
      if (d.netdev == netdev) return d.name;
    }
    return NotFoundError("fake: interface " + netdev + " has no RDMA device");
  }

 private:
  FakeFabric* f_;
  int host_;
};

int FakeFabric::AddHost(std::vector<FakeDeviceSpec> devices) {
  std::lock_guard<std::mutex> lock(mu);
  hosts_.push_back(std::move(devices));
  return static_cast<int>(hosts_.size()) - 1;
}

std::unique_ptr<VerbsApi> FakeFabric::Api(int host) {
  return std::make_unique<FakeApi>(this, host);
}

void FakeFabric::Complete(FakeCq* cq, const Completion& c) {
  if (hold_) {
    held_.emplace_back(cq, c);
  } else {
    cq->queue.push_back(c);
    cv.notify_all();
  }
}

void FakeFabric::Release() {
  std::lock_guard<std::mutex> lock(mu);
  hold_ = false;
  for (auto& [cq, c] : held_) cq->queue.push_back(c);
  held_.clear();
  cv.notify_all();
}

void FakeFabric::KillQp(uint32_t qpn) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = qps.find(qpn);
  if (it != qps.end()) it->second->GoToError();
}

}  // namespace testing
}  // namespace rdma
}  // namespace meshpost
