#include "tensor/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace meshpost {

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

struct SharedMemoryRegistry::Impl {
  mutable std::mutex mu;
  // Block start address -> block; a block removes itself in its destructor.
  std::map<uintptr_t, SharedBlock*> by_addr;
  std::map<uint32_t, std::weak_ptr<SharedBlock>> by_id;
  std::map<uint64_t, std::shared_ptr<FreeListener>> listeners;
  uint64_t next_listener = 1;
};

SharedMemoryRegistry& SharedMemoryRegistry::Get() {
  // Leaked on purpose: blocks may be freed during static destruction (Python exit).
  static SharedMemoryRegistry* registry = new SharedMemoryRegistry();
  return *registry;
}

SharedMemoryRegistry::Impl& SharedMemoryRegistry::impl() const {
  static Impl* impl = new Impl();
  return *impl;
}

bool SharedMemoryRegistry::Find(const void* addr, size_t size, SharedRef* out) const {
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  if (addr == nullptr) return false;
  std::lock_guard<std::mutex> lock(impl().mu);
  auto& m = impl().by_addr;
  auto it = m.upper_bound(a);
  if (it == m.begin()) return false;
  --it;
  SharedBlock* b = it->second;
  const size_t off = a - it->first;
  if (off >= b->size() || size > b->size() - off) return false;
  auto sp = impl().by_id[b->id()].lock();
  if (!sp) return false;  // being destroyed
  out->block_id = b->id();
  out->fd = b->fd();
  out->offset = off;
  out->block_size = b->size();
  out->block = std::move(sp);
  return true;
}

std::shared_ptr<SharedBlock> SharedMemoryRegistry::FindId(uint32_t id) const {
  std::lock_guard<std::mutex> lock(impl().mu);
  auto it = impl().by_id.find(id);
  return it == impl().by_id.end() ? nullptr : it->second.lock();
}

size_t SharedMemoryRegistry::live_blocks() const {
  std::lock_guard<std::mutex> lock(impl().mu);
  return impl().by_addr.size();
}

std::shared_ptr<void> SharedMemoryRegistry::AddFreeListener(FreeListener fn) {
  uint64_t token;
  {
    std::lock_guard<std::mutex> lock(impl().mu);
    token = impl().next_listener++;
    impl().listeners.emplace(token, std::make_shared<FreeListener>(std::move(fn)));
  }
  Impl* im = &impl();
  return std::shared_ptr<void>(nullptr, [im, token](void*) {
    std::lock_guard<std::mutex> lock(im->mu);
    im->listeners.erase(token);
  });
}

void SharedMemoryRegistry::Add(const std::shared_ptr<SharedBlock>& block) {
  std::lock_guard<std::mutex> lock(impl().mu);
  impl().by_addr[reinterpret_cast<uintptr_t>(block->data())] = block.get();
  impl().by_id[block->id()] = block;
}

void SharedMemoryRegistry::Remove(SharedBlock* block) {
  std::vector<std::shared_ptr<FreeListener>> listeners;
  {
    std::lock_guard<std::mutex> lock(impl().mu);
    impl().by_addr.erase(reinterpret_cast<uintptr_t>(block->data()));
    impl().by_id.erase(block->id());
    for (auto& kv : impl().listeners) listeners.push_back(kv.second);
  }
  for (auto& l : listeners) (*l)(block->id());
}

SharedBlock::~SharedBlock() {
  if (data_ != nullptr) {
    SharedMemoryRegistry::Get().Remove(this);
    ::munmap(data_, size_);
  }
  if (fd_ >= 0) ::close(fd_);
}

