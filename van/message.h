// Messages that vans carry: a Meta header (control command or request/response
// description) plus zero or more data segments, one per TensorDesc in meta.data.
// Send segments reference caller memory (zero-copy) and carry an owner kept alive until
// the transport is done with the bytes; received segments point at their final
// destination (registered memory) or at a van-owned buffer kept alive by `owner`.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tensor/dtype.h"

namespace meshpost {

enum class Command : uint8_t {
  kRegister = 1,        // node → scheduler: who I am and where I listen
  kRegisterReply = 2,   // scheduler → node: refused (status_code != 0, body says why)
  kNodeTable = 3,       // scheduler → all: every node's address
  kBarrier = 4,         // node → scheduler: arrived at barrier (arg = group mask, id = seq)
  kBarrierDone = 5,     // scheduler → members: barrier released
  kHeartbeat = 6,       // node → scheduler
  kHeartbeatAck = 7,    // scheduler → node
  kLeave = 8,           // node → scheduler: stopping
  kLeaveAck = 9,        // scheduler → node: may close now
  kNodeDown = 10,       // scheduler → all: node `arg` is gone; id = NodeDownReason
  kPeerLeave = 11,      // node → its data peers, after its last data message: stopping
  kVanRendezvous = 12,  // data peer → data peer over tcp: a van's rendezvous blob in body
  kRequest = 20,        // worker → server: pushes in data, pull slots in slots
  kResponse = 21,       // server → worker: pull-slot payloads in data
  kCancel = 22,         // worker → server: withdraw request `id` (its handle failed elsewhere)
  // tcp van internal (van/streamed_bytes.h): a message sent before all its bytes exist.
  kStreamBegin = 23,  // body: the encoded header of the message; id: the stream
  kStreamPart = 24,   // bytes [data[0].addr, + data[0].nbytes) of segment `arg` of stream `id`
  kStreamAbort = 25,  // stream `id` ends unfinished (status_code, body: why)
};
bool IsValidCommand(int value);
const char* CommandName(Command cmd);

// Describes one tensor on the wire. `addr` is the receiver-registered destination address
// for one-sided transports (a worker's pull slot, a server's registered buffer); 0 if none.
struct TensorDesc {
  int64_t key = 0;
  DType dtype = DType::kUInt8;
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
  uint64_t addr = 0;
};

// Server-side trace stamps carried back in a response (see ps/trace.h for their order).
constexpr int kServerStamps = 4;

struct Meta {
  Command cmd = Command::kHeartbeat;
  int32_t sender = -1;            // node id
  int32_t recipient = -1;         // node id
  uint64_t id = 0;                // request id / barrier sequence / heartbeat sequence / reason
  int32_t arg = 0;                // barrier group mask, node id of a down node, ...
  int32_t status_code = 0;        // non-zero: the operation failed; body holds the message
  std::string body;               // control payload (encoded node table, ...) or error text
  std::vector<TensorDesc> data;   // one per data segment, in order
  std::vector<TensorDesc> slots;  // kRequest: the worker's pull slots for this server
  std::array<uint64_t, kServerStamps> stamps{};
};

struct SendSegment {
  const void* data = nullptr;
  size_t size = 0;
  std::shared_ptr<const void> owner;  // kept alive until the van no longer reads `data`
  // The bytes are still being written: they become final as OutMessage::stream advances.
  bool streamed = false;
};

struct RecvSegment {
  void* data = nullptr;
  size_t size = 0;
  std::shared_ptr<void> owner;  // null when data points at registered memory
  Device device;                // cpu, or the CUDA device of a peer's pull slot mapped here
};

class StreamedBytes;  // van/streamed_bytes.h

struct OutMessage {
  Meta meta;
  std::vector<SendSegment> segments;
  // Set when segments marked `streamed` are still being written: only a van that
  // SupportsStreaming() takes such a message (the others refuse it).
  std::shared_ptr<StreamedBytes> stream;
};

struct InMessage {
  Meta meta;
  std::vector<RecvSegment> segments;
  // kRequest over a van that maps peer memory (cma with shared blocks or CUDA IPC): per
  // meta.slots entry, a writable view of the sender's pull slot (data null where the slot
  // is not in memory the sender shared; device says where the view lives). Writing there and
  // answering with that address sends no bytes, only the completion. Empty when the van has none.
  std::vector<RecvSegment> peer_slots;
  // The connected peer the van received this on, as the van knows it (not read from the
  // wire); -1 when the van cannot tell. Until vans authenticate their connections it is
  // meta.sender for tcp and cma; rdma knows it from the queue pair.
  int peer = -1;
};

}  // namespace meshpost
