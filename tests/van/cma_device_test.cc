// The cma van's CUDA IPC path (van/cma/cma_device.h) with the fake device backend, whose
// "device" memory is a memfd an IPC handle maps in another process, as CUDA's handles do:
// - across two processes, a device push is copied out of the sender's allocation by the
//   receiver, a CUDA pull slot arrives as a writable device view, and an answer written into
//   that view travels as a name and lands with no copy at all;
// - the bookkeeping refuses what a confused or hostile peer names: allocations it was never
//   given, ranges outside them, duplicate or empty handles; registrations end with their
//   owner or InvalidateMemory.
#include "van/cma/cma_device.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <string>

#include "common/clock.h"
#include "support/recording_receiver.h"
#include "tensor/backend/fake_backend.h"
#include "van/cma/cma_van.h"

namespace meshpost {
namespace {

using support::RecordingReceiver;
using ::testing::HasSubstr;

constexpr int kParentId = 8;
constexpr int kChildId = 9;
constexpr size_t kBytes = 64 << 10;

VanOptions Options(DeviceBackend* backend) {
  VanOptions o;
  o.connect_timeout_ms = 30'000;
  o.device_backend = backend;
  return o;
}

MemoryRegion DeviceRegion(void* p, size_t n, std::shared_ptr<const void> owner = nullptr) {
  MemoryRegion r;
  r.addr = p;
  r.size = n;
  r.kind = MemoryKind::kCudaDevice;
  r.device = 0;
  r.owner = owner;
  return r;
}

uint8_t Pattern(size_t i, int salt) { return static_cast<uint8_t>((i * 7 + salt) % 251); }

bool WriteLine(int fd, const std::string& s) {
  const std::string line = s + "\n";
  return write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
}

// One line from fd within 30 s, or "" on timeout / EOF.
std::string ReadLine(int fd) {
  std::string line;
  const uint64_t deadline = GetNanosecond() + 30'000'000'000ull;
  while (line.find('\n') == std::string::npos && GetNanosecond() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    char c;
    if (read(fd, &c, 1) != 1) return "";
    line.push_back(c);
  }
  if (line.empty() || line.back() != '\n') return "";
  line.pop_back();
  return line;
}

// The child: a worker-like node that pushes from device memory and offers a CUDA pull
// slot; exits 0 when the answer landed in that slot with no copy in this process.
int ChildMain(int from_parent, int to_parent) {
  FakeBackend be;
  auto* push = static_cast<uint8_t*>(*be.AllocDevice(0, kBytes));
  auto* slot = static_cast<uint8_t*>(*be.AllocDevice(0, kBytes));
  for (size_t i = 0; i < kBytes; ++i) push[i] = Pattern(i, 1);
  std::memset(slot, 0, kBytes);
  RecordingReceiver rx;
  rx.land(2, slot);  // the response for key 2 lands in the pull slot
  auto van = CreateCmaVan(Options(&be));
  if (!van->Bind("", 0).ok() || !van->Start(&rx).ok()) return 10;
  if (!van->SupportsMemory(MemoryKind::kCudaDevice) || !van->RegistersMemory()) return 11;
  if (!van->RegisterMemory(DeviceRegion(push, kBytes)).ok()) return 12;
  if (!van->RegisterMemory(DeviceRegion(slot, kBytes)).ok()) return 12;
  if (!WriteLine(to_parent, van->endpoint())) return 13;
  const std::string parent = ReadLine(from_parent);
  if (parent.empty()) return 14;
  if (!van->Connect({kParentId, "", 0, parent, getppid()}).ok()) return 15;

  OutMessage m;
  m.meta.cmd = Command::kRequest;
  m.meta.sender = kChildId;
  m.meta.recipient = kParentId;
  m.meta.id = 1;
  TensorDesc d;
  d.key = 1;
  d.shape = {static_cast<int64_t>(kBytes)};
  d.nbytes = kBytes;
  m.meta.data.push_back(d);
  d.key = 2;
  d.addr = reinterpret_cast<uint64_t>(slot);
  m.meta.slots.push_back(d);
  m.segments.push_back({push, kBytes, nullptr});
  if (!van->Send(std::move(m)).ok()) return 16;
  if (!rx.WaitFor(1)) return 17;
  auto got = rx.TakeMessages();
  if (got.size() != 1 || got[0].segments.size() != 1) return 18;
  if (got[0].segments[0].data != slot) return 19;
  for (size_t i = 0; i < kBytes; ++i) {
    if (slot[i] != Pattern(i, 2)) return 20;
  }
  if (be.copies_executed() != 0) return 21;  // the answer was written in place
  van->Stop();
  return 0;
}

TEST(CmaDeviceIpcTest, DevicePushAndCudaPullSlotCrossProcessesByIpc) {
  int down[2], up[2];
  ASSERT_EQ(pipe(down), 0);
  ASSERT_EQ(pipe(up), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(down[1]);
    close(up[0]);
    _exit(ChildMain(down[0], up[1]));
  }
  close(down[0]);
  close(up[1]);
  auto reap = [&] {
    int status = 0;
    for (int i = 0; i < 300; ++i) {
      if (waitpid(child, &status, WNOHANG) == child) return status;
      usleep(100'000);
    }
    kill(child, SIGKILL);
    waitpid(child, &status, 0);
    return -1;
  };

  FakeBackend be;
  RecordingReceiver rx;
  auto van = CreateCmaVan(Options(&be));
  ASSERT_TRUE(van->Bind("", 0).ok());
  ASSERT_TRUE(van->Start(&rx).ok());
  const std::string child_ep = ReadLine(up[0]);
  ASSERT_FALSE(child_ep.empty()) << "child status " << reap();
  ASSERT_TRUE(WriteLine(down[1], van->endpoint()));
  ASSERT_TRUE(van->Connect({kChildId, "", 0, child_ep, child}).ok());

  ASSERT_TRUE(rx.WaitFor(1)) << "child status " << reap();
  auto got = rx.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  InMessage& req = got[0];
  ASSERT_EQ(req.segments.size(), 1u);
  const auto* pushed = static_cast<const uint8_t*>(req.segments[0].data);
  ASSERT_NE(pushed, nullptr);
  for (size_t i = 0; i < kBytes; ++i) ASSERT_EQ(pushed[i], Pattern(i, 1)) << i;
  EXPECT_EQ(be.copies_executed(), 1u) << "one device-to-host copy out of the child's memory";
  // The child's CUDA pull slot, mapped here as a device view.
  ASSERT_EQ(req.peer_slots.size(), 1u);
  const RecvSegment& view = req.peer_slots[0];
  ASSERT_NE(view.data, nullptr);
  EXPECT_EQ(view.size, kBytes);
  EXPECT_EQ(view.device, (Device{DeviceType::kCUDA, 0}));
  ASSERT_NE(view.owner, nullptr);  // keeps the import open while held
  // "Compute" into the view (fake device memory is host-addressable), answer with it.
  auto* out = static_cast<uint8_t*>(view.data);
  for (size_t i = 0; i < kBytes; ++i) out[i] = Pattern(i, 2);
  ASSERT_TRUE(van->RegisterMemory(DeviceRegion(view.data, view.size, view.owner)).ok());
  OutMessage resp;
  resp.meta.cmd = Command::kResponse;
  resp.meta.sender = kParentId;
  resp.meta.recipient = kChildId;
  resp.meta.id = 1;
  resp.meta.data.push_back(req.meta.slots[0]);
  resp.segments.push_back({view.data, view.size, view.owner});
  ASSERT_TRUE(van->Send(std::move(resp)).ok());
  const int status = reap();
  ASSERT_TRUE(WIFEXITED(status)) << "child status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << "see ChildMain for the meaning of the code";
  van->Stop();
  close(down[1]);
  close(up[0]);
}

// --- the bookkeeping, in one process ---

class CmaDeviceMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override { dev_ = static_cast<char*>(*be_.AllocDevice(0, kBytes)); }
  void TearDown() override { be_.FreeDevice(dev_); }
  FakeBackend be_;
  cma::DeviceMemory mem_{&be_};
  char* dev_ = nullptr;
};

TEST_F(CmaDeviceMemoryTest, RegistrationsEndWithTheirOwnerOrInvalidate) {
  EXPECT_FALSE(mem_.active());
  EXPECT_EQ(mem_.DeviceOf(dev_, 16), -1);
  auto owner = std::make_shared<int>(0);
  ASSERT_TRUE(mem_.Register(DeviceRegion(dev_ + 4096, 4096, owner)).ok());
  EXPECT_TRUE(mem_.active());
  EXPECT_EQ(mem_.DeviceOf(dev_ + 4096, 4096), 0);
  EXPECT_EQ(mem_.DeviceOf(dev_ + 4096, 4097), -1) << "runs past the registered range";
  EXPECT_EQ(mem_.DeviceOf(dev_, 16), -1);
  owner.reset();
  EXPECT_EQ(mem_.DeviceOf(dev_ + 4096, 16), -1) << "owner gone";
  ASSERT_TRUE(mem_.Register(DeviceRegion(dev_, kBytes)).ok());  // no owner: until Invalidate
  EXPECT_EQ(mem_.DeviceOf(dev_ + 100, 100), 0);
  mem_.Invalidate(dev_ + 8, 8);
  EXPECT_EQ(mem_.DeviceOf(dev_ + 100, 100), -1);
}

TEST_F(CmaDeviceMemoryTest, BadRegionsAndAnUnusableBackendAreRefusedWithTheReason) {
  Status empty = mem_.Register(DeviceRegion(dev_, 0));
  EXPECT_EQ(empty.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(empty.message(), HasSubstr("0 bytes"));
  MemoryRegion no_device = DeviceRegion(dev_, 64);
  no_device.device = -1;
  EXPECT_THAT(mem_.Register(no_device).message(), HasSubstr("device -1"));
  FakeBackend broken;
  broken.SetUnavailable(UnavailableError("no device in this test"));
  cma::DeviceMemory other(&broken);
  EXPECT_THAT(other.Register(DeviceRegion(dev_, 64)).message(),
              HasSubstr("no device in this test"));
}

TEST_F(CmaDeviceMemoryTest, OwnRangesAreOnlyThoseExportedToThatProcess) {
  ASSERT_TRUE(mem_.Register(DeviceRegion(dev_, kBytes)).ok());
  auto ex = mem_.Export(dev_ + 256, 512);
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(ex->offset, 256u);
  EXPECT_EQ(ex->base, reinterpret_cast<uintptr_t>(dev_));
  auto again = mem_.Export(dev_ + 1024, 16);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->id, ex->id) << "one id per allocation";
  const pid_t peer = 4242;
  EXPECT_FALSE(mem_.Own(ex->id, peer, 0, 16).ok()) << "not passed to that process yet";
  mem_.SentTo(ex->id, peer);
  auto own = mem_.Own(ex->id, peer, 256, 512);
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_EQ(own->ptr, dev_ + 256);
  EXPECT_FALSE(mem_.Own(ex->id, peer + 1, 0, 16).ok());
  EXPECT_FALSE(mem_.Own(ex->id, peer, kBytes - 8, 16).ok()) << "past the allocation";
  EXPECT_FALSE(mem_.Own(ex->id + 100, peer, 0, 16).ok());
  std::vector<char> host(64);
  EXPECT_FALSE(mem_.Export(host.data(), host.size()).ok()) << "host memory has no IPC handle";
}

TEST_F(CmaDeviceMemoryTest, ImportsAreCheckedClosedAndBounded) {
  auto ex = be_.ExportIpc(dev_);
  ASSERT_TRUE(ex.ok());
  const uint64_t conn = 7;
  EXPECT_FALSE(mem_.Imported(conn, 1, 0, 16).ok()) << "never opened";
  ASSERT_TRUE(mem_.Open(conn, 4242, 1, *ex).ok());
  EXPECT_FALSE(mem_.Open(conn, 4242, 1, *ex).ok()) << "duplicate id";
  IpcExport empty = *ex;
  empty.alloc_size = 0;
  EXPECT_EQ(mem_.Open(conn, 4242, 2, empty).code(), StatusCode::kDataLoss);
  auto r = mem_.Imported(conn, 1, 128, 256);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->device, 0);
  ASSERT_NE(r->keep, nullptr);
  r->ptr[0] = 42;  // the same memory as dev_ + 128
  EXPECT_EQ(dev_[128], 42);
  EXPECT_EQ(mem_.Imported(conn, 1, kBytes - 4, 8).status().code(), StatusCode::kDataLoss);
  EXPECT_FALSE(mem_.Imported(conn + 1, 1, 0, 8).ok()) << "another connection's import";
  uint32_t id = 0;
  uint64_t off = 0;
  ASSERT_TRUE(mem_.ImportedFrom(4242, r->ptr, 16, &id, &off));
  EXPECT_EQ(id, 1u);
  EXPECT_EQ(off, 128u);
  EXPECT_FALSE(mem_.ImportedFrom(4243, r->ptr, 16, &id, &off)) << "another process";
  ASSERT_TRUE(mem_.Close(conn, 1).ok());
  EXPECT_FALSE(mem_.Imported(conn, 1, 0, 8).ok());
  EXPECT_EQ(r->ptr[0], 42) << "a view handed out keeps its import open";
  EXPECT_FALSE(mem_.Close(conn, 1).ok());
  ASSERT_TRUE(mem_.Open(conn, 4242, 3, *ex).ok());
  mem_.CloseAll(conn);
  EXPECT_FALSE(mem_.Imported(conn, 3, 0, 8).ok());
}

TEST_F(CmaDeviceMemoryTest, CopiesFinishBeforeFinishReturns) {
  std::vector<char> host(kBytes, 5), back(kBytes, 0);
  be_.SetCopyCost(20'000);  // slow enough that a Finish that did not wait would see zeros
  ASSERT_TRUE(mem_.Copy(dev_, host.data(), kBytes, 0).ok());
  ASSERT_TRUE(mem_.Copy(back.data(), dev_, kBytes, 0).ok());
  ASSERT_TRUE(mem_.Finish().ok());
  be_.HostAccess(back.data(), kBytes, /*write=*/false);
  EXPECT_EQ(back[kBytes - 1], 5);
  be_.SetCopyCost(0);
  EXPECT_TRUE(be_.Hazards().empty());
}

}  // namespace
}  // namespace meshpost
