// Vans with a cluster token (tcp and the same-host cma van): connections authenticate,
// messages are attributed to the authenticated peer, and bytes from connections without
// the token never reach the receiver. The tcp attacker is a raw ZeroMQ DEALER that knows
// the wire format.
#include <gtest/gtest.h>
#include <unistd.h>

#include <thread>

#include "common/auth.h"
#include "common/clock.h"
#include "tests/support/raw_zmq_peer.h"
#include "tests/support/recording_receiver.h"
#include "van/codec.h"
#include "van/registry.h"
#include "van/van.h"
#include "van/zmq/zmq_van.h"

namespace meshpost {
namespace {

const std::string kToken = "zmq-auth-test-token-0123456789";

using Recorder = support::RecordingReceiver;

// The headers of the messages `r` received so far, in order (taken out of `r`).
std::vector<Meta> Metas(Recorder& r) {
  std::vector<Meta> out;
  for (InMessage& m : r.TakeMessages()) out.push_back(std::move(m.meta));
  return out;
}

std::unique_ptr<Van> MakeVan(const std::string& token, int self_id, Recorder* r, int* port) {
  VanOptions o;
  o.cluster_token = token;
  o.self_id = self_id;
  auto van = CreateZmqVan(o);
  auto bound = van->Bind("127.0.0.1", 0);
  EXPECT_TRUE(bound.ok());
  *port = *bound;
  EXPECT_TRUE(van->Start(r).ok());
  return van;
}

OutMessage Heartbeat(int from, int to, uint64_t id) {
  OutMessage m;
  m.meta.cmd = Command::kHeartbeat;
  m.meta.sender = from;
  m.meta.recipient = to;
  m.meta.id = id;
  return m;
}

// Two tcp vans on loopback, ids 1 (a) and 2 (b), each with its token and recorder.
struct TcpPair {
  TcpPair(const std::string& token_a, const std::string& token_b) {
    a = MakeVan(token_a, 1, &ra, &pa);
    b = MakeVan(token_b, 2, &rb, &pb);
  }
  Recorder ra, rb;  // outlive the vans
  int pa = 0, pb = 0;
  std::unique_ptr<Van> a, b;
};

// `from` (node 1, connected to node 2) sends a message claiming to come from node 5, then
// one as itself: only the second reaches `to`, attributed to node 1.
void ExpectOnlyTheAuthenticatedSenderGetsThrough(Van& from, Recorder& to) {
  ASSERT_TRUE(from.Send(Heartbeat(5, 2, 1)).ok());  // node 1 pretends to be node 5
  ASSERT_TRUE(from.Send(Heartbeat(1, 2, 2)).ok());
  ASSERT_TRUE(to.WaitFor(1));
  auto got = Metas(to);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].sender, 1);
  EXPECT_EQ(got[0].id, 2u);
}

TEST(ZmqAuthTest, AuthenticatedPeersExchangeMessagesAttributedToTheConnection) {
  TcpPair p(kToken, kToken);
  ASSERT_TRUE(p.a->Connect({2, "127.0.0.1", p.pb}).ok());
  ASSERT_TRUE(p.b->Connect({1, "127.0.0.1", p.pa}).ok());
  for (uint64_t i = 1; i <= 3; ++i) ASSERT_TRUE(p.a->Send(Heartbeat(1, 2, i)).ok());
  ASSERT_TRUE(p.b->Send(Heartbeat(2, 1, 9)).ok());
  ASSERT_TRUE(p.rb.WaitFor(3));
  ASSERT_TRUE(p.ra.WaitFor(1));
  auto got = Metas(p.rb);
  ASSERT_EQ(got.size(), 3u);
  for (uint64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(got[i].sender, 1);
    EXPECT_EQ(got[i].id, i + 1) << "messages queued during the handshake keep their order";
  }
  EXPECT_EQ(Metas(p.ra).at(0).sender, 2);
}

TEST(ZmqAuthTest, AMessageClaimingAnotherSenderIsDropped) {
  TcpPair p(kToken, kToken);
  ASSERT_TRUE(p.a->Connect({2, "127.0.0.1", p.pb}).ok());
  ExpectOnlyTheAuthenticatedSenderGetsThrough(*p.a, p.rb);
}

