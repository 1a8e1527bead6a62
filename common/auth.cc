#include "common/auth.h"

#include <sodium.h>

#include <cctype>
#include <cstring>
#include <fstream>
#include <sstream>

#include "common/wire.h"

namespace meshpost {
namespace {

// libsodium must be initialised once before its RNG is used; sodium_init is idempotent
// and thread-safe, so every entry point that needs randomness calls it.
void EnsureSodium() {
  static const int rc = sodium_init();
  (void)rc;  // < 0 only when /dev/urandom is unusable; randombytes then aborts loudly
}

constexpr char kTranscriptLabel[] = "meshpost-auth-v1";
constexpr char kAcceptorLabel[] = "acceptor proves";
constexpr char kConnectorLabel[] = "connector proves";
constexpr char kSessionLabel[] = "session connector->acceptor";

struct Transcript {
  int32_t connector_id;
  int32_t acceptor_id;
  AuthNonce connector_nonce;
  AuthNonce acceptor_nonce;
};

// HMAC-SHA256(token, label || transcript): the label separates the three uses of the
// token, so an acceptor proof can never be replayed as a connector proof (reflection).
AuthMac Mac(const std::string& token, const char* label, const Transcript& t) {
  crypto_auth_hmacsha256_state st;
  crypto_auth_hmacsha256_init(&st, reinterpret_cast<const unsigned char*>(token.data()),
                              token.size());
  auto update = [&](const void* p, size_t n) {
    crypto_auth_hmacsha256_update(&st, static_cast<const unsigned char*>(p), n);
  };
  update(kTranscriptLabel, sizeof(kTranscriptLabel));
  update(label, std::strlen(label) + 1);
  WireWriter w;
  w.Put<int32_t>(t.connector_id);
  w.Put<int32_t>(t.acceptor_id);
  w.PutBytes(t.connector_nonce.data(), t.connector_nonce.size());
  w.PutBytes(t.acceptor_nonce.data(), t.acceptor_nonce.size());
  const std::string bytes = w.Release();
  update(bytes.data(), bytes.size());
  AuthMac out;
  crypto_auth_hmacsha256_final(&st, out.data());
  return out;
}

AuthNonce RandomNonce() {
  EnsureSodium();
  AuthNonce n;
  randombytes_buf(n.data(), n.size());
  return n;
}

bool MacEqual(const AuthMac& a, const AuthMac& b) {
  return sodium_memcmp(a.data(), b.data(), a.size()) == 0;
}

AuthMac HeaderMac(const SessionKey& key, uint64_t seq, const void* data, size_t size) {
  crypto_auth_hmacsha256_state st;
  crypto_auth_hmacsha256_init(&st, key.data(), key.size());
  unsigned char seq_bytes[8];
  std::memcpy(seq_bytes, &seq, sizeof(seq));
  crypto_auth_hmacsha256_update(&st, seq_bytes, sizeof(seq_bytes));
  crypto_auth_hmacsha256_update(&st, static_cast<const unsigned char*>(data), size);
  AuthMac out;
  crypto_auth_hmacsha256_final(&st, out.data());
  return out;
}

}  // namespace

Status ValidateClusterToken(const std::string& token, const char* where) {
  if (token.empty()) return OkStatus();
  if (token.size() < kMinClusterTokenBytes) {
    return InvalidArgumentError(std::string(where) + " has " + std::to_string(token.size()) +
                                " bytes; expected at least " +
                                std::to_string(kMinClusterTokenBytes) +
                                " (generate one with: head -c 32 /dev/urandom | xxd -p -c 64)");
  }
  return OkStatus();
}

Result<std::string> ClusterTokenFromEnv(const EnvLookup& env) {
  const char* inline_token = env("MESHPOST_CLUSTER_TOKEN");
  const char* file = env("MESHPOST_CLUSTER_TOKEN_FILE");
  const bool has_inline = inline_token != nullptr && *inline_token != '\0';
  const bool has_file = file != nullptr && *file != '\0';
  if (has_inline && has_file) {
    return InvalidArgumentError(
        "MESHPOST_CLUSTER_TOKEN and MESHPOST_CLUSTER_TOKEN_FILE are both set; expected one");
  }
  if (has_inline) {
    std::string token = inline_token;
    MESHPOST_RETURN_IF_ERROR(ValidateClusterToken(token, "MESHPOST_CLUSTER_TOKEN"));
    return token;
  }
  if (!has_file) return std::string();
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    return InvalidArgumentError(std::string("MESHPOST_CLUSTER_TOKEN_FILE=") + file +
                                ": cannot open the file: " + std::strerror(errno));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  std::string token = ss.str();
  if (token.size() > 4096) {
    return InvalidArgumentError(std::string("MESHPOST_CLUSTER_TOKEN_FILE=") + file + " holds " +
                                std::to_string(token.size()) +
                                " bytes; expected a token of at most 4096");
  }
  while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) {
    token.pop_back();
  }
  MESHPOST_RETURN_IF_ERROR(ValidateClusterToken(
      token, (std::string("the token in MESHPOST_CLUSTER_TOKEN_FILE=") + file).c_str()));
  if (token.empty()) {
    return InvalidArgumentError(std::string("MESHPOST_CLUSTER_TOKEN_FILE=") + file +
                                " is empty; expected a token of at least " +
                                std::to_string(kMinClusterTokenBytes) + " bytes");
  }
  return token;
}

