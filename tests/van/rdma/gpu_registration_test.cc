// GPUDirect registration in the RDMA van (van/rdma/mr_cache.h: RegisterGpuMemory, MrCache
// with cuda_device): the dma-buf path, the ibv_reg_mr (nvidia-peermem) fallback, the clear
// error when neither works, and the user-chosen staging mode. Device memory comes from the
// fake device backend (memfd-backed, so its dma-buf is a real file descriptor); the verbs
// device is the fake fabric's, wrapped to script dma-buf and peer-memory support.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <vector>

#include "fake_verbs.h"
#include "tensor/backend/fake_backend.h"
#include "test_util.h"
#include "van/rdma/mr_cache.h"
#include "van/rdma/rdma_van.h"

namespace meshpost {
namespace rdma {
namespace testing {
namespace {

using ::testing::HasSubstr;

// The fake fabric's device with scripted GPUDirect support: RegisterDmabuf checks the fd
// is open and registers [iova, iova + length) on the fabric; RegisterMemory on device
// memory fails unless peer memory is "loaded".
class ScriptedGpuDevice : public VerbsDevice {
 public:
  ScriptedGpuDevice(std::unique_ptr<VerbsDevice> inner, FakeBackend* backend)
      : inner_(std::move(inner)), backend_(backend) {}

  bool dmabuf_supported = true;
  bool peermem_loaded = true;
  int dmabuf_calls = 0;
  int reg_mr_device_calls = 0;
  uint64_t last_offset = 0;
  uint64_t last_iova = 0;

  const std::string& name() const override { return inner_->name(); }
  Result<DeviceAttr> QueryDevice() override { return inner_->QueryDevice(); }
  Result<PortAttr> QueryPort(uint8_t port) override { return inner_->QueryPort(port); }
  Result<GidEntry> QueryGid(uint8_t port, int index) override {
    return inner_->QueryGid(port, index);
  }
  Result<std::unique_ptr<VerbsMr>> RegisterMemory(void* addr, size_t length,
                                                  uint32_t access) override {
    auto where = backend_->PointerDevice(addr);
    if (where.ok() && where->type == DeviceType::kCUDA) {
      ++reg_mr_device_calls;
      if (!peermem_loaded) return InvalidArgumentError("ibv_reg_mr: Bad address (errno 14)");
    }
    return inner_->RegisterMemory(addr, length, access);
  }
  Result<std::unique_ptr<VerbsMr>> RegisterDmabuf(int fd, uint64_t offset, size_t length,
                                                  uint64_t iova, uint32_t access) override {
    ++dmabuf_calls;
    if (!dmabuf_supported) {
      return UnimplementedError("ibv_reg_dmabuf_mr: Operation not supported (errno 95)");
    }
    struct stat st;
    if (fstat(fd, &st) != 0) return InvalidArgumentError("RegisterDmabuf: fd is not open");
    last_offset = offset;
    last_iova = iova;
    return inner_->RegisterMemory(reinterpret_cast<void*>(iova), length, access);
  }
  Result<std::unique_ptr<VerbsCq>> CreateCq(int depth) override { return inner_->CreateCq(depth); }
  Result<std::unique_ptr<VerbsQp>> CreateQp(VerbsCq* cq, const QpCaps& caps) override {
    return inner_->CreateQp(cq, caps);
  }

 private:
  std::unique_ptr<VerbsDevice> inner_;
  FakeBackend* backend_;
};

class GpuRegistrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    host_ = fabric_.AddHost({RoceSpec()});
    api_ = fabric_.Api(host_);
    auto d = api_->OpenDevice("mlx5_0");
    ASSERT_TRUE(d.ok()) << d.status();
    device_ = std::make_unique<ScriptedGpuDevice>(std::move(d).value(), &be_);
    auto mem = be_.AllocDevice(0, kAlloc);
    ASSERT_TRUE(mem.ok()) << mem.status();
    gpu_ = static_cast<char*>(*mem);
  }
  void TearDown() override { be_.FreeDevice(gpu_); }

