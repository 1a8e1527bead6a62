// Bytes the RDMA van exchanges (van/rdma internal): rendezvous blobs carried over the
// control plane (Hello = connection info, Advertise = writable buffers, NeedBuffer /
// Refuse = re-rendezvous), the header frame written into the peer's header ring, and
// the 32-bit immediate. Every decoder treats its input as untrusted (DataLoss on error).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/result.h"
#include "van/message.h"
#include "van/rdma/verbs_api.h"

namespace meshpost {
namespace rdma {

constexpr uint32_t kBlobMagic = 0x4452504D;    // "MPRD"
constexpr uint32_t kHeaderMagic = 0x4852504D;  // "MPRH"
constexpr uint16_t kBlobVersion = 2;           // 2: Advertise carries per-buffer flags
constexpr uint32_t kMaxAdvertised = 4096;
constexpr uint32_t kMaxHeaderSlots = 1u << 16;
constexpr uint32_t kMinSlotBytes = 256;
constexpr uint32_t kMaxSlotBytes = 1u << 20;
// Headers larger than the peer's slot travel out of line: the encoded frame is written into
// a van buffer the peer advertises for this reserved key, and the slot holds an indirect
// frame naming it. Messages may not use the key themselves.
constexpr int64_t kHeaderBodyKey = INT64_MIN;
constexpr uint32_t kIndirectHeaderMagic = 0x4952504D;  // "MPRI"
constexpr size_t kIndirectHeaderBytes = 4 + 4 + 8 + 8;

enum class BlobType : uint8_t { kHello = 1, kAdvertise = 2, kNeedBuffer = 3, kRefuse = 4 };

// Connection info: everything the peer needs to bring its QP to RTR and to write headers.
struct ConnInfo {
  uint32_t qpn = 0;  // 24 bits
  uint32_t psn = 0;  // 24 bits
  uint16_t lid = 0;
  Gid gid{};
  uint32_t mtu_bytes = 1024;
  LinkLayer link_layer = LinkLayer::kUnknown;
  uint64_t ring_addr = 0;  // header ring the peer writes into
  uint32_t ring_rkey = 0;
  uint32_t slot_bytes = 0;
  uint32_t slots = 0;
};

// A buffer on the advertising node that the peer may write into for `key`.
struct RemoteBuffer {
  int64_t key = 0;
  uint64_t addr = 0;
  uint32_t rkey = 0;
  uint64_t capacity = 0;
  // Wire flag: a van-owned buffer whose bytes the receiver copies out before it returns the
  // header credit of the message that filled it; the sender writes it again only after that
  // credit is back (docs/rdma.md, "Van buffers"). Off for register_recv_buffer memory and
  // pull slots, which the application owns.
  bool reuse_after_credit = false;
  // Sender-side only (not on the wire): the header sequence number of the last message
  // written into this buffer; reusable once that many headers are credited back.
  uint64_t busy_until = 0;
};
constexpr uint8_t kBufferReuseAfterCredit = 1;

struct Blob {
  BlobType type = BlobType::kHello;
  ConnInfo hello;                     // kHello
  std::vector<RemoteBuffer> buffers;  // kAdvertise
  int64_t key = 0;                    // kNeedBuffer, kRefuse
  uint64_t nbytes = 0;                // kNeedBuffer
  std::string reason;                 // kRefuse
};

std::string EncodeHello(const ConnInfo& info);
std::string EncodeAdvertise(const std::vector<RemoteBuffer>& buffers);
std::string EncodeNeedBuffer(int64_t key, uint64_t nbytes);
std::string EncodeRefuse(int64_t key, const std::string& reason);
Result<Blob> DecodeBlob(const void* data, size_t size);

// Header frame: magic, frame length, encoded Meta, then one rkey per meta.slots entry (the
// worker's pull slots the peer may write the response into).
std::string EncodeHeaderFrame(const std::string& encoded_meta,
                              const std::vector<uint32_t>& slot_rkeys);
struct HeaderFrame {
  Meta meta;
  std::vector<uint32_t> slot_rkeys;
};
Result<HeaderFrame> DecodeHeaderFrame(const void* data, size_t size);

// Indirect frame (fits any slot): where in the peer's kHeaderBodyKey buffer the full header
// frame of this message was written, and its length.
std::string EncodeIndirectHeader(uint64_t addr, uint64_t len);
bool IsIndirectHeader(const void* data, size_t size);
struct IndirectHeader {
  uint64_t addr = 0;
  uint64_t len = 0;
};
Result<IndirectHeader> DecodeIndirectHeader(const void* data, size_t size);

// 32-bit immediate: two kind bits, 30 value bits (header slot index or returned credits).
enum class ImmKind : uint32_t { kHeader = 0, kCredit = 1 };
constexpr uint32_t kImmValueMask = (1u << 30) - 1;
inline uint32_t MakeImm(ImmKind kind, uint32_t value) {
  return (static_cast<uint32_t>(kind) << 30) | (value & kImmValueMask);
}
inline ImmKind ImmKindOf(uint32_t imm) { return static_cast<ImmKind>(imm >> 30); }
inline uint32_t ImmValue(uint32_t imm) { return imm & kImmValueMask; }

// The header goes inline only when the QP granted room for it; never more than that.
inline bool ShouldInline(size_t bytes, uint32_t max_inline) { return bytes <= max_inline; }

}  // namespace rdma
}  // namespace meshpost
