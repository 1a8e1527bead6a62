#include "ps/control.h"

#include "common/wire.h"

namespace meshpost {

ControlMessage::ControlMessage(Command cmd, int sender, int recipient) {
  msg_.meta.cmd = cmd;
  msg_.meta.sender = sender;
  msg_.meta.recipient = recipient;
}

ControlMessage& ControlMessage::Arg(int32_t arg) {
  msg_.meta.arg = arg;
  return *this;
}

ControlMessage& ControlMessage::Seq(uint64_t seq) {
  msg_.meta.id = seq;
  return *this;
}

ControlMessage& ControlMessage::Body(std::string body) {
  msg_.meta.body = std::move(body);
  return *this;
}

ControlMessage& ControlMessage::Outcome(const Status& status) {
  msg_.meta.status_code = static_cast<int32_t>(status.code());
  msg_.meta.body = status.message();
  return *this;
}

ControlMessage& ControlMessage::Reason(NodeDownReason reason) {
  msg_.meta.id = static_cast<uint64_t>(reason);
  return *this;
}

Status OutcomeOf(const Meta& meta, const std::string& context) {
  if (meta.status_code == 0) return OkStatus();
  StatusCode code = StatusCode::kInternal;
  if (meta.status_code > 0 &&
      meta.status_code <= static_cast<int32_t>(StatusCode::kUnimplemented)) {
    code = static_cast<StatusCode>(meta.status_code);
  }
  return Status(code, context + meta.body);
}

NodeDownReason NodeDownReasonOf(const Meta& meta) {
  if (meta.id == static_cast<uint64_t>(NodeDownReason::kLeft)) return NodeDownReason::kLeft;
  if (meta.id == static_cast<uint64_t>(NodeDownReason::kEvicted)) return NodeDownReason::kEvicted;
  if (meta.id == static_cast<uint64_t>(NodeDownReason::kReplaced)) return NodeDownReason::kReplaced;
  return NodeDownReason::kDied;
}

std::string EncodeRendezvous(const std::string& van, const std::string& blob) {
  WireWriter w;
  w.PutString(van);
  w.PutString(blob);
  return w.Release();
}

Result<std::pair<std::string, std::string>> DecodeRendezvous(const std::string& body) {
  WireReader r(body.data(), body.size());
  std::pair<std::string, std::string> out;
  r.GetString(&out.first, 64);
  r.GetString(&out.second, 1 << 20);
  if (!r.ok()) return r.status();
  if (r.remaining() != 0) return DataLossError("trailing bytes after a rendezvous blob");
  return out;
}

}  // namespace meshpost