std::string GenerateClusterToken() {
  EnsureSodium();
  unsigned char raw[32];
  randombytes_buf(raw, sizeof(raw));
  char hex[2 * sizeof(raw) + 1];
  sodium_bin2hex(hex, sizeof(hex), raw, sizeof(raw));
  return std::string(hex);
}

bool LooksLikeAuthFrame(const void* data, size_t size) {
  if (size < 4) return false;
  uint32_t magic;
  std::memcpy(&magic, data, sizeof(magic));
  return magic == kAuthMagic;
}

std::string EncodeAuthFrame(const AuthFrame& f) {
  WireWriter w;
  w.Put<uint32_t>(kAuthMagic);
  w.Put<uint8_t>(static_cast<uint8_t>(f.type));
  switch (f.type) {
    case AuthFrameType::kHello:
      w.Put<int32_t>(f.connector_id);
      w.Put<int32_t>(f.acceptor_id);
      w.PutBytes(f.nonce.data(), f.nonce.size());
      break;
    case AuthFrameType::kChallenge:
      w.Put<int32_t>(f.acceptor_id);
      w.PutBytes(f.nonce.data(), f.nonce.size());
      w.PutBytes(f.mac.data(), f.mac.size());
      break;
    case AuthFrameType::kProof: w.PutBytes(f.mac.data(), f.mac.size()); break;
    case AuthFrameType::kRefused: w.PutString(f.reason.substr(0, kMaxAuthReasonBytes)); break;
  }
  return w.Release();
}

Result<AuthFrame> DecodeAuthFrame(const void* data, size_t size) {
  WireReader r(data, size);
  uint32_t magic = 0;
  uint8_t type = 0;
  if (!r.Get(&magic) || !r.Get(&type)) return r.status();
  if (magic != kAuthMagic) return DataLossError("not an authentication frame (bad magic)");
  AuthFrame f;
  auto get_bytes = [&r](uint8_t* out, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      if (!r.Get(&out[i])) return false;
    }
    return true;
  };
  switch (type) {
    case static_cast<uint8_t>(AuthFrameType::kHello):
      f.type = AuthFrameType::kHello;
      r.Get(&f.connector_id);
      r.Get(&f.acceptor_id);
      get_bytes(f.nonce.data(), f.nonce.size());
      break;
    case static_cast<uint8_t>(AuthFrameType::kChallenge):
      f.type = AuthFrameType::kChallenge;
      r.Get(&f.acceptor_id);
      get_bytes(f.nonce.data(), f.nonce.size());
      get_bytes(f.mac.data(), f.mac.size());
      break;
    case static_cast<uint8_t>(AuthFrameType::kProof):
      f.type = AuthFrameType::kProof;
      get_bytes(f.mac.data(), f.mac.size());
      break;
    case static_cast<uint8_t>(AuthFrameType::kRefused):
      f.type = AuthFrameType::kRefused;
      r.GetString(&f.reason, kMaxAuthReasonBytes);
      break;
    default: return DataLossError("unknown authentication frame type " + std::to_string(type));
  }
  if (!r.ok()) return r.status();
  if (r.remaining() != 0) {
    return DataLossError(std::to_string(r.remaining()) +
                         " trailing bytes after the authentication frame");
  }
  return f;
}

ConnectorHandshake::ConnectorHandshake(std::string token, int32_t self_id, int32_t peer_id)
    : token_(std::move(token)), self_id_(self_id), peer_id_(peer_id), nonce_(RandomNonce()) {}

std::string ConnectorHandshake::Hello() {
  AuthFrame f;
  f.type = AuthFrameType::kHello;
  f.connector_id = self_id_;
  f.acceptor_id = peer_id_;
  f.nonce = nonce_;
  return EncodeAuthFrame(f);
}

Result<std::string> ConnectorHandshake::OnChallenge(const AuthFrame& c, bool any_acceptor_id) {
  if (c.type != AuthFrameType::kChallenge) {
    return DataLossError("authentication: expected a challenge frame");
  }
  if (!any_acceptor_id && c.acceptor_id != peer_id_) {
    return UnavailableError("authentication: the node listening there is node " +
                            std::to_string(c.acceptor_id) + ", not node " +
                            std::to_string(peer_id_));
  }
  const Transcript t{self_id_, c.acceptor_id, nonce_, c.nonce};
  if (!MacEqual(Mac(token_, kAcceptorLabel, t), c.mac)) {
    return UnavailableError(
        "authentication: the peer does not know this cluster's token (MESHPOST_CLUSTER_TOKEN "
        "differs between the nodes, or the peer is not a member of this cluster)");
  }
  const AuthMac key = Mac(token_, kSessionLabel, t);
  std::memcpy(key_.data(), key.data(), key_.size());
  AuthFrame proof;
  proof.type = AuthFrameType::kProof;
  proof.mac = Mac(token_, kConnectorLabel, t);
  return EncodeAuthFrame(proof);
}