TEST(ZmqAuthTest, RawFramesWithoutTheTokenNeverReachTheReceiver) {
  TcpPair p(kToken, kToken);
  {
    support::RawZmqPeer evil(p.pb);  // holds no token
    Meta forged;
    forged.cmd = Command::kNodeDown;
    forged.sender = 0;
    forged.recipient = 2;
    forged.arg = 1;
    for (int i = 0; i < 50; ++i) evil.Send(EncodeMeta(forged));
    // A proof with no hello, a hello followed by a guessed proof, and garbage.
    AuthFrame hello;
    hello.type = AuthFrameType::kHello;
    hello.connector_id = 0;
    hello.acceptor_id = 2;
    evil.Send(EncodeAuthFrame(hello));
    AuthFrame proof;
    proof.type = AuthFrameType::kProof;
    evil.Send(EncodeAuthFrame(proof));
    evil.Send(EncodeMeta(forged));
    evil.Send("garbage");
    // Then a legitimate message on an authenticated connection: once it arrived, every
    // attacker frame sent before it was handled (one receive thread, handled in order of
    // arrival is not guaranteed across connections, so send it after a round trip).
    ASSERT_TRUE(p.a->Connect({2, "127.0.0.1", p.pb}).ok());
    ASSERT_TRUE(p.b->Connect({1, "127.0.0.1", p.pa}).ok());
    ASSERT_TRUE(p.b->Send(Heartbeat(2, 1, 1)).ok());
    ASSERT_TRUE(p.ra.WaitFor(1));
    ASSERT_TRUE(p.a->Send(Heartbeat(1, 2, 1)).ok());
    ASSERT_TRUE(p.rb.WaitFor(1));
  }
  for (const Meta& m : Metas(p.rb)) {
    EXPECT_EQ(m.cmd, Command::kHeartbeat) << "a forged " << CommandName(m.cmd) << " got through";
    EXPECT_EQ(m.sender, 1);
  }
}

// Waits (bounded) until Send reports the connection's failure.
Status SendUntilFailure(Van& van, int to) {
  const uint64_t deadline = GetNanosecond() + 30'000'000'000ull;
  Status s;
  while (GetNanosecond() < deadline) {
    s = van.Send(Heartbeat(1, to, 1));
    if (!s.ok()) return s;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return s;
}

TEST(ZmqAuthTest, AWrongTokenFailsTheConnectionWithAClearError) {
  TcpPair p("a-different-token-0123456789", kToken);
  ASSERT_TRUE(p.a->Connect({2, "127.0.0.1", p.pb}).ok());
  Status s = SendUntilFailure(*p.a, 2);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("token"), std::string::npos) << s.message();
  EXPECT_TRUE(Metas(p.rb).empty());
}

TEST(ZmqAuthTest, ANodeWithoutATokenRefusesAnAuthenticatingPeer) {
  TcpPair p(kToken, "");
  ASSERT_TRUE(p.a->Connect({2, "127.0.0.1", p.pb}).ok());
  Status s = SendUntilFailure(*p.a, 2);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("without a cluster token"), std::string::npos) << s.message();
}

TEST(ZmqAuthTest, FramesAboveTheSizeLimitCloseTheConnectionWithoutBeingDelivered) {
  Recorder rb;
  VanOptions o;
  o.max_message_bytes = 64 << 10;
  auto b = CreateZmqVan(o);
  const int pb = *b->Bind("127.0.0.1", 0);
  ASSERT_TRUE(b->Start(&rb).ok());
  support::RawZmqPeer big(pb);
  Meta m;
  m.cmd = Command::kHeartbeat;
  m.sender = 1;
  m.recipient = 2;
  m.body.assign(1 << 20, 'x');  // a valid frame, but above the limit
  big.Send(EncodeMeta(m));
  support::RawZmqPeer small(pb);
  m.body = "ok";
  small.Send(EncodeMeta(m));
  ASSERT_TRUE(rb.WaitFor(1));
  for (const Meta& got : Metas(rb)) EXPECT_EQ(got.body, "ok");
}

