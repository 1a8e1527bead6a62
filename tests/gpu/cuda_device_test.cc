// The CUDA backend on a real device (built with MESHPOST_WITH_CUDA; every test skips with
// the backend's reason where no driver or GPU is usable). Run by scripts/gpu_check.sh.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <future>
#include <vector>

#include "tensor/device_backend.h"
#include "tensor/device_staging.h"

namespace meshpost {
namespace {

constexpr int64_t kWaitMs = 60'000;

class CudaDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    be_ = CudaBackend();
    Status s = be_->Available();
    if (!s.ok()) GTEST_SKIP() << "no usable CUDA device: " << s.message();
  }
  DeviceBackend* be_ = nullptr;
};

TEST_F(CudaDeviceTest, PointerKindsAndRoundTripCopy) {
  const size_t n = 1 << 20;
  void* dev = *be_->AllocDevice(0, n);
  void* pinned = *be_->AllocPinned(n);
  EXPECT_EQ(be_->PointerDevice(dev)->type, DeviceType::kCUDA);
  EXPECT_EQ(be_->PointerDevice(pinned)->type, DeviceType::kCPU);
  std::vector<uint8_t> src(n), back(n, 0);
  for (size_t i = 0; i < n; ++i) src[i] = static_cast<uint8_t>(i * 7);
  DeviceStream s = *be_->CreateStream(0);
  ASSERT_TRUE(be_->RegisterHost(src.data(), n).ok());
  ASSERT_TRUE(be_->CopyAsync(dev, src.data(), n, s).ok());
  ASSERT_TRUE(be_->CopyAsync(pinned, dev, n, s).ok());
  DeviceEvent e = *be_->CreateEvent(0);
  ASSERT_TRUE(be_->RecordEvent(e, s).ok());
  ASSERT_TRUE(be_->SyncEvent(e, kWaitMs).ok());
  EXPECT_EQ(std::memcmp(pinned, src.data(), n), 0);
  EXPECT_TRUE(be_->UnregisterHost(src.data()).ok());
  be_->DestroyEvent(e);
  be_->DestroyStream(s);
  be_->FreeDevice(dev);
  be_->FreePinned(pinned);
}

TEST_F(CudaDeviceTest, FlagKernelsOrderStreams) {
  int64_t* host = static_cast<int64_t*>(*be_->AllocPinned(16));
  host[0] = 0;
  host[1] = 0;
  int64_t* flag = static_cast<int64_t*>(*be_->HostDevicePointer(host));
  int64_t* seq = static_cast<int64_t*>(*be_->AllocDevice(0, 8));
  DeviceStream a = *be_->CreateStream(0), b = *be_->CreateStream(0);
  ASSERT_TRUE(be_->CopyAsync(seq, &host[1], 8, a).ok());
  ASSERT_TRUE(be_->IncrementAsync(seq, a).ok());
  ASSERT_TRUE(be_->IncrementAsync(seq, a).ok());
  ASSERT_TRUE(be_->WaitFlagAsync(flag, 2, nullptr, b).ok());  // b waits for a's flag
  DeviceEvent eb = *be_->CreateEvent(0);
  ASSERT_TRUE(be_->RecordEvent(eb, b).ok());
  ASSERT_TRUE(be_->WriteFlagAsync(flag, 0, seq, a).ok());  // writes *seq == 2
  ASSERT_TRUE(be_->SyncEvent(eb, kWaitMs).ok());
  EXPECT_EQ(__atomic_load_n(&host[0], __ATOMIC_ACQUIRE), 2);
  // The host releases a waiting stream.
  ASSERT_TRUE(be_->WaitFlagAsync(flag, 5, nullptr, b).ok());
  ASSERT_TRUE(be_->RecordEvent(eb, b).ok());
  be_->HostWriteFlag(&host[0], 5);
  ASSERT_TRUE(be_->SyncEvent(eb, kWaitMs).ok());
  be_->DestroyEvent(eb);
  be_->DestroyStream(a);
  be_->DestroyStream(b);
  be_->FreeDevice(seq);
  be_->FreePinned(host);
}

TEST_F(CudaDeviceTest, StagerCopiesAfterTheCallersEvent) {
  auto stager = DeviceStager::Create(be_, StagerOptions{});
  ASSERT_TRUE(stager.ok()) << stager.status();
  const size_t n = 4 << 20;
  void* dev = *be_->AllocDevice(0, n);
  DeviceStream user = *be_->CreateStream(0);
  std::vector<uint8_t> src(n, 0x5A);
  ASSERT_TRUE(be_->CopyAsync(dev, src.data(), n, user).ok());
  auto ev = (*stager)->RecordOn(user);
  ASSERT_TRUE(ev.ok());
  auto buf = (*stager)->Acquire(n);
  ASSERT_TRUE(buf.ok());
  std::promise<Status> done;
  ASSERT_TRUE((*stager)
                  ->Submit({{buf->data, dev, n}}, *ev, [&](const Status& s) { done.set_value(s); })
                  .ok());
  ASSERT_TRUE(done.get_future().get().ok());
  EXPECT_EQ(static_cast<uint8_t*>(buf->data)[n - 1], 0x5A);
  be_->FreeDevice(dev);
}

TEST_F(CudaDeviceTest, DmabufExportWhereTheDriverSupportsIt) {
  void* dev = *be_->AllocDevice(0, 1 << 21);
  auto d = be_->DmabufFd(dev, 1 << 21);
  if (!d.ok()) {
    EXPECT_TRUE(d.status().code() == StatusCode::kUnimplemented ||
                d.status().message().find("cuMemGetHandleForAddressRange") != std::string::npos)
        << d.status();
    GTEST_SKIP() << "dma-buf export unavailable: " << d.status().message();
  }
  EXPECT_GE(d->fd, 0);
  close(d->fd);
  be_->FreeDevice(dev);
}

}  // namespace
}  // namespace meshpost
