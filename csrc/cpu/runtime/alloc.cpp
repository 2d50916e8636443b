// Large CPU outputs that a kernel is about to write whole. ISA-NEUTRAL (no -m flags).
//
// A fresh CPU tensor of hundreds of MiB comes from mmap, and writing it takes one page fault
// per 4 KiB page: the kernel zeroes and maps each page on first touch, and frees them all again
// when the tensor dies. For a loss backward's dX of 1 GiB the faults, not the kernel, set the
// time (eager PyTorch pays the same; figures: docs/perf-notes-from-code.md). Two things are
// done about it:
//
// 1. Reuse (OutputCache, below). Outputs of 8 MiB and more come from an allocator that keeps the
//    memory of a freed output and hands it to the next output of the same size (rounded up to
//    2 MiB), already mapped: what PyTorch's CUDA caching allocator does on the GPU, bounded. A
//    training step allocates the same shapes every step, so from the second step on the dX, out,
//    pre and G buffers cost no page fault. The idle memory it keeps is capped: at most
//    MANUAL_LAYERS_CPU_CACHE_MB MiB (default: an eighth of physical memory, at most 4096 MiB;
//    0 turns the reuse off), the longest idle buffers freed first; torch.ops.manual_layers.
//    _cpu_output_cache(True) (manual_layers.empty_cpu_cache()) frees all of it.
// 2. Transparent huge pages (madvise MADV_HUGEPAGE, what c10's THP_MEM_ALLOC_ENABLE=1 does for
//    every allocation) on each new buffer before it is touched: one fault per 2 MiB.
//
// Reuse is what makes the difference on the machines measured; huge pages alone can be slower
// where the host backs memory on first touch (docs/perf-notes-from-code.md, "CPU output
// cache").
//
// Only empty_for_write's outputs (csrc/cpu/kernels/*.cpp: Linear/MLP out, pre, G, dX; the losses' dX
// and the (N, C) residual the loss pass keeps for it; the chunked cross entropy's grad_x and
// backward's scaled copy of it, csrc/generic/ce_chunked.cpp and csrc/autograd/losses.cpp; and, through it,
// the CPU products of gemm::mm / gemm::addmm, csrc/cpu/runtime/gemm.cpp) go through it; below 8 MiB,
// on other devices, or with the cache off: at::empty (plus the huge-page advice from 8 MiB).
// The tensors are ordinary resizable CPU tensors; their storage's allocator is this one, so a
// resize_ also allocates here.
#include "../../common.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <optional>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace manual_layers {
namespace {

constexpr size_t kHugeBytes = size_t(2) << 20;     // buffers are 2 MiB aligned, 2 MiB multiples
constexpr size_t kMinBytes = size_t(8) << 20;      // smaller outputs: at::empty

void advise_huge(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + kHugeBytes - 1) & ~uintptr_t(kHugeBytes - 1);
  const uintptr_t hi = (a + bytes) & ~uintptr_t(kHugeBytes - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

size_t default_cap_bytes() {
  const char* e = std::getenv("MANUAL_LAYERS_CPU_CACHE_MB");
  if (e != nullptr && *e != '\0') {
    char* end = nullptr;
    const long long mb = std::strtoll(e, &end, 10);
    TORCH_CHECK_VALUE(end != e && *end == '\0' && mb >= 0,
                      "MANUAL_LAYERS_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", e,
                      "'");
    return size_t(mb) << 20;
  }
  size_t cap = size_t(4096) << 20;
#if defined(__linux__)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) cap = std::min(cap, size_t(pages) * size_t(page) / 8);
#endif
  return cap;
}

// The buffers of freed outputs, oldest first, and the allocator whose DataPtrs return to it.
class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : cap_(default_cap_bytes()) {}

  size_t cap() const { return cap_; }

  // A buffer of `bytes` (a multiple of kHugeBytes): an idle one of that size, else a new one.
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = std::max(kHugeBytes, (n + kHugeBytes - 1) & ~(kHugeBytes - 1));
    void* p = take(bytes);
    if (p == nullptr) {
      if (posix_memalign(&p, kHugeBytes, bytes) != 0) {
        trim(0);  // the idle buffers first, then once more
        if (posix_memalign(&p, kHugeBytes, bytes) != 0) p = nullptr;
      }
      TORCH_CHECK(p != nullptr, "manual_layers: out of CPU memory allocating ", bytes, " bytes");
      advise_huge(p, bytes);
    }
    auto* ctx = new Block{p, bytes};
    return {p, ctx, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count > 0) std::memcpy(dest, src, count);
  }

  // Frees idle buffers, oldest first, until at most `keep` bytes stay idle.
  void trim(size_t keep) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      size_t i = 0;
      while (idle_bytes_ > keep && i < idle_.size()) {
        idle_bytes_ -= idle_[i].bytes;
        drop.push_back(idle_[i++].p);
      }
      idle_.erase(idle_.begin(), idle_.begin() + static_cast<std::ptrdiff_t>(i));
    }
    for (void* p : drop) std::free(p);
  }

  // {idle bytes, cap, reuses, new buffers}
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {int64_t(idle_bytes_), int64_t(cap_), hits_, misses_};
  }

  // After fork() in the child: another thread may have held the lock at the fork.
  void reset_lock_after_fork() { new (&mu_) std::mutex(); }

 private:
  struct Block {
    void* p;
    size_t bytes;
  };

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    for (size_t i = idle_.size(); i-- > 0;) {  // the most recently freed first: warmest in cache
      if (idle_[i].bytes == bytes) {
        void* p = idle_[i].p;
        idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(i));
        idle_bytes_ -= bytes;
        ++hits_;
        return p;
      }
    }
    ++misses_;
    return nullptr;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (bytes <= cap_) {
        idle_.push_back({p, bytes});
        idle_bytes_ += bytes;
        p = nullptr;
      }
    }
    if (p != nullptr) std::free(p);
    trim(cap_);
  }

  static void release(void* ctx);

  std::mutex mu_;
  std::vector<Block> idle_;
  size_t idle_bytes_ = 0;
  const size_t cap_;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: an output may die after static destructors have run.
OutputCache& cache() {
  static OutputCache* c = [] {
    auto* oc = new OutputCache();
#if defined(__linux__)
    pthread_atfork(nullptr, nullptr, [] { cache().reset_lock_after_fork(); });
#endif
    return oc;
  }();
  return *c;
}

void OutputCache::release(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  cache().give(b->p, b->bytes);
  delete b;
}

}  // namespace

at::Tensor empty_for_write(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu() && options.layout() == at::kStrided) {
    const auto dtype = c10::typeMetaToScalarType(options.dtype());
    const size_t bytes = size_t(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
    if (bytes >= kMinBytes) {
      OutputCache& c = cache();
      if (c.cap() > 0) {
        return at::Tensor(at::detail::empty_generic(
            sizes, &c, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt));
      }
      at::Tensor t = at::empty(sizes, options);
      advise_huge(t.data_ptr(), t.nbytes());
      return t;
    }
  }
  return at::empty(sizes, options);
}

}  // namespace manual_layers

// manual_layers.cpu_cache_info() / empty_cpu_cache(): {idle bytes, cap bytes, reuses, new
// buffers}, after freeing every idle buffer when `empty` is set. No tensors: not traced.
TORCH_LIBRARY_FRAGMENT(manual_layers, m) {
  m.def("_cpu_output_cache(bool empty=False) -> int[]", [](bool empty) {
    if (empty) manual_layers::cache().trim(0);
    return manual_layers::cache().stats();
  });
}