// Node 2 caps frames at 64 KiB; node 1 (default cap) sends it a 256 KiB header. Node 2
// closes that connection; node 1's van notices, authenticates a new connection (new
// session key, sequence numbers from 1) and later messages are delivered, in order,
// attributed to node 1. The oversized message itself is never delivered.
TEST(ZmqAuthTest, AConnectionTheReceiverClosedAuthenticatesAgainAndCarriesLaterMessages) {
  Recorder ra, rb;
  VanOptions oa;
  oa.cluster_token = kToken;
  oa.self_id = 1;
  VanOptions ob = oa;
  ob.self_id = 2;
  ob.max_message_bytes = 64 << 10;
  auto a = CreateZmqVan(oa);
  auto b = CreateZmqVan(ob);
  ASSERT_TRUE(a->Bind("127.0.0.1", 0).ok());
  const int pb = *b->Bind("127.0.0.1", 0);
  ASSERT_TRUE(a->Start(&ra).ok());
  ASSERT_TRUE(b->Start(&rb).ok());
  ASSERT_TRUE(a->Connect({2, "127.0.0.1", pb}).ok());
  ASSERT_TRUE(a->Send(Heartbeat(1, 2, 1)).ok());
  ASSERT_TRUE(rb.WaitFor(1));
  OutMessage big = Heartbeat(1, 2, 2);
  big.meta.body.assign(256 << 10, 'x');
  ASSERT_TRUE(a->Send(std::move(big)).ok());
  // Messages sent before node 1 noticed the close go down the dead connection; keep
  // sending until one arrives (bounded), then check a burst arrives whole and in order.
  uint64_t id = 100;
  bool arrived = false;
  for (int attempt = 0; attempt < 60 && !arrived; ++attempt) {
    ASSERT_TRUE(a->Send(Heartbeat(1, 2, id++)).ok());
    arrived = rb.WaitFor(2, 0, std::chrono::seconds(1));
  }
  ASSERT_TRUE(arrived) << "no message reached node 2 after it closed the connection";
  std::vector<Meta> got = Metas(rb);
  for (uint64_t i = 0; i < 5; ++i) ASSERT_TRUE(a->Send(Heartbeat(1, 2, 1000 + i)).ok());
  ASSERT_TRUE(rb.WaitFor(5));
  for (Meta& m : Metas(rb)) got.push_back(std::move(m));
  ASSERT_GE(got.size(), 7u);
  EXPECT_EQ(got[0].id, 1u);
  for (const Meta& m : got) {
    EXPECT_EQ(m.sender, 1);
    EXPECT_NE(m.id, 2u) << "the frame over the receiver's cap was delivered";
    EXPECT_TRUE(m.body.empty());
  }
  for (uint64_t i = 0; i < 5; ++i) EXPECT_EQ(got[got.size() - 5 + i].id, 1000 + i);
  a.reset();
  EXPECT_TRUE(ra.failures.empty()) << ra.failures.front().second.ToString();
}

// A peer that closes the connection and never comes back: within connect_timeout_ms the
// sender reports the peer failed (UNAVAILABLE, naming it) and its sends fail with that.
TEST(ZmqAuthTest, ALostConnectionThatCannotAuthenticateAgainFailsThePeer) {
  Recorder ra, rb;
  VanOptions oa;
  oa.cluster_token = kToken;
  oa.self_id = 1;
  oa.connect_timeout_ms = 300;
  VanOptions ob = oa;
  ob.self_id = 2;
  auto a = CreateZmqVan(oa);
  auto b = CreateZmqVan(ob);
  ASSERT_TRUE(a->Bind("127.0.0.1", 0).ok());
  const int pb = *b->Bind("127.0.0.1", 0);
  ASSERT_TRUE(a->Start(&ra).ok());
  ASSERT_TRUE(b->Start(&rb).ok());
  ASSERT_TRUE(a->Connect({2, "127.0.0.1", pb}).ok());
  ASSERT_TRUE(a->Send(Heartbeat(1, 2, 1)).ok());
  ASSERT_TRUE(rb.WaitFor(1));
  b.reset();  // closes its socket; nothing listens at pb any more
  ASSERT_TRUE(ra.WaitForFailures(1));
  Status send;
  for (int attempt = 0; attempt < 100 && send.ok(); ++attempt) {
    send = a->Send(Heartbeat(1, 2, 2));
  }
  a.reset();
  ASSERT_EQ(ra.failures.size(), 1u);
  EXPECT_EQ(ra.failures[0].first, 2);
  EXPECT_EQ(ra.failures[0].second.code(), StatusCode::kUnavailable);
  EXPECT_NE(ra.failures[0].second.message().find("node 2"), std::string::npos)
      << ra.failures[0].second.ToString();
  EXPECT_EQ(send.code(), StatusCode::kUnavailable) << send.ToString();
}

// ---- same-host van ----

bool HaveCma() {
  for (const std::string& n : CompiledTransports()) {
    if (n == "cma") return true;
  }
  return false;
}

