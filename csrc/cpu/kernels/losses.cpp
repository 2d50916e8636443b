// CPU kernels of the fused logistic-regression losses (csrc/contracts/losses.h):
//   binary:      BCE-with-logits of z = x w^T + b   (C == 1)
//   multinomial: cross-entropy of z = x W^T + b     (C classes)
//
// Single pass over X. Reading X is the cost (plain PyTorch reads it twice: the forward GEMV/GEMM
// and then X^T r in backward), so each row of X is read from memory exactly once and everything
// that needs it is done while it is in L1:
//
//   rows are split into a FIXED number of contiguous blocks (a function of N, C and D only, never
//   of the thread count); at::parallel_for runs over the blocks. Within a block, per tile of
//   kRows (16) rows (on AMD, the binary pass on rows of up to 1 KiB: 16, 8 or 4, see tile_shape):
//     1. z = W x_i + b for the tile's rows, one row after another, each read front to back
//        (up to 4 classes per register block; vectorised, accumulation type acc_t: float for
//        float/bf16/half, double for double; W is kept as a zero-padded acc_t copy), with the
//        rows ~48 KiB ahead prefetched into L2 where tile_shape asks for it;
//     2. the loss terms and residuals r_i = dloss_i/dz_i of the tile, vectorised over its rows
//        (one SIMD lane per row: stable softplus / log-sum-exp), the residual multiplied by the
//        reduction's scale (1/N, 1/sum_w or 1), the losses accumulated in double in row order;
//     3. one sweep over the tile, a register-blocked micro-GEMM grad_W += R^T X_tile into the
//        block's partial grad_W (C x D acc_t, small enough to stay in cache: loaded and stored
//        once per tile, the rows added in order), and r_i into its partial grad_b; when x needs
//        a gradient, r_i (N x C, acc_t) is kept for backward, which writes
//        dX = (grad_output r) W (csrc/contracts/losses.h says why dX is not written here).
//   Per tile of 16 rows against 4 before, the loss's exp/log run on full vectors and grad_W
//   moves through registers a quarter as often: binary 1,048,576 x 256 fp32 loss+grad on the
//   2-core Zen 4, 100 -> 68 ms (min of 9, one process each, alternating). Rows read one at a
//   time instead of 4 interleaved, prefetch into L2, and log1p through log: 68 -> 45 ms (1.35x
//   one X.sum() in the same process, from 2.0x); CE C=10 with grad 155 -> 110 ms; float64
//   200,000 x 100 binary (the fit's pass) 10.6 -> 6.1 ms. Binary prefetches spread over the
//   row reads (a line per vector instead of a burst per 4 rows): 45 -> 36-40 ms (1.1x X.sum()).
//   On the Zen 4, binary tiles of at most 4 KiB and no software prefetch for rows up to 1 KiB
//   (tile_shape): 1.11-1.38x -> 1.03-1.27x one X.sum() in the same process; on an Intel Xeon
//   the 16-row prefetching tiles stream at X.sum()'s rate (0.96-0.97x) and the short ones do not.
//   The block partials (loss, grad_W, grad_b) are then summed in block order: bitwise
//   deterministic from run to run, whatever the thread count, no atomics. Temporary memory is
//   O(blocks x C x D), independent of N.
//
// reduction="none" runs the same pass, writing the per-row loss and the unscaled residual (N, C);
// its backward, _linear_loss_bwd (csrc/generic/loss_bwd.cpp), is three GEMMs through ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include "../../common.h"
#include "../../contracts/losses.h"
#include "vec_io.h"

// Compiled once per ISA (csrc/cpu/runtime/dispatch.cpp explains the dispatch): everything below lives in
// manual_layers::CPU_CAPABILITY (DEFAULT, AVX2 or AVX512), registered by csrc/cpu/runtime/dispatch.cpp.
#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/*.cpp are compiled per ISA with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (setup.py, CMakeLists.txt)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTile = 4;                  // rows per logits step (converted/prefetched together)
constexpr int64_t kRows = 16;                 // rows per tile (at most): losses, grad_W sweep
constexpr int64_t kPrefetchBytes = 48 << 10;  // software prefetch distance (into L2)
constexpr int64_t kMinBlockRows = 2048;       // a block is at least this many rows...
constexpr int64_t kMaxBlocks = 64;            // ...and there are at most this many blocks,
constexpr int64_t kMaxPartialBytes = 64 << 20;  // whose partial grad_W total at most this.

// The fixed row partition: `count` blocks of `rows` rows (a multiple of kRows; the last block
// may be shorter or empty). Depends on the problem shape only, so results never depend on the
// number of threads.
struct Blocks {
  int64_t count;
  int64_t rows;
};

Blocks make_blocks(int64_t N, int64_t C, int64_t Dp, int64_t elem_size) {
  int64_t count = std::min(kMaxBlocks, (N + kMinBlockRows - 1) / kMinBlockRows);
  const int64_t per_block = std::max<int64_t>(1, C * (Dp + 1) * elem_size);
  count = std::max<int64_t>(1, std::min(count, kMaxPartialBytes / per_block));
  int64_t rows = (N + count - 1) / count;
  rows = std::max<int64_t>(kRows, (rows + kRows - 1) / kRows * kRows);
  return {count, rows};
}

