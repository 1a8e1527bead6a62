// The fake device backend: stream/event semantics, and that it reports the ordering bugs
// meshpost's GPU paths must not have (a read before the producing event completed, a flag
// written before the data, a pinned buffer reused while its copy is in flight).
#include "tensor/backend/fake_backend.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <vector>

namespace meshpost {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr int64_t kIdleMs = 60'000;

class FakeBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    producer_ = *be_.CreateStream(0);
    consumer_ = *be_.CreateStream(0);
    dev_ = static_cast<uint8_t*>(*be_.AllocDevice(0, kBytes));
    pinned_ = static_cast<uint8_t*>(*be_.AllocPinned(kBytes));
    src_.assign(kBytes, 0xAB);
    std::memset(dev_, 0, kBytes);
    std::memset(pinned_, 0, kBytes);
  }
  void TearDown() override {
    if (flag_ != nullptr) be_.FreePinned(flag_);
    be_.FreeDevice(dev_);
    be_.FreePinned(pinned_);
  }

  // The flag tests' start: a pinned flag_ (0); a reader_ stream that waits for the flag to
  // be 1 and then copies dev_ to pinned_; and the producer_, held, copying src_ to dev_.
  void StartFlaggedTransfer() {
    flag_ = static_cast<int64_t*>(*be_.AllocPinned(8));
    *flag_ = 0;
    reader_ = *be_.CreateStream(0);
    ASSERT_TRUE(be_.WaitFlagAsync(flag_, 1, nullptr, reader_).ok());
    ASSERT_TRUE(be_.CopyAsync(pinned_, dev_, kBytes, reader_).ok());
    be_.HoldStream(producer_);
    ASSERT_TRUE(be_.CopyAsync(dev_, src_.data(), kBytes, producer_).ok());
  }

  // Completes everything on `stream` submitted so far.
  void Drain(DeviceStream stream) {
    DeviceEvent e = *be_.CreateEvent(0);
    ASSERT_TRUE(be_.RecordEvent(e, stream).ok());
    ASSERT_TRUE(be_.SyncEvent(e, kIdleMs).ok());
    be_.DestroyEvent(e);
  }

  static constexpr size_t kBytes = 1 << 16;
  FakeBackend be_;
  DeviceStream producer_ = 0, consumer_ = 0;
  DeviceStream reader_ = 0;  // StartFlaggedTransfer
  int64_t* flag_ = nullptr;  // StartFlaggedTransfer
  uint8_t* dev_ = nullptr;
  uint8_t* pinned_ = nullptr;
  std::vector<uint8_t> src_;
};

TEST_F(FakeBackendTest, DeviceMemoryIsClassifiedAsDevice) {
  EXPECT_EQ(be_.PointerDevice(dev_ + 100)->type, DeviceType::kCUDA);
  EXPECT_EQ(be_.PointerDevice(pinned_)->type, DeviceType::kCPU);
  EXPECT_EQ(be_.PointerDevice(src_.data())->type, DeviceType::kCPU);
  EXPECT_FALSE(be_.AllocDevice(3, 16).ok());
}

