// The thin verbs interface the RDMA van is written against (van/rdma internal).
// Every verbs object is an RAII C++ object whose destructor releases it; every call that
// can fail returns Status/Result. CreateIbverbsApi() is the libibverbs implementation;
// tests substitute a scripted fake. No ibverbs types appear here on purpose.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/result.h"

namespace meshpost {
namespace rdma {

// Work-completion status values. They equal enum ibv_wc_status (checked by static_assert
// in verbs_ibv.cc) so fakes can produce exactly what a NIC reports.
constexpr int kWcSuccess = 0;
constexpr int kWcLocLenErr = 1;
constexpr int kWcLocQpOpErr = 2;
constexpr int kWcLocProtErr = 4;
constexpr int kWcWrFlushErr = 5;
constexpr int kWcBadRespErr = 7;
constexpr int kWcLocAccessErr = 8;
constexpr int kWcRemInvReqErr = 9;
constexpr int kWcRemAccessErr = 10;
constexpr int kWcRemOpErr = 11;
constexpr int kWcRetryExcErr = 12;
constexpr int kWcRnrRetryExcErr = 13;
constexpr int kWcGeneralErr = 21;

// ibv_wc_status_str(status): the string users search for ("transport retry counter exceeded").
std::string WcStatusString(int status);

enum class WcOpcode { kRdmaWrite, kRecvWithImm, kOther };

struct Completion {
  uint64_t wr_id = 0;
  int status = kWcSuccess;
  WcOpcode opcode = WcOpcode::kOther;  // meaningful only when status == kWcSuccess
  bool has_imm = false;
  uint32_t imm = 0;  // host byte order
  uint32_t byte_len = 0;
  uint32_t vendor_err = 0;
};

enum class LinkLayer { kUnknown, kInfiniBand, kEthernet };
const char* LinkLayerName(LinkLayer l);

struct DeviceAttr {
  std::string name;
  uint64_t node_guid = 0;
  int phys_port_cnt = 0;
  int max_qp_wr = 0;
  int max_sge = 0;
  int max_cqe = 0;
};

struct PortAttr {
  bool active = false;
  std::string state;  // "ACTIVE", "DOWN", ...
  uint16_t lid = 0;
  uint32_t active_mtu_bytes = 0;  // 256..4096
  LinkLayer link_layer = LinkLayer::kUnknown;
  int gid_tbl_len = 0;
};

using Gid = std::array<uint8_t, 16>;
std::string GidToString(const Gid& gid);
bool GidIsZero(const Gid& gid);

enum class GidType { kIbRoceV1, kRoceV2, kUnknown };

struct GidEntry {
  Gid gid{};
  GidType type = GidType::kUnknown;
  std::string netdev;  // the Ethernet interface behind a RoCE GID, if known
};

// Access bits for memory registration (subset of ibv_access_flags).
constexpr uint32_t kAccessLocalWrite = 1;
constexpr uint32_t kAccessRemoteWrite = 2;

struct MrInfo {
  uint64_t addr = 0;
  uint64_t length = 0;
  uint32_t lkey = 0;
  uint32_t rkey = 0;
  uint32_t access = 0;
};

class VerbsMr {
 public:
  virtual ~VerbsMr() = default;  // deregisters
  virtual const MrInfo& info() const = 0;
};

class VerbsCq {
 public:
  virtual ~VerbsCq() = default;
  // Appends up to max completions to out; returns how many were appended.
  virtual Result<int> Poll(int max, std::vector<Completion>* out) = 0;
  // Arms the completion channel: the next completion wakes WaitNotify. Poll again after
  // arming, since a completion that arrived before it does not notify.
  virtual Status RequestNotify() = 0;
  // Blocks up to timeout_ms for a notification; returns false on timeout.
  virtual Result<bool> WaitNotify(int timeout_ms) = 0;
};

struct QpCaps {
  uint32_t max_send_wr = 256;
  uint32_t max_recv_wr = 256;
  uint32_t max_inline_data = 256;  // requested; the QP reports what it really granted
};

// What the local QP needs to know about the remote one to reach RTR.
struct QpPeer {
  uint32_t qpn = 0;
  uint32_t psn = 0;
  uint16_t lid = 0;
  Gid gid{};
  bool use_grh = false;       // RoCE, or IB across subnets
  uint32_t mtu_bytes = 1024;  // path MTU (min of both ports)
  uint8_t port = 1;           // local port
  int sgid_index = 0;         // local GID index
};

struct WriteRequest {
  uint64_t wr_id = 0;
  bool with_imm = false;
  uint32_t imm = 0;  // host byte order; the implementation converts
  bool signaled = false;
  bool inline_data = false;
  const void* local_addr = nullptr;
  uint32_t length = 0;
  uint32_t lkey = 0;  // ignored for inline data
  uint64_t remote_addr = 0;
  uint32_t rkey = 0;
};

class VerbsQp {
 public:
  virtual ~VerbsQp() = default;  // destroys the QP
  virtual uint32_t qp_num() const = 0;
  virtual uint32_t max_inline_data() const = 0;  // granted by the device at creation
  virtual Status ToInit(uint8_t port) = 0;
  virtual Status ToRtr(const QpPeer& peer) = 0;
  virtual Status ToRts(uint32_t psn) = 0;
  virtual Status PostWrite(const WriteRequest& wr) = 0;
  virtual Status PostRecv(uint64_t wr_id) = 0;  // zero-length receive for WRITE_WITH_IMM
};

// An opened device with its protection domain.
class VerbsDevice {
 public:
  virtual ~VerbsDevice() = default;
  virtual const std::string& name() const = 0;
  virtual Result<DeviceAttr> QueryDevice() = 0;
  virtual Result<PortAttr> QueryPort(uint8_t port) = 0;
  virtual Result<GidEntry> QueryGid(uint8_t port, int index) = 0;
  virtual Result<std::unique_ptr<VerbsMr>> RegisterMemory(void* addr, size_t length,
                                                          uint32_t access) = 0;
  // GPUDirect through a dma-buf (ibv_reg_dmabuf_mr): registers `length` bytes starting
  // `offset` bytes into the dma-buf `fd`, addressed by peers and work requests as `iova`
  // (the device pointer). The caller keeps ownership of fd (closing it after registration
  // is fine: the registration holds its own reference). Unimplemented when the verbs
  // library or the device has no dma-buf support.
  virtual Result<std::unique_ptr<VerbsMr>> RegisterDmabuf(int fd, uint64_t offset, size_t length,
                                                          uint64_t iova, uint32_t access) {
    return UnimplementedError("ibv_reg_dmabuf_mr(" + name() + "): not supported by this device");
  }
  virtual Result<std::unique_ptr<VerbsCq>> CreateCq(int depth) = 0;
  virtual Result<std::unique_ptr<VerbsQp>> CreateQp(VerbsCq* cq, const QpCaps& caps) = 0;
};

class VerbsApi {
 public:
  virtual ~VerbsApi() = default;
  // Names of the RDMA devices present (empty when there are none).
  virtual Result<std::vector<std::string>> ListDevices() = 0;
  virtual Result<std::unique_ptr<VerbsDevice>> OpenDevice(const std::string& name) = 0;
  // The RDMA device behind a network interface (DMLC_INTERFACE), e.g. "eth2" -> "mlx5_1".
  virtual Result<std::string> DeviceForInterface(const std::string& netdev) = 0;
};

std::unique_ptr<VerbsApi> CreateIbverbsApi();

}  // namespace rdma
}  // namespace meshpost
