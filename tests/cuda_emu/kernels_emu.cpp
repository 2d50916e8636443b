// Host emulation of CUDA kernels that could not be run on a GPU when they were written, so that
// their indexing, shared-memory layout, fragment addressing, pipeline ring and reductions are
// checked on machines without one (tests/cuda_emu/test_cuda_emu.py builds and runs this with g++):
//   ce_tc    the tensor-core cross-entropy kernel (csrc/cuda/losses/ce_tc_kernels.cuh)
//   ce_tc_cl its sm_90a cluster instances (csrc/cuda/losses/ce_tc_cluster.cu; the cluster
//            functions of csrc/cuda/common/cluster_sm90.cuh are emulated below: a cluster's
//            blocks run at the same time)
//   ce_fused the CUDA-core single-pass cross-entropy kernel and the mean-denominator kernels
//            (csrc/cuda/losses/ce_fused_kernels.cuh, csrc/cuda/losses/common.cu)
//   loss_dx  the losses' dX kernel for few classes (csrc/cuda/losses/loss_dx.cu)
//   act_bwd  the activation gradient with the bias gradient's column sums
//            (csrc/cuda/linear/linear_kernels.cuh: act_bwd_colsum_kernel, colsum_final_kernel)
//   ce_rows  the cross-entropy row kernel of the GEMM and chunked paths, G lanes per row
//            (csrc/cuda/losses/gemm_path.cu: ce_rows_kernel)
//   bce      the fused binary cross entropy and the finalize step every mean/sum path ends with
//            (csrc/cuda/losses/bce_fused.cu, csrc/cuda/losses/common.cu)
//   bce_rows the GEMM path's binary row kernel (csrc/cuda/losses/gemm_path.cu: bce_rows_kernel)
//   linear_misc  Linear's activation, softmax and column-sum kernels
//            (csrc/cuda/linear/linear_kernels.cuh)
//
// The .cu files are compiled as C++ with ML_CUDA_HOST_EMU (which leaves out their host code): a
// block's threads are fibers on one OS thread (tests/cuda_emu/fibers.h: cooperative, in a schedule
// chosen to expose missing barriers; blocks run one after another, a cluster's blocks together;
// __shared__ arrays are static, so all threads of a block see one), __syncthreads, __syncwarp and
// the warp shuffles are barriers (under ThreadSanitizer the shuffles order no memory:
// __shfl_xor_sync), dynamic shared memory is the launch's size at the end of an array (launch), a
// cp.async copy lands when its thread waits for its group (a read before the wait and the barrier
// sees the poisoned shared memory), and mma.sync is computed from the fragment layouts of the PTX
// ISA, written here independently of the kernel (m16n8k16 16-bit: A[g + 8 (r % 2)][2t + 8 (r / 2) +
// h] in register r of lane 4g + t, B[2t + 8r + h][g], D[g + 8 (r / 2)][2t + r % 2]; m16n8k8 tf32
// likewise with k = t + 4 (r / 2) and t + 4r). What it cannot check: the PTX itself and timing. A
// race the thread schedule of a run does not expose passes the value checks; built with
// -fsanitize=thread (tests/cuda_emu/test_cuda_emu.py) it is reported whatever the schedule. A wait
// that cannot end (a thread that left the kernel before a __syncthreads of the others, an mbarrier
// phase that never completes) ends the run with exit status 3.
//
// Usage (exit 0 when every output matches a float64 reference of the same inputs, else 1):
//   kernels_emu ce_tc|ce_tc_cl|ce_fused DTYPE N D C GRID STAGES OPTS   (ce_tc_cl: GRID
//       clusters of ceil(C / 32) blocks) DTYPE bf16|f16|f32 (ce_fused:
//       also f64); OPTS a subset of "wWsi" (class weights in [0.1, 2] or up to 3e4, label
//       smoothing, ignored rows) or "-" (run_ce_single)
//   kernels_emu loss_dx DTYPE N D C THREADS PER_ROW  DTYPE bf16|f16|f32|f64; THREADS the
//       launch's thread cap (rows per step = THREADS / (D / VEC)); PER_ROW 0|1 (none's coef)
//   kernels_emu act_bwd DTYPE ACT ROWS COLS BLOCKS   ACT gelu|silu|gelu_tanh|relu; BLOCKS the
//       block target of the row chunking (launch_act_bwd: 16 x SMs)
//   kernels_emu ce_rows DTYPE N C GRID MODE OPTS     MODE mean|scale|inplace (run_ce_rows_g)
//   kernels_emu bce DTYPE N D GRID OPTS              OPTS a subset of "psum" (run_bce) or "-"
//   kernels_emu bce_rows DTYPE N GRID OPTS           OPTS a subset of "psm" or "-"
//   kernels_emu linear_misc DTYPE ROWS COLS GRID BLOCKS  (run_linear_misc)
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fibers.h"

#define ML_CUDA_HOST_EMU 1
#define ML_SM80 1
#define ML_SM90A 1
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static
#define ML_DYNAMIC_SMEM(name) unsigned char* name = emu::smem_dyn

// The running thread's (set by the scheduler whenever a fiber resumes: launch, resume).
uint3 threadIdx;
uint3 blockIdx;
uint3 gridDim;
uint3 blockDim;

namespace emu {
constexpr int kMaxCluster = 8;                 // blocks of a cluster, run at the same time
constexpr int kMaxWarps = 32 * kMaxCluster;    // warps of those blocks
constexpr size_t kSmemBytes = 232448;          // shared memory per block (sm_90's opt-in limit)
// A kernel's dynamic shared memory: the launch's size in bytes (16-byte multiple) at the END of
// each block's array, so that an access past it leaves the array (AddressSanitizer reports it in
// the sanitizer builds, tests/cuda_emu/test_cuda_emu.py). Block k of a cluster has smem_raw[k]; the
// blocks' arrays lie kSmemGap bytes apart and the AddressSanitizer build poisons the gaps, so that
// an access past block k's array is reported too instead of landing in block k + 1's.
constexpr size_t kSmemGap = 256;
alignas(16) unsigned char smem_raw[kMaxCluster][kSmemBytes + kSmemGap];
#if defined(__SANITIZE_ADDRESS__)
extern "C" void __asan_poison_memory_region(void const volatile* addr, size_t size);
const bool smem_gaps_poisoned = [] {
  for (int k = 0; k < kMaxCluster; ++k)
    __asan_poison_memory_region(smem_raw[k] + kSmemBytes, kSmemGap);
  return true;
}();
#endif
unsigned char* smem_dyn = nullptr;              // the running thread's block's
unsigned char* block_smem[kMaxCluster] = {};    // every block's (distributed shared memory)
size_t dyn_bytes = 0;                           // the launch's dynamic shared memory
fib::Barrier block_bars[kMaxCluster], warp_bars[kMaxWarps], cluster_bar;
fib::Barrier* block_bar = nullptr;              // the running thread's block's
int warp_base = 0;                              // 32 x the running block's rank in its cluster
uint64_t xch[kMaxWarps][32];
uint32_t mma_a[kMaxWarps][32][4];
uint32_t mma_b[kMaxWarps][32][2];
inline int tid() { return static_cast<int>(threadIdx.x + threadIdx.y * blockDim.x); }
inline int warp() { return warp_base + (tid() >> 5); }  // unique over the cluster's blocks
inline int lane() { return tid() & 31; }
inline void warp_sync() { warp_bars[warp()].wait(true, "__syncwarp / mma"); }
}  // namespace emu

inline void __syncthreads() { emu::block_bar->wait(true, "__syncthreads"); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }

#if defined(__SANITIZE_THREAD__)
// Under ThreadSanitizer a shuffle exchanges its value through relaxed atomics and waits for
// the warp at a barrier that orders nothing: it orders no other memory access, as on the GPU,
// where the memory model gives __shfl_sync no ordering (__syncwarp and __syncthreads have it).
// So shared memory written by one lane and read by another with only shuffles between them is
// reported as the race it is.
namespace emu {
std::atomic<uint64_t> axch[kMaxWarps][32];
inline void relaxed_warp_wait() { warp_bars[warp()].wait(false, "a shuffle"); }
}  // namespace emu

