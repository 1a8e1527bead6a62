#include "van/rdma/rdma_wire.h"

#include "common/wire.h"
#include "van/codec.h"

namespace meshpost {
namespace rdma {
namespace {

WireWriter BlobWriter(BlobType type) {
  WireWriter w;
  w.Put<uint32_t>(kBlobMagic);
  w.Put<uint16_t>(kBlobVersion);
  w.Put<uint8_t>(static_cast<uint8_t>(type));
  return w;
}

bool ValidMtu(uint32_t m) { return m == 256 || m == 512 || m == 1024 || m == 2048 || m == 4096; }

Status Bad(const std::string& what) { return DataLossError("rdma rendezvous blob: " + what); }

}  // namespace

std::string EncodeHello(const ConnInfo& c) {
  WireWriter w = BlobWriter(BlobType::kHello);
  w.Put<uint32_t>(c.qpn);
  w.Put<uint32_t>(c.psn);
  w.Put<uint16_t>(c.lid);
  w.PutBytes(c.gid.data(), c.gid.size());
  w.Put<uint32_t>(c.mtu_bytes);
  w.Put<uint8_t>(static_cast<uint8_t>(c.link_layer));
  w.Put<uint64_t>(c.ring_addr);
  w.Put<uint32_t>(c.ring_rkey);
  w.Put<uint32_t>(c.slot_bytes);
  w.Put<uint32_t>(c.slots);
  return w.Release();
}

std::string EncodeAdvertise(const std::vector<RemoteBuffer>& buffers) {
  WireWriter w = BlobWriter(BlobType::kAdvertise);
  w.Put<uint32_t>(static_cast<uint32_t>(buffers.size()));
  for (const auto& b : buffers) {
    w.Put<int64_t>(b.key);
    w.Put<uint64_t>(b.addr);
    w.Put<uint32_t>(b.rkey);
    w.Put<uint64_t>(b.capacity);
    w.Put<uint8_t>(b.reuse_after_credit ? kBufferReuseAfterCredit : 0);
  }
  return w.Release();
}

std::string EncodeNeedBuffer(int64_t key, uint64_t nbytes) {
  WireWriter w = BlobWriter(BlobType::kNeedBuffer);
  w.Put<int64_t>(key);
  w.Put<uint64_t>(nbytes);
  return w.Release();
}

std::string EncodeRefuse(int64_t key, const std::string& reason) {
  WireWriter w = BlobWriter(BlobType::kRefuse);
  w.Put<int64_t>(key);
  w.PutString(reason.size() > 1024 ? reason.substr(0, 1024) : reason);
  return w.Release();
}

Result<Blob> DecodeBlob(const void* data, size_t size) {
  WireReader r(data, size);
  uint32_t magic = 0;
  uint16_t version = 0;
  uint8_t type = 0;
  r.Get(&magic);
  r.Get(&version);
  r.Get(&type);
  if (!r.ok()) return Bad(r.status().message());
  if (magic != kBlobMagic) return Bad("bad magic " + std::to_string(magic));
  if (version != kBlobVersion) {
    return Bad("version " + std::to_string(version) + " (this build speaks " +
               std::to_string(kBlobVersion) + ")");
  }
  Blob b;
  switch (static_cast<BlobType>(type)) {
    case BlobType::kHello: {
      b.type = BlobType::kHello;
      ConnInfo& c = b.hello;
      uint8_t ll = 0;
      r.Get(&c.qpn);
      r.Get(&c.psn);
      r.Get(&c.lid);
      if (r.remaining() >= c.gid.size()) {
        for (auto& byte : c.gid) r.Get(&byte);
      } else {
        r.Skip(c.gid.size());
      }
      r.Get(&c.mtu_bytes);
      r.Get(&ll);
      r.Get(&c.ring_addr);
      r.Get(&c.ring_rkey);
      r.Get(&c.slot_bytes);
      r.Get(&c.slots);
      if (!r.ok()) return Bad("hello: " + r.status().message());
      if (c.qpn == 0 || c.qpn > 0xFFFFFF) return Bad("hello: QP number " + std::to_string(c.qpn));
      if (c.psn > 0xFFFFFF) return Bad("hello: PSN " + std::to_string(c.psn) + " exceeds 24 bits");
      if (!ValidMtu(c.mtu_bytes)) return Bad("hello: MTU " + std::to_string(c.mtu_bytes));
      if (ll > static_cast<uint8_t>(LinkLayer::kEthernet)) {
        return Bad("hello: link layer " + std::to_string(ll));
      }
      c.link_layer = static_cast<LinkLayer>(ll);
      if (c.lid == 0 && GidIsZero(c.gid)) return Bad("hello: neither a LID nor a GID");
      if (c.ring_addr == 0) return Bad("hello: header ring address is 0");
      if (c.slot_bytes < kMinSlotBytes || c.slot_bytes > kMaxSlotBytes) {
        return Bad("hello: header slot size " + std::to_string(c.slot_bytes));
      }
      if (c.slots == 0 || c.slots > kMaxHeaderSlots) {
        return Bad("hello: header slot count " + std::to_string(c.slots));
      }
      if (c.ring_addr + uint64_t{c.slot_bytes} * c.slots < c.ring_addr) {
        return Bad("hello: header ring wraps the address space");
      }
      break;
    }
    case BlobType::kAdvertise: {
      b.type = BlobType::kAdvertise;
      uint32_t n = 0;
      if (!r.Get(&n)) return Bad("advertise: " + r.status().message());
      if (n > kMaxAdvertised) return Bad("advertise: " + std::to_string(n) + " buffers");
      constexpr size_t kEntryBytes = 8 + 8 + 4 + 8 + 1;
      if (r.remaining() < n * kEntryBytes) return Bad("advertise: truncated");
      b.buffers.resize(n);
      for (auto& e : b.buffers) {
        r.Get(&e.key);
        r.Get(&e.addr);
        r.Get(&e.rkey);
        r.Get(&e.capacity);
        uint8_t flags = 0;
        r.Get(&flags);
        if ((flags & ~kBufferReuseAfterCredit) != 0) {
          return Bad("advertise: unknown buffer flags " + std::to_string(flags));
        }
        e.reuse_after_credit = (flags & kBufferReuseAfterCredit) != 0;
        if (e.addr == 0 || e.capacity == 0 || e.capacity > kMaxTensorBytes ||
            e.addr + e.capacity < e.addr) {
          return Bad("advertise: buffer for key " + std::to_string(e.key) + " at " +
                     std::to_string(e.addr) + " of " + std::to_string(e.capacity) + " bytes");
        }
      }
      break;
    }
    case BlobType::kNeedBuffer:
      b.type = BlobType::kNeedBuffer;
      r.Get(&b.key);
      r.Get(&b.nbytes);
      if (!r.ok()) return Bad("need-buffer: " + r.status().message());
      if (b.nbytes == 0 || b.nbytes > kMaxTensorBytes) {
        return Bad("need-buffer: " + std::to_string(b.nbytes) + " bytes");
      }
      break;
    case BlobType::kRefuse:
      b.type = BlobType::kRefuse;
      r.Get(&b.key);
      r.GetString(&b.reason, 1024);
      if (!r.ok()) return Bad("refuse: " + r.status().message());
      break;
    default: return Bad("unknown type " + std::to_string(type));
  }
  if (r.remaining() != 0) return Bad(std::to_string(r.remaining()) + " trailing bytes");
  return b;
}

std::string EncodeHeaderFrame(const std::string& encoded_meta,
                              const std::vector<uint32_t>& slot_rkeys) {
  WireWriter w;
  const size_t total = 4 + 4 + 4 + encoded_meta.size() + 4 + 4 * slot_rkeys.size();
  w.Put<uint32_t>(kHeaderMagic);
  w.Put<uint32_t>(static_cast<uint32_t>(total));
  w.Put<uint32_t>(static_cast<uint32_t>(encoded_meta.size()));
  w.PutBytes(encoded_meta.data(), encoded_meta.size());
  w.Put<uint32_t>(static_cast<uint32_t>(slot_rkeys.size()));
  for (uint32_t k : slot_rkeys) w.Put<uint32_t>(k);
  return w.Release();
}

Result<HeaderFrame> DecodeHeaderFrame(const void* data, size_t size) {
  WireReader r(data, size);
  uint32_t magic = 0, total = 0, meta_len = 0;
  r.Get(&magic);
  r.Get(&total);
  r.Get(&meta_len);
  if (!r.ok()) return DataLossError("rdma header frame: " + r.status().message());
  if (magic != kHeaderMagic) return DataLossError("rdma header frame: bad magic");
  if (total > size || total < 16) {
    return DataLossError("rdma header frame: length " + std::to_string(total) + " for a " +
                         std::to_string(size) + "-byte slot");
  }
  if (meta_len > total - 16) {
    return DataLossError("rdma header frame: meta length " + std::to_string(meta_len));
  }
  const char* meta_bytes = static_cast<const char*>(data) + 12;
  HeaderFrame f;
  auto meta = DecodeMeta(meta_bytes, meta_len);
  if (!meta.ok()) return meta.status();
  f.meta = std::move(meta).value();
  WireReader tail(meta_bytes + meta_len, total - 12 - meta_len);
  uint32_t n = 0;
  tail.Get(&n);
  if (!tail.ok()) return DataLossError("rdma header frame: " + tail.status().message());
  if (n != f.meta.slots.size() || tail.remaining() != 4ull * n) {
    return DataLossError("rdma header frame: " + std::to_string(n) + " rkeys for " +
                         std::to_string(f.meta.slots.size()) + " pull slots");
  }
  f.slot_rkeys.resize(n);
  for (auto& k : f.slot_rkeys) tail.Get(&k);
  return f;
}

std::string EncodeIndirectHeader(uint64_t addr, uint64_t len) {
  WireWriter w;
  w.Put<uint32_t>(kIndirectHeaderMagic);
  w.Put<uint32_t>(static_cast<uint32_t>(kIndirectHeaderBytes));
  w.Put<uint64_t>(addr);
  w.Put<uint64_t>(len);
  return w.Release();
}

bool IsIndirectHeader(const void* data, size_t size) {
  WireReader r(data, size);
  uint32_t magic = 0;
  return r.Get(&magic) && magic == kIndirectHeaderMagic;
}

Result<IndirectHeader> DecodeIndirectHeader(const void* data, size_t size) {
  WireReader r(data, size);
  uint32_t magic = 0, total = 0;
  IndirectHeader h;
  r.Get(&magic);
  r.Get(&total);
  r.Get(&h.addr);
  r.Get(&h.len);
  if (!r.ok()) return DataLossError("rdma indirect header: " + r.status().message());
  if (magic != kIndirectHeaderMagic || total != kIndirectHeaderBytes) {
    return DataLossError("rdma indirect header: bad magic or length " + std::to_string(total));
  }
  if (h.addr == 0 || h.len < 16 || h.len > kMaxBodyBytes + (1u << 20) || h.addr + h.len < h.addr) {
    return DataLossError("rdma indirect header: " + std::to_string(h.len) + " bytes at " +
                         std::to_string(h.addr));
  }
  return h;
}

}  // namespace rdma
}  // namespace meshpost
