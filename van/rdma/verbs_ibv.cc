// libibverbs implementation of VerbsApi. Each class owns exactly one verbs object and
// releases it in its destructor; errno from a failed verbs call becomes a Status that
// names the call and the device.
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <net/if.h>
#include <poll.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/logging.h"
#include "van/rdma/verbs_api.h"

namespace meshpost {
namespace rdma {

static_assert(kWcSuccess == IBV_WC_SUCCESS);
static_assert(kWcLocLenErr == IBV_WC_LOC_LEN_ERR);
static_assert(kWcLocQpOpErr == IBV_WC_LOC_QP_OP_ERR);
static_assert(kWcLocProtErr == IBV_WC_LOC_PROT_ERR);
static_assert(kWcWrFlushErr == IBV_WC_WR_FLUSH_ERR);
static_assert(kWcBadRespErr == IBV_WC_BAD_RESP_ERR);
static_assert(kWcLocAccessErr == IBV_WC_LOC_ACCESS_ERR);
static_assert(kWcRemInvReqErr == IBV_WC_REM_INV_REQ_ERR);
static_assert(kWcRemAccessErr == IBV_WC_REM_ACCESS_ERR);
static_assert(kWcRemOpErr == IBV_WC_REM_OP_ERR);
static_assert(kWcRetryExcErr == IBV_WC_RETRY_EXC_ERR);
static_assert(kWcRnrRetryExcErr == IBV_WC_RNR_RETRY_EXC_ERR);
static_assert(kWcGeneralErr == IBV_WC_GENERAL_ERR);

std::string WcStatusString(int status) {
  return ibv_wc_status_str(static_cast<ibv_wc_status>(status));
}

const char* LinkLayerName(LinkLayer l) {
  switch (l) {
    case LinkLayer::kInfiniBand: return "InfiniBand";
    case LinkLayer::kEthernet: return "Ethernet (RoCE)";
    default: return "unknown";
  }
}

std::string GidToString(const Gid& gid) {
  char buf[INET6_ADDRSTRLEN] = {};
  if (inet_ntop(AF_INET6, gid.data(), buf, sizeof(buf)) == nullptr) return "?";
  return buf;
}

bool GidIsZero(const Gid& gid) {
  for (uint8_t b : gid) {
    if (b != 0) return false;
  }
  return true;
}

namespace {

Status Errno(const std::string& what, int err) {
  const std::string msg = what + ": " + std::strerror(err) + " (errno " + std::to_string(err) + ")";
  if (err == ENOMEM || err == EAGAIN) return ResourceExhaustedError(msg);
  if (err == EINVAL) return InvalidArgumentError(msg);
  return UnavailableError(msg);
}

ibv_mtu MtuEnum(uint32_t bytes) {
  switch (bytes) {
    case 256: return IBV_MTU_256;
    case 512: return IBV_MTU_512;
    case 2048: return IBV_MTU_2048;
    case 4096: return IBV_MTU_4096;
    default: return IBV_MTU_1024;
  }
}

uint32_t MtuBytes(ibv_mtu mtu) {
  switch (mtu) {
    case IBV_MTU_256: return 256;
    case IBV_MTU_512: return 512;
    case IBV_MTU_1024: return 1024;
    case IBV_MTU_2048: return 2048;
    case IBV_MTU_4096: return 4096;
  }
  return 0;
}

class IbvMr : public VerbsMr {
 public:
  IbvMr(ibv_mr* mr, uint32_t access) : mr_(mr) {
    info_.addr = reinterpret_cast<uint64_t>(mr->addr);
    info_.length = mr->length;
    info_.lkey = mr->lkey;
    info_.rkey = mr->rkey;
    info_.access = access;
  }
  ~IbvMr() override {
    if (int rc = ibv_dereg_mr(mr_); rc != 0) {
      MP_LOG_ERROR("van", "ibv_dereg_mr failed: {}", std::strerror(rc));
    }
  }
  const MrInfo& info() const override { return info_; }