// Rows per tile and software prefetch. While a tile's losses and grad_W sweep run from L1, the
// pass asks for no new line of X; by default tiles are 16 rows, with the rows ~48 KiB ahead
// prefetched into L2 meanwhile (run_block). A tile's size changes no result: every sum runs in
// row order whatever the tiles. The exception, on AMD CPUs only (measured on a 2-core Zen 4): the
// binary pass on rows of up to 1 KiB takes the most rows, 16, 8 or 4, whose tile fits 4 KiB, and
// no software prefetch: the hardware prefetchers then keep X streaming. Loss+grad per X.sum() in
// the same process (medians of 11 interleaved calls, 2-6 processes each), against 16-row tiles
// with prefetch: fp32 1,048,576 x 256 (4 rows) 1.11-1.38x -> 1.03-1.27x; 2,097,152 x 128 (8 rows)
// 1.09-1.20x -> 1.02x; 4,194,304 x 64 (16 rows) 1.15-1.17x -> 0.98-1.01x; bf16 1,048,576 x 256
// (8 rows) 1.28-1.30x -> 1.19-1.24x; float64 200,000 x 100 (4 rows) 1.15-1.22x -> 1.15-1.18x.
// Rows of 2 and 4 KiB (fp32 D = 512, 1000) were slower in 4-row tiles or without the prefetch.
// Cross entropy (compute-bound) keeps 16 rows and the prefetch: without it, 1 GiB of fp32 X,
// D = 256, C = 10 took the same time, C = 4 up to 35 % longer, bf16 C = 10 20-35 % longer.
// On a 2-core Intel Xeon (AVX-512, AMX; KVM) the same comparison goes the other way: per X.sum()
// (medians of 9 interleaved calls, one process per shape), 16 rows with the prefetch against the
// Zen 4 rule: fp32 1,048,576 x 256 0.96-0.97x against 1.19-1.22x; 2,097,152 x 128 1.02x against
// 1.29x; 4,194,304 x 64 1.14x against 1.34x; bf16 1,048,576 x 256 0.99x against 1.20x; float64
// 200,000 x 100 1.04x against 1.49x; 8 or 4 rows with the prefetch in between; fp32 D = 1024 the
// same within 3 %. Cross entropy there too: C = 10 2.19x X.sum() with the prefetch, 2.31x
// without. Hence the vendor test (cpu_is_amd); other CPUs take the Intel rule, unmeasured.
struct TileShape {
  int64_t rows;
  bool prefetch;
};

// Whether this is an AMD CPU (x86 CPUID vendor string), where the short binary tiles were
// measured faster; elsewhere (Intel measured) 16-row tiles with the prefetch are.
inline bool cpu_is_amd() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const bool amd = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
  }();
  return amd;
#else
  return false;
#endif
}

// MANUAL_LAYERS_CPU_BINARY_TILE=ROWS[,noprefetch] (ROWS 4, 8 or 16; read per call) forces the
// binary pass's tiles: for tuning on another CPU, and for the tests, which run every tile shape
// on any CPU and check that all give the same bits.
inline TileShape tile_shape(int64_t C, int64_t row_bytes) {
  if (C == 1) {
    const char* e = std::getenv("MANUAL_LAYERS_CPU_BINARY_TILE");
    if (e != nullptr && *e != '\0' && std::strcmp(e, "auto") != 0) {
      const std::string v(e);
      const bool no_pf = v.size() > 11 && v.compare(v.size() - 11, 11, ",noprefetch") == 0;
      const std::string rows = no_pf ? v.substr(0, v.size() - 11) : v;
      TORCH_CHECK_VALUE(rows == "4" || rows == "8" || rows == "16",
                        "MANUAL_LAYERS_CPU_BINARY_TILE must be auto, 4, 8 or 16, optionally "
                        "followed by ',noprefetch'; got '", v, "'");
      return {std::stoi(rows), !no_pf};
    }
  }
  if (C == 1 && cpu_is_amd()) {
    for (int64_t rows = kRows; rows >= kTile; rows /= 2)
      if (rows * row_bytes <= (4 << 10)) return {rows, false};
  }
  return {kRows, true};
}

// ---------------------------------------------------------------------------------------------
// Per-tile losses, vectorised over the tile's ROWS (one lane per row): the transcendental
// functions run once per kRows / Vec::size() rows and class, not once per row.
// tile(i0, nr, z, r, loss) takes the logits of rows i0 .. i0 + nr CLASS-MAJOR (z[c * kRows + k]
// is row i0 + k, class c), writes the residuals dloss/dz in the same layout into r and the rows'
// losses into loss[0 .. kRows). Lanes nr .. kRows hold finite padding; the caller discards them.

// loss = sw * [(1 - y) z + (1 + (pw - 1) y) softplus(-z)],
// dloss/dz = sw * [(1 - y) - (1 + (pw - 1) y) sigmoid(-z)]   (= sw (sigmoid(z) - y) for pw = 1),
// with softplus(-z) = max(-z, 0) + log1p(exp(-|z|)): no overflow for any z.
template <typename acc_t>
struct BceLoss {
  const acc_t* target;  // (N,)
  const acc_t* sample_weight;  // (N,) or null
  acc_t pos_weight;  // 1 when None

  inline void tile(int64_t i0, int64_t nr, int64_t rows, const acc_t* z, acc_t* r,
                   acc_t* loss) const {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const Vec one(1), zero(0);
    for (int64_t k = 0; k < rows; k += V) {
      const int64_t len = std::max<int64_t>(0, std::min<int64_t>(V, nr - k));
      const Vec zv = Vec::loadu(z + k);
      const Vec y = Vec::loadu(target + i0 + k, len);
      const Vec e = zv.abs().neg().exp();  // exp(-|z|) in (0, 1]
      // log1p(e) as log(w) e / (w - 1) with w = 1 + e rounded (exact to a few ulp; e itself
      // where w rounds to 1): Sleef's vector log1p costs ~350 cycles per 512-bit vector on
      // Zen 4 against ~40 for log, and was a fifth of the binary pass from cache.
      const Vec w = one + e;
      const Vec log1p_e = Vec::blendv(w.log() * e / (w - one), e, w == one);
      const Vec softplus_neg = at::vec::maximum(zv.neg(), zero) + log1p_e;
      const Vec inv = one / w;
      const Vec sigmoid_neg = Vec::blendv(inv, e * inv, zv >= zero);
      const Vec lw = one + (Vec(pos_weight) - one) * y;
      const Vec sw = sample_weight ? Vec::loadu(sample_weight + i0 + k, len) : one;
      (sw * ((one - y) - lw * sigmoid_neg)).store(r + k);
      (sw * ((one - y) * zv + lw * softplus_neg)).store(loss + k);
    }
  }
};

