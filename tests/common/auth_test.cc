// Cluster authentication primitives: the handshake, message sealing, token loading and the
// log rate limiter.
#include "common/auth.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>

#include "common/log_rate.h"

namespace meshpost {
namespace {

const std::string kToken = "0123456789abcdef-cluster-token";

struct Done {
  SessionKey connector_key{};
  SessionKey acceptor_key{};
  Result<int32_t> who = InternalError("not run");
};

Done RunHandshake(const std::string& connector_token, const std::string& acceptor_token) {
  ConnectorHandshake c(connector_token, 7, 1);
  AcceptorHandshake a(acceptor_token, 1);
  Done d;
  auto hello = DecodeAuthFrame(c.Hello().data(), c.Hello().size());
  EXPECT_TRUE(hello.ok());
  auto challenge = a.OnHello(*hello);
  EXPECT_TRUE(challenge.ok());
  auto ch = DecodeAuthFrame(challenge->data(), challenge->size());
  EXPECT_TRUE(ch.ok());
  auto proof = c.OnChallenge(*ch, false);
  if (!proof.ok()) {
    d.who = proof.status();
    return d;
  }
  auto pf = DecodeAuthFrame(proof->data(), proof->size());
  EXPECT_TRUE(pf.ok());
  d.who = a.OnProof(*pf);
  d.connector_key = c.session_key();
  d.acceptor_key = a.session_key();
  return d;
}

TEST(AuthTest, HandshakeAuthenticatesTheConnectorAndAgreesOnAKey) {
  Done d = RunHandshake(kToken, kToken);
  ASSERT_TRUE(d.who.ok()) << d.who.status().ToString();
  EXPECT_EQ(*d.who, 7);
  EXPECT_EQ(d.connector_key, d.acceptor_key);
}

TEST(AuthTest, ConnectorRefusesAnAcceptorWithAnotherToken) {
  Done d = RunHandshake(kToken, "another-token-of-this-cluster!!");
  ASSERT_FALSE(d.who.ok());
  EXPECT_NE(d.who.status().message().find("token"), std::string::npos);
}

TEST(AuthTest, AcceptorRefusesAConnectorWithoutTheToken) {
  ConnectorHandshake c(kToken, 7, 1);
  AcceptorHandshake a(kToken, 1);
  auto hello = DecodeAuthFrame(c.Hello().data(), c.Hello().size());
  ASSERT_TRUE(a.OnHello(*hello).ok());
  AuthFrame guessed;
  guessed.type = AuthFrameType::kProof;
  guessed.mac.fill(0x41);
  EXPECT_FALSE(a.OnProof(guessed).ok());
}

TEST(AuthTest, AnAcceptorProofCannotBeReflectedAsAConnectorProof) {
  // An attacker without the token opens a connection, receives the acceptor's proof and
  // sends it straight back as its own proof.
  AcceptorHandshake a(kToken, 1);
  AuthFrame hello;
  hello.type = AuthFrameType::kHello;
  hello.connector_id = 2;
  hello.acceptor_id = 1;
  auto challenge = a.OnHello(hello);
  ASSERT_TRUE(challenge.ok());
  auto ch = DecodeAuthFrame(challenge->data(), challenge->size());
  AuthFrame reflected;
  reflected.type = AuthFrameType::kProof;
  reflected.mac = ch->mac;
  EXPECT_FALSE(a.OnProof(reflected).ok());
}

TEST(AuthTest, ConnectorChecksWhoAnswers) {
  ConnectorHandshake c(kToken, 7, 3);
  AcceptorHandshake a(kToken, 4);  // a different node listens where node 3 was expected
  auto hello = DecodeAuthFrame(c.Hello().data(), c.Hello().size());
  auto challenge = a.OnHello(*hello);
  auto ch = DecodeAuthFrame(challenge->data(), challenge->size());
  auto proof = c.OnChallenge(*ch, false);
  ASSERT_FALSE(proof.ok());
  EXPECT_NE(proof.status().message().find("node 4, not node 3"), std::string::npos);
}

TEST(AuthTest, ASecondHelloOnOneConnectionIsRefused) {
  AcceptorHandshake a(kToken, 1);
  AuthFrame hello;
  hello.type = AuthFrameType::kHello;
  ASSERT_TRUE(a.OnHello(hello).ok());
  EXPECT_FALSE(a.OnHello(hello).ok());
}

TEST(AuthTest, SealedHeadersRefuseTamperingReplayAndReordering) {
  SessionKey key{};
  key.fill(9);
  MessageSealer sealer(key);
  MessageOpener opener(key);
  std::string m1 = "first header", m2 = "second header", m3 = "third header";
  sealer.Seal(&m1);
  sealer.Seal(&m2);
  sealer.Seal(&m3);
  auto ok1 = opener.Open(m1.data(), m1.size());
  ASSERT_TRUE(ok1.ok());
  EXPECT_EQ(*ok1, std::string("first header").size());
  EXPECT_FALSE(opener.Open(m1.data(), m1.size()).ok()) << "replay accepted";
  EXPECT_FALSE(opener.Open(m3.data(), m3.size()).ok()) << "reordering accepted";
  std::string tampered = m2;
  tampered[0] ^= 1;
  EXPECT_FALSE(opener.Open(tampered.data(), tampered.size()).ok()) << "tampering accepted";
  EXPECT_TRUE(opener.Open(m2.data(), m2.size()).ok());
  EXPECT_TRUE(opener.Open(m3.data(), m3.size()).ok());
  SessionKey other{};
  MessageOpener stranger(other);
  std::string m4 = "x";
  MessageSealer(key).Seal(&m4);
  EXPECT_FALSE(stranger.Open(m4.data(), m4.size()).ok()) << "wrong key accepted";
  EXPECT_FALSE(opener.Open("short", 5).ok());
}

TEST(AuthTest, FramesRoundTripAndMalformedOnesAreRefused) {
  AuthFrame f;
  f.type = AuthFrameType::kRefused;
  f.reason = "because";
  const std::string bytes = EncodeAuthFrame(f);
  EXPECT_TRUE(LooksLikeAuthFrame(bytes.data(), bytes.size()));
  auto back = DecodeAuthFrame(bytes.data(), bytes.size());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->reason, "because");
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_FALSE(DecodeAuthFrame(bytes.data(), n).ok()) << "truncated to " << n;
  }
  std::string trailing = bytes + "x";
  EXPECT_FALSE(DecodeAuthFrame(trailing.data(), trailing.size()).ok());
  std::string bad_type = bytes;
  bad_type[4] = 99;
  EXPECT_FALSE(DecodeAuthFrame(bad_type.data(), bad_type.size()).ok());
}

