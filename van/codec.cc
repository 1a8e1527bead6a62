#include "van/codec.h"

#include <cstdio>
#include <cstring>

#include "common/wire.h"
#include "tensor/tensor_view.h"
#include "van/van.h"

namespace meshpost {

const char* MemoryKindName(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kHost: return "host";
    case MemoryKind::kSharedHost: return "shared host";
    case MemoryKind::kCudaDevice: return "cuda device";
  }
  return "unknown";
}

bool IsValidCommand(int v) {
  return (v >= static_cast<int>(Command::kRegister) &&
          v <= static_cast<int>(Command::kVanRendezvous)) ||
         (v >= static_cast<int>(Command::kRequest) && v <= static_cast<int>(Command::kStreamAbort));
}

const char* CommandName(Command cmd) {
  switch (cmd) {
    case Command::kRegister: return "REGISTER";
    case Command::kRegisterReply: return "REGISTER_REPLY";
    case Command::kNodeTable: return "NODE_TABLE";
    case Command::kBarrier: return "BARRIER";
    case Command::kBarrierDone: return "BARRIER_DONE";
    case Command::kHeartbeat: return "HEARTBEAT";
    case Command::kHeartbeatAck: return "HEARTBEAT_ACK";
    case Command::kLeave: return "LEAVE";
    case Command::kLeaveAck: return "LEAVE_ACK";
    case Command::kNodeDown: return "NODE_DOWN";
    case Command::kPeerLeave: return "PEER_LEAVE";
    case Command::kVanRendezvous: return "VAN_RENDEZVOUS";
    case Command::kRequest: return "REQUEST";
    case Command::kResponse: return "RESPONSE";
    case Command::kCancel: return "CANCEL";
    case Command::kStreamBegin: return "STREAM_BEGIN";
    case Command::kStreamPart: return "STREAM_PART";
    case Command::kStreamAbort: return "STREAM_ABORT";
  }
  return "INVALID";
}

namespace {

void PutDescs(WireWriter& w, const std::vector<TensorDesc>& descs) {
  w.Put<uint32_t>(static_cast<uint32_t>(descs.size()));
  for (const TensorDesc& d : descs) {
    w.Put<int64_t>(d.key);
    w.Put<uint8_t>(static_cast<uint8_t>(d.dtype));
    w.Put<uint8_t>(static_cast<uint8_t>(d.shape.size()));
    for (int64_t dim : d.shape) w.Put<int64_t>(dim);
    w.Put<uint64_t>(d.nbytes);
    w.Put<uint64_t>(d.addr);
  }
}

bool GetDescs(WireReader& r, std::vector<TensorDesc>* out, const char* what) {
  uint32_t n = 0;
  if (!r.Get(&n)) return false;
  if (n > kMaxTensorsPerMessage) {
    return r.Fail(std::string(what) + " count " + std::to_string(n) + " exceeds limit " +
                  std::to_string(kMaxTensorsPerMessage));
  }
  // Each descriptor takes at least 26 bytes: refuse counts the frame cannot hold before
  // reserving memory for them.
  if (static_cast<uint64_t>(n) * 26 > r.remaining()) {
    return r.Fail(std::string(what) + " count " + std::to_string(n) + " does not fit in " +
                  std::to_string(r.remaining()) + " remaining bytes");
  }
  out->resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    TensorDesc& d = (*out)[i];
    uint8_t dtype = 0, ndim = 0;
    if (!r.Get(&d.key) || !r.Get(&dtype) || !r.Get(&ndim)) return false;
    if (!IsValidDType(dtype)) {
      return r.Fail(std::string(what) + "[" + std::to_string(i) + "] has invalid dtype " +
                    std::to_string(dtype));
    }
    if (ndim > kMaxTensorDims) {
      return r.Fail(std::string(what) + "[" + std::to_string(i) + "] has " + std::to_string(ndim) +
                    " dims; limit " + std::to_string(kMaxTensorDims));
    }
    d.dtype = static_cast<DType>(dtype);
    d.shape.resize(ndim);
    for (auto& dim : d.shape) {
      if (!r.Get(&dim)) return false;
    }
    if (!r.Get(&d.nbytes) || !r.Get(&d.addr)) return false;
    auto numel = CheckedNumel(d.shape);
    if (!numel.ok()) {
      return r.Fail(std::string(what) + "[" + std::to_string(i) + "]: " + numel.status().message());
    }
    if (static_cast<uint64_t>(*numel) > kMaxTensorBytes ||
        static_cast<uint64_t>(*numel) * DTypeSize(d.dtype) != d.nbytes) {
      return r.Fail(std::string(what) + "[" + std::to_string(i) + "] claims " +
                    std::to_string(d.nbytes) + " bytes but its shape and dtype give " +
                    std::to_string(static_cast<uint64_t>(*numel) * DTypeSize(d.dtype)));
    }
  }
  return true;
}

}  // namespace