template <typename T>
T __shfl_xor_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 64 bits");
  const int w = emu::warp(), l = emu::lane();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::axch[w][l].store(bits, std::memory_order_relaxed);
  emu::relaxed_warp_wait();  // every lane's value stored
  bits = emu::axch[w][l ^ off].load(std::memory_order_relaxed);
  emu::relaxed_warp_wait();  // every lane's value read before the next shuffle stores
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
#else
template <typename T>
T __shfl_xor_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 64 bits");
  const int w = emu::warp(), l = emu::lane();
  std::memcpy(&emu::xch[w][l], &v, sizeof(T));
  emu::warp_sync();
  T r;
  std::memcpy(&r, &emu::xch[w][l ^ off], sizeof(T));
  emu::warp_sync();
  return r;
}
#endif

namespace manual_layers {
namespace cuda_logreg {

// cp.async, deferred as on the GPU: a copy lands only when its thread waits for its commit
// group (cp_async_wait), so a read of shared memory before the wait and the barrier after it
// sees the poison, not the data. Per thread: the copies not yet committed, and the committed
// groups not yet waited for, oldest first.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;  // 16, or 0: zero fill
};
struct AsyncCopies {
  std::vector<AsyncCopy> open;
  std::deque<std::vector<AsyncCopy>> groups;
};
std::vector<AsyncCopies> cp_state;  // by fiber (launch sizes it)
inline AsyncCopies& cp_mine() { return cp_state[emu::fib::current()->id]; }

inline void cp_async16(void* smem, const void* gmem, int src_bytes) {
  cp_mine().open.push_back({smem, gmem, src_bytes});
}
inline void cp_async_commit() {
  AsyncCopies& c = cp_mine();
  c.groups.push_back(std::move(c.open));
  c.open.clear();
}
inline void cp_async_wait(int n) {
  std::deque<std::vector<AsyncCopy>>& cp_groups = cp_mine().groups;
  while (static_cast<int>(cp_groups.size()) > n) {
    for (const AsyncCopy& c : cp_groups.front()) {
      if (c.bytes == 16) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
    cp_groups.pop_front();
  }
}

// Thread-block clusters (csrc/cuda/common/cluster_sm90.cuh): a cluster's blocks run at the same
// time (launch), each with its own shared memory; cluster_sync is a barrier of all their threads,
// after which the blocks run in a new priority order (tests/cuda_emu/fibers.h), so that a block
// that writes into another's shared memory before that one is done with it (a copy issued one
// barrier too early) changes what it reads, and the value checks fail. cluster_map points into
// another block's shared memory at the same offset. An mbarrier is an object beside the
// shared-memory word it is initialised at: arrivals and a transaction count per phase, as in the
// PTX ISA (a phase completes when its arrivals are all in and the count is back to 0; copies may
// complete their bytes before the expecting arrival). A multicast bulk copy lands at once, in every
// block of its mask, and completes its bytes on each block's mbarrier at the same offset: a copy
// issued into a stage that another block is still reading changes what that block reads (and
// ThreadSanitizer reports the race). A wait that would never end on a GPU (a miscounted phase) ends
// the run; so does a block's barrier that still expects bytes or arrivals when the kernel returns
// (copies in flight at exit). For ThreadSanitizer an arrival and a copy's completion release, a
// completed wait acquires (the orderings the mbarrier gives on a GPU), and the lookup of an
// mbarrier reads a word its initialisation wrote, so a use not ordered after mbarrier_init (by the
// cluster barrier) is reported.
namespace cl {
namespace fib = emu::fib;
struct MBar {
  int count = 0;       // arrivals per phase
  int pending = 0;     // arrivals still expected in this phase
  int64_t tx = 0;      // bytes still expected in this phase
  uint32_t phase = 0;  // completed phases
  std::vector<fib::Fiber*> waiting;
  char sync[2] = {0, 0};  // TSan sync objects by phase parity
  int initialised = 0;    // written by mbarrier_init, read by every use (TSan)
};
std::map<const void*, std::unique_ptr<MBar>> bars;  // by address (a shared-memory word)
int size = 1;                                       // blocks per cluster
int rank = 0;                                       // the running thread's block's

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cluster emulation: %s\n", what);
  std::fflush(stderr);
  std::_Exit(3);
}
inline MBar& get(const void* b) {
  MBar* m = nullptr;
  {
    fib::Hidden h;
    auto it = bars.find(b);
    if (it != bars.end()) m = it->second.get();
  }
  if (m == nullptr || m->initialised != 1) fail("mbarrier used before mbarrier_init");
  return *m;
}
inline void settle(MBar& m) {  // inside fib::Hidden
  if (m.pending < 0) fail("more arrivals than the mbarrier's count in one phase");
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.count;
    fib::wake(m.waiting, m.phase);
  }
}
// The address `offset` bytes into block `r`'s shared memory that p is into this block's.
template <typename T>
T* peer(T* p, int r) {
  const unsigned char* b = reinterpret_cast<const unsigned char*>(p);
  if (b < emu::smem_dyn || b >= emu::smem_dyn + emu::dyn_bytes) fail("not a shared address");
  if (r < 0 || r >= size) fail("rank outside the cluster");
  return reinterpret_cast<T*>(emu::block_smem[r] + (b - emu::smem_dyn));
}
}  // namespace cl

inline int cluster_rank() { return cl::rank; }
inline int cluster_size() { return cl::size; }
inline void cluster_sync() { emu::cluster_bar.wait(true, "the cluster barrier"); }
template <typename T>
const T* cluster_map(const T* p, int rank) {
  return cl::peer(p, rank);
}
inline void mbarrier_init(uint64_t* bar, int count) {
  cl::MBar* m = nullptr;
  {
    emu::fib::Hidden h;
    auto owned = std::make_unique<cl::MBar>();
    m = owned.get();
    m->count = m->pending = count;
    cl::bars[bar] = std::move(owned);
  }
  m->initialised = 1;
}
inline void fence_mbarrier_init() {}
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  cl::MBar& m = cl::get(bar);
  emu::fib::tsan_release(&m.sync[m.phase & 1]);
  emu::fib::Hidden h;
  m.tx += bytes;
  --m.pending;
  cl::settle(m);
}
inline void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  cl::MBar& m = cl::get(bar);
  {
    emu::fib::Hidden h;
    while ((m.phase & 1) == parity) {
      m.waiting.push_back(emu::fib::current());
      emu::fib::block("an mbarrier wait");
    }
  }
  emu::fib::tsan_acquire(&m.sync[parity & 1]);
}
inline void bulk_load_multicast(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                uint16_t mask) {
  if (bytes % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(src) % 16 != 0)
    cl::fail("bulk copy: size or address not a multiple of 16");
  if (mask >> cl::size) cl::fail("bulk copy: mask names a block outside the cluster");
  for (int r = 0; r < cl::size; ++r) {
    if (!((mask >> r) & 1)) continue;
    unsigned char* d = cl::peer(static_cast<unsigned char*>(dst), r);
    if (d + bytes > emu::block_smem[r] + emu::dyn_bytes) cl::fail("bulk copy past shared memory");
    std::memcpy(d, src, bytes);
    cl::MBar& m = cl::get(cl::peer(bar, r));
    emu::fib::tsan_release(&m.sync[m.phase & 1]);
    emu::fib::Hidden h;
    m.tx -= bytes;
    cl::settle(m);
  }
}

template <typename scalar_t>
uint16_t to_bits(float v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return c10::BFloat16(v).x;
  } else {
    return c10::Half(v).x;
  }
}
template <typename scalar_t>
float from_bits(uint16_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits()));
  } else {
    return static_cast<float>(c10::Half(v, c10::Half::from_bits()));
  }
}

// cvt.rna.tf32.f32: keep the top 19 bits, rounding to nearest with ties away from zero.
inline uint32_t tf32_round(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return (b + 0x1000u) & 0xffffe000u;
}
inline float f32_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}
inline void tf32_split(float v, uint32_t& hi, uint32_t& lo) {
  hi = tf32_round(v);
  lo = tf32_round(v - f32_of(hi));
}
inline void tf32_split(uint32_t bits, uint32_t& hi, uint32_t& lo) { tf32_split(f32_of(bits), hi, lo); }

