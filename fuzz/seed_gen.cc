// Writes the seed corpus in fuzz/corpus/ from the real encoders, so seeds start valid
// and the fuzzers mutate from there. Run by hand when a format changes:
//   clang++ -std=c++17 -I. fuzz/seed_gen.cc common/*.cc tensor/*.cc van/codec.cc \
//     van/rdma/rdma_wire.cc van/rdma/verbs_ibv.cc -libverbs $(pkg-config --cflags --libs libsodium)
//     -lspdlog -lfmt \ -o /tmp/seed_gen && /tmp/seed_gen fuzz/corpus
#include <cstdio>
#include <fstream>
#include <string>

#include "common/auth.h"
#include "common/wire.h"
#include "van/codec.h"
#include "van/rdma/rdma_wire.h"

using namespace meshpost;

namespace {

std::string g_root;

void Write(const std::string& target, const std::string& name, const std::string& bytes) {
  std::ofstream(g_root + "/" + target + "/" + name, std::ios::binary) << bytes;
}

std::string CmaPreamble(uint8_t type, uint8_t flags) {
  WireWriter w;
  w.Put<uint32_t>(0x4D43504D);
  w.Put<uint16_t>(2);
  w.Put<uint8_t>(type);
  w.Put<uint8_t>(flags);
  return w.Release();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  g_root = argv[1];
  // codec
  Meta hb;
  hb.cmd = Command::kHeartbeat;
  hb.sender = 3;
  hb.recipient = 0;
  hb.id = 7;
  Write("codec", "heartbeat", EncodeMeta(hb));
  Meta req;
  req.cmd = Command::kRequest;
  req.sender = 3;
  req.recipient = 1;
  req.id = (5ull << 12) | 1;
  req.data.push_back({0, DType::kFloat32, {4, 16}, 256, 0});
  req.slots.push_back({100, DType::kBFloat16, {4, 16}, 128, 0x7f0000001000});
  Write("codec", "request", EncodeMeta(req));
  Meta table;
  table.cmd = Command::kNodeTable;
  table.body = std::string("\x01\x00\x00\x00", 4) + std::string(40, 'n');
  Write("codec", "node_table", EncodeMeta(table));
  Meta resp = req;
  resp.cmd = Command::kResponse;
  resp.status_code = 3;
  resp.body = "server 1 failed";
  resp.stamps = {1, 2, 3, 4};
  Write("codec", "response_error", EncodeMeta(resp));
  // auth: first byte selects the target in auth_fuzz.cc
  ConnectorHandshake c("fuzzing-cluster-token-0123456789", 2, 1);
  AcceptorHandshake a("fuzzing-cluster-token-0123456789", 1);
  const std::string hello = c.Hello();
  auto hello_frame = DecodeAuthFrame(hello.data(), hello.size());
  const std::string challenge = *a.OnHello(*hello_frame);
  auto ch = DecodeAuthFrame(challenge.data(), challenge.size());
  const std::string proof = *c.OnChallenge(*ch, false);
  AuthFrame refused;
  refused.type = AuthFrameType::kRefused;
  refused.reason = "no";
  Write("auth", "acceptor_hello_proof", std::string(1, '\0') + hello + proof);
  Write("auth", "connector_challenge", std::string(1, '\1') + challenge);
  std::string sealed = EncodeMeta(hb);
  SessionKey key{};
  key.fill(7);
  MessageSealer(key).Seal(&sealed);
  Write("auth", "sealed_header", std::string(1, '\2') + sealed);
  Write("auth", "refused", std::string(1, '\3') + EncodeAuthFrame(refused));
  // rdma_wire: odd first byte = blob, even = header frame
  rdma::ConnInfo info;
  info.qpn = 77;
  info.slot_bytes = 4096;
  info.slots = 64;
  Write("rdma_wire", "hello", "\x01" + rdma::EncodeHello(info));
  Write("rdma_wire", "advertise", "\x01" + rdma::EncodeAdvertise({{1, 0x1000, 5, 4096}}));
  Write("rdma_wire", "need_buffer", "\x01" + rdma::EncodeNeedBuffer(3, 1 << 20));
  Write("rdma_wire", "refuse", "\x01" + rdma::EncodeRefuse(3, "too big"));
  Write("rdma_wire", "header",
        std::string(1, '\0') + rdma::EncodeHeaderFrame(EncodeMeta(req), {9}));
  // cma_frames: mode byte (bit0 = send a valid hello first, bit2 = authenticated van,
  // bit5 = frames through a frame ring)
  {
    // A data frame with the meta inline: seq, nseg=0, Source(meta: inline at 0), meta.
    const std::string meta = EncodeMeta(hb);
    WireWriter w;
    w.Put<uint64_t>(1);
    w.Put<uint32_t>(0);
    w.Put<uint8_t>(0);  // kInline
    w.Put<uint32_t>(0);
    w.Put<uint64_t>(0);
    w.Put<uint64_t>(meta.size());
    const std::string data = CmaPreamble(4, 1) + w.Release() + meta;
    Write("cma_frames", "data_inline", std::string(1, '\1') + data);
    WireWriter s;
    s.Put<uint32_t>(1);
    s.Put<uint64_t>(4096);
    Write("cma_frames", "staging_without_fd",
          std::string(1, '\1') + CmaPreamble(3, 0) + s.Release());
    WireWriter h;
    h.Put<uint32_t>(1);
    h.Put<uint64_t>(0);
    h.Put<uint32_t>(16);
    h.PutBytes(std::string(16, 'c').data(), 16);
    h.Put<uint8_t>(0);
    Write("cma_frames", "auth_hello",
          std::string(1, '\4') + CmaPreamble(1, 2) + h.Release() + hello);
    Write("cma_frames", "no_hello", std::string(1, '\0') + data);
    Write("cma_frames", "data_inline_ring", std::string(1, '\x21') + data);
  }
  std::printf("seeds written under %s\n", g_root.c_str());
  return 0;
}