// With eps = label_smoothing, w = class weights (ones if None), t = target, p = softmax(z):
//   loss = (1 - eps) w_t (lse - z_t) + (eps / C) sum_c w_c (lse - z_c)
//   dloss/dz_c = [(1 - eps) w_t + (eps / C) sum_k w_k] p_c - (1 - eps) w_t [c == t] - (eps / C) w_c
// Ignored rows have zero loss and residual. Targets were range-checked before the pass.
// Per lane (row): m = max_c z_c, s = sum_c exp(z_c - m) in class order, lse = m + log s.
template <typename acc_t>
struct CeLoss {
  const int64_t* target;  // (N,)
  const acc_t* class_weight;  // (C,) or null
  int64_t C;
  int64_t ignore_index;
  acc_t eps;
  acc_t class_weight_sum;  // sum_k w_k (C when None)

  inline void tile(int64_t i0, int64_t nr, int64_t rows, const acc_t* z, acc_t* r,
                   acc_t* loss) const {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const acc_t keep = acc_t(1) - eps, eps_c = eps / acc_t(C);
    // Per row: the target's logit and weight; ignored and padding rows get weight 0 and are
    // zeroed after the vector pass (whatever their logits, as torch gives them no gradient).
    int64_t tk[kRows];
    acc_t zt[kRows], wt[kRows];
    for (int64_t k = 0; k < kRows; ++k) {
      const int64_t t = k < nr ? target[i0 + k] : ignore_index;
      const bool valid = k < nr && t != ignore_index;
      tk[k] = valid ? t : -1;
      zt[k] = valid ? z[t * kRows + k] : acc_t(0);
      wt[k] = valid ? (class_weight ? class_weight[t] : acc_t(1)) : acc_t(0);
    }
    for (int64_t k = 0; k < rows; k += V) {
      Vec m = Vec::loadu(z + k);
      for (int64_t c = 1; c < C; ++c) m = at::vec::maximum(m, Vec::loadu(z + c * kRows + k));
      Vec s(0);
      for (int64_t c = 0; c < C; ++c) {
        const Vec e = (Vec::loadu(z + c * kRows + k) - m).exp();
        e.store(r + c * kRows + k);
        s = s + e;
      }
      const Vec lse = m + s.log();
      const Vec w = Vec::loadu(wt + k);
      Vec l = Vec(keep) * w * (lse - Vec::loadu(zt + k));
      const Vec a = Vec(keep) * w + Vec(eps_c * class_weight_sum);
      const Vec inv_s = Vec(1) / s;
      if (eps != acc_t(0)) {
        Vec smooth(0);
        for (int64_t c = 0; c < C; ++c) {
          const Vec wc(class_weight ? class_weight[c] : acc_t(1));
          smooth = smooth + wc * (lse - Vec::loadu(z + c * kRows + k));
          acc_t* rc = r + c * kRows + k;
          (a * (Vec::loadu(rc) * inv_s) - Vec(eps_c) * wc).store(rc);
        }
        l = l + Vec(eps_c) * smooth;
      } else {
        for (int64_t c = 0; c < C; ++c) {
          acc_t* rc = r + c * kRows + k;
          (a * (Vec::loadu(rc) * inv_s)).store(rc);
        }
      }
      l.store(loss + k);
    }
    for (int64_t k = 0; k < rows; ++k) {
      if (tk[k] >= 0) {
        r[tk[k] * kRows + k] -= keep * wt[k];
      } else {
        for (int64_t c = 0; c < C; ++c) r[c * kRows + k] = acc_t(0);
        loss[k] = acc_t(0);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The pass.

template <typename scalar_t, typename acc_t>
struct Pass {
  // inputs
  const scalar_t* x;  // row i at x + i * x_row_stride, unit column stride
  int64_t x_row_stride;
  int64_t N, D, Dp, C;  // Dp: D rounded up to the vector width
  const acc_t* W;  // (C, Dp), zero-padded
  const acc_t* bias;  // (C,) or null
  acc_t scale;  // applied to the residual before accumulation (mean/sum)
  Blocks blocks;
  TileShape tile;
  // mean/sum outputs
  double* part_loss;  // (blocks,)
  acc_t* part_w;  // (blocks, C, Dp) or null
  acc_t* part_b;  // (blocks, C) or null
  acc_t* residual;  // (N, C) or null: mean/sum scaled by `scale` (need_x), none unscaled
  // reduction="none" outputs
  bool none_mode;
  acc_t* row_loss;  // (N,)
};

// The sum of a vector's lanes. at::vec's vec_reduce_all has a shuffle tree for float but, on
// AVX-512, a lane-by-lane generic loop for double that made the float64 logits 7x slower than
// their FMAs (digits, 1797 x 64 x 10: 1.1 ms per pass); here: halves added pairwise.
template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, float>) {
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
  } else {
    constexpr int64_t V = Vec::size();
    alignas(64) acc_t t[V];
    v.store(t);
    for (int64_t h = V / 2; h >= 1; h /= 2)
      for (int64_t j = 0; j < h; ++j) t[j] += t[j + h];
    return t[0];
  }
}

// z[c * kRows] = W_c . x + b_c for NC classes c0 .. c0 + NC of ONE row x (D values, read in
// place: a last partial vector is a masked load, never past the row): NC x ND accumulators,
// each x vector loaded once serves NC FMAs, ND independent chains per class keep the FMA
// pipe busy when NC is small. W rows are zero-padded to Dp.
template <int NC, int ND, typename acc_t>
inline void row_logits(const acc_t* x, const acc_t* W, const acc_t* bias, int64_t c0, int64_t D,
                       int64_t Dp, acc_t* z) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc[NC][ND];
  for (int i = 0; i < NC; ++i)
    for (int j = 0; j < ND; ++j) acc[i][j] = Vec(0);
  const acc_t* w = W + c0 * Dp;
  int64_t d = 0;
  for (; d + ND * V <= D; d += ND * V) {
    for (int j = 0; j < ND; ++j) {
      const Vec xv = Vec::loadu(x + d + j * V);
      for (int i = 0; i < NC; ++i)
        acc[i][j] = at::vec::fmadd(xv, Vec::loadu(w + i * Dp + d + j * V), acc[i][j]);
    }
  }
  for (; d < D; d += V) {  // fewer than ND vectors left: whole, then a partial one
    const Vec xv = D - d >= V ? Vec::loadu(x + d) : Vec::loadu(x + d, D - d);
    for (int i = 0; i < NC; ++i)
      acc[i][0] = at::vec::fmadd(xv, Vec::loadu(w + i * Dp + d), acc[i][0]);
  }
  for (int i = 0; i < NC; ++i) {
    Vec a = acc[i][0];
    for (int j = 1; j < ND; ++j) a = a + acc[i][j];
    z[i * kRows] = hsum(a) + (bias ? bias[c0 + i] : acc_t(0));
  }
}

// z[c * kRows + k] = W_c . x_k + b_c for the kTile rows x_k = x + k * xs (k < kTile). The rows
// are read ONE AFTER ANOTHER, each front to back: interleaving the loads of 4 rows (to reuse
// each W vector for 4 rows) kept the memory reads of the pass at about half of X.sum()'s rate
// on Zen 4; one row at a time they stream like X.sum() (C-only microbenchmark, 1,048,576 x 256
// fp32, 2 threads: 4 rows interleaved 58 ms, 1 row at a time 34 ms, plain sum 36 ms). W stays
// in L1, so its extra loads cost little.
template <typename acc_t>
inline void logits_block(const acc_t* x, int64_t xs, const acc_t* W, const acc_t* bias, int64_t C,
                         int64_t D, int64_t Dp, acc_t* z) {
  for (int64_t k = 0; k < kTile; ++k, x += xs, ++z) {
    int64_t c = 0;
    for (; c + 4 <= C; c += 4) row_logits<4, 1>(x, W, bias, c, D, Dp, z + c * kRows);
    switch (C - c) {
      case 3: row_logits<3, 2>(x, W, bias, c, D, Dp, z + c * kRows); break;
      case 2: row_logits<2, 2>(x, W, bias, c, D, Dp, z + c * kRows); break;
      case 1: row_logits<1, 4>(x, W, bias, c, D, Dp, z + c * kRows); break;
      default: break;
    }
  }
}

// The same for one class (binary), rows read in place in x's own dtype (src_t: acc_t, or
// bf16/fp16 converted as loaded, so 16-bit rows are neither copied nor widened in memory); with
// PF, the row pf_stride bytes ahead of each row is prefetched into L2 a line at a time as the
// row is read (see run_block). The four accumulators are named variables: as an array inlined
// into run_block, GCC 12 kept them on the stack (a store and a reload per FMA).
template <bool PF, typename acc_t, typename src_t>
inline void logits_block_binary(const src_t* x, int64_t xs, const acc_t* W, const acc_t* bias,
                                int64_t D, acc_t* z, const char* pf, int64_t pf_stride) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t S = sizeof(src_t);
  const acc_t b = bias ? bias[0] : acc_t(0);
  for (int64_t k = 0; k < kTile; ++k, x += xs, ++z, pf += pf_stride) {
    Vec a0(0), a1(0), a2(0), a3(0);
    int64_t d = 0;
    for (; d + 4 * V <= D; d += 4 * V) {
      if constexpr (PF) {
        for (int64_t o = 0; o < 4 * V * S; o += 64) __builtin_prefetch(pf + d * S + o, 0, 2);
      }
      a0 = at::vec::fmadd(load<src_t, acc_t>(x + d, V), Vec::loadu(W + d), a0);
      a1 = at::vec::fmadd(load<src_t, acc_t>(x + d + V, V), Vec::loadu(W + d + V), a1);
      a2 = at::vec::fmadd(load<src_t, acc_t>(x + d + 2 * V, V), Vec::loadu(W + d + 2 * V), a2);
      a3 = at::vec::fmadd(load<src_t, acc_t>(x + d + 3 * V, V), Vec::loadu(W + d + 3 * V), a3);
    }
    if constexpr (PF) {
      // The lines of the rest of the row, its last byte included (rows need not start a line).
      for (int64_t o = d * S; o < D * S; o += 64) __builtin_prefetch(pf + o, 0, 2);
      __builtin_prefetch(pf + D * S - 1, 0, 2);
    }
    for (; d < D; d += V) {  // as row_logits: whole vectors, then a partial one, into a0
      const Vec xv = load<src_t, acc_t>(x + d, std::min<int64_t>(V, D - d));
      a0 = at::vec::fmadd(xv, Vec::loadu(W + d), a0);
    }
    *z = hsum(((a0 + a1) + a2) + a3) + b;  // row_logits<1, 4>'s order: bitwise the same
  }
}