 private:
  ibv_mr* mr_;
  MrInfo info_;
};

class IbvCq : public VerbsCq {
 public:
  IbvCq(ibv_cq* cq, ibv_comp_channel* channel) : cq_(cq), channel_(channel) {}
  ~IbvCq() override {
    if (unacked_ > 0) ibv_ack_cq_events(cq_, unacked_);
    ibv_destroy_cq(cq_);
    if (channel_ != nullptr) ibv_destroy_comp_channel(channel_);
  }
  ibv_cq* raw() { return cq_; }

  Status RequestNotify() override {
    if (int rc = ibv_req_notify_cq(cq_, 0); rc != 0) return Errno("ibv_req_notify_cq", rc);
    return OkStatus();
  }

  Result<bool> WaitNotify(int timeout_ms) override {
    pollfd p{channel_->fd, POLLIN, 0};
    const int rc = ::poll(&p, 1, timeout_ms);
    if (rc < 0) return errno == EINTR ? Result<bool>(false) : Result<bool>(Errno("poll", errno));
    if (rc == 0) return false;
    ibv_cq* ev_cq = nullptr;
    void* ctx = nullptr;
    if (ibv_get_cq_event(channel_, &ev_cq, &ctx) != 0) return false;  // non-blocking fd
    // Acknowledging in batches avoids a mutex round trip inside libibverbs per event.
    if (++unacked_ >= 64) {
      ibv_ack_cq_events(cq_, unacked_);
      unacked_ = 0;
    }
    return true;
  }

  Result<int> Poll(int max, std::vector<Completion>* out) override {
    ibv_wc wc[32];
    const int want = max < 32 ? max : 32;
    const int n = ibv_poll_cq(cq_, want, wc);
    if (n < 0) return UnavailableError("ibv_poll_cq failed (" + std::to_string(n) + ")");
    for (int i = 0; i < n; ++i) {
      Completion c;
      c.wr_id = wc[i].wr_id;
      c.status = wc[i].status;
      c.vendor_err = wc[i].vendor_err;
      c.byte_len = wc[i].byte_len;
      if (wc[i].status == IBV_WC_SUCCESS) {
        if (wc[i].opcode == IBV_WC_RDMA_WRITE) {
          c.opcode = WcOpcode::kRdmaWrite;
        } else if (wc[i].opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
          c.opcode = WcOpcode::kRecvWithImm;
        }
        if (wc[i].wc_flags & IBV_WC_WITH_IMM) {
          c.has_imm = true;
          c.imm = ntohl(wc[i].imm_data);
        }
      }
      out->push_back(c);
    }
    return n;
  }

 private:
  ibv_cq* cq_;
  ibv_comp_channel* channel_;
  unsigned int unacked_ = 0;
};

class IbvQp : public VerbsQp {
 public:
  IbvQp(ibv_qp* qp, uint32_t max_inline) : qp_(qp), max_inline_(max_inline) {}
  ~IbvQp() override { ibv_destroy_qp(qp_); }
  uint32_t qp_num() const override { return qp_->qp_num; }
  uint32_t max_inline_data() const override { return max_inline_; }