EnvLookup MapEnv(std::map<std::string, std::string> vars) {
  auto shared = std::make_shared<std::map<std::string, std::string>>(std::move(vars));
  return [shared](const char* name) -> const char* {
    auto it = shared->find(name);
    return it == shared->end() ? nullptr : it->second.c_str();
  };
}

TEST(AuthTest, TokenFromEnvironmentOrFile) {
  auto none = ClusterTokenFromEnv(MapEnv({}));
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, "");
  auto inline_token = ClusterTokenFromEnv(MapEnv({{"MESHPOST_CLUSTER_TOKEN", kToken}}));
  ASSERT_TRUE(inline_token.ok());
  EXPECT_EQ(*inline_token, kToken);

  auto short_token = ClusterTokenFromEnv(MapEnv({{"MESHPOST_CLUSTER_TOKEN", "abc"}}));
  ASSERT_FALSE(short_token.ok());
  EXPECT_NE(short_token.status().message().find("MESHPOST_CLUSTER_TOKEN has 3 bytes"),
            std::string::npos);

  char path[] = "/tmp/meshpost_token_XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  const std::string content = kToken + "\n";
  ASSERT_EQ(write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
  close(fd);
  auto from_file = ClusterTokenFromEnv(MapEnv({{"MESHPOST_CLUSTER_TOKEN_FILE", path}}));
  ASSERT_TRUE(from_file.ok()) << from_file.status().ToString();
  EXPECT_EQ(*from_file, kToken);
  auto both = ClusterTokenFromEnv(
      MapEnv({{"MESHPOST_CLUSTER_TOKEN_FILE", path}, {"MESHPOST_CLUSTER_TOKEN", kToken}}));
  EXPECT_FALSE(both.ok());
  std::remove(path);
  auto missing = ClusterTokenFromEnv(MapEnv({{"MESHPOST_CLUSTER_TOKEN_FILE", path}}));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find(path), std::string::npos);
}

TEST(AuthTest, GeneratedTokensAreLongAndDistinct) {
  const std::string a = GenerateClusterToken(), b = GenerateClusterToken();
  EXPECT_EQ(a.size(), 64u);
  EXPECT_NE(a, b);
  EXPECT_TRUE(ValidateClusterToken(a, "token").ok());
}

TEST(LogRateLimiterTest, BurstThenCountThenNewWindow) {
  LogRateLimiter limiter(2, 1000);
  uint64_t suppressed = 99;
  const uint64_t t0 = 5'000'000'000ull;
  EXPECT_TRUE(limiter.AllowAt(t0, &suppressed));
  EXPECT_EQ(suppressed, 0u);
  EXPECT_TRUE(limiter.AllowAt(t0 + 1, &suppressed));
  EXPECT_FALSE(limiter.AllowAt(t0 + 2, &suppressed));
  EXPECT_FALSE(limiter.AllowAt(t0 + 3, &suppressed));
  EXPECT_TRUE(limiter.AllowAt(t0 + 1'000'000'000ull, &suppressed));
  EXPECT_EQ(suppressed, 2u);
}

}  // namespace
}  // namespace meshpost