AcceptorHandshake::AcceptorHandshake(std::string token, int32_t self_id)
    : token_(std::move(token)), self_id_(self_id), nonce_(RandomNonce()) {}

Result<std::string> AcceptorHandshake::OnHello(const AuthFrame& h) {
  if (h.type != AuthFrameType::kHello) return DataLossError("authentication: expected hello");
  if (hello_seen_) return DataLossError("authentication: a second hello on one connection");
  hello_seen_ = true;
  connector_id_ = h.connector_id;
  connector_nonce_ = h.nonce;
  const Transcript t{connector_id_, self_id_, connector_nonce_, nonce_};
  expected_proof_ = Mac(token_, kConnectorLabel, t);
  const AuthMac key = Mac(token_, kSessionLabel, t);
  std::memcpy(key_.data(), key.data(), key_.size());
  AuthFrame c;
  c.type = AuthFrameType::kChallenge;
  c.acceptor_id = self_id_;
  c.nonce = nonce_;
  c.mac = Mac(token_, kAcceptorLabel, t);
  return EncodeAuthFrame(c);
}

Result<int32_t> AcceptorHandshake::OnProof(const AuthFrame& p) {
  if (p.type != AuthFrameType::kProof) return DataLossError("authentication: expected proof");
  if (!hello_seen_) return DataLossError("authentication: proof before hello");
  if (!MacEqual(expected_proof_, p.mac)) {
    return UnavailableError(
        "authentication: wrong proof (the connecting node does not know "
        "this cluster's token)");
  }
  return connector_id_;
}

static_assert(sizeof(crypto_onetimeauth_state) <= 256, "PayloadTagger state too small");

PayloadTagger::PayloadTagger(const SessionKey& key, uint64_t seq) {
  // One-time key = HMAC-SHA256(session key, "payload" | seq): never reused (seq is unique
  // per connection and direction), and unrelated to the header MAC's inputs.
  crypto_auth_hmacsha256_state st;
  crypto_auth_hmacsha256_init(&st, key.data(), key.size());
  static const char kLabel[] = "meshpost payload";
  crypto_auth_hmacsha256_update(&st, reinterpret_cast<const unsigned char*>(kLabel),
                                sizeof(kLabel));
  unsigned char seq_bytes[8];
  std::memcpy(seq_bytes, &seq, sizeof(seq));
  crypto_auth_hmacsha256_update(&st, seq_bytes, sizeof(seq_bytes));
  unsigned char one_time[crypto_auth_hmacsha256_BYTES];
  crypto_auth_hmacsha256_final(&st, one_time);
  crypto_onetimeauth_init(reinterpret_cast<crypto_onetimeauth_state*>(state_), one_time);
  sodium_memzero(one_time, sizeof(one_time));
}

PayloadTagger::~PayloadTagger() { sodium_memzero(state_, sizeof(state_)); }

void PayloadTagger::Update(const void* data, size_t size) {
  auto* st = reinterpret_cast<crypto_onetimeauth_state*>(state_);
  const uint64_t len = size;
  unsigned char len_bytes[8];
  std::memcpy(len_bytes, &len, sizeof(len));
  crypto_onetimeauth_update(st, len_bytes, sizeof(len_bytes));
  crypto_onetimeauth_update(st, static_cast<const unsigned char*>(data), size);
}

PayloadTag PayloadTagger::Final() {
  PayloadTag out;
  crypto_onetimeauth_final(reinterpret_cast<crypto_onetimeauth_state*>(state_), out.data());
  return out;
}

bool PayloadTagEqual(const PayloadTag& a, const PayloadTag& b) {
  return sodium_memcmp(a.data(), b.data(), a.size()) == 0;
}

void MessageSealer::Seal(std::string* header) {
  const uint64_t seq = next_seq_++;
  const AuthMac mac = HeaderMac(key_, seq, header->data(), header->size());
  header->append(reinterpret_cast<const char*>(&seq), sizeof(seq));
  header->append(reinterpret_cast<const char*>(mac.data()), mac.size());
}

Result<size_t> MessageOpener::Open(const void* data, size_t size) {
  if (size < kAuthTrailerBytes) {
    return DataLossError("sealed header has " + std::to_string(size) +
                         " bytes; expected at least " + std::to_string(kAuthTrailerBytes));
  }
  const size_t len = size - kAuthTrailerBytes;
  const auto* bytes = static_cast<const uint8_t*>(data);
  uint64_t seq;
  std::memcpy(&seq, bytes + len, sizeof(seq));
  AuthMac mac;
  std::memcpy(mac.data(), bytes + len + sizeof(seq), mac.size());
  if (!MacEqual(HeaderMac(key_, seq, data, len), mac)) {
    return DataLossError("message authentication failed (forged or altered header)");
  }
  if (seq != next_seq_) {
    return DataLossError("message sequence " + std::to_string(seq) + " where " +
                         std::to_string(next_seq_) + " was expected (replayed or reordered)");
  }
  ++next_seq_;
  return len;
}

}  // namespace meshpost