// g[i * Dp + j * V ..] += sum_{k < kr} r[i * kRows + k] x_k[j * V ..] for NC classes and ND
// feature vectors: NC x ND accumulators held in registers over the tile's rows. len < V (only
// with ND == 1): the rows' last, partial vector (masked loads; g's padding gets zeros added).
template <int NC, int ND, typename acc_t, typename src_t>
inline void sweep_block(const acc_t* r, const src_t* x, int64_t xs, int64_t kr, acc_t* g,
                        int64_t Dp, int64_t len = Vectorized<acc_t>::size()) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc[NC][ND];
  for (int i = 0; i < NC; ++i)
    for (int j = 0; j < ND; ++j) acc[i][j] = Vec::loadu(g + i * Dp + j * V);
  for (int64_t k = 0; k < kr; ++k, x += xs) {
    Vec xv[ND];
    for (int j = 0; j < ND; ++j) xv[j] = load<src_t, acc_t>(x + j * V, ND == 1 ? len : V);
    for (int i = 0; i < NC; ++i) {
      const Vec rv(r[i * kRows + k]);
      for (int j = 0; j < ND; ++j) acc[i][j] = at::vec::fmadd(rv, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NC; ++i)
    for (int j = 0; j < ND; ++j) acc[i][j].store(g + i * Dp + j * V);
}

// grad_W (C x Dp) += R^T X for the tile: R class-major (C x kRows), rows x_k = x + k * xs of D
// values each (acc_t, or 16-bit rows read in place by the binary pass).
template <typename acc_t, typename src_t>
inline void sweep_tile(const acc_t* r, const src_t* x, int64_t xs, int64_t kr, acc_t* gw,
                       int64_t C, int64_t D, int64_t Dp) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  const int64_t Df = D / V * V;
  for (int64_t c = 0; c < C; c += 2) {
    const acc_t* rc = r + c * kRows;
    acc_t* g = gw + c * Dp;
    const bool two = c + 2 <= C;
    int64_t d = 0;
    for (; d + 4 * V <= Df; d += 4 * V) {
      if (two) sweep_block<2, 4>(rc, x + d, xs, kr, g + d, Dp);
      else sweep_block<1, 4>(rc, x + d, xs, kr, g + d, Dp);
    }
    for (; d < D; d += V) {
      const int64_t len = std::min<int64_t>(V, D - d);
      if (two) sweep_block<2, 1>(rc, x + d, xs, kr, g + d, Dp, len);
      else sweep_block<1, 1>(rc, x + d, xs, kr, g + d, Dp, len);
    }
  }
}