std::string EncodeMeta(const Meta& m) {
  WireWriter w;
  w.Put<uint32_t>(kWireMagic);
  w.Put<uint16_t>(kWireVersion);
  w.Put<uint16_t>(0);  // flags, reserved
  w.Put<uint32_t>(0);  // body length, patched below
  w.Put<uint8_t>(static_cast<uint8_t>(m.cmd));
  w.Put<int32_t>(m.sender);
  w.Put<int32_t>(m.recipient);
  w.Put<uint64_t>(m.id);
  w.Put<int32_t>(m.arg);
  w.Put<int32_t>(m.status_code);
  w.PutString(m.body);
  PutDescs(w, m.data);
  PutDescs(w, m.slots);
  for (uint64_t s : m.stamps) w.Put<uint64_t>(s);
  std::string out = w.Release();
  const uint32_t body_len = static_cast<uint32_t>(out.size() - kWirePreambleBytes);
  std::memcpy(&out[8], &body_len, sizeof(body_len));
  return out;
}

Result<Meta> DecodeMeta(const void* data, size_t size) {
  WireReader r(data, size);
  uint32_t magic = 0, body_len = 0;
  uint16_t version = 0, flags = 0;
  if (!r.Get(&magic) || !r.Get(&version) || !r.Get(&flags) || !r.Get(&body_len)) {
    return r.status();
  }
  if (magic != kWireMagic) {
    return DataLossError("bad frame magic 0x" + [&] {
      char b[16];
      std::snprintf(b, sizeof(b), "%08x", magic);
      return std::string(b);
    }() + "; expected a meshpost frame (0x5453504d)");
  }
  if (version != kWireVersion) {
    return DataLossError("unsupported protocol version " + std::to_string(version) +
                         "; this build speaks version " + std::to_string(kWireVersion));
  }
  if (body_len != r.remaining()) {
    return DataLossError("frame declares " + std::to_string(body_len) + " body bytes but has " +
                         std::to_string(r.remaining()));
  }
  Meta m;
  uint8_t cmd = 0;
  if (!r.Get(&cmd)) return r.status();
  if (!IsValidCommand(cmd)) return DataLossError("unknown command " + std::to_string(cmd));
  m.cmd = static_cast<Command>(cmd);
  r.Get(&m.sender);
  r.Get(&m.recipient);
  r.Get(&m.id);
  r.Get(&m.arg);
  r.Get(&m.status_code);
  r.GetString(&m.body, kMaxBodyBytes);
  GetDescs(r, &m.data, "data");
  GetDescs(r, &m.slots, "slots");
  for (auto& s : m.stamps) r.Get(&s);
  if (!r.ok()) return r.status();
  if (r.remaining() != 0) {
    return DataLossError(std::to_string(r.remaining()) + " trailing bytes after the frame");
  }
  return m;
}

}  // namespace meshpost