TEST_F(FakeBackendTest, ConsumerWaitingOnEventReadsProducedData) {
  be_.HoldStream(producer_);
  ASSERT_TRUE(be_.CopyAsync(dev_, src_.data(), kBytes, producer_).ok());
  DeviceEvent produced = *be_.CreateEvent(0);
  ASSERT_TRUE(be_.RecordEvent(produced, producer_).ok());
  ASSERT_TRUE(be_.StreamWaitEvent(consumer_, produced).ok());
  ASSERT_TRUE(be_.CopyAsync(pinned_, dev_, kBytes, consumer_).ok());
  ASSERT_TRUE(be_.WaitIdle(kIdleMs));
  EXPECT_FALSE(*be_.EventDone(produced));
  EXPECT_EQ(pinned_[0], 0) << "consumer ran before the producer's event";
  be_.ReleaseStream(producer_);
  Drain(consumer_);
  EXPECT_EQ(std::memcmp(pinned_, src_.data(), kBytes), 0);
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

TEST_F(FakeBackendTest, ReadBeforeProducingEventIsAHazard) {
  be_.HoldStream(producer_);
  ASSERT_TRUE(be_.CopyAsync(dev_, src_.data(), kBytes, producer_).ok());
  // Bug under test: no StreamWaitEvent before reading what the producer writes.
  ASSERT_TRUE(be_.CopyAsync(pinned_, dev_, kBytes, consumer_).ok());
  ASSERT_TRUE(be_.WaitIdle(kIdleMs));
  be_.ReleaseStream(producer_);
  Drain(producer_);
  ASSERT_THAT(be_.Hazards(), Not(IsEmpty()));
  EXPECT_THAT(be_.Hazards()[0], HasSubstr("unordered with copy"));
}

TEST_F(FakeBackendTest, FlagWrittenBeforeDataIsAHazard) {
  ASSERT_NO_FATAL_FAILURE(StartFlaggedTransfer());
  // Bug under test: the flag goes out on another stream without waiting for the data.
  ASSERT_TRUE(be_.WriteFlagAsync(flag_, 1, nullptr, consumer_).ok());
  ASSERT_TRUE(be_.WaitIdle(kIdleMs));
  be_.ReleaseStream(producer_);
  Drain(reader_);
  Drain(producer_);
  EXPECT_THAT(be_.Hazards(), Not(IsEmpty()));
}

TEST_F(FakeBackendTest, FlagAfterDataEventIsClean) {
  ASSERT_NO_FATAL_FAILURE(StartFlaggedTransfer());
  DeviceEvent data = *be_.CreateEvent(0);
  ASSERT_TRUE(be_.RecordEvent(data, producer_).ok());
  ASSERT_TRUE(be_.StreamWaitEvent(consumer_, data).ok());
  ASSERT_TRUE(be_.WriteFlagAsync(flag_, 1, nullptr, consumer_).ok());
  ASSERT_TRUE(be_.WaitIdle(kIdleMs));
  be_.ReleaseStream(producer_);
  Drain(reader_);
  EXPECT_EQ(std::memcmp(pinned_, src_.data(), kBytes), 0);
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

TEST_F(FakeBackendTest, PinnedBufferReusedWhileCopyInFlightIsAHazard) {
  be_.HoldStream(consumer_);
  ASSERT_TRUE(be_.CopyAsync(dev_, pinned_, kBytes, consumer_).ok());
  // Bug under test: the host refills the staging buffer before its copy completed.
  be_.HostAccess(pinned_, kBytes, /*write=*/true);
  be_.ReleaseStream(consumer_);
  Drain(consumer_);
  ASSERT_THAT(be_.Hazards(), Not(IsEmpty()));
  EXPECT_THAT(be_.Hazards()[0], HasSubstr("host write"));
  be_.ClearHazards();
  be_.HostAccess(pinned_, kBytes, /*write=*/true);  // after the copy: fine
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

TEST_F(FakeBackendTest, FlagValueFromMemoryAndIncrement) {
  int64_t* flag = static_cast<int64_t*>(*be_.AllocPinned(16));
  int64_t* seq = flag + 1;
  *flag = 0;
  *seq = 41;
  ASSERT_TRUE(be_.IncrementAsync(seq, producer_).ok());
  ASSERT_TRUE(be_.WriteFlagAsync(flag, 0, seq, producer_).ok());
  ASSERT_TRUE(be_.WaitFlagAsync(flag, 0, seq, consumer_).ok());
  Drain(producer_);
  Drain(consumer_);
  EXPECT_EQ(*flag, 42);
  be_.FreePinned(flag);
}

TEST_F(FakeBackendTest, InjectedDelayKeepsStreamOrder) {
  be_.SetDelayUs(producer_, 200);
  std::vector<uint8_t> a(kBytes, 1), b(kBytes, 2);
  ASSERT_TRUE(be_.CopyAsync(dev_, a.data(), kBytes, producer_).ok());
  ASSERT_TRUE(be_.CopyAsync(dev_, b.data(), kBytes, producer_).ok());
  ASSERT_TRUE(be_.CopyAsync(pinned_, dev_, kBytes, producer_).ok());
  Drain(producer_);
  EXPECT_EQ(pinned_[kBytes - 1], 2);
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

TEST_F(FakeBackendTest, IpcHandleMapsTheSameMemoryInAnotherProcess) {
  auto ex = be_.ExportIpc(dev_ + 128);
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(ex->offset, 128u);
  dev_[128] = 7;
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    FakeBackend other;
    auto base = other.OpenIpc(*ex);
    if (!base.ok()) _exit(2);
    uint8_t* p = static_cast<uint8_t*>(*base) + ex->offset;
    if (*p != 7) _exit(3);
    *p = 9;
    _exit(other.CloseIpc(*base).ok() ? 0 : 4);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(dev_[128], 9);
  EXPECT_FALSE(be_.ExportIpc(pinned_).ok());
}

TEST_F(FakeBackendTest, UnavailableBackendSaysWhy) {
  be_.SetUnavailable(UnavailableError("no device in this test"));
  EXPECT_EQ(be_.device_count(), 0);
  auto s = be_.CreateStream(0);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("no device in this test"));
  EXPECT_FALSE(be_.CopyAsync(pinned_, dev_, 8, producer_).ok());
}

TEST_F(FakeBackendTest, SyncEventTimesOutInsteadOfHanging) {
  be_.HoldStream(producer_);
  DeviceEvent e = *be_.CreateEvent(0);
  ASSERT_TRUE(be_.RecordEvent(e, producer_).ok());
  Status s = be_.SyncEvent(e, 20);
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s;
  be_.ReleaseStream(producer_);
  EXPECT_TRUE(be_.SyncEvent(e, kIdleMs).ok());
}

TEST(CudaBackendTest, ReportsWhyDevicesAreRefusedWithoutADriver) {
  DeviceBackend* cuda = CudaBackend();
  ASSERT_NE(cuda, nullptr);
  Status s = cuda->Available();
  if (s.ok()) GTEST_SKIP() << "a CUDA device is usable here; tests/gpu covers it";
  EXPECT_FALSE(s.message().empty());
  if (!BuiltWithCuda()) {
    EXPECT_THAT(s.message(), HasSubstr("no CUDA support"));
  }
  EXPECT_EQ(cuda->device_count(), 0);
  auto stream = cuda->CreateStream(0);
  ASSERT_FALSE(stream.ok());
  EXPECT_EQ(stream.status().message(), s.message());
  int x = 0;
  EXPECT_EQ(cuda->PointerDevice(&x)->type, DeviceType::kCPU);
}

}  // namespace
}  // namespace meshpost