std::unique_ptr<Van> MakeCma(const std::string& token, int self_id, Recorder* r) {
  VanOptions o;
  o.cluster_token = token;
  o.self_id = self_id;
  o.cma_disable = true;  // the doorbell handshake is what is under test, not CMA itself
  auto van = CreateVan("cma", o);
  EXPECT_TRUE(van.ok());
  EXPECT_TRUE((*van)->Bind("", 0).ok());
  EXPECT_TRUE((*van)->Start(r).ok());
  return std::move(van).value();
}

PeerAddress CmaPeer(int id, const Van& van) {
  PeerAddress p;
  p.id = id;
  p.endpoint = van.endpoint();
  p.pid = static_cast<int>(getpid());
  return p;
}

// A peer this node disconnected (e.g. the scheduler after sending a refusal) goes away
// after the monitor thread forgot that DEALER's monitor; other peers must keep working.
// The stall this guards against (ZeroMQ's blocking send of a monitor event into a closed
// monitor froze the I/O thread: Peer::CloseSocket) needs the closed DEALER to emit an
// event while it lingers; this sequence does not force that, so it passed before the fix
// too. What reproduced the stall was ReplaceTest under load (security_test.cc), about
// one run in three of `ctest -j2 -R 'ReplaceTest|SecurityTest' --repeat until-fail:3`.
TEST(ZmqAuthTest, APeerThatLeavesAfterBeingDisconnectedDoesNotStallOtherConnections) {
  Recorder ra, rb, rc;
  int pa = 0, pb = 0, pc = 0;
  auto a = MakeVan(kToken, 1, &ra, &pa);
  auto c = MakeVan(kToken, 3, &rc, &pc);
  ASSERT_TRUE(a->Connect({3, "127.0.0.1", pc}).ok());
  for (int round = 0; round < 3; ++round) {
    auto b = MakeVan(kToken, 2, &rb, &pb);
    ASSERT_TRUE(a->Connect({2, "127.0.0.1", pb}).ok());
    ASSERT_TRUE(a->Send(Heartbeat(1, 2, 100 + round)).ok());
    ASSERT_TRUE(rb.WaitFor(1));
    rb.TakeMessages();
    a->Disconnect(2);
    // Let the monitor thread drop the disconnected DEALER's monitor, then b leaves while
    // that DEALER may still linger.
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    b->Stop();
    b.reset();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ASSERT_TRUE(a->Send(Heartbeat(1, 3, round + 1)).ok());
    ASSERT_TRUE(rc.WaitFor(1, 0, std::chrono::seconds(20)))
        << "round " << round << ": the connection to node 3 stalled";
    EXPECT_EQ(Metas(rc).size(), 1u);
  }
}

TEST(CmaAuthTest, AuthenticatedConnectionsCarryMessagesAndRefuseOtherSenders) {
  if (!HaveCma()) GTEST_SKIP() << "no same-host van in this build";
  Recorder ra, rb;
  auto a = MakeCma(kToken, 1, &ra);
  auto b = MakeCma(kToken, 2, &rb);
  ASSERT_TRUE(a->Connect(CmaPeer(2, *b)).ok());
  ExpectOnlyTheAuthenticatedSenderGetsThrough(*a, rb);
}

TEST(CmaAuthTest, MismatchedTokensFailConnectWithAClearError) {
  if (!HaveCma()) GTEST_SKIP() << "no same-host van in this build";
  Recorder ra, rb, rc;
  auto a = MakeCma("a-different-token-0123456789", 1, &ra);
  auto b = MakeCma(kToken, 2, &rb);
  auto none = MakeCma("", 3, &rc);
  Status wrong = a->Connect(CmaPeer(2, *b));
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.message().find("token"), std::string::npos) << wrong.message();
  Status tokenless_to_token = none->Connect(CmaPeer(2, *b));
  ASSERT_FALSE(tokenless_to_token.ok());
  EXPECT_NE(tokenless_to_token.message().find("MESHPOST_CLUSTER_TOKEN"), std::string::npos)
      << tokenless_to_token.message();
  Status token_to_tokenless = b->Connect(CmaPeer(3, *none));
  ASSERT_FALSE(token_to_tokenless.ok());
  EXPECT_NE(token_to_tokenless.message().find("without a cluster token"), std::string::npos)
      << token_to_tokenless.message();
  EXPECT_TRUE(Metas(rb).empty());
}

}  // namespace
}  // namespace meshpost