// T: rows per tile (p.tile.rows), a compile-time constant: as a run-time value the 4-row tiles'
// loops (the loss's vector, the residual scaling, the sweep's row loop) cost the time the small
// tiles save (binary 1,048,576 x 256 fp32 in the VM's slow-memory processes: 1.15-1.22x one
// X.sum() against 1.03-1.07x).
template <typename scalar_t, typename acc_t, bool NEED_W, int64_t T, typename LossFn>
void run_block(const Pass<scalar_t, acc_t>& p, const LossFn& loss_fn, int64_t blk) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  static_assert(T % kTile == 0 && T <= kRows && kRows % V == 0,
                "tiles of whole register blocks, buffers of whole vectors");
  const bool prefetch = p.tile.prefetch;
  const int64_t C = p.C, D = p.D, Dp = p.Dp;
  const int64_t begin = std::min(p.N, blk * p.blocks.rows);
  const int64_t end = std::min(p.N, begin + p.blocks.rows);
  const bool none_mode = p.none_mode;

  acc_t* gw = NEED_W ? p.part_w + blk * C * Dp : nullptr;
  acc_t* gb = p.part_b ? p.part_b + blk * C : nullptr;
  if (gw) std::fill(gw, gw + C * Dp, acc_t(0));
  if (gb) std::fill(gb, gb + C, acc_t(0));

  // Whole tiles of acc_t rows are read in place, any D (a row's last partial vector is a masked
  // load: float64 200,000 x 100 binary loss+grad, D not a multiple of 8, no longer copies every
  // row); so are whole tiles of 16-bit rows in the binary pass, converted as loaded (below). The
  // other 16-bit tiles and the last, short tile are converted / copied into a zero-padded acc_t
  // tile, padded with zero rows (and zero residuals).
  std::vector<acc_t> xbuf(T * Dp, acc_t(0));
  std::vector<acc_t> z(kRows * C), r(kRows * C);  // class-major: [c * kRows + k]
  acc_t tile_loss[kRows];
  double loss_sum = 0;

  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  // Software prefetch distance in rows, where tile_shape asks for prefetch: kPrefetchBytes
  // ahead (binary 1,048,576 x 256 fp32 in 16-row tiles on the 2-core Zen 4, per X.sum() in the
  // same process: 1.41x without, 1.31-1.40x at 16-128 KiB, flat; into L1 instead of L2, or 8
  // rows ahead, was slower than none).
  const int64_t pf_rows =
      std::max<int64_t>(kTile, (kPrefetchBytes + row_bytes - 1) / std::max<int64_t>(row_bytes, 1));
  for (int64_t i0 = begin; i0 < end; i0 += T) {
    const int64_t nr = std::min(T, end - i0);
    const int64_t kr = (nr + kTile - 1) / kTile * kTile;  // rows the register blocks cover
    // The tile's rows x_k = xt + k * xs: in place (a whole tile of acc_t rows), or converted /
    // copied into xbuf with zero rows after the last one. Binary: a whole tile is read in place
    // whatever x's dtype (`direct`, rows x_k = p.x + (i0 + k) * x_row_stride), 16-bit values
    // converted in registers as they are loaded, by the logits and again by the sweep (from
    // L1): writing the tile to xbuf and reading it back set the 16-bit pass's speed. Binary
    // 1,048,576 x 256 loss+grad on the 2-core Zen 4 (A/B in alternating processes): bf16
    // 23-25.5 -> 19.7-21.2 ms (1.2-1.35x -> 1.05-1.13x the fp32 pass's time per byte), fp16
    // 96-98 -> 19.4-19.9 ms (its xbuf conversion was ATen's scalar loop: vec_io.h).
    const bool in_place = std::is_same_v<scalar_t, acc_t> && nr == T;
    const bool direct = C == 1 && nr == T;
    const acc_t* xt = in_place ? reinterpret_cast<const acc_t*>(p.x + i0 * p.x_row_stride)
                               : xbuf.data();
    const int64_t xs = in_place ? p.x_row_stride : Dp;
    const scalar_t* x_tile = p.x + i0 * p.x_row_stride;
    // 1. logits, one register block of kTile rows at a time.
    for (int64_t k0 = 0; k0 < kr; k0 += kTile) {
      // Reading X sets the pass's speed, and the hardware prefetcher idles while a tile's
      // losses and grad_W sweep run from L1: where tile_shape says so, ask for the rows pf_rows
      // ahead (into L2, so the tile in L1 is not evicted) so that memory stays busy meanwhile.
      // Binary rows read in place: one prefetch per line, issued as this row's same line is
      // read (logits_block_binary), not a burst of kTile rows' lines here: 1,048,576 x 256
      // fp32 loss+grad 44-46 -> 36-40 ms where X.sum() takes 33-36 ms in the same process
      // (1.33-1.37x -> 1.09-1.12x), float64 200,000 x 100 1.22-1.31x -> 1.12-1.17x. Measured
      // slower for cross entropy (compute-bound: C = 10 117 -> 129 ms), which keeps the burst.
      const bool spread = prefetch && direct && i0 + pf_rows + k0 + kTile <= end;
      for (int64_t k = k0; prefetch && !spread && k < k0 + kTile && i0 + pf_rows + k < end; ++k) {
        const char* row = reinterpret_cast<const char*>(p.x + (i0 + pf_rows + k) * p.x_row_stride);
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 2);
      }
      if (!in_place && !direct) {
        for (int64_t k = k0; k < k0 + kTile; ++k) {
          acc_t* row = xbuf.data() + k * Dp;
          if (k >= nr) std::fill(row, row + D, acc_t(0));
          else convert_row(p.x + (i0 + k) * p.x_row_stride, row, D);
        }
      }
      if (direct) {
        const int64_t row_stride_bytes = p.x_row_stride * static_cast<int64_t>(sizeof(scalar_t));
        const scalar_t* rows = x_tile + k0 * p.x_row_stride;
        if (spread) {
          logits_block_binary<true>(rows, p.x_row_stride, p.W, p.bias, D, z.data() + k0,
                                    reinterpret_cast<const char*>(rows + pf_rows * p.x_row_stride),
                                    row_stride_bytes);
        } else {
          logits_block_binary<false>(rows, p.x_row_stride, p.W, p.bias, D, z.data() + k0,
                                     nullptr, 0);
        }
      } else {
        logits_block(xt + k0 * xs, xs, p.W, p.bias, C, D, Dp, z.data() + k0);
      }
    }
    for (int64_t k = kr; k < T; ++k)  // lanes no register block covered: finite padding
      for (int64_t c = 0; c < C; ++c) z[c * kRows + k] = acc_t(0);

    // 2. losses and residuals of the tile's rows; padding lanes get zero residuals.
    loss_fn.tile(i0, nr, T, z.data(), r.data(), tile_loss);
    for (int64_t c = 0; c < C; ++c)
      std::fill(r.data() + c * kRows + nr, r.data() + c * kRows + T, acc_t(0));
    if (none_mode) {
      for (int64_t k = 0; k < nr; ++k) p.row_loss[i0 + k] = tile_loss[k];
    } else {
      for (int64_t k = 0; k < nr; ++k) loss_sum += static_cast<double>(tile_loss[k]);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = c * kRows; j < c * kRows + T; j += V)
          (Vec::loadu(r.data() + j) * Vec(p.scale)).store(r.data() + j);
    }
    if (p.residual) {
      for (int64_t k = 0; k < nr; ++k)
        for (int64_t c = 0; c < C; ++c) p.residual[(i0 + k) * C + c] = r[c * kRows + k];
    }
    if (none_mode) continue;

    if (gb) {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < nr; ++k) gb[c] += r[c * kRows + k];
    }

    // 3. one sweep over the tile: grad_W += R^T X_tile as a register-blocked micro-GEMM
    //    (2 classes x 4 feature vectors per block), the rows added in order: grad_W is loaded
    //    and stored once per tile, not once per row.
    if constexpr (NEED_W) {
      if (direct) sweep_tile(r.data(), x_tile, p.x_row_stride, kr, gw, C, D, Dp);
      else sweep_tile(r.data(), xt, xs, kr, gw, C, D, Dp);
    }
  }
  if (!none_mode) p.part_loss[blk] = loss_sum;
}

