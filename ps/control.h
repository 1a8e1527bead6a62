// Control messages between nodes and the scheduler (register, node table, barriers,
// heartbeats, leave, node down, peer leave, van rendezvous): one builder for all of them,
// and readers for the fields whose meaning depends on the command. Internal to ps/.
#pragma once

#include <string>
#include <utility>

#include "common/result.h"
#include "van/message.h"

namespace meshpost {

// Why a NODE_DOWN was sent (carried in Meta::id).
// kEvicted: sent to the node itself, which the scheduler had declared dead (it paused or
// lost its connection past the heartbeat timeout) and which spoke again afterwards.
// kReplaced: sent to a process whose rank a new process took after it was declared dead
// or left (it spoke again, from another incarnation than the holder's).
enum class NodeDownReason : uint64_t { kDied = 0, kLeft = 1, kEvicted = 2, kReplaced = 3 };

class ControlMessage {
 public:
  ControlMessage(Command cmd, int sender, int recipient);
  ControlMessage& Arg(int32_t arg);        // barrier group mask, node id of a down node
  ControlMessage& Seq(uint64_t seq);       // barrier / heartbeat sequence
  ControlMessage& Body(std::string body);  // encoded nodes, reason text, rendezvous envelope
  // A failed operation: status_code and the message as body. OK leaves both empty.
  ControlMessage& Outcome(const Status& status);
  ControlMessage& Reason(NodeDownReason reason);
  OutMessage Build() { return std::move(msg_); }

 private:
  OutMessage msg_;
};

// The outcome a message reports (status_code + body): OK for 0; a code outside the known
// range (untrusted bytes) becomes kInternal; `context` prefixes the message.
Status OutcomeOf(const Meta& meta, const std::string& context = "");
// NODE_DOWN: kLeft only for exactly 1, so a malformed value reads as a death.
NodeDownReason NodeDownReasonOf(const Meta& meta);

// VAN_RENDEZVOUS body: which van the blob belongs to, and the van's opaque bytes.
std::string EncodeRendezvous(const std::string& van, const std::string& blob);
Result<std::pair<std::string, std::string>> DecodeRendezvous(const std::string& body);

}  // namespace meshpost