// One warp-wide mma: every lane's fragments are exchanged, then each lane computes its four
// elements of D = A B + D (d[r] = D[g + 8 (r / 2)][2t + r % 2]) in double from A(frag, row, k)
// and B(frag, k, n), which read an element out of the warp's exchanged fragments.
template <int K, typename GetA, typename GetB>
void warp_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], GetA A, GetB B) {
  const int w = emu::warp(), l = emu::lane();
  for (int r = 0; r < 4; ++r) emu::mma_a[w][l][r] = a[r];
  for (int r = 0; r < 2; ++r) emu::mma_b[w][l][r] = b[r];
  emu::warp_sync();
  const int g = l >> 2, t = l & 3;
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
    double acc = 0;
    for (int k = 0; k < K; ++k)
      acc += static_cast<double>(A(emu::mma_a[w], row, k)) * B(emu::mma_b[w], k, col);
    d[r] += static_cast<float>(acc);
  }
  emu::warp_sync();
}

// m16n8k8 tf32: A[row][k] in lane 4 (row % 8) + k % 4, register (row / 8) + 2 (k / 4);
// B[k][n] in lane 4 n + k % 4, register k / 4; the low 13 bits of an operand are ignored.
inline void mma1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  warp_mma<8>(
      d, a, b,
      [](const uint32_t (*fa)[4], int row, int k) {
        return f32_of(fa[4 * (row % 8) + k % 4][row / 8 + 2 * (k / 4)] & 0xffffe000u);
      },
      [](const uint32_t (*fb)[2], int k, int n) {
        return f32_of(fb[4 * n + k % 4][k / 4] & 0xffffe000u);
      });
}

// m16n8k16 16-bit: A[row][k] in lane 4 (row % 8) + (k % 8) / 2, register (row / 8) + 2 (k / 8),
// half k % 2 (the lower k in the low 16 bits); B[k][n] in lane 4 n + (k % 8) / 2, register
// k / 8, half k % 2.
template <typename scalar_t>
void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  auto half = [](uint32_t word, int h) { return static_cast<uint16_t>(word >> (16 * h)); };
  warp_mma<16>(
      d, a, b,
      [&](const uint32_t (*fa)[4], int row, int k) {
        return from_bits<scalar_t>(
            half(fa[4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2));
      },
      [&](const uint32_t (*fb)[2], int k, int n) {
        return from_bits<scalar_t>(half(fb[4 * n + (k % 8) / 2][k / 8], k % 2));
      });
}

}  // namespace cuda_logreg
}  // namespace manual_layers

#include "../../csrc/cuda/losses/ce_tc.cu"
#include "../../csrc/cuda/losses/ce_tc_cluster.cu"
#include "../../csrc/cuda/losses/loss_dx.cu"
#include "../../csrc/cuda/losses/gemm_path.cu"
#include "../../csrc/cuda/linear/linear_kernels.cuh"
#include "../../csrc/cuda/losses/bce_fused.cu"
#include "../../csrc/cuda/losses/common.cu"
#include "../../csrc/cuda/losses/ce_fused.cu"

using namespace manual_layers::cuda_logreg;

// Runs fn() as the kernel of a grid of grid.x x grid.y blocks of block.x x block.y threads
// (block.x * block.y a multiple of 32, at most 1024), in clusters of `cluster` consecutive
// blocks along x (grid.x a multiple of it; 1: no clusters), cluster after cluster, the blocks
// of a cluster at the same time; dyn_smem bytes of dynamic shared memory (as the launch's third
// argument) per block, poisoned (0xff bytes: NaN in 16 and 32 bits) before each cluster. The
// threads of a cluster are fibers (tests/cuda_emu/fibers.h), all on this OS thread. A thread
// that leaves the kernel early deadlocks a __syncthreads of the others (on a GPU: undefined)
// instead of completing it, and the run ends. Per-thread cp.async state and the mbarriers are
// dropped at the end of each cluster.
namespace emu {
unsigned launch_bx0 = 0, launch_by = 0;  // the running cluster's first block
// A fiber resumes: the per-thread globals become its.
inline void resume(const fib::Fiber& f) {
  threadIdx = uint3{f.tid % blockDim.x, f.tid / blockDim.x, 0};
  blockIdx = uint3{launch_bx0 + f.rank, launch_by, 0};
  smem_dyn = block_smem[f.rank];
  block_bar = &block_bars[f.rank];
  warp_base = f.rank * static_cast<int>(blockDim.x * blockDim.y / 32);
  cl::rank = f.rank;
}
}  // namespace emu

template <typename Fn>
void launch(uint3 grid, uint3 block, Fn fn, size_t dyn_smem = 0, int cluster = 1) {
  const size_t dyn = (dyn_smem + 15) / 16 * 16;
  if (dyn > emu::kSmemBytes) {
    std::fprintf(stderr, "dynamic shared memory %zu > %zu\n", dyn, emu::kSmemBytes);
    std::exit(2);
  }
  if (cluster < 1 || cluster > emu::kMaxCluster || grid.x % cluster != 0) {
    std::fprintf(stderr, "cluster of %d blocks for a grid of %u\n", cluster, grid.x);
    std::exit(2);
  }
  emu::dyn_bytes = dyn;
  for (int r = 0; r < cluster; ++r) emu::block_smem[r] = emu::smem_raw[r] + emu::kSmemBytes - dyn;
  gridDim = grid;
  blockDim = block;
  cl::size = cluster;
  const int n = static_cast<int>(block.x * block.y);
  emu::fib::sched().resume_hook = emu::resume;
  manual_layers::cuda_logreg::cp_state.assign(static_cast<size_t>(cluster) * n, {});
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx0 = 0; bx0 < grid.x; bx0 += cluster) {
      for (int r = 0; r < cluster; ++r) {
        std::memset(emu::smem_raw[r], 0xff, emu::kSmemBytes);
        emu::block_bars[r].reset(n);
      }
      for (int k = 0; k < cluster * n / 32; ++k) emu::warp_bars[k].reset(32);
      emu::cluster_bar.reset(cluster * n, true);
      cl::bars.clear();
      emu::launch_bx0 = bx0;
      emu::launch_by = by;
      emu::fib::run(cluster, n, [](void* f) { (*static_cast<Fn*>(f))(); }, &fn);
      for (auto& c : manual_layers::cuda_logreg::cp_state) c = {};
      for (const auto& [addr, m] : cl::bars)
        if (m->pending != m->count || m->tx != 0)
          cl::fail("a block returned with arrivals or bytes still due on its mbarrier");
    }
}
template <typename Fn>
void launch(int grid, Fn fn, size_t dyn_smem = 0) {
  launch(uint3{static_cast<unsigned>(grid), 1, 1}, uint3{kThreads, 1, 1}, fn, dyn_smem);
}

// max |a - e| / max |e|, infinite when a holds a non-finite value (an unwritten output).
double rel_err(const std::vector<double>& a, const std::vector<double>& e) {
  double num = 0, den = 0;
  for (size_t k = 0; k < a.size(); ++k) {
    if (!std::isfinite(a[k])) return static_cast<double>(INFINITY);
    num = std::max(num, std::abs(a[k] - e[k]));
    den = std::max(den, std::abs(e[k]));
  }
  return num / std::max(den, 1e-30);
}

template <typename scalar_t>
const char* dtype_name() {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return "bf16";
  if constexpr (std::is_same_v<scalar_t, c10::Half>) return "f16";
  if constexpr (std::is_same_v<scalar_t, float>) return "f32";
  return "f64";
}

