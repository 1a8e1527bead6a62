// Control messages: the builder fills what each command carries, readers treat the
// command-specific fields as untrusted.
#include "ps/control.h"

#include <gtest/gtest.h>

#include "van/codec.h"

namespace meshpost {
namespace {

TEST(ControlTest, BuilderFillsFields) {
  OutMessage m = ControlMessage(Command::kBarrierDone, 0, 3)
                     .Arg(6)
                     .Seq(42)
                     .Outcome(UnavailableError("server 1 died"))
                     .Build();
  EXPECT_EQ(m.meta.cmd, Command::kBarrierDone);
  EXPECT_EQ(m.meta.sender, 0);
  EXPECT_EQ(m.meta.recipient, 3);
  EXPECT_EQ(m.meta.arg, 6);
  EXPECT_EQ(m.meta.id, 42u);
  EXPECT_TRUE(m.segments.empty());
  Status s = OutcomeOf(m.meta);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_EQ(s.message(), "server 1 died");
}

TEST(ControlTest, OkOutcomeCarriesNothing) {
  OutMessage m = ControlMessage(Command::kBarrierDone, 0, 3).Outcome(OkStatus()).Build();
  EXPECT_EQ(m.meta.status_code, 0);
  EXPECT_TRUE(OutcomeOf(m.meta).ok());
}

TEST(ControlTest, OutOfRangeStatusCodeBecomesInternal) {
  Meta m;
  m.status_code = 12345;
  m.body = "x";
  EXPECT_EQ(OutcomeOf(m, "ctx: ").code(), StatusCode::kInternal);
  EXPECT_EQ(OutcomeOf(m, "ctx: ").message(), "ctx: x");
  m.status_code = -1;
  EXPECT_EQ(OutcomeOf(m).code(), StatusCode::kInternal);
}

TEST(ControlTest, NodeDownReasonRoundTripsAndDefaultsToDied) {
  OutMessage left =
      ControlMessage(Command::kNodeDown, 0, 2).Arg(1).Reason(NodeDownReason::kLeft).Build();
  EXPECT_EQ(NodeDownReasonOf(left.meta), NodeDownReason::kLeft);
  OutMessage died =
      ControlMessage(Command::kNodeDown, 0, 2).Arg(1).Reason(NodeDownReason::kDied).Build();
  EXPECT_EQ(NodeDownReasonOf(died.meta), NodeDownReason::kDied);
  Meta junk;
  junk.id = 77;
  EXPECT_EQ(NodeDownReasonOf(junk), NodeDownReason::kDied);
}

TEST(ControlTest, RendezvousEnvelopeRoundTripsAndRejectsJunk) {
  const std::string blob("\x00\x01\xff rdma hello", 15);
  auto decoded = DecodeRendezvous(EncodeRendezvous("rdma", blob));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->first, "rdma");
  EXPECT_EQ(decoded->second, blob);
  EXPECT_EQ(DecodeRendezvous("junk").status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(DecodeRendezvous(EncodeRendezvous("rdma", blob) + "x").status().code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(DecodeRendezvous(EncodeRendezvous(std::string(65, 'v'), blob)).status().code(),
            StatusCode::kDataLoss);
}

}  // namespace
}  // namespace meshpost