namespace {

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// A sealed memfd of `size` bytes mapped read-write at a 2 MiB aligned address, or an error.
// hugetlb first only when explicitly possible (it needs reserved pages: without them the
// mapping fails, and we fall back silently to THP-advised shmem).
Status MapBlock(size_t size, bool hugetlb, int* fd_out, char** data_out) {
  unsigned flags = MFD_CLOEXEC | MFD_ALLOW_SEALING | (hugetlb ? MFD_HUGETLB : 0u);
  int fd = ::memfd_create("meshpost-shared", flags);
  if (fd < 0) return UnavailableError(Errno("memfd_create"));
  auto fail = [&](Status s) {
    ::close(fd);
    return s;
  };
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    return fail(ResourceExhaustedError(Errno("ftruncate shared block")));
  }
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return fail(UnavailableError(Errno("seal shared block")));
  }
  // Reserve size + align of address space, then map the memfd at the aligned address
  // inside it, so the block starts on a huge-page boundary.
  void* area = ::mmap(nullptr, size + kSharedBlockAlign, PROT_NONE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (area == MAP_FAILED) return fail(ResourceExhaustedError(Errno("reserve address space")));
  const uintptr_t base = reinterpret_cast<uintptr_t>(area);
  const uintptr_t aligned = (base + kSharedBlockAlign - 1) & ~(uintptr_t{kSharedBlockAlign} - 1);
  void* p = ::mmap(reinterpret_cast<void*>(aligned), size, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_FIXED, fd, 0);
  if (p == MAP_FAILED) {
    Status s = ResourceExhaustedError(Errno("mmap shared block"));
    ::munmap(area, size + kSharedBlockAlign);
    return fail(s);
  }
  // Give back the unused head and tail of the reservation.
  if (aligned > base) ::munmap(area, aligned - base);
  const uintptr_t end = aligned + size, area_end = base + size + kSharedBlockAlign;
  if (area_end > end) ::munmap(reinterpret_cast<void*>(end), area_end - end);
  if (!hugetlb) ::madvise(p, size, MADV_HUGEPAGE);
  if (hugetlb) {
    // A hugetlb mapping without reserved pages SIGBUSes on first touch on some kernels
    // instead of failing mmap: fault one page in with MADV_POPULATE_WRITE where available.
#ifdef MADV_POPULATE_WRITE
    if (::madvise(p, kSharedBlockAlign, MADV_POPULATE_WRITE) != 0) {
      Status s = ResourceExhaustedError(Errno("populate hugetlb block"));
      ::munmap(p, size);
      return fail(s);
    }
#else
    ::munmap(p, size);
    return fail(UnavailableError("hugetlb needs MADV_POPULATE_WRITE to probe safely"));
#endif
  }
  *fd_out = fd;
  *data_out = static_cast<char*>(p);
  return OkStatus();
}

bool HugetlbAvailable() {
  // Only when the administrator reserved huge pages (no configuration changes by us).
  static const bool available = [] {
    int fd = ::open("/proc/sys/vm/nr_hugepages", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    char buf[32] = {0};
    ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
    ::close(fd);
    return n > 0 && std::atol(buf) > 0;
  }();
  return available;
}

}  // namespace

Result<std::shared_ptr<SharedBlock>> AllocateShared(size_t bytes) {
  if (bytes == 0 || bytes > kMaxSharedBlockBytes) {
    return InvalidArgumentError("AllocateShared: bytes=" + std::to_string(bytes) +
                                "; expected 1 <= bytes <= " + std::to_string(kMaxSharedBlockBytes));
  }
  static std::atomic<uint32_t> next_id{1};
  const size_t size = (bytes + kSharedBlockAlign - 1) & ~(kSharedBlockAlign - 1);
  int fd = -1;
  char* data = nullptr;
  bool huge = false;
  if (HugetlbAvailable() && MapBlock(size, true, &fd, &data).ok()) {
    huge = true;
  } else {
    Status s = MapBlock(size, false, &fd, &data);
    if (!s.ok()) return s.Annotate("AllocateShared(" + std::to_string(bytes) + " bytes)");
  }
  std::shared_ptr<SharedBlock> b(new SharedBlock());
  b->id_ = next_id.fetch_add(1);
  b->fd_ = fd;
  b->data_ = data;
  b->size_ = size;
  b->huge_ = huge;
  SharedMemoryRegistry::Get().Add(b);
  return b;
}

Result<TensorView> AllocateSharedTensor(DType dtype, const std::vector<int64_t>& shape) {
  if (shape.size() > kMaxTensorDims) {
    return InvalidArgumentError("AllocateSharedTensor: shape has " + std::to_string(shape.size()) +
                                " dims; expected at most " + std::to_string(kMaxTensorDims));
  }
  auto numel = CheckedNumel(shape);
  if (!numel.ok()) return numel.status().Annotate("AllocateSharedTensor: shape");
  TensorView v;
  v.dtype = dtype;
  v.shape = shape;
  const size_t bytes = static_cast<size_t>(*numel) * DTypeSize(dtype);
  // An empty tensor still gets a (minimal) block, so every shared tensor has an owner.
  auto block = AllocateShared(bytes == 0 ? 1 : bytes);
  if (!block.ok()) return block.status();
  v.data = (*block)->data();
  v.owner = std::move(block).value();
  return v;
}

}  // namespace meshpost