// The single-pass cross-entropy kernels against float64 (loss, residual / den, dW and db partials
// summed in block order): kind "tc" the tensor-core kernel (csrc/cuda/losses/ce_tc.cu: STAGES tiles
// in its ring), "fused" the CUDA-core kernel (csrc/cuda/losses/ce_fused.cu: W in acc_t, the mean
// denominator from ce_den_partial_kernel and ce_den_final_kernel, STAGES unused).
template <typename scalar_t>
int run_ce_single(const std::string& kind, int64_t N, int D, int C, int grid, int stages,
                  const std::string& opts) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool cl = kind == "tc_cl";  // the cluster instances: GRID clusters of ceil(C / 32)
  const bool tc = kind == "tc" || cl;
  std::mt19937 gen(N * 131 + D * 7 + C);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.1f, 2.0f);
  const bool big = opts.find('W') != std::string::npos;  // weights up to 3e4 (fp16 scaling)
  const bool weights = big || opts.find('w') != std::string::npos;
  const bool smooth = opts.find('s') != std::string::npos;
  const bool ignore = opts.find('i') != std::string::npos;
  std::vector<scalar_t> x(N * D), w(static_cast<size_t>(C) * D);
  for (auto& v : x) v = scalar_t(nd(gen));
  for (auto& v : w) v = scalar_t(nd(gen) / std::sqrt(static_cast<float>(D)));
  std::vector<acc_t> w_acc(w.begin(), w.end());
  std::vector<acc_t> bias(C), cw(C, acc_t(1));
  for (auto& v : bias) v = nd(gen);
  if (weights) for (auto& v : cw) v = big ? ud(gen) * 1.5e4f : ud(gen);
  std::vector<int64_t> target(N);
  const int64_t ignore_index = -100;
  for (int64_t i = 0; i < N; ++i) target[i] = static_cast<int64_t>(gen() % C);
  if (ignore) for (int64_t i = 1; i < N; i += 7) target[i] = ignore_index;
  const acc_t eps = smooth ? acc_t(0.15) : acc_t(0);

  // float64 reference from the same input values: loss, residual r, sum_i r x_i, sum_i r.
  // The cluster instances' 16-bit dW rounds r once to the input type (fp16: scaled by the
  // kernel's power of two): gw_ref1 is sum_i round(r) x_i, and gw_amb bounds what the rounding
  // of an r within 1e-5 of a tie (where the kernel's fp32 r may round the other way) can move.
  double den = 0, loss_ref = 0;
  std::vector<double> r_ref(N * C, 0.0), gw_ref(static_cast<size_t>(C) * D, 0.0), gb_ref(C, 0.0);
  const bool one_part = cl && sizeof(scalar_t) == 2;
  std::vector<double> gw_ref1(one_part ? gw_ref.size() : 0, 0.0), gw_amb(gw_ref1.size(), 0.0);
  double wsum = 0, wmax = 0;
  for (int c = 0; c < C; ++c) {
    wsum += cw[c];
    wmax = std::max(wmax, std::abs(static_cast<double>(cw[c])));
  }
  double rscale = 1;
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    int e = 0;
    std::frexp(std::max(2 * wmax, 1.0), &e);
    rscale = std::ldexp(1.0, -e);
  }
  for (int64_t i = 0; i < N; ++i) {
    if (target[i] == ignore_index) continue;
    const int y = static_cast<int>(target[i]);
    den += cw[y];
    std::vector<double> z(C);
    double m = -INFINITY;
    for (int c = 0; c < C; ++c) {
      double s = bias[c];
      for (int d = 0; d < D; ++d)
        s += static_cast<double>(x[i * D + d]) * static_cast<double>(w[c * D + d]);
      z[c] = s;
      m = std::max(m, s);
    }
    double se = 0;
    for (int c = 0; c < C; ++c) se += std::exp(z[c] - m);
    const double lse = m + std::log(se);
    double sm = 0;
    for (int c = 0; c < C; ++c) sm += cw[c] * (lse - z[c]);
    loss_ref += (1 - eps) * cw[y] * (lse - z[y]) + eps / C * sm;
    const double a = (1 - eps) * cw[y] + eps / C * wsum;
    for (int c = 0; c < C; ++c) {
      double v = a * std::exp(z[c] - lse) - (c == y ? (1 - eps) * cw[y] : 0.0) - eps / C * cw[c];
      r_ref[i * C + c] = v;
      gb_ref[c] += v;
      for (int d = 0; d < D; ++d) gw_ref[c * D + d] += v * static_cast<double>(x[i * D + d]);
      if constexpr (!std::is_same_v<scalar_t, double> && !std::is_same_v<scalar_t, float>) {
        if (one_part) {
          auto round16 = [&](double f) {
            return from_bits<scalar_t>(to_bits<scalar_t>(static_cast<float>(v * rscale * f)));
          };
          const double v1 = round16(1 - 1e-5), v2 = round16(1 + 1e-5);
          for (int d = 0; d < D; ++d) {
            const double xd = static_cast<double>(x[i * D + d]);
            gw_ref1[c * D + d] += v1 / rscale * xd;
            gw_amb[c * D + d] += std::abs(v2 - v1) / rscale * std::abs(xd);
          }
        }
      }
    }
  }

  // The kernel's inputs and outputs, outputs poisoned with NaN (an unwritten element fails).
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  std::vector<acc_t> res(N * C, nan), ws_gw(static_cast<size_t>(grid) * C * D, nan),
      ws_gb(static_cast<size_t>(grid) * C, nan), ws_loss(grid, nan);
  CeFusedParams<scalar_t, acc_t> p{};
  p.x = x.data();
  p.wx = w.data();
  p.w = w_acc.data();
  p.bias = bias.data();
  p.target = target.data();
  p.cw = weights ? cw.data() : nullptr;
  p.res = res.data();
  p.ws_gw = ws_gw.data();
  p.ws_gb = ws_gb.data();
  p.ws_loss = ws_loss.data();
  p.N = N;
  p.ignore_index = ignore_index;
  p.D = D;
  p.C = C;
  p.eps = eps;
  p.stages = stages;
  p.vec_ok = D % (16 / static_cast<int>(sizeof(scalar_t))) == 0;
  // The mean denominator: the kernels' own partial and final sums (fused), or given (tc).
  const int n_den = 3;
  std::vector<acc_t> den_ws(n_den, nan);
  acc_t den_dev = static_cast<acc_t>(den);
  if (!tc) {
    launch(n_den, [&] {
      ce_den_partial_kernel<acc_t>(target.data(), p.cw, N, C, ignore_index, den_ws.data());
    });
    launch(1, [&] { ce_den_final_kernel<acc_t>(den_ws.data(), n_den, &den_dev); });
  }
  p.den = &den_dev;
  size_t smem = 0;
  CeFusedKernel<scalar_t> kernel = nullptr;
  int cp = 0, nt = 0, blocks = 1;
  if (tc) {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      ce_tc_tiles(C, D, cl, &cp, &nt, &blocks);
      smem = ce_tc_smem<scalar_t>(cp, D, stages);
      kernel = ce_tc_kernel_for<scalar_t>(cp, nt, cl);
    }
  } else {
    cp = C <= 16 ? 16 : 32;            // ce_fused_config's CMAX
    const int dj_need = (D + kThreads - 1) / kThreads;
    nt = dj_need <= 1 ? 1 : (dj_need <= 2 ? 2 : 4);  // its DJ
    smem = ce_fused_smem<scalar_t>(C, (D + 127) / 128 * 128, cp);
    kernel = ce_fused_kernel_for<scalar_t>(cp, nt);
  }
  if (kernel == nullptr || smem > emu::kSmemBytes) {
    std::printf("no kernel for this case, or shared memory %zu > %zu\n", smem, emu::kSmemBytes);
    return 2;
  }
  launch(uint3{static_cast<unsigned>(grid * blocks), 1, 1}, uint3{kThreads, 1, 1},
         [&] { kernel(p); }, smem, blocks);

  // finalize_kernel's sums (block or cluster order), then the relative errors.
  double loss = 0;
  std::vector<double> gw(static_cast<size_t>(C) * D, 0.0), gb(C, 0.0), rr(N * C);
  for (int b = 0; b < grid; ++b) {
    loss += ws_loss[b];
    for (int k = 0; k < C * D; ++k) gw[k] += ws_gw[static_cast<size_t>(b) * C * D + k];
    for (int c = 0; c < C; ++c) gb[c] += ws_gb[static_cast<size_t>(b) * C + c];
  }
  std::vector<double> rr_ref(N * C);
  for (int64_t k = 0; k < N * C; ++k) {
    rr[k] = res[k];
    rr_ref[k] = r_ref[k] / den;
  }
  const double e_loss = rel_err({loss}, {loss_ref});
  const double e_gb = rel_err(gb, gb_ref), e_res = rel_err(rr, rr_ref);
  const double e_den = rel_err({static_cast<double>(den_dev)}, {den});
  // tc 16-bit: fp32 logits of exact products, r split in two 16-bit parts (cluster: one part,
  // dW checked against gw_ref1 at fp32's bound, and against the exact dW at 2 ulp of the type);
  // tc fp32: 3xTF32 products; fused: fp32 (fp64) arithmetic throughout
  const double tol = sizeof(acc_t) == 8 ? 1e-12
                     : (!tc || std::is_same_v<scalar_t, float>) ? 2e-5 : 2e-4;
  const double e_gw_exact = rel_err(gw, gw_ref);  // infinite for an unwritten element
  double e_gw = e_gw_exact, tol_gw = tol, tol_exact = tol;
  if (one_part) {  // max (|gw - gw_ref1| - gw_amb) / max |gw_ref1|
    double num = 0, mx = 1e-30;
    for (size_t k = 0; k < gw.size(); ++k) {
      num = std::max(num, std::abs(gw[k] - gw_ref1[k]) - gw_amb[k]);
      mx = std::max(mx, std::abs(gw_ref1[k]));
    }
    e_gw = num / mx;
    tol_gw = 2e-5;
    tol_exact = std::is_same_v<scalar_t, c10::Half> ? 0x1p-10 : 0x1p-7;
  }
  const bool ok = e_loss < tol && e_gw < tol_gw && e_gw_exact < tol_exact && e_gb < tol &&
                  e_res < tol && e_den < tol;
  std::printf("ce_%s %s N=%lld D=%d C=%d grid=%d stages=%d opts=%s cp=%d nt=%d cluster=%d: "
              "loss %.2e gw %.2e (exact r %.2e) gb %.2e res %.2e den %.2e -> %s\n",
              kind.c_str(), dtype_name<scalar_t>(), static_cast<long long>(N), D, C, grid,
              stages, opts.c_str(), cp, nt, blocks, e_loss, e_gw, e_gw_exact, e_gb, e_res, e_den,
              ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

// dX = coef * (residual W) against float64, residual in acc_t, coef one element or per row.
template <typename scalar_t>
int run_loss_dx(int64_t N, int D, int C, int64_t threads, bool per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  using namespace manual_layers::cuda_dx;
  constexpr int VEC = dx_vec<scalar_t>();
  std::mt19937 gen(N * 17 + D + C);
  std::normal_distribution<float> nd;
  std::vector<acc_t> res(N * C), coef(per_row ? N : 1);
  std::vector<scalar_t> w(static_cast<size_t>(C) * D);
  for (auto& v : res) v = nd(gen);
  for (auto& v : coef) v = nd(gen);
  for (auto& v : w) v = scalar_t(nd(gen));
  std::vector<scalar_t> out(N * D, scalar_t(std::nanf("")));
  const int64_t nvec = D / VEC;
  const int64_t rows_per_step = std::max<int64_t>(1, std::min<int64_t>(N, threads / nvec));
  const int grid = static_cast<int>(ceil_div(rows_per_step * nvec, kThreads));
  launch(grid, [&] {
    loss_dx_kernel<scalar_t, VEC>(res.data(), coef.data(), per_row, w.data(), out.data(), N, C,
                                  D, rows_per_step);
  });
  std::vector<double> got(N * D), want(N * D);
  for (int64_t i = 0; i < N; ++i)
    for (int d = 0; d < D; ++d) {
      double v = 0;
      for (int c = 0; c < C; ++c) v += static_cast<double>(res[i * C + c]) * static_cast<double>(w[c * D + d]);
      want[i * D + d] = v * coef[per_row ? i : 0];
      got[i * D + d] = static_cast<double>(out[i * D + d]);
    }
  const double err = rel_err(got, want);
  const double tol = sizeof(scalar_t) == 2 ? 1e-2 : (sizeof(scalar_t) == 4 ? 1e-5 : 1e-12);
  std::printf("loss_dx %s N=%lld D=%d C=%d threads=%lld per_row=%d: %.2e -> %s\n",
              dtype_name<scalar_t>(), static_cast<long long>(N), D, C,
              static_cast<long long>(threads), per_row ? 1 : 0, err, err < tol ? "OK" : "FAIL");
  return err < tol ? 0 : 1;
}

// G = g * act'(s) and bias = column sums of G (act_bwd_colsum_kernel + colsum_final_kernel),
// the rows cut into chunks as launch_act_bwd cuts them for `target_blocks` blocks. G must equal
// act_backward<A> element by element (same formula, same rounding); the bias is compared with
// float64 column sums of that G.
template <typename T, manual_layers::Act A>
int run_act_bwd(int64_t rows, int64_t cols, int64_t target_blocks) {
  using acc_t = at::opmath_type<T>;
  using manual_layers::cuda_common::act_backward;
  constexpr int VEC = manual_layers::cuda_common::VecWidth<T>::value;
  if (cols % VEC != 0) {
    std::printf("cols must be a multiple of %d\n", VEC);
    return 2;
  }
  std::mt19937 gen(rows * 3 + cols);
  std::normal_distribution<float> nd;
  std::vector<T> g(rows * cols), sv(rows * cols), G(rows * cols, T(std::nanf("")));
  for (auto& v : g) v = T(nd(gen));
  for (auto& v : sv) v = T(2 * nd(gen));
  const int64_t gx = ceil_div(cols, 32 * VEC);
  const auto [chunks, rpc] = manual_layers::column_chunks(rows, gx, target_blocks,
                                                          manual_layers::kFuseRows);
  std::vector<acc_t> partial(chunks * cols, acc_t(std::nan("")));
  std::vector<T> bias(cols, T(std::nanf("")));
  launch(uint3{static_cast<unsigned>(gx), static_cast<unsigned>(chunks), 1},
         uint3{32, manual_layers::kFuseRows, 1}, [&] {
           manual_layers::act_bwd_colsum_kernel<T, A, VEC>(g.data(), sv.data(), G.data(),
                                                           partial.data(), rows, cols, rpc);
         });
  launch(static_cast<int>(ceil_div(cols, kThreads)), [&] {
    manual_layers::colsum_final_kernel<T>(partial.data(), bias.data(), chunks, cols);
  });
  int64_t bad = 0;
  std::vector<double> colsum(cols, 0.0), got(cols);
  for (int64_t k = 0; k < rows * cols; ++k) {
    const T want = static_cast<T>(act_backward<A>(static_cast<acc_t>(g[k]), static_cast<acc_t>(sv[k])));
    if (!(static_cast<double>(G[k]) == static_cast<double>(want))) ++bad;
    colsum[k % cols] += static_cast<double>(G[k]);
  }
  for (int64_t c = 0; c < cols; ++c) got[c] = static_cast<double>(bias[c]);
  const double err = rel_err(got, colsum);
  const double tol = sizeof(T) == 2 ? 1e-2 : (sizeof(T) == 4 ? 1e-5 : 1e-12);
  const bool ok = bad == 0 && err < tol;
  std::printf("act_bwd %s act=%d rows=%lld cols=%lld chunks=%lld x %lld rows: G mismatches %lld, "
              "bias %.2e -> %s\n",
              dtype_name<T>(), static_cast<int>(A), static_cast<long long>(rows),
              static_cast<long long>(cols), static_cast<long long>(chunks),
              static_cast<long long>(rpc), static_cast<long long>(bad), err, ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

// ce_rows_kernel<T, R, G> against float64, in one of its callers' modes: "mean" (path 2: the
// residual divided by the mean denominator, the fixed-order sum of n_den partials), "scale"
// (the chunked path's none backward: res_scale x row_scale), "inplace" (the chunked path:
// R == T, the residual written over the logits). Rows 1, 8, 15, ... are ignored; options "ws"
// as for ce_tc. GRID blocks of 8 warps; the kernel loops when they do not cover N.
template <typename T, typename R, int G>
int run_ce_rows_g(int64_t N, int C, int grid, const std::string& mode, const std::string& opts) {
  using acc_t = at::opmath_type<T>;
  std::mt19937 gen(N * 5 + C);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.1f, 2.0f);
  const bool weights = opts.find('w') != std::string::npos;
  const bool smooth = opts.find('s') != std::string::npos;
  const acc_t eps = smooth ? acc_t(0.15) : acc_t(0);
  const int64_t ignore_index = -100;
  std::vector<T> logits(N * C);
  for (auto& v : logits) v = T(2 * nd(gen));
  std::vector<acc_t> bias(C), cw(C, acc_t(1)), row_scale(N);
  for (auto& v : bias) v = nd(gen);
  if (weights) for (auto& v : cw) v = ud(gen);
  for (auto& v : row_scale) v = nd(gen);
  std::vector<int64_t> target(N);
  for (int64_t i = 0; i < N; ++i) target[i] = i % 7 == 1 ? ignore_index : static_cast<int64_t>(gen() % C);
  // Mean denominator as partials (n_den of them), as ce_den_partial_kernel leaves it.
  const int n_den = 3;
  std::vector<acc_t> den_ws(n_den, acc_t(0));
  double den = 0;
  for (int64_t i = 0; i < N; ++i)
    if (target[i] != ignore_index) {
      den_ws[i % n_den] += cw[target[i]];
      den += cw[target[i]];
    }
  const acc_t res_scale_v = acc_t(0.75);
  std::vector<R> res_buf(mode == "inplace" ? 0 : N * C, R(std::nanf("")));
  std::vector<acc_t> loss_out(N, acc_t(std::nan(""))), ws_loss(grid, acc_t(std::nan("")));
  const std::vector<T> logits0 = logits;
  CeRowsParams<T, R> p{};
  p.logits = logits.data();
  if constexpr (std::is_same_v<R, T>) {
    p.res = mode == "inplace" ? logits.data() : res_buf.data();
  } else {
    p.res = res_buf.data();
  }
  p.loss_out = loss_out.data();
  p.ws_loss = ws_loss.data();
  p.bias = bias.data();
  p.target = target.data();
  p.cw = weights ? cw.data() : nullptr;
  p.den_ws = mode == "mean" ? den_ws.data() : nullptr;
  p.n_den = mode == "mean" ? n_den : 0;
  p.host_den = acc_t(1);
  p.res_scale = mode == "mean" ? nullptr : &res_scale_v;
  p.row_scale = mode == "scale" ? row_scale.data() : nullptr;
  p.N = N;
  p.C = C;
  p.ignore_index = ignore_index;
  p.eps = eps;
  launch(grid, [&] { ce_rows_kernel<T, R, G>(p); });

  std::vector<double> r_got(N * C), r_want(N * C, 0.0), l_got(N), l_want(N, 0.0);
  double total = 0, total_want = 0;
  double wsum = 0;
  for (int c = 0; c < C; ++c) wsum += cw[c];
  for (int64_t i = 0; i < N; ++i) {
    l_got[i] = loss_out[i];
    for (int c = 0; c < C; ++c)
      r_got[i * C + c] = static_cast<double>(mode == "inplace" ? static_cast<double>(logits[i * C + c])
                                                                : static_cast<double>(p.res[i * C + c]));
    if (target[i] == ignore_index) continue;
    const int y = static_cast<int>(target[i]);
    std::vector<double> z(C);
    double m = -INFINITY;
    for (int c = 0; c < C; ++c) {
      z[c] = static_cast<double>(logits0[i * C + c]) + bias[c];
      m = std::max(m, z[c]);
    }
    double se = 0, sm = 0;
    for (int c = 0; c < C; ++c) se += std::exp(z[c] - m);
    const double lse = m + std::log(se);
    for (int c = 0; c < C; ++c) sm += cw[c] * (lse - z[c]);
    l_want[i] = (1 - eps) * cw[y] * (lse - z[y]) + eps / C * sm;
    total_want += l_want[i];
    const double a = (1 - eps) * cw[y] + eps / C * wsum;
    const double scale = mode == "mean" ? 1.0 / den : res_scale_v * (mode == "scale" ? row_scale[i] : 1.0);
    for (int c = 0; c < C; ++c)
      r_want[i * C + c] = (a * std::exp(z[c] - lse) - (c == y ? (1 - eps) * cw[y] : 0.0) -
                           eps / C * cw[c]) * scale;
  }
  for (int b = 0; b < grid; ++b) total += ws_loss[b];
  const double e_res = rel_err(r_got, r_want), e_loss = rel_err(l_got, l_want),
               e_total = rel_err({total}, {total_want});
  const double tol = sizeof(R) == 2 ? 1e-2 : (sizeof(acc_t) == 4 ? 1e-5 : 1e-12);
  const double tol_l = sizeof(acc_t) == 4 ? 1e-5 : 1e-12;
  const bool ok = e_res < tol && e_loss < tol_l && e_total < tol_l;
  std::printf("ce_rows %s G=%d N=%lld C=%d grid=%d mode=%s opts=%s: res %.2e loss %.2e total "
              "%.2e -> %s\n",
              dtype_name<T>(), G, static_cast<long long>(N), C, grid, mode.c_str(), opts.c_str(),
              e_res, e_loss, e_total, ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

// The lanes per row launch_ce_rows picks for C.
template <typename T, typename R>
int run_ce_rows(int64_t N, int C, int grid, const std::string& mode, const std::string& opts) {
  if (C <= 2) return run_ce_rows_g<T, R, 2>(N, C, grid, mode, opts);
  if (C <= 4) return run_ce_rows_g<T, R, 4>(N, C, grid, mode, opts);
  if (C <= 8) return run_ce_rows_g<T, R, 8>(N, C, grid, mode, opts);
  if (C <= 16) return run_ce_rows_g<T, R, 16>(N, C, grid, mode, opts);
  return run_ce_rows_g<T, R, 32>(N, C, grid, mode, opts);
}

template <typename T>
int run_ce_rows_mode(int64_t N, int C, int grid, const std::string& mode, const std::string& opts) {
  // path 2 writes an acc_t residual; the chunked path a residual in x's dtype
  if (mode == "mean") return run_ce_rows<T, at::opmath_type<T>>(N, C, grid, mode, opts);
  return run_ce_rows<T, T>(N, C, grid, mode, opts);
}

// The fused binary cross entropy (bce_fused_kernel, its CHUNKS and rows-per-group from
// bce_fused_config) and finalize_kernel over its partials, against float64: loss, grad_w,
// grad_b (divided by N for mean) and the residual r / N. Options: p pos_weight, s sample
// weights, u the scalar (unaligned) load path, m sum instead of mean.
// One binary cross-entropy term in float64 (torch's formulas): loss and r = dloss/dz.
void bce_ref(double z, double y, double s, bool use_pw, double pw, double* loss, double* r) {
  const double lw = use_pw ? 1 + (pw - 1) * y : 1.0;
  const double log_sig = std::min(z, 0.0) - std::log1p(std::exp(-std::abs(z)));
  const double sig = 1 / (1 + std::exp(-z));
  *loss = s * ((1 - y) * z - lw * log_sig);
  *r = s * (lw * sig - (use_pw ? pw : 1.0) * y);
}

template <typename T>
int run_bce(int64_t N, int64_t D, int grid, const std::string& opts) {
  using acc_t = at::opmath_type<T>;
  const bool use_pw = opts.find('p') != std::string::npos;
  const bool use_sw = opts.find('s') != std::string::npos;
  const bool mean = opts.find('m') == std::string::npos;
  std::mt19937 gen(N * 11 + D);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  std::vector<T> x(N * D), y(N), sw(N);
  std::vector<acc_t> w(D);
  for (auto& v : x) v = T(nd(gen));
  // w has x's dtype (the op's contract; the kernel keeps it as scalar_t): values of T only
  for (auto& v : w) v = static_cast<acc_t>(T(nd(gen) / std::sqrt(static_cast<float>(D))));
  for (auto& v : y) v = T(ud(gen) < 0.5f ? 0.f : (ud(gen) < 0.8f ? 1.f : ud(gen)));
  for (auto& v : sw) v = T(ud(gen) + 0.5f);
  const acc_t bias = acc_t(0.3), pw = acc_t(2.5);
  int chunks = 0, wpr = 0;
  if (!bce_fused_config<T>(D, &chunks, &wpr)) {
    std::printf("D too large for the fused kernel\n");
    return 2;
  }
  const int64_t gpb = kWarps / wpr;
  const size_t smem = bce_fused_smem<acc_t>(gpb, D, true);
  if (smem > emu::kSmemBytes) return 2;
  const acc_t den = mean ? static_cast<acc_t>(N) : acc_t(1);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  std::vector<acc_t> res(N, nan), ws_gw(grid * D, nan), ws_loss(grid, nan), ws_gb(grid, nan);
  BceFusedParams<T, acc_t> p{};
  p.x = x.data();
  p.w = w.data();
  p.bias = &bias;
  p.target = y.data();
  p.pos_weight = use_pw ? &pw : nullptr;
  p.sw = use_sw ? sw.data() : nullptr;
  p.res = res.data();
  p.ws_gw = ws_gw.data();
  p.ws_loss = ws_loss.data();
  p.ws_gb = ws_gb.data();
  p.N = N;
  p.D = D;
  p.den = den;
  p.wpr = wpr;
  p.vec_ok = opts.find('u') == std::string::npos && D % (16 / sizeof(T)) == 0;
  launch(grid, [&] {
    if (chunks == 1) bce_fused_kernel<T, acc_t, 1>(p);
    else if (chunks == 2) bce_fused_kernel<T, acc_t, 2>(p);
    else if (chunks == 4) bce_fused_kernel<T, acc_t, 4>(p);
    else if constexpr (kBce8Chunks<T>) bce_fused_kernel<T, acc_t, 8>(p);
  }, smem);
  acc_t loss = nan, gb = nan;
  std::vector<acc_t> gw(D, nan);
  FinalizeParams<acc_t> fp{};
  fp.ws_gw = ws_gw.data();
  fp.ws_loss = ws_loss.data();
  fp.ws_gb = ws_gb.data();
  fp.gw_out = gw.data();
  fp.gb_out = &gb;
  fp.loss_out = &loss;
  fp.B = grid;
  fp.D = D;
  fp.nb = 1;
  fp.host_den = den;
  launch(static_cast<int>(std::max<int64_t>(1, ceil_div(D, 32))), [&] { finalize_kernel<acc_t>(fp); });

  double loss_ref = 0, gb_ref = 0;
  std::vector<double> gw_ref(D, 0.0), r_ref(N), r_got(N), gw_got(D);
  for (int64_t i = 0; i < N; ++i) {
    double z = bias;
    for (int64_t d = 0; d < D; ++d) z += static_cast<double>(x[i * D + d]) * w[d];
    double l = 0, r = 0;
    bce_ref(z, static_cast<double>(y[i]), use_sw ? static_cast<double>(sw[i]) : 1.0, use_pw,
            pw, &l, &r);
    loss_ref += l;
    r_ref[i] = r / den;
    r_got[i] = res[i];
    gb_ref += r;
    for (int64_t d = 0; d < D; ++d) gw_ref[d] += r * static_cast<double>(x[i * D + d]);
  }
  for (int64_t d = 0; d < D; ++d) {
    gw_ref[d] /= den;
    gw_got[d] = gw[d];
  }
  const double e_loss = rel_err({static_cast<double>(loss)}, {loss_ref / den});
  const double e_gw = rel_err(gw_got, gw_ref), e_gb = rel_err({static_cast<double>(gb)}, {gb_ref / den});
  const double e_res = rel_err(r_got, r_ref);
  const double tol = sizeof(acc_t) == 4 ? 1e-5 : 1e-12;
  // grad_b is one sum of residuals of both signs: its bar scales with the sum's condition
  // number sum_i |r_i| / |sum_i r_i| (random shapes found N = 33 where it is 7530: 3.4e-4 in
  // fp32, with every residual right to 7e-8).
  double abs_sum = 0;
  for (int64_t i = 0; i < N; ++i) abs_sum += std::abs(r_ref[i]);
  const double cond = std::max(1.0, abs_sum / std::max(std::abs(gb_ref / den), 1e-300));
  const bool ok = e_loss < tol && e_gw < tol && e_gb < tol * cond && e_res < tol;
  std::printf("bce %s N=%lld D=%lld grid=%d chunks=%d wpr=%d vec=%d opts=%s: loss %.2e gw %.2e "
              "gb %.2e res %.2e -> %s\n",
              dtype_name<T>(), static_cast<long long>(N), static_cast<long long>(D), grid, chunks,
              wpr, p.vec_ok ? 1 : 0, opts.c_str(), e_loss, e_gw, e_gb, e_res, ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

// The GEMM path's binary row kernel (bce_rows_kernel): one thread per row over the logits, loss
// per row, residual / den and block loss partials against float64. Options as for bce.
template <typename T>
int run_bce_rows(int64_t N, int grid, const std::string& opts) {
  using acc_t = at::opmath_type<T>;
  const bool use_pw = opts.find('p') != std::string::npos;
  const bool use_sw = opts.find('s') != std::string::npos;
  const bool mean = opts.find('m') == std::string::npos;
  std::mt19937 gen(N * 13);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  std::vector<T> logits(N), y(N), sw(N);
  for (auto& v : logits) v = T(4 * nd(gen));
  for (auto& v : y) v = T(ud(gen) < 0.5f ? 0.f : 1.f);
  for (auto& v : sw) v = T(ud(gen) + 0.5f);
  const acc_t bias = acc_t(-0.7), pw = acc_t(3.0);
  const acc_t den = mean ? static_cast<acc_t>(N) : acc_t(1);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  std::vector<acc_t> res(N, nan), loss_out(N, nan), ws_loss(grid, nan);
  BceRowsParams<T, acc_t> p{};
  p.logits = logits.data();
  p.res = res.data();
  p.loss_out = loss_out.data();
  p.ws_loss = ws_loss.data();
  p.bias = &bias;
  p.target = y.data();
  p.pos_weight = use_pw ? &pw : nullptr;
  p.sw = use_sw ? sw.data() : nullptr;
  p.den = den;
  p.N = N;
  launch(grid, [&] { bce_rows_kernel<T, acc_t>(p); });
  std::vector<double> r_got(N), r_want(N), l_got(N), l_want(N);
  double total = 0, total_want = 0;
  for (int64_t i = 0; i < N; ++i) {
    double l = 0, r = 0;
    bce_ref(static_cast<double>(logits[i]) + bias, static_cast<double>(y[i]),
            use_sw ? static_cast<double>(sw[i]) : 1.0, use_pw, pw, &l, &r);
    l_want[i] = l;
    r_want[i] = r / den;
    l_got[i] = loss_out[i];
    r_got[i] = res[i];
    total_want += l;
  }
  for (int b = 0; b < grid; ++b) total += ws_loss[b];
  const double e_res = rel_err(r_got, r_want), e_loss = rel_err(l_got, l_want),
               e_total = rel_err({total}, {total_want});
  const double tol = sizeof(acc_t) == 4 ? 1e-5 : 1e-12;
  const bool ok = e_res < tol && e_loss < tol && e_total < tol;
  std::printf("bce_rows %s N=%lld grid=%d opts=%s: res %.2e loss %.2e total %.2e -> %s\n",
              dtype_name<T>(), static_cast<long long>(N), grid, opts.c_str(), e_res, e_loss,
              e_total, ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

// Linear's other kernels (csrc/cuda/linear/linear.cu) on a rows x cols matrix, GRID blocks of 256
// threads (fewer than the data needs: grid-stride loops): act_fwd_kernel and act_bwd_kernel
// (GELU; equal to act_forward / act_backward element by element, the vector body and the
// scalar tail), softmax_fwd_kernel and softmax_bwd_kernel (against float64), and the column
// sum of activation "none" (colsum_partial_kernel + colsum_final_kernel, chunked as
// column_sum chunks it for `target_blocks` blocks, against float64).
template <typename T>
int run_linear_misc(int64_t rows, int64_t cols, int grid, int64_t target_blocks) {
  using acc_t = at::opmath_type<T>;
  using manual_layers::Act;
  using manual_layers::cuda_common::act_backward;
  using manual_layers::cuda_common::act_forward;
  constexpr int VEC = manual_layers::cuda_common::VecWidth<T>::value;
  const int64_t n = rows * cols;
  std::mt19937 gen(rows * 7 + cols);
  std::normal_distribution<float> nd;
  std::vector<T> z(n), g(n);
  for (auto& v : z) v = T(2 * nd(gen));
  for (auto& v : g) v = T(nd(gen));
  const T tnan = T(std::nanf(""));
  std::vector<T> y(n, tnan), G(n, tnan), sm(n, tnan), sG(n, tnan), colsum(cols, tnan);
  launch(grid, [&] { manual_layers::act_fwd_kernel<T, Act::Gelu, VEC>(z.data(), y.data(), n); });
  launch(grid, [&] {
    manual_layers::act_bwd_kernel<T, Act::Gelu, VEC>(g.data(), z.data(), G.data(), n);
  });
  launch(grid, [&] { manual_layers::softmax_fwd_kernel<T>(z.data(), sm.data(), rows, cols); });
  launch(grid, [&] {
    manual_layers::softmax_bwd_kernel<T>(g.data(), sm.data(), sG.data(), rows, cols);
  });
  const int64_t gx = ceil_div(cols, manual_layers::kColTileX);
  const auto [chunks, rpc] = manual_layers::column_chunks(rows, gx, target_blocks, 32);
  std::vector<acc_t> partial(chunks * cols, std::numeric_limits<acc_t>::quiet_NaN());
  launch(uint3{static_cast<unsigned>(gx), static_cast<unsigned>(chunks), 1},
         uint3{manual_layers::kColTileX, manual_layers::kColTileY, 1}, [&] {
           manual_layers::colsum_partial_kernel<T>(g.data(), partial.data(), rows, cols, rpc);
         });
  launch(static_cast<int>(ceil_div(cols, kThreads)), [&] {
    manual_layers::colsum_final_kernel<T>(partial.data(), colsum.data(), chunks, cols);
  });

  int64_t bad = 0;
  for (int64_t k = 0; k < n; ++k) {
    const T f = static_cast<T>(act_forward<Act::Gelu>(static_cast<acc_t>(z[k])));
    const T b = static_cast<T>(
        act_backward<Act::Gelu>(static_cast<acc_t>(g[k]), static_cast<acc_t>(z[k])));
    if (!(static_cast<double>(y[k]) == static_cast<double>(f))) ++bad;
    if (!(static_cast<double>(G[k]) == static_cast<double>(b))) ++bad;
  }
  std::vector<double> sm_got(n), sm_want(n), sg_got(n), sg_want(n), cs_got(cols),
      cs_want(cols, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double m = -INFINITY, se = 0, dot = 0;
    for (int64_t j = 0; j < cols; ++j) m = std::max(m, static_cast<double>(z[r * cols + j]));
    for (int64_t j = 0; j < cols; ++j) se += std::exp(static_cast<double>(z[r * cols + j]) - m);
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t k = r * cols + j;
      sm_want[k] = std::exp(static_cast<double>(z[k]) - m) / se;
      sm_got[k] = static_cast<double>(sm[k]);
      dot += static_cast<double>(g[k]) * static_cast<double>(sm[k]);  // backward of the y given
    }
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t k = r * cols + j;
      sg_want[k] = static_cast<double>(sm[k]) * (static_cast<double>(g[k]) - dot);
      sg_got[k] = static_cast<double>(sG[k]);
      cs_want[j] += static_cast<double>(g[k]);
    }
  }
  for (int64_t j = 0; j < cols; ++j) cs_got[j] = static_cast<double>(colsum[j]);
  const double e_sm = rel_err(sm_got, sm_want), e_sg = rel_err(sg_got, sg_want),
               e_cs = rel_err(cs_got, cs_want);
  const double tol = sizeof(T) == 2 ? 1e-2 : (sizeof(T) == 4 ? 1e-5 : 1e-12);
  const bool ok = bad == 0 && e_sm < tol && e_sg < tol && e_cs < tol;
  std::printf("linear_misc %s rows=%lld cols=%lld grid=%d colsum chunks=%lld: act mismatches "
              "%lld, softmax %.2e, softmax bwd %.2e, column sum %.2e -> %s\n",
              dtype_name<T>(), static_cast<long long>(rows), static_cast<long long>(cols), grid,
              static_cast<long long>(chunks), static_cast<long long>(bad), e_sm, e_sg, e_cs,
              ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  if ((what == "ce_tc" || what == "ce_tc_cl" || what == "ce_fused") && argc == 9) {
    const std::string kind = what.substr(3), dt = argv[2];
    const int64_t N = std::atoll(argv[3]);
    const int D = std::atoi(argv[4]), C = std::atoi(argv[5]), grid = std::atoi(argv[6]),
              stages = std::atoi(argv[7]);
    const std::string opts = argv[8];
    if (dt == "bf16") return run_ce_single<c10::BFloat16>(kind, N, D, C, grid, stages, opts);
    if (dt == "f32") return run_ce_single<float>(kind, N, D, C, grid, stages, opts);
    if (dt == "f64") return run_ce_single<double>(kind, N, D, C, grid, stages, opts);
    return run_ce_single<c10::Half>(kind, N, D, C, grid, stages, opts);
  }
  if (what == "loss_dx" && argc == 8) {
    const std::string dt = argv[2];
    const int64_t N = std::atoll(argv[3]);
    const int D = std::atoi(argv[4]), C = std::atoi(argv[5]);
    const int64_t threads = std::atoll(argv[6]);
    const bool per_row = std::atoi(argv[7]) != 0;
    if (dt == "bf16") return run_loss_dx<c10::BFloat16>(N, D, C, threads, per_row);
    if (dt == "f16") return run_loss_dx<c10::Half>(N, D, C, threads, per_row);
    if (dt == "f32") return run_loss_dx<float>(N, D, C, threads, per_row);
    return run_loss_dx<double>(N, D, C, threads, per_row);
  }
  if (what == "act_bwd" && argc == 7) {
    using manual_layers::Act;
    const std::string dt = argv[2], act = argv[3];
    const int64_t rows = std::atoll(argv[4]), cols = std::atoll(argv[5]),
                  blocks = std::atoll(argv[6]);
    auto by_act = [&](auto tag) {
      using T = decltype(tag);
      if (act == "gelu") return run_act_bwd<T, Act::Gelu>(rows, cols, blocks);
      if (act == "silu") return run_act_bwd<T, Act::Silu>(rows, cols, blocks);
      if (act == "gelu_tanh") return run_act_bwd<T, Act::GeluTanh>(rows, cols, blocks);
      return run_act_bwd<T, Act::Relu>(rows, cols, blocks);
    };
    if (dt == "bf16") return by_act(c10::BFloat16());
    if (dt == "f16") return by_act(c10::Half());
    if (dt == "f32") return by_act(float());
    return by_act(double());
  }
  if (what == "ce_rows" && argc == 8) {
    const std::string dt = argv[2];
    const int64_t N = std::atoll(argv[3]);
    const int C = std::atoi(argv[4]), grid = std::atoi(argv[5]);
    const std::string mode = argv[6], opts = argv[7];
    if (dt == "bf16") return run_ce_rows_mode<c10::BFloat16>(N, C, grid, mode, opts);
    if (dt == "f16") return run_ce_rows_mode<c10::Half>(N, C, grid, mode, opts);
    if (dt == "f32") return run_ce_rows_mode<float>(N, C, grid, mode, opts);
    return run_ce_rows_mode<double>(N, C, grid, mode, opts);
  }
  if (what == "bce" && argc == 7) {
    const std::string dt = argv[2];
    const int64_t N = std::atoll(argv[3]), D = std::atoll(argv[4]);
    const int grid = std::atoi(argv[5]);
    const std::string opts = argv[6];
    if (dt == "bf16") return run_bce<c10::BFloat16>(N, D, grid, opts);
    if (dt == "f16") return run_bce<c10::Half>(N, D, grid, opts);
    if (dt == "f32") return run_bce<float>(N, D, grid, opts);
    return run_bce<double>(N, D, grid, opts);
  }
  if (what == "bce_rows" && argc == 6) {
    const std::string dt = argv[2];
    const int64_t N = std::atoll(argv[3]);
    const int grid = std::atoi(argv[4]);
    const std::string opts = argv[5];
    if (dt == "bf16") return run_bce_rows<c10::BFloat16>(N, grid, opts);
    if (dt == "f16") return run_bce_rows<c10::Half>(N, grid, opts);
    if (dt == "f32") return run_bce_rows<float>(N, grid, opts);
    return run_bce_rows<double>(N, grid, opts);
  }
  if (what == "linear_misc" && argc == 7) {
    const std::string dt = argv[2];
    const int64_t rows = std::atoll(argv[3]), cols = std::atoll(argv[4]);
    const int grid = std::atoi(argv[5]);
    const int64_t blocks = std::atoll(argv[6]);
    if (dt == "bf16") return run_linear_misc<c10::BFloat16>(rows, cols, grid, blocks);
    if (dt == "f16") return run_linear_misc<c10::Half>(rows, cols, grid, blocks);
    if (dt == "f32") return run_linear_misc<float>(rows, cols, grid, blocks);
    return run_linear_misc<double>(rows, cols, grid, blocks);
  }
  std::fprintf(stderr,
               "usage: %s ce_tc|ce_fused bf16|f16|f32|f64 N D C GRID STAGES OPTS\n"
               "       %s loss_dx bf16|f16|f32|f64 N D C THREADS PER_ROW\n"
               "       %s act_bwd bf16|f16|f32|f64 gelu|silu|gelu_tanh|relu ROWS COLS BLOCKS\n"
               "       %s ce_rows bf16|f16|f32|f64 N C GRID mean|scale|inplace OPTS\n"
               "       %s bce bf16|f16|f32|f64 N D GRID OPTS\n"
               "       %s bce_rows bf16|f16|f32|f64 N GRID OPTS\n"
               "       %s linear_misc bf16|f16|f32|f64 ROWS COLS GRID BLOCKS\n",
               argv[0], argv[0], argv[0], argv[0], argv[0], argv[0], argv[0]);
  return 2;
}