template <typename scalar_t, typename acc_t, bool NEED_W, typename LossFn>
void run_pass(const Pass<scalar_t, acc_t>& p, const LossFn& loss_fn) {
  at::parallel_for(0, p.blocks.count, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      // Only the binary pass takes tiles of fewer than kRows rows (tile_shape).
      if constexpr (std::is_same_v<LossFn, BceLoss<acc_t>>) {
        if (p.tile.rows == kTile) {
          run_block<scalar_t, acc_t, NEED_W, kTile>(p, loss_fn, b);
          continue;
        }
        if (p.tile.rows == 2 * kTile) {
          run_block<scalar_t, acc_t, NEED_W, 2 * kTile>(p, loss_fn, b);
          continue;
        }
      }
      TORCH_INTERNAL_ASSERT(p.tile.rows == kRows);
      run_block<scalar_t, acc_t, NEED_W, kRows>(p, loss_fn, b);
    }
  });
}

// weight (C, D) as a contiguous acc_t (C, Dp) matrix, each row zero-padded to Dp columns (whole
// vectors): the W of the pass and of the dX kernel, which only read it. A weight that already
// is one (acc_t, contiguous, D a whole number of vectors) is used as it is; anything else is
// copied (for small problems the copy was a sizeable part of the call: zeros, a view, copy_).
inline at::Tensor padded_acc_weight(const at::Tensor& weight, int64_t Dp) {
  const int64_t C = weight.size(0), D = weight.size(1);
  const auto acc = at::toOpMathType(weight.scalar_type());
  if (D == Dp && weight.scalar_type() == acc && weight.is_contiguous()) return weight;
  at::Tensor Wp = at::zeros({C, Dp}, weight.options().dtype(acc));
  Wp.narrow(1, 0, D).copy_(weight);
  return Wp;
}

// Sums `count` partials of n elements each (laid out one after another) in block order.
template <typename acc_t>
void reduce_partials(const acc_t* part, int64_t count, int64_t n, acc_t* out) {
  at::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
    std::copy(part + lo, part + hi, out + lo);
    for (int64_t b = 1; b < count; ++b) {
      const acc_t* pb = part + b * n;
      for (int64_t j = lo; j < hi; ++j) out[j] += pb[j];
    }
  });
}

