// FrameRing (van/cma/frame_ring.h): order, wrap-around, a full ring, the sleeper
// handshake, and a peer that corrupts the shared indices or hands over a bad memfd.
#include "van/cma/frame_ring.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

namespace meshpost {
namespace cma {
namespace {

struct Pair {
  std::unique_ptr<FrameRing> producer;
  std::unique_ptr<FrameRing> consumer;
  int fd = -1;
  ~Pair() {
    if (fd >= 0) ::close(fd);
  }
};

void MakePair(size_t capacity, Pair* p) {
  auto made = FrameRing::Create(capacity, &p->fd);
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  p->producer = std::move(made).value();
  auto attached = FrameRing::Attach(p->fd, size_t{1} << 20);
  ASSERT_TRUE(attached.ok()) << attached.status().ToString();
  p->consumer = std::move(attached).value();
}

// The shared words, as a hostile peer would reach them through its own mapping.
uint64_t* Word(int fd, size_t offset, void** map) {
  *map = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  EXPECT_NE(*map, MAP_FAILED);
  return reinterpret_cast<uint64_t*>(static_cast<char*>(*map) + offset);
}

TEST(FrameRingTest, FramesArriveInOrderAcrossTheWrapAndAFullRingRefusesMore) {
  Pair p;
  MakePair(4096, &p);
  ASSERT_EQ(p.producer->max_frame(), 1024u);
  std::vector<char> buf(4096);
  uint32_t kind = 0;
  size_t n = 0;
  // 300 frames of varying sizes through a 4 KiB ring: many wrap-arounds.
  for (int i = 0; i < 300; ++i) {
    std::string frame(static_cast<size_t>(1 + (i * 37) % 1000), static_cast<char>('a' + i % 26));
    auto wrote = p.producer->TryWrite(FrameRing::kFrame, frame.data(), frame.size());
    ASSERT_TRUE(wrote.ok() && *wrote) << i;
    if (i % 3 == 0) {  // a marker between: no bytes
      auto m = p.producer->TryWrite(FrameRing::kMarker, nullptr, 0);
      ASSERT_TRUE(m.ok() && *m);
    }
    auto got = p.consumer->Read(buf.data(), buf.size(), &kind, &n);
    ASSERT_TRUE(got.ok() && *got) << i;
    EXPECT_EQ(kind, FrameRing::kFrame);
    ASSERT_EQ(std::string(buf.data(), n), frame) << i;
    if (i % 3 == 0) {
      got = p.consumer->Read(buf.data(), buf.size(), &kind, &n);
      ASSERT_TRUE(got.ok() && *got);
      EXPECT_EQ(kind, FrameRing::kMarker);
      EXPECT_EQ(n, 0u);
    }
    EXPECT_TRUE(p.consumer->Empty());
  }
  // Full: four 1000-byte frames take 4 x 1008 bytes; a fifth does not fit.
  std::string big(1000, 'z');
  for (int i = 0; i < 4; ++i) {
    auto wrote = p.producer->TryWrite(FrameRing::kFrame, big.data(), big.size());
    ASSERT_TRUE(wrote.ok() && *wrote);
  }
  auto full = p.producer->TryWrite(FrameRing::kFrame, big.data(), big.size());
  ASSERT_TRUE(full.ok());
  EXPECT_FALSE(*full);
  auto huge = p.producer->TryWrite(FrameRing::kFrame, buf.data(), 1025);
  EXPECT_FALSE(huge.ok());  // larger than max_frame: the caller uses the socket
  // Reading one makes room again.
  ASSERT_TRUE(*p.consumer->Read(buf.data(), buf.size(), &kind, &n));
  auto again = p.producer->TryWrite(FrameRing::kFrame, big.data(), big.size());
  ASSERT_TRUE(again.ok() && *again);
}

TEST(FrameRingTest, OnlyAnArmedConsumerAsksForADoorbellAndOnlyOnce) {
  Pair p;
  MakePair(4096, &p);
  const char x = 'x';
  ASSERT_TRUE(*p.producer->TryWrite(FrameRing::kFrame, &x, 1));
  EXPECT_FALSE(p.producer->TakeSleeper());  // consumer polling: no doorbell
  // A frame waits: the consumer must not sleep.
  EXPECT_FALSE(p.consumer->Arm());
  std::vector<char> buf(64);
  uint32_t kind;
  size_t n;
  ASSERT_TRUE(*p.consumer->Read(buf.data(), buf.size(), &kind, &n));
  EXPECT_TRUE(p.consumer->Arm());  // empty: may sleep
  ASSERT_TRUE(*p.producer->TryWrite(FrameRing::kFrame, &x, 1));
  EXPECT_TRUE(p.producer->TakeSleeper());   // ring the doorbell
  EXPECT_FALSE(p.producer->TakeSleeper());  // once
  p.consumer->Arm();
  p.consumer->Disarm();
  EXPECT_FALSE(p.producer->TakeSleeper());
}

TEST(FrameRingTest, CorruptIndicesAreErrorsNotOutOfBoundsAccesses) {
  std::vector<char> buf(4096);
  uint32_t kind;
  size_t n;
  {
    Pair p;
    MakePair(4096, &p);
    void* map;
    uint64_t* tail = Word(p.fd, 64, &map);
    *tail = 1u << 20;  // more than the ring holds
    EXPECT_EQ(p.consumer->Read(buf.data(), buf.size(), &kind, &n).status().code(),
              StatusCode::kDataLoss);
    *tail = 12;  // not a record boundary
    EXPECT_FALSE(p.consumer->Read(buf.data(), buf.size(), &kind, &n).ok());
    ::munmap(map, 4096);
  }
  {
    Pair p;
    MakePair(4096, &p);
    std::string frame(100, 'f');
    ASSERT_TRUE(*p.producer->TryWrite(FrameRing::kFrame, frame.data(), frame.size()));
    // The producer rewrites the record's length after publishing it.
    void* map = ::mmap(nullptr, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, p.fd, 0);
    ASSERT_NE(map, MAP_FAILED);
    uint32_t len = 3000;
    std::memcpy(static_cast<char*>(map) + 4096, &len, sizeof(len));
    EXPECT_EQ(p.consumer->Read(buf.data(), buf.size(), &kind, &n).status().code(),
              StatusCode::kDataLoss);
    // A record larger than the caller's buffer is refused as well.
    len = 100;
    std::memcpy(static_cast<char*>(map) + 4096, &len, sizeof(len));
    EXPECT_FALSE(p.consumer->Read(buf.data(), 64, &kind, &n).ok());
    ::munmap(map, 8192);
  }
  {
    Pair p;
    MakePair(4096, &p);
    void* map;
    uint64_t* head = Word(p.fd, 128, &map);
    *head = 99999;  // the consumer claims to have read what was never written
    const char x = 'x';
    EXPECT_EQ(p.producer->TryWrite(FrameRing::kFrame, &x, 1).status().code(),
              StatusCode::kDataLoss);
    ::munmap(map, 4096);
  }
}

TEST(FrameRingTest, AttachRefusesUnsealedUndersizedAndOversizedRings) {
  int fd = -1;
  auto made = FrameRing::Create(8192, &fd);
  ASSERT_TRUE(made.ok());
  EXPECT_FALSE(FrameRing::Attach(fd, 4096).ok());  // larger than the receiver accepts
  EXPECT_TRUE(FrameRing::Attach(fd, 8192).ok());
  ::close(fd);
  EXPECT_FALSE(FrameRing::Create(5000, &fd).ok());  // not a power of two
  // An unsealed memfd with a valid-looking header: it could shrink under the mapping.
  int raw = ::memfd_create("raw", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  ASSERT_GE(raw, 0);
  ASSERT_EQ(::ftruncate(raw, 4096 + 4096), 0);
  const uint32_t magic = 0x47525053, version = 1;
  const uint64_t cap = 4096;
  ASSERT_EQ(::pwrite(raw, &magic, 4, 0), 4);
  ASSERT_EQ(::pwrite(raw, &version, 4, 4), 4);
  ASSERT_EQ(::pwrite(raw, &cap, 8, 8), 8);
  auto unsealed = FrameRing::Attach(raw, 1 << 20);
  EXPECT_FALSE(unsealed.ok());
  ASSERT_EQ(::fcntl(raw, F_ADD_SEALS, F_SEAL_SHRINK), 0);
  EXPECT_TRUE(FrameRing::Attach(raw, 1 << 20).ok());
  // A header that claims more than the memfd holds.
  const uint64_t liar = 1 << 16;
  ASSERT_EQ(::pwrite(raw, &liar, 8, 8), 8);
  EXPECT_FALSE(FrameRing::Attach(raw, 1 << 20).ok());
  ::close(raw);
}

}  // namespace
}  // namespace cma
}  // namespace meshpost
