// Streamed messages on the tcp van (van/streamed_bytes.h): a message sent while its bytes
// are still being written (GPU staging) goes out range by range as the producer advances,
// so copy and network overlap, and arrives whole; a producer failure drops it at the
// receiver with the reason; parts that do not fit their stream are refused; vans that do
// not stream refuse such messages.
#include <gtest/gtest.h>
#include <zmq.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tests/support/raw_zmq_peer.h"
#include "tests/support/recording_receiver.h"
#include "van/cma/cma_van.h"
#include "van/codec.h"
#include "van/streamed_bytes.h"
#include "van/zmq/zmq_van.h"

namespace meshpost {
namespace {

// Also records OnStreamProgress: (segment, bytes) of the latest call.
class Recorder : public support::RecordingReceiver {
 public:
  void OnStreamProgress(const Meta& meta, size_t index, size_t bytes) override {
    std::lock_guard<std::mutex> lock(progress_mu_);
    progress_ = {index, bytes};
  }
  std::pair<size_t, size_t> progress() {
    std::lock_guard<std::mutex> lock(progress_mu_);
    return progress_;
  }

 private:
  std::mutex progress_mu_;
  std::pair<size_t, size_t> progress_{0, 0};
};

struct Pair {
  std::unique_ptr<Van> a = CreateZmqVan({});
  std::unique_ptr<Van> b = CreateZmqVan({});
  Recorder ra, rb;
  int port_b = 0;
  Pair() {
    int pa = *a->Bind("127.0.0.1", 0);
    port_b = *b->Bind("127.0.0.1", 0);
    EXPECT_TRUE(a->Start(&ra).ok());
    EXPECT_TRUE(b->Start(&rb).ok());
    EXPECT_TRUE(a->Connect({2, "127.0.0.1", port_b}).ok());
    EXPECT_TRUE(b->Connect({1, "127.0.0.1", pa}).ok());
  }
};

TensorDesc Desc(int64_t key, size_t n) {
  return TensorDesc{key, DType::kUInt8, {static_cast<int64_t>(n)}, n, 0};
}

// A request of a ready segment (key 1) and two streamed ones (keys 2, 3) over `bufs`.
OutMessage Streamed(const std::vector<std::vector<char>>& bufs,
                    const std::shared_ptr<StreamedBytes>& stream) {
  OutMessage m;
  m.meta.cmd = Command::kRequest;
  m.meta.sender = 1;
  m.meta.recipient = 2;
  m.meta.id = 77;
  for (size_t i = 0; i < bufs.size(); ++i) {
    m.meta.data.push_back(Desc(static_cast<int64_t>(i + 1), bufs[i].size()));
    m.segments.push_back({bufs[i].data(), bufs[i].size(), nullptr, /*streamed=*/i > 0});
  }
  m.stream = stream;
  return m;
}

std::vector<std::vector<char>> Buffers() {
  std::vector<std::vector<char>> bufs = {std::vector<char>(1000), std::vector<char>(300000),
                                         std::vector<char>(5000)};
  for (size_t b = 0; b < bufs.size(); ++b) {
    for (size_t i = 0; i < bufs[b].size(); ++i) bufs[b][i] = static_cast<char>(i * 7 + b);
  }
  return bufs;
}

TEST(ZmqStreamTest, ArrivesWholeOnlyAfterTheLastByteIsReady) {
  const auto bufs = Buffers();  // outlive the vans: the segments have no owners
  std::vector<char> dest(bufs[1].size());
  Pair p;
  p.rb.land(2, dest.data());
  auto stream = std::make_shared<StreamedBytes>();
  ASSERT_TRUE(p.a->Send(Streamed(bufs, stream)).ok());
  stream->Advance(100000);
  for (int i = 0; i < 500 && p.rb.progress().second < 100000; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  // The receiver hears of the bytes as they land (segment 1: the first streamed one).
  EXPECT_EQ(p.rb.progress(), (std::pair<size_t, size_t>{1, 100000}));
  EXPECT_TRUE(p.rb.TakeMessages().empty()) << "delivered before its bytes were ready";
  stream->Advance(300000 + 4999);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_TRUE(p.rb.TakeMessages().empty());
  stream->Advance(300000 + 5000);
  ASSERT_TRUE(p.rb.WaitFor(1, 0));
  auto got = p.rb.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  const InMessage& in = got[0];
  EXPECT_EQ(in.meta.cmd, Command::kRequest);
  EXPECT_EQ(in.meta.id, 77u);
  ASSERT_EQ(in.segments.size(), 3u);
  EXPECT_EQ(in.segments[1].data, dest.data()) << "the receiver's destination, chosen at BEGIN";
  EXPECT_EQ(dest, bufs[1]);
  for (size_t s : {0, 2}) {
    ASSERT_EQ(in.segments[s].size, bufs[s].size());
    EXPECT_EQ(std::memcmp(in.segments[s].data, bufs[s].data(), bufs[s].size()), 0) << s;
  }
  // Ordinary messages still flow, streamed or not.
  std::vector<char> small(64, 3);
  OutMessage plain;
  plain.meta.cmd = Command::kRequest;
  plain.meta.sender = 1;
  plain.meta.recipient = 2;
  plain.meta.data.push_back(Desc(9, small.size()));
  plain.segments.push_back({small.data(), small.size(), nullptr});
  ASSERT_TRUE(p.a->Send(std::move(plain)).ok());
  ASSERT_TRUE(p.rb.WaitFor(1, 0));
}

// What the sending van puts on the wire, seen by a bare ROUTER: BEGIN and the ready parts
// leave before the producer finished (the overlap), the rest as it advances.
TEST(ZmqStreamTest, ReadyRangesLeaveBeforeTheProducerFinishes) {
  void* ctx = zmq_ctx_new();
  void* router = zmq_socket(ctx, ZMQ_ROUTER);
  ASSERT_EQ(zmq_bind(router, "tcp://127.0.0.1:*"), 0);
  char endpoint[256];
  size_t len = sizeof(endpoint);
  zmq_getsockopt(router, ZMQ_LAST_ENDPOINT, endpoint, &len);
  const int port = std::stoi(std::string(endpoint).substr(std::string(endpoint).rfind(':') + 1));
  const auto bufs = Buffers();
  {
    auto a = CreateZmqVan({});
    Recorder ra;
    ASSERT_TRUE(a->Bind("127.0.0.1", 0).ok());
    ASSERT_TRUE(a->Start(&ra).ok());
    ASSERT_TRUE(a->Connect({2, "127.0.0.1", port}).ok());
    auto stream = std::make_shared<StreamedBytes>();
    ASSERT_TRUE(a->Send(Streamed(bufs, stream)).ok());
    stream->Advance(150000);
    // Receive messages until the parts cover the first 150000 streamed bytes.
    std::vector<Meta> seen;
    size_t streamed_bytes = 0;
    int timeout_ms = 5000;
    zmq_setsockopt(router, ZMQ_RCVTIMEO, &timeout_ms, sizeof(timeout_ms));
    auto receive = [&]() -> bool {
      zmq_msg_t frame;
      zmq_msg_init(&frame);
      if (zmq_msg_recv(&frame, router, 0) < 0) return false;  // identity
      zmq_msg_close(&frame);
      zmq_msg_init(&frame);
      if (zmq_msg_recv(&frame, router, 0) < 0) return false;
      auto meta = DecodeMeta(static_cast<const char*>(zmq_msg_data(&frame)), zmq_msg_size(&frame));
      bool more = zmq_msg_more(&frame);
      zmq_msg_close(&frame);
      while (more) {
        zmq_msg_init(&frame);
        zmq_msg_recv(&frame, router, 0);
        more = zmq_msg_more(&frame);
        zmq_msg_close(&frame);
      }
      if (!meta.ok()) return false;
      if (meta->cmd == Command::kStreamPart && meta->arg > 0)
        streamed_bytes += meta->data[0].nbytes;
      seen.push_back(*meta);
      return true;
    };
    while (streamed_bytes < 150000 && receive()) {
    }
    ASSERT_EQ(streamed_bytes, 150000u) << "the ready range did not go out before the rest";
    ASSERT_GE(seen.size(), 3u);
    EXPECT_EQ(seen[0].cmd, Command::kStreamBegin);
    EXPECT_EQ(seen[1].cmd, Command::kStreamPart);
    EXPECT_EQ(seen[1].arg, 0) << "the ready segment goes first";
    stream->Advance(305000);
    while (streamed_bytes < 305000 && receive()) {
    }
    EXPECT_EQ(streamed_bytes, 305000u);
    a->Stop();
  }
  zmq_close(router);
  zmq_ctx_term(ctx);
}

TEST(ZmqStreamTest, ProducerFailureDropsTheMessageWithTheReason) {
  const auto bufs = Buffers();
  Pair p;
  auto stream = std::make_shared<StreamedBytes>();
  ASSERT_TRUE(p.a->Send(Streamed(bufs, stream)).ok());
  stream->Advance(1000);
  stream->Fail(UnavailableError("the device copy failed (test)"));
  ASSERT_TRUE(p.rb.WaitFor(0, 1));
  auto dropped = p.rb.TakeDropped();
  EXPECT_EQ(dropped[0].first.cmd, Command::kRequest);
  EXPECT_EQ(dropped[0].first.id, 77u);
  EXPECT_NE(dropped[0].second.message().find("the device copy failed (test)"), std::string::npos)
      << dropped[0].second;
  stream->Advance(305000);  // too late: nothing more is sent
  auto again = std::make_shared<StreamedBytes>();
  ASSERT_TRUE(p.a->Send(Streamed(bufs, again)).ok());
  again->Advance(305000);
  ASSERT_TRUE(p.rb.WaitFor(1, 0));
}

// A peer sending parts that do not fit: unknown stream (ignored), out of order or past
// the segment (the message is dropped); the van keeps working.
TEST(ZmqStreamTest, PartsThatDoNotFitTheirStreamAreRefused) {
  Pair p;
  support::RawZmqPeer raw(p.port_b);
  ASSERT_TRUE(raw.connected());
  Meta part;
  part.cmd = Command::kStreamPart;
  part.sender = 1;
  part.recipient = 2;
  part.id = 5;
  part.data.push_back(Desc(1, 8));
  ASSERT_TRUE(raw.Send(part, {std::vector<char>(8, 1)}));  // no such stream: ignored
  Meta inner;
  inner.cmd = Command::kRequest;
  inner.sender = 1;
  inner.recipient = 2;
  inner.id = 9;
  inner.data.push_back(Desc(1, 16));
  Meta begin;
  begin.cmd = Command::kStreamBegin;
  begin.sender = 1;
  begin.recipient = 2;
  begin.id = 5;
  begin.body = EncodeMeta(inner);
  ASSERT_TRUE(raw.Send(begin, {}));
  part.data[0].addr = 8;  // skips the first 8 bytes
  ASSERT_TRUE(raw.Send(part, {std::vector<char>(8, 1)}));
  ASSERT_TRUE(p.rb.WaitFor(0, 1));
  auto dropped = p.rb.TakeDropped();
  EXPECT_EQ(dropped[0].first.id, 9u);
  EXPECT_EQ(dropped[0].second.code(), StatusCode::kDataLoss);
  // A begin whose inner message claims another sender is ignored outright.
  inner.sender = 7;
  begin.id = 6;
  begin.body = EncodeMeta(inner);
  ASSERT_TRUE(raw.Send(begin, {}));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_TRUE(p.rb.TakeDropped().empty());
  EXPECT_TRUE(p.rb.TakeMessages().empty());
  // In order and in bounds: delivered.
  inner.sender = 1;
  begin.id = 7;
  begin.body = EncodeMeta(inner);
  ASSERT_TRUE(raw.Send(begin, {}));
  part.id = 7;
  part.data[0].addr = 0;
  part.data[0].nbytes = 16;
  part.data[0].shape = {16};
  ASSERT_TRUE(raw.Send(part, {std::vector<char>(16, 4)}));
  ASSERT_TRUE(p.rb.WaitFor(1, 0));
  auto got = p.rb.TakeMessages();
  EXPECT_EQ(static_cast<const char*>(got[0].segments[0].data)[15], 4);
}

TEST(ZmqStreamTest, VansThatDoNotStreamRefuseAStreamedMessage) {
  auto cma = CreateCmaVan({});
  EXPECT_FALSE(cma->SupportsStreaming());
  const auto bufs = Buffers();
  Status s = cma->Send(Streamed(bufs, std::make_shared<StreamedBytes>()));
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(CreateZmqVan({})->SupportsStreaming());
}

}  // namespace
}  // namespace meshpost
