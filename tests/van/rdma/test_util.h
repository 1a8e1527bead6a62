// Helpers shared by the RDMA van tests: fake device specs, the shared recorder, and a
// cluster of RdmaTransports over one FakeFabric whose control plane is an in-memory queue
// (Settle() delivers blobs and polls completions until nothing moves; no threads).
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "fake_verbs.h"
#include "tests/support/recording_receiver.h"
#include "van/rdma/rdma_transport.h"

namespace meshpost {
namespace rdma {
namespace testing {

inline GidEntry MakeGid(std::vector<uint8_t> bytes, GidType type, const std::string& netdev) {
  GidEntry e;
  for (size_t i = 0; i < bytes.size() && i < 16; ++i) e.gid[i] = bytes[i];
  e.type = type;
  e.netdev = netdev;
  return e;
}

inline GidEntry Ipv4Gid(uint8_t last, GidType type, const std::string& netdev = "eth0") {
  return MakeGid({0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, last}, type, netdev);
}

inline FakeDeviceSpec RoceSpec(const std::string& name = "mlx5_0", uint8_t ip = 1) {
  FakeDeviceSpec s;
  s.name = name;
  s.gids = {
      MakeGid({0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, ip}, GidType::kIbRoceV1, "eth0"),
      MakeGid({0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, ip}, GidType::kRoceV2, "eth0"),
      Ipv4Gid(ip, GidType::kIbRoceV1), Ipv4Gid(ip, GidType::kRoceV2)};
  return s;
}

// Engine tests drive the transport by hand (Settle), so they read the recorder's vectors
// directly; no van thread delivers concurrently.
using Recorder = support::RecordingReceiver;

struct TestNode {
  int id = 0;
  std::unique_ptr<RdmaTransport> t;
  Recorder recv;
  std::vector<std::pair<int, Status>> failures;
};

struct Blobbed {
  int from;
  int to;
  std::string blob;
};

class FakeCluster {
 public:
  TestNode* Add(int id, FakeDeviceSpec spec = RoceSpec(), RdmaOptions options = {}) {
    const int host = fabric.AddHost({spec});
    auto node = std::make_unique<TestNode>();
    node->id = id;
    auto t =
        RdmaTransport::Create(fabric.Api(host), options, [this, id](int peer, std::string blob) {
          wire.push_back({id, peer, std::move(blob)});
          sent.push_back(wire.back());
          return OkStatus();
        });
    if (!t.ok()) {
      create_status = t.status();
      return nullptr;
    }
    node->t = std::move(t).value();
    node->t->SetReceiver(&node->recv);
    TestNode* raw = node.get();
    node->t->SetPeerFailureCallback(
        [raw](int peer, const Status& why) { raw->failures.emplace_back(peer, why); });
    nodes[id] = std::move(node);
    return raw;
  }

  // Delivers control blobs and polls every node until nothing happens.
  void Settle() {
    for (int round = 0; round < 10000; ++round) {
      bool moved = false;
      while (!wire.empty()) {
        Blobbed b = std::move(wire.front());
        wire.pop_front();
        auto it = nodes.find(b.to);
        if (it != nodes.end() && !hold_blobs) {
          (void)it->second->t->OnControlBlob(b.from, b.blob.data(), b.blob.size());
        }
        moved = true;
      }
      for (auto& [id, n] : nodes) moved |= n->t->Progress() > 0;
      if (!moved) return;
    }
  }

  int CountSent(BlobType type) const {
    int n = 0;
    for (const auto& b : sent) {
      auto d = DecodeBlob(b.blob.data(), b.blob.size());
      if (d.ok() && d->type == type) ++n;
    }
    return n;
  }

  ~FakeCluster() {
    fabric.Release();
    nodes.clear();
  }

  FakeFabric fabric;
  std::deque<Blobbed> wire;
  std::vector<Blobbed> sent;
  std::map<int, std::unique_ptr<TestNode>> nodes;
  Status create_status;
  bool hold_blobs = false;
};

// A push of `bytes` for `key` from `from` to `to`; the payload buffer rides as the owner.
inline OutMessage MakePush(int from, int to, int64_t key,
                           const std::shared_ptr<std::vector<uint8_t>>& bytes, uint64_t id = 1) {
  OutMessage m;
  m.meta.cmd = Command::kRequest;
  m.meta.sender = from;
  m.meta.recipient = to;
  m.meta.id = id;
  TensorDesc d;
  d.key = key;
  d.dtype = DType::kUInt8;
  d.shape = {static_cast<int64_t>(bytes->size())};
  d.nbytes = bytes->size();
  m.meta.data.push_back(d);
  m.segments.push_back({bytes->data(), bytes->size(), bytes});
  return m;
}

inline std::shared_ptr<std::vector<uint8_t>> Bytes(size_t n, uint8_t seed) {
  auto v = std::make_shared<std::vector<uint8_t>>(n);
  for (size_t i = 0; i < n; ++i) (*v)[i] = static_cast<uint8_t>(seed + i * 7);
  return v;
}

}  // namespace testing
}  // namespace rdma
}  // namespace meshpost