  Status ToInit(uint8_t port) override {
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_INIT;
    attr.pkey_index = 0;
    attr.port_num = port;
    attr.qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE;
    const int rc = ibv_modify_qp(
        qp_, &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
    if (rc != 0) return Errno("ibv_modify_qp(INIT)", rc);
    return OkStatus();
  }

  Status ToRtr(const QpPeer& peer) override {
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_RTR;
    attr.path_mtu = MtuEnum(peer.mtu_bytes);
    attr.dest_qp_num = peer.qpn;
    attr.rq_psn = peer.psn;
    attr.max_dest_rd_atomic = 1;
    attr.min_rnr_timer = 12;  // 0.64 ms
    attr.ah_attr.dlid = peer.lid;
    attr.ah_attr.sl = 0;
    attr.ah_attr.src_path_bits = 0;
    attr.ah_attr.port_num = peer.port;
    if (peer.use_grh) {
      attr.ah_attr.is_global = 1;
      std::memcpy(attr.ah_attr.grh.dgid.raw, peer.gid.data(), 16);
      attr.ah_attr.grh.sgid_index = static_cast<uint8_t>(peer.sgid_index);
      attr.ah_attr.grh.hop_limit = 64;
      attr.ah_attr.grh.traffic_class = 0;
    }
    const int rc =
        ibv_modify_qp(qp_, &attr,
                      IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                          IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
    if (rc != 0) return Errno("ibv_modify_qp(RTR)", rc);
    return OkStatus();
  }

  Status ToRts(uint32_t psn) override {
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_RTS;
    attr.timeout = 14;  // 4.096 us * 2^14 ~ 67 ms per retry
    attr.retry_cnt = 7;
    attr.rnr_retry = 7;  // infinite RNR retry: receives are re-posted by the poller
    attr.sq_psn = psn;
    attr.max_rd_atomic = 1;
    const int rc = ibv_modify_qp(qp_, &attr,
                                 IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                     IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
    if (rc != 0) return Errno("ibv_modify_qp(RTS)", rc);
    return OkStatus();
  }

  Status PostWrite(const WriteRequest& w) override {
    if (w.inline_data && w.length > max_inline_) {
      // Our own caller must never ask for this; refuse rather than let the driver corrupt.
      return InternalError("inline write of " + std::to_string(w.length) +
                           " bytes exceeds the QP's max_inline_data " +
                           std::to_string(max_inline_));
    }
    ibv_sge sge{};
    sge.addr = reinterpret_cast<uint64_t>(w.local_addr);
    sge.length = w.length;
    sge.lkey = w.inline_data ? 0 : w.lkey;
    ibv_send_wr wr{};
    wr.wr_id = w.wr_id;
    wr.sg_list = w.length > 0 ? &sge : nullptr;
    wr.num_sge = w.length > 0 ? 1 : 0;
    wr.opcode = w.with_imm ? IBV_WR_RDMA_WRITE_WITH_IMM : IBV_WR_RDMA_WRITE;
    if (w.with_imm) wr.imm_data = htonl(w.imm);
    wr.send_flags = (w.signaled ? IBV_SEND_SIGNALED : 0) | (w.inline_data ? IBV_SEND_INLINE : 0);
    wr.wr.rdma.remote_addr = w.remote_addr;
    wr.wr.rdma.rkey = w.rkey;
    ibv_send_wr* bad = nullptr;
    const int rc = ibv_post_send(qp_, &wr, &bad);
    if (rc != 0) return Errno("ibv_post_send", rc);
    return OkStatus();
  }

  Status PostRecv(uint64_t wr_id) override {
    ibv_recv_wr wr{};
    wr.wr_id = wr_id;
    wr.sg_list = nullptr;
    wr.num_sge = 0;
    ibv_recv_wr* bad = nullptr;
    const int rc = ibv_post_recv(qp_, &wr, &bad);
    if (rc != 0) return Errno("ibv_post_recv", rc);
    return OkStatus();
  }

 private:
  ibv_qp* qp_;
  uint32_t max_inline_;
};

class IbvDevice : public VerbsDevice {
 public:
  IbvDevice(std::string name, ibv_context* ctx, ibv_pd* pd)
      : name_(std::move(name)), ctx_(ctx), pd_(pd) {}
  ~IbvDevice() override {
    ibv_dealloc_pd(pd_);
    ibv_close_device(ctx_);
  }
  const std::string& name() const override { return name_; }

  Result<DeviceAttr> QueryDevice() override {
    ibv_device_attr a{};
    if (int rc = ibv_query_device(ctx_, &a); rc != 0) {
      return Errno("ibv_query_device(" + name_ + ")", rc);
    }
    DeviceAttr d;
    d.name = name_;
    d.node_guid = a.node_guid;
    d.phys_port_cnt = a.phys_port_cnt;
    d.max_qp_wr = a.max_qp_wr;
    d.max_sge = a.max_sge;
    d.max_cqe = a.max_cqe;
    return d;
  }

  Result<PortAttr> QueryPort(uint8_t port) override {
    ibv_port_attr a{};
    if (int rc = ibv_query_port(ctx_, port, &a); rc != 0) {
      return Errno("ibv_query_port(" + name_ + ", port " + std::to_string(port) + ")", rc);
    }
    PortAttr p;
    p.active = a.state == IBV_PORT_ACTIVE;
    p.state = ibv_port_state_str(a.state);
    p.lid = a.lid;
    p.active_mtu_bytes = MtuBytes(a.active_mtu);
    p.link_layer = a.link_layer == IBV_LINK_LAYER_ETHERNET     ? LinkLayer::kEthernet
                   : a.link_layer == IBV_LINK_LAYER_INFINIBAND ? LinkLayer::kInfiniBand
                                                               : LinkLayer::kUnknown;
    if (a.link_layer == IBV_LINK_LAYER_UNSPECIFIED) p.link_layer = LinkLayer::kInfiniBand;
    p.gid_tbl_len = a.gid_tbl_len;
    return p;
  }

  Result<GidEntry> QueryGid(uint8_t port, int index) override {
    GidEntry e;
    ibv_gid_entry ex{};
    if (ibv_query_gid_ex(ctx_, port, static_cast<uint32_t>(index), &ex, 0) == 0) {
      std::memcpy(e.gid.data(), ex.gid.raw, 16);
      e.type = ex.gid_type == IBV_GID_TYPE_ROCE_V2 ? GidType::kRoceV2 : GidType::kIbRoceV1;
      char ifname[IF_NAMESIZE] = {};
      if (ex.ndev_ifindex != 0 && if_indextoname(ex.ndev_ifindex, ifname) != nullptr) {
        e.netdev = ifname;
      }
      return e;
    }
    ibv_gid gid{};
    if (int rc = ibv_query_gid(ctx_, port, index, &gid); rc != 0) {
      return Errno("ibv_query_gid(" + name_ + ", port " + std::to_string(port) + ", index " +
                       std::to_string(index) + ")",
                   rc == -1 ? errno : rc);
    }
    std::memcpy(e.gid.data(), gid.raw, 16);
    return e;
  }

  Result<std::unique_ptr<VerbsMr>> RegisterMemory(void* addr, size_t length,
                                                  uint32_t access) override {
    int flags = 0;
    if (access & kAccessLocalWrite) flags |= IBV_ACCESS_LOCAL_WRITE;
    if (access & kAccessRemoteWrite) flags |= IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE;
    ibv_mr* mr = ibv_reg_mr(pd_, addr, length, flags);
    if (mr == nullptr) {
      const int err = errno;
      Status s = Errno("ibv_reg_mr(" + name_ + ", " + std::to_string(length) + " bytes)", err);
      if (err == ENOMEM || err == EPERM) {
        return ResourceExhaustedError(s.message() +
                                      "; check `ulimit -l` (locked memory) — see docs/rdma.md");
      }
      return s;
    }
    return std::unique_ptr<VerbsMr>(new IbvMr(mr, access));
  }

  Result<std::unique_ptr<VerbsMr>> RegisterDmabuf(int fd, uint64_t offset, size_t length,
                                                  uint64_t iova, uint32_t access) override {
    int flags = 0;
    if (access & kAccessLocalWrite) flags |= IBV_ACCESS_LOCAL_WRITE;
    if (access & kAccessRemoteWrite) flags |= IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE;
    ibv_mr* mr = ibv_reg_dmabuf_mr(pd_, offset, length, iova, fd, flags);
    if (mr == nullptr) {
      const int err = errno;
      Status s =
          Errno("ibv_reg_dmabuf_mr(" + name_ + ", " + std::to_string(length) + " bytes)", err);
      // EOPNOTSUPP / EPROTONOSUPPORT: the provider or kernel has no dma-buf MRs.
      if (err == EOPNOTSUPP || err == EPROTONOSUPPORT || err == ENOSYS) {
        return UnimplementedError(s.message() +
                                  " (the RDMA provider or kernel lacks dma-buf "
                                  "memory regions: needs Linux >= 5.12 and rdma-core >= 34)");
      }
      return s;
    }
    // ibv_mr.addr is the iova the peers use.
    return std::unique_ptr<VerbsMr>(new IbvMr(mr, access));
  }

  Result<std::unique_ptr<VerbsCq>> CreateCq(int depth) override {
    ibv_comp_channel* channel = ibv_create_comp_channel(ctx_);
    if (channel == nullptr) return Errno("ibv_create_comp_channel(" + name_ + ")", errno);
    const int flags = fcntl(channel->fd, F_GETFL);
    fcntl(channel->fd, F_SETFL, flags | O_NONBLOCK);
    ibv_cq* cq = ibv_create_cq(ctx_, depth, nullptr, channel, 0);
    if (cq == nullptr) {
      const int err = errno;
      ibv_destroy_comp_channel(channel);
      return Errno("ibv_create_cq(" + name_ + ")", err);
    }
    return std::unique_ptr<VerbsCq>(new IbvCq(cq, channel));
  }

  Result<std::unique_ptr<VerbsQp>> CreateQp(VerbsCq* cq, const QpCaps& caps) override {
    ibv_cq* raw = static_cast<IbvCq*>(cq)->raw();
    // Devices refuse a QP whose inline request exceeds what they support (and do not say
    // what they support), so ask for less until one is created; the granted value is what
    // the van later respects.
    uint32_t want = caps.max_inline_data;
    int last_err = 0;
    for (;;) {
      ibv_qp_init_attr init{};
      init.send_cq = raw;
      init.recv_cq = raw;
      init.qp_type = IBV_QPT_RC;
      init.sq_sig_all = 0;
      init.cap.max_send_wr = caps.max_send_wr;
      init.cap.max_recv_wr = caps.max_recv_wr;
      init.cap.max_send_sge = 1;
      init.cap.max_recv_sge = 1;
      init.cap.max_inline_data = want;
      ibv_qp* qp = ibv_create_qp(pd_, &init);
      if (qp != nullptr) {
        return std::unique_ptr<VerbsQp>(new IbvQp(qp, init.cap.max_inline_data));
      }
      last_err = errno;
      if (want == 0) break;
      want /= 2;
    }
    return Errno("ibv_create_qp(" + name_ + ")", last_err);
  }

 private:
  std::string name_;
  ibv_context* ctx_;
  ibv_pd* pd_;
};

class DeviceList {
 public:
  DeviceList() { list_ = ibv_get_device_list(&n_); }
  ~DeviceList() {
    if (list_ != nullptr) ibv_free_device_list(list_);
  }
  int size() const { return list_ == nullptr ? 0 : n_; }
  ibv_device* at(int i) const { return list_[i]; }

 private:
  ibv_device** list_ = nullptr;
  int n_ = 0;
};

class IbvApi : public VerbsApi {
 public:
  Result<std::vector<std::string>> ListDevices() override {
    DeviceList list;
    std::vector<std::string> names;
    for (int i = 0; i < list.size(); ++i) names.emplace_back(ibv_get_device_name(list.at(i)));
    return names;
  }

  Result<std::unique_ptr<VerbsDevice>> OpenDevice(const std::string& name) override {
    DeviceList list;
    for (int i = 0; i < list.size(); ++i) {
      if (name != ibv_get_device_name(list.at(i))) continue;
      ibv_context* ctx = ibv_open_device(list.at(i));
      if (ctx == nullptr) return Errno("ibv_open_device(" + name + ")", errno);
      ibv_pd* pd = ibv_alloc_pd(ctx);
      if (pd == nullptr) {
        const int err = errno;
        ibv_close_device(ctx);
        return Errno("ibv_alloc_pd(" + name + ")", err);
      }
      return std::unique_ptr<VerbsDevice>(new IbvDevice(name, ctx, pd));
    }
    return NotFoundError("RDMA device '" + name + "' not found (" + std::to_string(list.size()) +
                         " devices present)");
  }

  Result<std::string> DeviceForInterface(const std::string& netdev) override {
    // The kernel links a netdev to its RDMA device in sysfs; bonded interfaces are not
    // linked (their slaves are), which docs/rdma.md explains.
    const std::string dir = "/sys/class/net/" + netdev + "/device/infiniband";
    DIR* d = opendir(dir.c_str());
    if (d == nullptr) {
      return NotFoundError("network interface '" + netdev + "' has no RDMA device (" + dir +
                           " is missing; a bond or a non-RDMA NIC?) — set MESHPOST_RDMA_DEVICE");
    }
    std::string found;
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] == '.') continue;
      found = e->d_name;
      break;
    }
    closedir(d);
    if (found.empty()) return NotFoundError(dir + " is empty");
    return found;
  }
};

}  // namespace

std::unique_ptr<VerbsApi> CreateIbverbsApi() { return std::make_unique<IbvApi>(); }

}  // namespace rdma
}  // namespace meshpost
