// Large CPU outputs that a kernel is about to write whole. ISA-NEUTRAL (no -m flags).
//
// A fresh CPU tensor of hundreds of MiB comes from mmap, and writing it takes one page fault
// per 4 KiB page: the kernel zeroes and maps each page on first touch. For the loss backward's
// dX (1,048,576 x 256 fp32, 1 GiB) on the 2-core Zen 4 that is ~230 ms of faults against ~60 ms
// of writing: the faults, not the kernel, set the time (eager PyTorch pays the same). Asking the
// kernel for transparent huge pages on the buffer before it is touched (madvise MADV_HUGEPAGE,
// what c10's THP_MEM_ALLOC_ENABLE=1 does for every allocation) makes it one fault per 2 MiB.
// The same holds, smaller, for the Linear/MLP outputs (out, pre, dX: 64 MiB each at
// 65536x256->256 fp32, ~17 ms of faults apiece; Linear+GELU fwd+bwd there went from 220-246 to
// 192-204 ms, A/B in alternating processes), hence the 8 MiB threshold: four huge pages, below
// which the syscall and the rounding to 2 MiB boundaries buy nothing.
// Advisory only: where THP is "never", on other systems, or if madvise fails, nothing changes.
#include "common.h"

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace manual_layers {

at::Tensor empty_for_write(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  constexpr int64_t kMinBytes = int64_t(8) << 20;  // smaller: not worth a syscall
  if (t.device().is_cpu() && static_cast<int64_t>(t.nbytes()) >= kMinBytes) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + t.nbytes()) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace manual_layers