// Everything shared by the two losses: argument preparation, the pass, the reductions and the
// outputs. `make_loss` builds the per-tile loss functor for the acc_t in use; `denominator`
// is the mean's divisor (N, or the class-weight sum of the non-ignored rows).
template <typename MakeLoss>
LossOut fused_loss(const at::Tensor& x_in, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, int64_t reduction, double denominator,
                   bool need_x, bool need_weight, bool need_bias, const MakeLoss& make_loss) {
  const int64_t N = x_in.size(0), D = x_in.size(1), C = weight.size(0);
  // Rows must have unit column stride; any row stride is read in place.
  const at::Tensor x = x_in.stride(1) == 1 || D <= 1 ? x_in : x_in.contiguous();
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(at::toOpMathType(x.scalar_type()));
  // Each output that is not computed is its own empty tensor: outputs must not alias.
  auto none = [&] { return at::empty({0}, acc_opts); };
  const bool any_grad = need_x || need_weight || need_bias;

  at::Tensor loss, grad_w = none(), grad_b = none(), residual = none();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t V = Vectorized<acc_t>::size();
    const int64_t Dp = (D + V - 1) / V * V;

    const at::Tensor Wp = padded_acc_weight(weight, Dp);
    at::Tensor b_acc;
    if (bias.has_value() && bias->defined()) b_acc = bias->to(acc_opts.dtype()).contiguous();

    const auto loss_fn = make_loss(acc_t());
    Pass<scalar_t, acc_t> p{};
    p.x = x.const_data_ptr<scalar_t>();
    p.x_row_stride = x.stride(0);
    p.N = N, p.D = D, p.Dp = Dp, p.C = C;
    p.W = Wp.const_data_ptr<acc_t>();
    p.bias = b_acc.defined() ? b_acc.const_data_ptr<acc_t>() : nullptr;
    // Short tiles exist for the binary pass only (run_pass); a cross entropy with C = 1 has the
    // binary pass's C but runs the 16-row tiles.
    constexpr bool kBinaryPass = std::is_same_v<std::decay_t<decltype(loss_fn)>, BceLoss<acc_t>>;
    p.tile = kBinaryPass ? tile_shape(C, D * static_cast<int64_t>(sizeof(scalar_t)))
                         : TileShape{kRows, true};

    if (reduction == kNone) {
      loss = at::empty({N}, acc_opts);
      p.none_mode = true;
      p.row_loss = loss.mutable_data_ptr<acc_t>();
      if (any_grad) {
        residual = empty_for_write({N, C}, acc_opts);
        p.residual = residual.mutable_data_ptr<acc_t>();
      }
      p.blocks = make_blocks(N, 0, 0, 0);  // no partials in this mode
      run_pass<scalar_t, acc_t, false>(p, loss_fn);
      return;
    }

    // mean / sum: a zero denominator (empty batch, every row ignored) gives a NaN loss, as in
    // torch, and zero gradients.
    const double div = reduction == kMean ? denominator : 1.0;
    p.scale = div == 0.0 ? acc_t(0) : static_cast<acc_t>(1.0 / div);
    p.blocks = make_blocks(N, need_weight ? C : 0, Dp, sizeof(acc_t));
    const int64_t nb = p.blocks.count;
    std::vector<double> part_loss(nb, 0.0);
    p.part_loss = part_loss.data();
    at::Tensor part_w, part_b;
    if (need_weight) {
      part_w = at::empty({nb, C, Dp}, acc_opts);
      p.part_w = part_w.mutable_data_ptr<acc_t>();
    }
    if (need_bias) {
      part_b = at::empty({nb, C}, acc_opts);
      p.part_b = part_b.mutable_data_ptr<acc_t>();
    }
    if (need_x) {
      residual = empty_for_write({N, C}, acc_opts);
      p.residual = residual.mutable_data_ptr<acc_t>();
    }

    if (need_weight) run_pass<scalar_t, acc_t, true>(p, loss_fn);
    else run_pass<scalar_t, acc_t, false>(p, loss_fn);

    double total = 0;
    for (double l : part_loss) total += l;
    total = div == 0.0 ? std::numeric_limits<double>::quiet_NaN() : total / div;
    loss = at::empty({}, acc_opts).fill_(total);

    if (need_weight) {
      at::Tensor gw = at::empty({C, Dp}, acc_opts);
      reduce_partials(part_w.const_data_ptr<acc_t>(), nb, C * Dp, gw.mutable_data_ptr<acc_t>());
      grad_w = Dp == D ? gw : gw.narrow(1, 0, D).contiguous();
    }
    if (need_bias) {
      grad_b = at::empty({C}, acc_opts);
      reduce_partials(part_b.const_data_ptr<acc_t>(), nb, C, grad_b.mutable_data_ptr<acc_t>());
    }
  });
  return {loss, grad_w, grad_b, residual};
}

}  // namespace

LossOut linear_bce_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                           const c10::optional<at::Tensor>& pos_weight,
                           const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                           bool need_x, bool need_weight, bool need_bias) {
  constexpr const char* op = "manual_layers.linear_bce_fwd";
  check_linear_args(op, x, weight, bias);
  check_reduction(reduction);
  const int64_t N = x.size(0);
  TORCH_CHECK(weight.size(0) == 1, op, ": binary logistic regression needs weight of shape (1, ",
              x.size(1), "), got ", weight.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op, ": target must have shape (", N,
              ",), got ", target.sizes());
  TORCH_CHECK(at::isFloatingType(target.scalar_type()), op,
              ": target must be a floating tensor of probabilities, got ", target.scalar_type());
  const bool has_pw = pos_weight.has_value() && pos_weight->defined();
  const bool has_sw = sample_weight.has_value() && sample_weight->defined();
  if (has_pw) {
    TORCH_CHECK(pos_weight->numel() == 1, op, ": pos_weight must have one element, got shape ",
                pos_weight->sizes());
  }
  if (has_sw) {
    TORCH_CHECK(sample_weight->dim() == 1 && sample_weight->size(0) == N, op,
                ": sample_weight must have shape (", N, ",), got ", sample_weight->sizes());
  }
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor y = target.to(acc_dtype).contiguous();
  const at::Tensor sw = has_sw ? sample_weight->to(acc_dtype).contiguous() : at::Tensor();
  const double pw = has_pw ? pos_weight->item<double>() : 1.0;

  return fused_loss(x, weight, bias, reduction, static_cast<double>(N), need_x, need_weight,
                    need_bias, [&](auto acc_zero) {
                      using acc_t = decltype(acc_zero);
                      return BceLoss<acc_t>{y.const_data_ptr<acc_t>(),
                                           has_sw ? sw.const_data_ptr<acc_t>() : nullptr,
                                           static_cast<acc_t>(pw)};
                    });
}

