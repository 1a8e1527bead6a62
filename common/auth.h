// Cluster authentication. Every node of a cluster holds one shared secret (the cluster
// token); a connection proves both ends know it with a challenge-response handshake
// (HMAC-SHA256 over both nonces, both node ids and a direction label, so neither proof can
// be replayed or reflected), and every message on an authenticated connection then carries
// a sequence number and a MAC of its header under a key derived from that handshake, so
// a message cannot be injected, replayed or reordered on the connection. The token itself
// never crosses the wire. See docs/security.md for the threat model.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/env.h"
#include "common/result.h"

namespace meshpost {

constexpr size_t kMinClusterTokenBytes = 16;
constexpr size_t kAuthNonceBytes = 32;
constexpr size_t kAuthMacBytes = 32;
// Bytes a sealed message adds after its header: sequence number (8) + MAC (32).
constexpr size_t kAuthTrailerBytes = 8 + kAuthMacBytes;

using AuthNonce = std::array<uint8_t, kAuthNonceBytes>;
using AuthMac = std::array<uint8_t, kAuthMacBytes>;

// Reads MESHPOST_CLUSTER_TOKEN, or the file named by MESHPOST_CLUSTER_TOKEN_FILE (trailing
// whitespace stripped). "" when neither is set. Errors name the variable: both set, the
// file unreadable, or a token shorter than kMinClusterTokenBytes.
Result<std::string> ClusterTokenFromEnv(const EnvLookup& env);
// Checks a token given in code (Options.cluster_token); "" means unauthenticated.
Status ValidateClusterToken(const std::string& token, const char* where);
// A fresh random token (hex, 64 characters) for launchers.
std::string GenerateClusterToken();

// Handshake frames. They start with a magic distinct from the message codec's, so a
// receiver tells them apart from messages by their first four bytes.
constexpr uint32_t kAuthMagic = 0x3141504D;  // "MPA1" little-endian
enum class AuthFrameType : uint8_t {
  kHello = 1,      // connector -> acceptor: ids + connector nonce
  kChallenge = 2,  // acceptor -> connector: acceptor nonce + acceptor proof
  kProof = 3,      // connector -> acceptor: connector proof
  kRefused = 4,    // either way: why the handshake failed (text)
};

struct AuthFrame {
  AuthFrameType type = AuthFrameType::kHello;
  int32_t connector_id = -1;  // kHello
  int32_t acceptor_id = -1;   // kHello: whom the connector meant; kChallenge: who answers
  AuthNonce nonce{};          // kHello: connector nonce; kChallenge: acceptor nonce
  AuthMac mac{};              // kChallenge, kProof
  std::string reason;         // kRefused (bounded)
};

constexpr size_t kMaxAuthReasonBytes = 512;

bool LooksLikeAuthFrame(const void* data, size_t size);
std::string EncodeAuthFrame(const AuthFrame& frame);
// Untrusted input: every length and enum is checked; malformed bytes give DataLoss.
Result<AuthFrame> DecodeAuthFrame(const void* data, size_t size);

// Per-connection key for sealing messages, derived from the handshake transcript.
using SessionKey = std::array<uint8_t, 32>;

// Connector side of one connection. Not thread-safe.
class ConnectorHandshake {
 public:
  ConnectorHandshake(std::string token, int32_t self_id, int32_t peer_id);
  std::string Hello();  // the first frame to send
  // Verifies the acceptor's proof and returns the kProof frame to send. The acceptor must
  // answer as peer_id unless `any_acceptor_id` (used for ids the connector only knows as
  // temporary, e.g. a node the scheduler refuses).
  Result<std::string> OnChallenge(const AuthFrame& challenge, bool any_acceptor_id);
  const SessionKey& session_key() const { return key_; }

 private:
  std::string token_;
  int32_t self_id_;
  int32_t peer_id_;
  AuthNonce nonce_{};
  SessionKey key_{};
};

// Acceptor side of one connection. Not thread-safe.
class AcceptorHandshake {
 public:
  AcceptorHandshake(std::string token, int32_t self_id);
  // Answers a kHello with a kChallenge frame.
  Result<std::string> OnHello(const AuthFrame& hello);
  // Verifies the connector's proof; returns the connector's authenticated node id.
  Result<int32_t> OnProof(const AuthFrame& proof);
  const SessionKey& session_key() const { return key_; }
  bool hello_seen() const { return hello_seen_; }

 private:
  std::string token_;
  int32_t self_id_;
  bool hello_seen_ = false;
  int32_t connector_id_ = -1;
  AuthNonce connector_nonce_{};
  AuthNonce nonce_{};
  AuthMac expected_proof_{};
  SessionKey key_{};
};

// Payload MAC (MESHPOST_AUTH_PAYLOAD): Poly1305 over a message's data frames (each
// preceded by its length), under a one-time key derived from the connection's session key
// and the message's sequence number, so no two messages share a key. The 16-byte tag
// travels in the sealed header (docs/security.md).
constexpr size_t kPayloadTagBytes = 16;
using PayloadTag = std::array<uint8_t, kPayloadTagBytes>;
class PayloadTagger {
 public:
  PayloadTagger(const SessionKey& key, uint64_t seq);
  ~PayloadTagger();
  void Update(const void* data, size_t size);
  PayloadTag Final();

 private:
  alignas(16) unsigned char state_[256];  // crypto_onetimeauth_state
};
bool PayloadTagEqual(const PayloadTag& a, const PayloadTag& b);

// Seals outgoing headers of one connection: appends sequence number + MAC.
class MessageSealer {
 public:
  explicit MessageSealer(const SessionKey& key) : key_(key) {}
  void Seal(std::string* header);
  // The sequence number the next Seal uses, and the key (for a payload tag).
  uint64_t next_seq() const { return next_seq_; }
  const SessionKey& key() const { return key_; }

 private:
  SessionKey key_;
  uint64_t next_seq_ = 1;
};

// Opens incoming headers of one connection: checks the MAC and that the sequence number is
// exactly the next one (a replayed, dropped-then-injected or reordered header is refused).
class MessageOpener {
 public:
  explicit MessageOpener(const SessionKey& key) : key_(key) {}
  // Returns the length of the header without its trailer.
  Result<size_t> Open(const void* data, size_t size);
  // The sequence number of the header Open accepted last, and the key (payload tags).
  uint64_t last_seq() const { return next_seq_ - 1; }
  const SessionKey& key() const { return key_; }

 private:
  SessionKey key_;
  uint64_t next_seq_ = 1;
};

}  // namespace meshpost
