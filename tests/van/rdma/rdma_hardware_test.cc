// Runs against a real RDMA device when the host has one; skips with the reason otherwise.
// Two transports on the same device connect through an in-memory control plane and move
// a push and a pull response through the NIC (loopback).
#include <gtest/gtest.h>

#include <deque>

#include "test_util.h"
#include "van/rdma/rdma_transport.h"
#include "van/rdma/rdma_van.h"

namespace meshpost {
namespace rdma {
namespace {

Status NoDeviceReason() {
  auto devices = ProbeRdmaDevices();
  if (!devices.ok()) return devices.status();
  if (devices->empty()) return CheckRdmaAvailable();
  return OkStatus();
}

TEST(RdmaAvailabilityTest, CheckMatchesProbe) {
  auto devices = ProbeRdmaDevices();
  ASSERT_TRUE(devices.ok()) << devices.status();
  Status s = CheckRdmaAvailable();
  if (devices->empty()) {
    EXPECT_EQ(s.code(), StatusCode::kUnavailable);
    EXPECT_EQ(s.message().rfind("no RDMA device: ibv_get_device_list found 0 devices", 0), 0u) << s;
  } else {
    for (const auto& d : *devices) EXPECT_FALSE(d.name.empty());
  }
}

TEST(RdmaAvailabilityTest, VanBindReportsMissingDeviceAsStatus) {
  if (NoDeviceReason().ok()) GTEST_SKIP() << "this host has an RDMA device";
  auto van = CreateRdmaVan(RdmaOptions{});
  ASSERT_TRUE(van.ok());
  auto bound = (*van)->Bind("", 0);
  ASSERT_FALSE(bound.ok());
  EXPECT_EQ(bound.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(bound.status().message().find("no RDMA device"), std::string::npos);
  OutMessage m;
  m.meta.recipient = 1;
  EXPECT_EQ((*van)->Send(std::move(m)).code(), StatusCode::kFailedPrecondition);
}

TEST(RdmaHardwareTest, LoopbackPushAndPullOnARealDevice) {
  if (Status why = NoDeviceReason(); !why.ok()) GTEST_SKIP() << why.message();
  auto env = RdmaOptionsFromEnv(ProcessEnv());
  ASSERT_TRUE(env.ok()) << env.status();
  std::deque<std::tuple<int, int, std::string>> wire;
  auto make = [&](int id) {
    return RdmaTransport::Create(CreateIbverbsApi(), *env, [&wire, id](int peer, std::string b) {
      wire.emplace_back(id, peer, std::move(b));
      return OkStatus();
    });
  };
  auto a = make(1);
  auto b = make(2);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  testing::Recorder ra, rb;
  (*a)->SetReceiver(&ra);
  (*b)->SetReceiver(&rb);
  std::map<int, RdmaTransport*> nodes = {{1, a->get()}, {2, b->get()}};
  auto settle = [&](auto done) {
    // Bounded by iterations, not time: the NIC completes loopback writes quickly.
    for (int i = 0; i < 10'000'000 && !done(); ++i) {
      while (!wire.empty()) {
        auto [from, to, blob] = wire.front();
        wire.pop_front();
        ASSERT_TRUE(nodes[to]->OnControlBlob(from, blob.data(), blob.size()).ok());
      }
      (*a)->Progress();
      (*b)->Progress();
    }
  };
  ASSERT_TRUE((*a)->Connect(2).ok());
  settle(
      [&] { return (*a)->state(2) == PeerState::kReady && (*b)->state(1) == PeerState::kReady; });
  ASSERT_EQ((*a)->state(2), PeerState::kReady) << (*a)->dead_reason(2);
  std::vector<uint8_t> pull(1 << 16, 0);
  auto payload = testing::Bytes(1 << 20, 3);
  OutMessage req = testing::MakePush(1, 2, 5, payload);
  TensorDesc slot;
  slot.key = 6;
  slot.shape = {static_cast<int64_t>(pull.size())};
  slot.nbytes = pull.size();
  slot.addr = reinterpret_cast<uint64_t>(pull.data());
  req.meta.slots.push_back(slot);
  auto h = (*a)->Send(std::move(req), false);
  ASSERT_TRUE(h.ok()) << h.status();
  settle([&] { return (*a)->IsDone(*h) && rb.messages.size() == 1; });
  ASSERT_TRUE((*a)->Wait(*h, 0).ok());
  ASSERT_EQ(rb.messages.size(), 1u);
  const auto* got = static_cast<const uint8_t*>(rb.messages[0].segments[0].data);
  EXPECT_TRUE(std::equal(payload->begin(), payload->end(), got));
  auto result = testing::Bytes(pull.size(), 9);
  auto resp = testing::MakePush(2, 1, 6, result);
  resp.meta.cmd = Command::kResponse;
  auto rh = (*b)->Send(std::move(resp), false);
  ASSERT_TRUE(rh.ok()) << rh.status();
  settle([&] { return (*b)->IsDone(*rh) && ra.messages.size() == 1; });
  ASSERT_TRUE((*b)->Wait(*rh, 0).ok());
  EXPECT_EQ(pull, *result);
}

}  // namespace
}  // namespace rdma
}  // namespace meshpost