LossOut linear_ce_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                          const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                          double label_smoothing, int64_t reduction, bool need_x,
                          bool need_weight, bool need_bias) {
  constexpr const char* op = "manual_layers.linear_ce_fwd";
  check_linear_args(op, x, weight, bias);
  check_reduction(reduction);
  const int64_t N = x.size(0), C = weight.size(0);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op, ": target must have shape (", N,
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op,
              ": target must hold int64 class indices, got ", target.scalar_type());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be between 0.0 and 1.0, got ", label_smoothing);
  const bool has_cw = class_weight.has_value() && class_weight->defined();
  if (has_cw) {
    TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == C, op,
                ": class_weight must have shape (", C, ",), got ", class_weight->sizes());
  }
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor t = target.contiguous();
  const at::Tensor cw = has_cw ? class_weight->to(at::kDouble).contiguous() : at::Tensor();
  const at::Tensor cw_acc = has_cw ? class_weight->to(acc_dtype).contiguous() : at::Tensor();

  // Cheap first pass over the targets: range check, and the mean's denominator
  // sum_{i not ignored} w_{t_i}.
  const int64_t* tp = t.const_data_ptr<int64_t>();
  const double* cwp = has_cw ? cw.const_data_ptr<double>() : nullptr;
  double weight_total = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t ti = tp[i];
    if (ti == ignore_index) continue;
    TORCH_CHECK_INDEX(ti >= 0 && ti < C, "Target ", ti, " is out of bounds.");
    weight_total += cwp ? cwp[ti] : 1.0;
  }
  double class_weight_sum = static_cast<double>(C);
  if (has_cw) {
    class_weight_sum = 0;
    for (int64_t c = 0; c < C; ++c) class_weight_sum += cwp[c];
  }

  return fused_loss(x, weight, bias, reduction, weight_total, need_x, need_weight, need_bias,
                    [&](auto acc_zero) {
                      using acc_t = decltype(acc_zero);
                      return CeLoss<acc_t>{tp,
                                          has_cw ? cw_acc.const_data_ptr<acc_t>() : nullptr,
                                          C,
                                          ignore_index,
                                          static_cast<acc_t>(label_smoothing),
                                          static_cast<acc_t>(class_weight_sum)};
                    });
}

// dX = coef * residual W for the backward of a small-C loss (csrc/generic/loss_bwd.cpp chooses it):
// dX_i = sum_c (coef_i r_ic) W_c, classes in order, acc_t accumulation, one rounding to x's
// dtype. ATen's GEMM is slow at this shape (K = C <= 32: 1M x 10 @ 10 x 256 fp32 takes 3x a
// copy of dX on the 2-core Zen 4); here each output row is written once from registers, four
// rows per W load. Rows are independent, so the result does not depend on the thread count.
namespace {
template <typename scalar_t>
void loss_dx_kernel(const at::Tensor& residual, const at::Tensor& coef, const at::Tensor& weight,
                    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t R = kTile;
  const int64_t N = residual.size(0), C = residual.size(1), D = weight.size(1);
  const int64_t Dp = (D + V - 1) / V * V;
  const at::Tensor Wt = padded_acc_weight(weight, Dp);
  const acc_t* Wp = Wt.const_data_ptr<acc_t>();
  const acc_t* r = residual.const_data_ptr<acc_t>();
  const acc_t* cf = coef.const_data_ptr<acc_t>();
  const bool per_row = coef.numel() != 1;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, (N + R - 1) / R, 64, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> a(R * C);  // a[k * C + c] = coef_i r_ic for the block's rows
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * R, nr = std::min(R, N - i0);
      for (int64_t k = 0; k < R; ++k)
        for (int64_t c = 0; c < C; ++c)
          a[k * C + c] = k < nr ? (per_row ? cf[i0 + k] : cf[0]) * r[(i0 + k) * C + c] : acc_t(0);
      for (int64_t d = 0; d < Dp; d += V) {
        Vec acc0(0), acc1(0), acc2(0), acc3(0);
        for (int64_t c = 0; c < C; ++c) {
          const Vec w = Vec::loadu(Wp + c * Dp + d);
          acc0 = at::vec::fmadd(Vec(a[c]), w, acc0);
          acc1 = at::vec::fmadd(Vec(a[C + c]), w, acc1);
          acc2 = at::vec::fmadd(Vec(a[2 * C + c]), w, acc2);
          acc3 = at::vec::fmadd(Vec(a[3 * C + c]), w, acc3);
        }
        const int64_t len = std::min<int64_t>(V, D - d);
        const Vec accs[R] = {acc0, acc1, acc2, acc3};
        for (int64_t k = 0; k < nr; ++k) store<scalar_t, acc_t>(o + (i0 + k) * D + d, accs[k], len);
      }
    }
  });
}
}  // namespace

at::Tensor loss_dx_cpu(const at::Tensor& residual, const at::Tensor& coef,
                       const at::Tensor& weight) {
  at::Tensor out = empty_for_write({residual.size(0), weight.size(1)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "loss_dx_cpu", [&] {
    loss_dx_kernel<scalar_t>(residual.contiguous(), coef.contiguous(), weight, out);
  });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