  static constexpr size_t kAlloc = 1 << 20;
  static constexpr uint32_t kAccess = kAccessLocalWrite | kAccessRemoteWrite;
  FakeBackend be_;
  FakeFabric fabric_;
  int host_ = 0;
  std::unique_ptr<VerbsApi> api_;
  std::unique_ptr<ScriptedGpuDevice> device_;
  char* gpu_ = nullptr;
};

TEST_F(GpuRegistrationTest, DmabufPathRegistersTheDevicePointerAsIova) {
  char* p = gpu_ + 8192;  // inside the allocation: the dma-buf offset says where
  auto mr = RegisterGpuMemory(device_.get(), &be_, p, 4096, kAccess, GpuRegistration::kAuto);
  ASSERT_TRUE(mr.ok()) << mr.status();
  EXPECT_EQ(device_->dmabuf_calls, 1);
  EXPECT_EQ(device_->reg_mr_device_calls, 0);
  EXPECT_EQ(device_->last_offset, 8192u);
  EXPECT_EQ(device_->last_iova, reinterpret_cast<uint64_t>(p));
  EXPECT_EQ((*mr)->info().addr, reinterpret_cast<uint64_t>(p));
  EXPECT_EQ((*mr)->info().length, 4096u);
  EXPECT_EQ(fabric_.registrations(), 1);
}

TEST_F(GpuRegistrationTest, WithoutDmabufAutoFallsBackToPeerMemory) {
  device_->dmabuf_supported = false;
  auto mr = RegisterGpuMemory(device_.get(), &be_, gpu_, kAlloc, kAccess, GpuRegistration::kAuto);
  ASSERT_TRUE(mr.ok()) << mr.status();
  EXPECT_EQ(device_->dmabuf_calls, 1);
  EXPECT_EQ(device_->reg_mr_device_calls, 1);
  EXPECT_EQ((*mr)->info().addr, reinterpret_cast<uint64_t>(gpu_));
}

TEST_F(GpuRegistrationTest, NeitherPathWorksGivesAClearError) {
  device_->dmabuf_supported = false;
  device_->peermem_loaded = false;
  auto mr = RegisterGpuMemory(device_.get(), &be_, gpu_, kAlloc, kAccess, GpuRegistration::kAuto);
  ASSERT_FALSE(mr.ok());
  EXPECT_EQ(mr.status().code(), StatusCode::kFailedPrecondition);
  const std::string m = mr.status().message();
  EXPECT_THAT(m, HasSubstr("GPUDirect registration of 1048576 bytes"));
  EXPECT_THAT(m, HasSubstr("cuda:0"));
  EXPECT_THAT(m, HasSubstr("ibv_reg_dmabuf_mr: Operation not supported"));
  EXPECT_THAT(m, HasSubstr("nvidia-peermem"));
  EXPECT_THAT(m, HasSubstr("Bad address"));
  EXPECT_THAT(m, HasSubstr("MESHPOST_RDMA_GPU=staging"));
  EXPECT_EQ(fabric_.registrations(), 0);
}

TEST_F(GpuRegistrationTest, ExplicitModesTryOnlyTheirPath) {
  device_->dmabuf_supported = false;
  auto dmabuf_only =
      RegisterGpuMemory(device_.get(), &be_, gpu_, 4096, kAccess, GpuRegistration::kDmabuf);
  ASSERT_FALSE(dmabuf_only.ok());
  EXPECT_EQ(device_->reg_mr_device_calls, 0);
  EXPECT_THAT(dmabuf_only.status().message(), HasSubstr("MESHPOST_RDMA_GPU=dmabuf"));

  auto peermem =
      RegisterGpuMemory(device_.get(), &be_, gpu_, 4096, kAccess, GpuRegistration::kPeerMem);
  ASSERT_TRUE(peermem.ok()) << peermem.status();
  EXPECT_EQ(device_->dmabuf_calls, 1);  // only the kDmabuf attempt above
  EXPECT_EQ(device_->reg_mr_device_calls, 1);
}

TEST_F(GpuRegistrationTest, StagingModeRefusesAndSaysSo) {
  auto mr = RegisterGpuMemory(device_.get(), &be_, gpu_, 4096, kAccess, GpuRegistration::kStaging);
  ASSERT_FALSE(mr.ok());
  EXPECT_EQ(mr.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(mr.status().message(), HasSubstr("pinned host memory"));
  EXPECT_EQ(device_->dmabuf_calls + device_->reg_mr_device_calls, 0);
}

TEST_F(GpuRegistrationTest, HostMemoryOrAnUnusableBackendIsRefused) {
  std::vector<char> host(4096);
  auto not_gpu =
      RegisterGpuMemory(device_.get(), &be_, host.data(), 4096, kAccess, GpuRegistration::kAuto);
  ASSERT_FALSE(not_gpu.ok());
  EXPECT_EQ(not_gpu.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(not_gpu.status().message(), HasSubstr("not CUDA device memory"));

  be_.SetUnavailable(UnavailableError("CUDA driver not found (test)"));
  auto no_device =
      RegisterGpuMemory(device_.get(), &be_, gpu_, 4096, kAccess, GpuRegistration::kAuto);
  ASSERT_FALSE(no_device.ok());
  EXPECT_THAT(no_device.status().message(), HasSubstr("CUDA driver not found (test)"));
}

TEST_F(GpuRegistrationTest, CacheRegistersDeviceRangesThroughGpuDirectAndHitsInside) {
  MrCache cache(device_.get(), 16);
  cache.EnableGpu(&be_, GpuRegistration::kAuto);
  auto whole = cache.Get(gpu_, kAlloc, kAccess, {}, /*cuda_device=*/true);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(device_->dmabuf_calls, 1);
  // A send or a slot inside the registered range (any kind) reuses the registration.
  auto inside = cache.Get(gpu_ + 4096, 4096, kAccessLocalWrite);
  ASSERT_TRUE(inside.ok());
  EXPECT_EQ(inside->get(), whole->get());
  EXPECT_EQ(cache.stats().hits, 1u);

  MrCache staging(device_.get(), 16);
  staging.EnableGpu(&be_, GpuRegistration::kStaging);
  auto refused = staging.Get(gpu_, 4096, kAccess, {}, /*cuda_device=*/true);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("MESHPOST_RDMA_GPU=staging"));
}

TEST_F(GpuRegistrationTest, OptionIsParsedAndValidated) {
  for (const char* v : {"auto", "dmabuf", "peermem", "staging"}) {
    auto m = ParseGpuRegistration("MESHPOST_RDMA_GPU", v);
    ASSERT_TRUE(m.ok()) << v;
    EXPECT_STREQ(GpuRegistrationName(*m), v);
  }
  auto bad = RdmaOptionsFromEnv([](const char* name) -> const char* {
    return std::string(name) == "MESHPOST_RDMA_GPU" ? "gdr" : nullptr;
  });
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("MESHPOST_RDMA_GPU='gdr'"));
  EXPECT_THAT(bad.status().message(), HasSubstr("auto, dmabuf, peermem or staging"));
  auto good = RdmaOptionsFromEnv([](const char* name) -> const char* {
    return std::string(name) == "MESHPOST_RDMA_GPU" ? "staging" : nullptr;
  });
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->gpu, "staging");
}

}  // namespace
}  // namespace testing
}  // namespace rdma
}  // namespace meshpost
