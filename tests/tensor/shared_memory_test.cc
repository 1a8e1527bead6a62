#include "tensor/shared_memory.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cstring>

namespace meshpost {
namespace {

TEST(SharedMemoryTest, BlockIsAlignedSealedAndRounded) {
  auto b = AllocateShared(100);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ((*b)->size(), kSharedBlockAlign);
  EXPECT_EQ(reinterpret_cast<uintptr_t>((*b)->data()) % kSharedBlockAlign, 0u);
  const int seals = ::fcntl((*b)->fd(), F_GET_SEALS);
  EXPECT_TRUE(seals & F_SEAL_SHRINK);
  EXPECT_TRUE(seals & F_SEAL_GROW);
  struct stat st {};
  ASSERT_EQ(::fstat((*b)->fd(), &st), 0);
  EXPECT_EQ(static_cast<size_t>(st.st_size), (*b)->size());
  std::memset((*b)->data(), 7, (*b)->size());  // writable end to end
}

TEST(SharedMemoryTest, LargerRequestsRoundUpToHugePages) {
  auto b = AllocateShared(kSharedBlockAlign + 1);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)->size(), 2 * kSharedBlockAlign);
}

TEST(SharedMemoryTest, BadSizesAreInvalidArgument) {
  auto zero = AllocateShared(0);
  ASSERT_FALSE(zero.ok());
  EXPECT_EQ(zero.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(zero.status().message().find("bytes=0"), std::string::npos);
  auto huge = AllocateShared(kMaxSharedBlockBytes + 1);
  EXPECT_EQ(huge.status().code(), StatusCode::kInvalidArgument);
  auto neg = AllocateSharedTensor(DType::kFloat32, {4, -1});
  EXPECT_FALSE(neg.ok());
}

TEST(SharedMemoryTest, RegistryMapsRangesToBlocks) {
  auto a = AllocateShared(4096);
  auto b = AllocateShared(3 * kSharedBlockAlign);
  ASSERT_TRUE(a.ok() && b.ok());
  auto& reg = SharedMemoryRegistry::Get();
  SharedRef ref;
  ASSERT_TRUE(reg.Find((*b)->data() + 1000, 24, &ref));
  EXPECT_EQ(ref.block_id, (*b)->id());
  EXPECT_EQ(ref.fd, (*b)->fd());
  EXPECT_EQ(ref.offset, 1000u);
  EXPECT_EQ(ref.block_size, (*b)->size());
  EXPECT_EQ(ref.block.get(), b->get());
  // The last byte is inside, one past is not; a range crossing the end is not.
  EXPECT_TRUE(reg.Find((*b)->data() + (*b)->size() - 1, 1, &ref));
  EXPECT_FALSE(reg.Find((*b)->data() + (*b)->size() - 1, 2, &ref));
  EXPECT_FALSE(reg.Find((*b)->data() - 1, 1, &ref));
  int local = 0;
  EXPECT_FALSE(reg.Find(&local, sizeof(local), &ref));
  EXPECT_FALSE(reg.Find(nullptr, 0, &ref));
  EXPECT_EQ(reg.FindId((*a)->id()).get(), a->get());
  EXPECT_NE((*a)->id(), (*b)->id());
}

TEST(SharedMemoryTest, FreeUnregistersAndNotifiesListeners) {
  auto& reg = SharedMemoryRegistry::Get();
  std::vector<uint32_t> freed;
  auto token = reg.AddFreeListener([&](uint32_t id) { freed.push_back(id); });
  auto b = AllocateShared(1);
  ASSERT_TRUE(b.ok());
  const uint32_t id = (*b)->id();
  char* addr = (*b)->data();
  const size_t before = reg.live_blocks();
  b->reset();
  EXPECT_EQ(reg.live_blocks(), before - 1);
  ASSERT_EQ(freed.size(), 1u);
  EXPECT_EQ(freed[0], id);
  SharedRef ref;
  EXPECT_FALSE(reg.Find(addr, 1, &ref));
  EXPECT_EQ(reg.FindId(id), nullptr);
  token.reset();  // no longer notified
  auto c = AllocateShared(1);
  c->reset();
  EXPECT_EQ(freed.size(), 1u);
}

TEST(SharedMemoryTest, TensorOwnsItsBlock) {
  auto t = AllocateSharedTensor(DType::kBFloat16, {128, 7168});
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->nbytes(), 128u * 7168u * 2u);
  SharedRef ref;
  ASSERT_TRUE(SharedMemoryRegistry::Get().Find(t->data, t->nbytes(), &ref));
  EXPECT_EQ(ref.offset, 0u);
  std::memset(t->data, 1, t->nbytes());
  auto empty = AllocateSharedTensor(DType::kFloat32, {0, 4});
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->owner != nullptr);
}

TEST(SharedMemoryTest, PeerMappingSeesWritesAndOutlivesTheOwner) {
  auto b = AllocateShared(4096);
  ASSERT_TRUE(b.ok());
  const int dup = ::fcntl((*b)->fd(), F_DUPFD_CLOEXEC, 0);
  ASSERT_GE(dup, 0);
  void* peer = ::mmap(nullptr, (*b)->size(), PROT_READ | PROT_WRITE, MAP_SHARED, dup, 0);
  ASSERT_NE(peer, MAP_FAILED);
  std::strcpy((*b)->data(), "hello");
  EXPECT_STREQ(static_cast<char*>(peer), "hello");
  b->reset();  // the owner frees: the peer's mapping stays readable
  EXPECT_STREQ(static_cast<char*>(peer), "hello");
  ::munmap(peer, kSharedBlockAlign);
  ::close(dup);
}

}  // namespace
}  // namespace meshpost
