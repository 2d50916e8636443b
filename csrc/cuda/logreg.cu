// CUDA kernels of the fused logistic-regression losses (csrc/logreg.h is the contract).
//
// Three paths:
//
// 1. Fused binary path (C == 1, reduction mean/sum, D <= 8 warps x 4 chunks x 32 lanes x VEC,
//    i.e. D <= 4096 fp32 / 8192 fp16,bf16 / 2048 fp64): X is read exactly once.
//    bce_fused_kernel runs a fixed grid of B blocks (B = occupancy x SM count, at most one
//    block per group of rows), 256 threads = 8 warps. A "group" of WPR warps (WPR in 1,2,4,8)
//    owns one row at a time; warp j of the group holds columns
//      [(j*CHUNKS + k)*32*VEC + lane*VEC, +VEC), k < CHUNKS
//    of the row in registers (16-byte vector loads when the row start is 16-byte aligned and D
//    is a multiple of VEC; a scalar path otherwise), together with the same columns of w and of
//    its fp32 (fp64) partial grad_w. Per row: z = x.w (warp shuffles; plus a fixed-order sum
//    over the group's warps through shared memory when WPR > 1) + b, the loss term
//    (log-sigmoid in its stable form), r = dloss/dz, grad_w += r x, and the residual r / den
//    (one acc_t per row) when x needs a gradient (backward writes dX from it: csrc/logreg.h). Rows go to blocks in a grid-stride loop. At the end each block sums its groups'
//    grad_w in a fixed order (shared memory) and writes one row of a [B, D] fp32 workspace,
//    plus its loss and grad_b partials ([B] each): O(B*D) temporary memory, never O(N).
//    finalize_kernel then sums the B partials in a fixed order (bitwise deterministic, no
//    float atomics) and writes grad_w, grad_b and the loss in x's dtype, divided by the mean
//    denominator (N for mean, 1 for sum).
//
// 1b. Fused multinomial path (linear_ce_fwd, any C >= 1, reduction mean/sum,
//    C <= 32, D <= 1024 (D <= 512 when C > 16), W staged in shared memory as acc_t with
//    C * round_up(D, 128) * sizeof(acc_t) <= 48 KB, all dynamic shared memory <= 96 KB (and
//    the device's opt-in limit); fp64 only for C <= 16, D <= 512): X is read exactly once and no
//    (N, C) buffer exists. ce_fused_kernel runs a fixed grid of B blocks (occupancy x SM count,
//    at most ceil(N / 16)), 256 threads = 8 warps, over tiles of 16 rows (grid-stride loop):
//      A0  the block copies the tile's rows of X into shared memory (16-byte vector loads when
//          every row start is 16-byte aligned and D % VEC == 0, scalar otherwise);
//      A1  each warp takes 2 rows: lane holds columns 4 lane + 128 k, multiplies them with W
//          (shared, fp32) for all classes of both rows at once (each W load serves two rows),
//          then C warp butterflies per row give every lane all the logits (+ bias);
//      A2  stable log-softmax, loss term, residual r_c = dloss_i/dz_ic (csrc/logreg.h formulas;
//          ignore_index: loss 0, r = 0), r to shared memory;
//      A3  when grad_x is wanted, the residual r_c / den (C acc_t values per row) to global
//          memory (backward writes dX = (g res) W by GEMM: csrc/logreg.h);
//      B   thread t owns grad_W columns t + 256 j (j < DJ <= 4) for all classes in registers
//          (CMAX * DJ <= 64 accumulators) and adds r_c x_ic over the tile's rows in order;
//          thread c < C owns grad_b[c].
//    At the end each block writes its disjoint columns to a [B, C, D] fp32 (fp64) workspace
//    (O(B*C*D), never O(N)) plus [B, C] grad_b and [B] loss partials; finalize_kernel sums
//    the B partials in a fixed order (bitwise deterministic, no float atomics) and divides by
//    the mean denominator. For mean, ce_den_partial_kernel + ce_den_final_kernel put the
//    denominator in one device element before the main kernel runs (same stream; no host
//    sync), so the kernel can scale the residual. Shared-memory traffic for W (2 C D fp32 reads
//    per two rows) and the C butterflies per row are the main costs beyond the X read;
//    the kernel has not been timed (no GPU when written).
//
// 2. GEMM path (everything else: reduction none, binary with larger D, multinomial outside
//    the limits of 1b):
//    logits = x W^T through at::mm (cuBLAS, fp32 accumulation), a row kernel of our own that
//    adds the bias in fp32, computes the loss terms and writes the residual dloss/dlogits
//    into an (N, C) acc_t buffer (scaled by 1/den for mean), then grad_w = R^T x
//    through at::mm and grad_b = R.sum(0) through at::sum (fp32 accumulation). This reads X
//    twice when grad_w is needed and holds an (N, C) buffer: correct and deterministic.
//
// Targets: an out-of-range class index (not ignore_index) raises a device-side assert
// (CUDA_KERNEL_ASSERT, as torch's cross_entropy does) in both multinomial paths; should
// device asserts be compiled out, such a row contributes nothing (no loss, no gradient, not
// in the mean denominator) and is never used to index memory. Mean denominator of cross
// entropy: sum over non-ignored rows of class_weight[target] (1 without weights), computed
// on the device by ce_den_partial_kernel (per-block partials, summed in a fixed order by
// every consumer), so no host sync. N == 0 is handled on the host without launching kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../common.h"
#include "../logreg.h"
#include "cuda_common.cuh"

namespace manual_layers {
namespace {

using cuda_common::AlignedVec;
using cuda_common::kThreads;
using cuda_common::warp_max;
using cuda_common::warp_sum;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float dev_exp(float a) { return expf(a); }
__device__ __forceinline__ double dev_exp(double a) { return exp(a); }
__device__ __forceinline__ float dev_log(float a) { return logf(a); }
__device__ __forceinline__ double dev_log(double a) { return log(a); }
__device__ __forceinline__ float dev_log1p(float a) { return log1pf(a); }
__device__ __forceinline__ double dev_log1p(double a) { return log1p(a); }

// Fixed-order tree sum over the block (kThreads threads, all of which must call it).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* sbuf) {
  const int tid = threadIdx.x;
  sbuf[tid] = v;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) sbuf[tid] += sbuf[tid + s];
    __syncthreads();
  }
  const acc_t r = sbuf[0];
  __syncthreads();  // sbuf may be reused right after
  return r;
}

// Sum of n per-block partials, in a fixed order; the same value in every block that calls it.
template <typename acc_t>
__device__ acc_t block_sum_partials(const acc_t* part, int64_t n, acc_t* sbuf) {
  acc_t v = 0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) v += part[k];
  return block_sum(v, sbuf);
}

// One binary cross-entropy term, torch's formulas (binary_cross_entropy_with_logits and its
// backward): lw = 1 + (pw - 1) y,
//   loss = sw * ((1 - y) z - lw * log_sigmoid(z)),  log_sigmoid(z) = min(z, 0) - log1p(e^-|z|)
//   r    = sw * (lw * sigmoid(z) - pw y)             (= sw * (sigmoid(z) - y) without pw)
template <typename acc_t>
__device__ __forceinline__ void bce_term(acc_t z, acc_t y, bool has_pw, acc_t pw, acc_t sw,
                                         acc_t& loss, acc_t& r) {
  const acc_t az = z < acc_t(0) ? -z : z;
  const acc_t e = dev_exp(-az);  // in (0, 1]
  const acc_t log_sig = (z < acc_t(0) ? z : acc_t(0)) - dev_log1p(e);
  const acc_t sig = z >= acc_t(0) ? acc_t(1) / (acc_t(1) + e) : e / (acc_t(1) + e);
  if (has_pw) {
    const acc_t lw = (pw - acc_t(1)) * y + acc_t(1);
    loss = sw * ((acc_t(1) - y) * z - lw * log_sig);
    r = sw * (lw * sig - pw * y);
  } else {
    loss = sw * ((acc_t(1) - y) * z - log_sig);
    r = sw * (sig - y);
  }
}

// ---------------------------------------------------------------------------------------
// Fused binary kernel (path 1)
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct BceFusedParams {
  const scalar_t* x;        // (N, D)
  const acc_t* w;           // (D,) weight in acc_t
  const acc_t* bias;        // (1,) or nullptr
  const scalar_t* target;   // (N,)
  const acc_t* pos_weight;  // (1,) or nullptr
  const scalar_t* sw;       // (N,) or nullptr
  acc_t* res;               // (N,) residual dloss/dz / den, or nullptr (need_x)
  acc_t* ws_gw;             // (B, D) or nullptr (need_weight)
  acc_t* ws_loss;           // (B,)
  acc_t* ws_gb;             // (B,)
  int64_t N;
  int64_t D;
  acc_t den;                // N for mean, 1 for sum: res = r / den
  int wpr;                  // warps per row: 1, 2, 4 or 8
  bool vec_ok;              // 16-byte vector loads are aligned for every row
};

// Minimum resident blocks per SM asked of the register allocator: 3 (24 warps, so enough
// loads in flight) where the live registers allow it without spilling (up to two chunks, and
// fp32 with four), else 2 (ptxas: four chunks of fp16/bf16 spill 4 bytes at 2).
template <typename scalar_t, typename acc_t, int CHUNKS>
__global__ void __launch_bounds__(kThreads, (CHUNKS <= 2 || sizeof(scalar_t) == 4) ? 3 : 2)
    bce_fused_kernel(const BceFusedParams<scalar_t, acc_t> p) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));
  using Vec = AlignedVec<scalar_t, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* s_red = reinterpret_cast<acc_t*>(smem_raw);  // (GPB, D) when ws_gw != nullptr
  __shared__ acc_t s_dot[2][kWarps];
  __shared__ acc_t s_loss[kWarps];
  __shared__ acc_t s_gb[kWarps];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wpr = p.wpr;
  const int gpb = kWarps / wpr;  // row groups per block
  const int g = warp / wpr;      // this warp's group
  const int j = warp % wpr;      // this warp's rank in its group
  const int64_t D = p.D;
  const int64_t N = p.N;
  const bool need_w = p.ws_gw != nullptr;
  const bool has_pw = p.pos_weight != nullptr;

  acc_t wv[CHUNKS][VEC];
  acc_t gw[CHUNKS][VEC];
  Vec xr[CHUNKS];  // the row's values in x's dtype (half the registers for 16-bit types)
#pragma unroll
  for (int k = 0; k < CHUNKS; ++k) {
    const int64_t c0 = (static_cast<int64_t>(j * CHUNKS + k) * 32 + lane) * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      wv[k][e] = c0 + e < D ? p.w[c0 + e] : acc_t(0);
      gw[k][e] = acc_t(0);
    }
  }
  const acc_t bias = p.bias != nullptr ? p.bias[0] : acc_t(0);
  const acc_t pw = has_pw ? p.pos_weight[0] : acc_t(1);
  const acc_t den = p.den;
  acc_t loss_acc = 0;
  acc_t gb_acc = 0;
  int parity = 0;

  const int64_t step = static_cast<int64_t>(gridDim.x) * gpb;
  // The loop condition depends on blockIdx only: every thread of the block runs the same
  // iterations, so the __syncthreads below is reached by all of them.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * gpb; base < N; base += step) {
    const int64_t i = base + g;
    const bool valid = i < N;
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k)
#pragma unroll
      for (int e = 0; e < VEC; ++e) xr[k].val[e] = static_cast<scalar_t>(0.0f);
    acc_t part = 0;
    if (valid) {
      const scalar_t* xrow = p.x + i * D;
#pragma unroll
      for (int k = 0; k < CHUNKS; ++k) {
        const int64_t c0 = (static_cast<int64_t>(j * CHUNKS + k) * 32 + lane) * VEC;
        if (p.vec_ok) {
          // D % VEC == 0 here, so a vector is either wholly inside the row or wholly outside.
          if (c0 < D) xr[k] = *reinterpret_cast<const Vec*>(xrow + c0);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            if (c0 + e < D) xr[k].val[e] = xrow[c0 + e];
        }
      }
      // Columns outside the row hold 0 in xr and in wv.
#pragma unroll
      for (int k = 0; k < CHUNKS; ++k)
#pragma unroll
        for (int e = 0; e < VEC; ++e) part += static_cast<acc_t>(xr[k].val[e]) * wv[k][e];
    }
    part = warp_sum(part);
    acc_t z;
    if (wpr > 1) {
      // Double-buffered by iteration parity: the buffer written here was last read two
      // iterations ago, before the previous iteration's barrier.
      if (lane == 0) s_dot[parity][warp] = part;
      __syncthreads();
      z = 0;
      for (int jj = 0; jj < wpr; ++jj) z += s_dot[parity][g * wpr + jj];  // fixed order
      parity ^= 1;
    } else {
      z = part;
    }
    if (valid) {
      z += bias;
      const acc_t y = static_cast<acc_t>(p.target[i]);
      const acc_t sw = p.sw != nullptr ? static_cast<acc_t>(p.sw[i]) : acc_t(1);
      acc_t loss_i, r;
      bce_term(z, y, has_pw, pw, sw, loss_i, r);
      if (j == 0 && lane == 0) {
        loss_acc += loss_i;
        gb_acc += r;
      }
      if (need_w) {
#pragma unroll
        for (int k = 0; k < CHUNKS; ++k)
#pragma unroll
          for (int e = 0; e < VEC; ++e) gw[k][e] += r * static_cast<acc_t>(xr[k].val[e]);
      }
      // The residual for backward's dX = (g res) w (csrc/logreg.h): one value per row.
      if (p.res != nullptr && j == 0 && lane == 0) p.res[i] = r / den;
    }
  }

  // Block partials, fixed order.
  if (lane == 0) {
    s_loss[warp] = loss_acc;
    s_gb[warp] = gb_acc;
  }
  if (need_w) {
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      const int64_t c0 = (static_cast<int64_t>(j * CHUNKS + k) * 32 + lane) * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (c0 + e < D) s_red[g * D + c0 + e] = gw[k][e];
    }
  }
  __syncthreads();
  if (need_w) {
    acc_t* out = p.ws_gw + static_cast<int64_t>(blockIdx.x) * D;
    for (int64_t c = threadIdx.x; c < D; c += kThreads) {
      acc_t s = 0;
      for (int gg = 0; gg < gpb; ++gg) s += s_red[gg * D + c];
      out[c] = s;
    }
  }
  if (threadIdx.x == 0) {
    acc_t sl = 0, sg = 0;
    for (int w = 0; w < kWarps; ++w) {
      sl += s_loss[w];
      sg += s_gb[w];
    }
    p.ws_loss[blockIdx.x] = sl;
    p.ws_gb[blockIdx.x] = sg;
  }
}

// ---------------------------------------------------------------------------------------
// Finalize: fixed-order sums of the per-block partials, divided by the mean denominator.
// grid: max(1, ceil(D / 32)) blocks when grad_w is wanted, else 1. Block b handles columns
// [32 b, 32 b + 32); block 0 also writes the loss and grad_b.
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct FinalizeParams {
  const acc_t* ws_gw;    // (B, D) or nullptr
  const acc_t* ws_loss;  // (B,)
  const acc_t* ws_gb;    // (B, C) or nullptr (C == nb)
  const acc_t* den_ws;   // (n_den,) partial denominators, or nullptr: use host_den
  acc_t* gw_out;         // (D,) (one class) or nullptr
  acc_t* gb_out;         // (nb,) or nullptr
  acc_t* loss_out;       // 0-d
  int64_t B;
  int64_t D;
  int64_t nb;
  int64_t n_den;
  acc_t host_den;
};

// Gradient sums are divided by the mean denominator unless it is 0, which happens (N > 0)
// only for cross entropy with every row ignored (or with zero class weights): then they are
// 0, as on the CPU (scale 0), and the loss is NaN. Zero class weights with label smoothing
// leave nonzero residuals, so "unscaled" would not be 0 there (nor would r / 0 be finite).
template <typename acc_t>
__device__ __forceinline__ acc_t grad_div(acc_t t, acc_t den) {
  return den != acc_t(0) ? t / den : acc_t(0);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const FinalizeParams<scalar_t, acc_t> p) {
  __shared__ acc_t sbuf[kThreads];
  __shared__ acc_t s_part[kWarps][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const acc_t den =
      p.den_ws != nullptr ? block_sum_partials(p.den_ws, p.n_den, sbuf) : p.host_den;

  if (p.ws_gw != nullptr && p.gw_out != nullptr) {
    const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + lane;
    acc_t s = 0;
    if (col < p.D) {
#pragma unroll 4
      for (int64_t b = warp; b < p.B; b += kWarps) s += p.ws_gw[b * p.D + col];
    }
    s_part[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && col < p.D) {
      acc_t t = 0;
      for (int w = 0; w < kWarps; ++w) t += s_part[w][lane];
      p.gw_out[col] = grad_div(t, den);
    }
  }
  if (blockIdx.x == 0) {
    const acc_t l = block_sum_partials(p.ws_loss, p.B, sbuf);
    if (threadIdx.x == 0) {
      // den == 0: NaN as on the CPU (l / 0 would be +-inf when l != 0).
      p.loss_out[0] = den != acc_t(0) ? l / den : std::numeric_limits<acc_t>::quiet_NaN();
    }
    if (p.ws_gb != nullptr && p.gb_out != nullptr) {
      for (int64_t c = 0; c < p.nb; ++c) {  // nb is 1 on the fused path
        acc_t v = 0;
        for (int64_t b = threadIdx.x; b < p.B; b += kThreads) v += p.ws_gb[b * p.nb + c];
        v = block_sum(v, sbuf);
        if (threadIdx.x == 0) p.gb_out[c] = grad_div(v, den);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Row kernels of the GEMM path (path 2). logits (N, C) in x's dtype, as at::mm wrote them;
// res (N, C) acc_t, a separate buffer.
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct RowParams {
  const scalar_t* logits;   // (N, C)
  acc_t* res;               // (N, C) residual out, or nullptr
  acc_t* loss_out;          // (N,) per-row loss (reduction none), or nullptr
  acc_t* ws_loss;           // (gridDim.x,) per-block loss partials, or nullptr
  const acc_t* bias;        // (C,) or nullptr
  const scalar_t* ftarget;  // binary: (N,) targets of x's dtype
  const int64_t* itarget;   // multinomial: (N,) class indices
  const acc_t* pos_weight;  // binary: (1,) or nullptr
  const scalar_t* sw;       // binary: (N,) or nullptr
  const acc_t* cw;          // multinomial: (C,) class weights or nullptr
  const acc_t* den_ws;      // (n_den,) partial mean denominators, or nullptr: host_den
  int64_t n_den;
  acc_t host_den;           // residual divisor when den_ws == nullptr (N, or 1)
  int64_t N;
  int64_t C;
  int64_t ignore_index;
  acc_t eps;                // label smoothing
};

// Binary: one thread per row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bce_rows_kernel(const RowParams<scalar_t, acc_t> p) {
  __shared__ acc_t sbuf[kThreads];
  const acc_t den = p.den_ws != nullptr ? block_sum_partials(p.den_ws, p.n_den, sbuf) : p.host_den;
  const bool has_pw = p.pos_weight != nullptr;
  const acc_t pw = has_pw ? p.pos_weight[0] : acc_t(1);
  const acc_t bias = p.bias != nullptr ? p.bias[0] : acc_t(0);
  acc_t loss_acc = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < p.N; i += step) {
    const acc_t z = static_cast<acc_t>(p.logits[i]) + bias;
    const acc_t y = static_cast<acc_t>(p.ftarget[i]);
    const acc_t sw = p.sw != nullptr ? static_cast<acc_t>(p.sw[i]) : acc_t(1);
    acc_t loss_i, r;
    bce_term(z, y, has_pw, pw, sw, loss_i, r);
    loss_acc += loss_i;
    if (p.loss_out != nullptr) p.loss_out[i] = loss_i;
    if (p.res != nullptr) p.res[i] = r / den;
  }
  if (p.ws_loss != nullptr) {
    const acc_t s = block_sum(loss_acc, sbuf);
    if (threadIdx.x == 0) p.ws_loss[blockIdx.x] = s;
  }
}

// Multinomial: one warp per row, lanes over classes.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ce_rows_kernel(const RowParams<scalar_t, acc_t> p) {
  __shared__ acc_t sbuf[kThreads];
  __shared__ acc_t s_loss[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const acc_t den = p.den_ws != nullptr ? block_sum_partials(p.den_ws, p.n_den, sbuf) : p.host_den;
  const int64_t C = p.C;
  const acc_t eps = p.eps;
  const acc_t eps_c = eps / static_cast<acc_t>(C);
  const bool smooth = eps != acc_t(0);
  acc_t loss_acc = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp; i < p.N; i += step) {
    const scalar_t* zr = p.logits + i * C;
    acc_t* rr = p.res != nullptr ? p.res + i * C : nullptr;
    const int64_t y = p.itarget[i];  // the same for every lane: warp-uniform branches below
    if (y != p.ignore_index) {
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "linear_ce_fwd: target class index out of range");
    }
    // Out of range reaches here only if device asserts are compiled out: no memory access.
    const bool active = y != p.ignore_index && y >= 0 && y < C;
    if (!active) {
      if (rr != nullptr)
        for (int64_t c = lane; c < C; c += 32) rr[c] = acc_t(0);
      if (p.loss_out != nullptr && lane == 0) p.loss_out[i] = acc_t(0);
      continue;
    }
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t z = static_cast<acc_t>(zr[c]) + (p.bias != nullptr ? p.bias[c] : acc_t(0));
      m = z > m ? z : m;
    }
    m = warp_max(m);
    acc_t s = 0;
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t z = static_cast<acc_t>(zr[c]) + (p.bias != nullptr ? p.bias[c] : acc_t(0));
      s += dev_exp(z - m);
    }
    s = warp_sum(s);
    const acc_t lse = m + dev_log(s);
    acc_t sm = 0, wsum = 0;
    if (smooth) {
      for (int64_t c = lane; c < C; c += 32) {
        const acc_t z = static_cast<acc_t>(zr[c]) + (p.bias != nullptr ? p.bias[c] : acc_t(0));
        const acc_t wc = p.cw != nullptr ? p.cw[c] : acc_t(1);
        sm += wc * (lse - z);
        wsum += wc;
      }
      sm = warp_sum(sm);
      wsum = warp_sum(wsum);
    }
    const acc_t wy = p.cw != nullptr ? p.cw[y] : acc_t(1);
    const acc_t zy = static_cast<acc_t>(zr[y]) + (p.bias != nullptr ? p.bias[y] : acc_t(0));
    const acc_t loss_i = (acc_t(1) - eps) * wy * (lse - zy) + eps_c * sm;
    // All reads of zr[y] by every lane happen before any write below (the warp_sum/warp_max
    // shuffles above are warp-synchronous, and zr[y] is read before the residual loop).
    __syncwarp();
    if (rr != nullptr) {
      // r_c = ((1-eps) w_y + (eps/C) sum_k w_k) p_c - (1-eps) w_y [c == y] - (eps/C) w_c
      const acc_t a = (acc_t(1) - eps) * wy + eps_c * wsum;
      for (int64_t c = lane; c < C; c += 32) {
        const acc_t z = static_cast<acc_t>(zr[c]) + (p.bias != nullptr ? p.bias[c] : acc_t(0));
        acc_t r = a * dev_exp(z - lse);
        if (c == y) r -= (acc_t(1) - eps) * wy;
        if (smooth) r -= eps_c * (p.cw != nullptr ? p.cw[c] : acc_t(1));
        rr[c] = grad_div(r, den);  // den 0: zero gradients
      }
    }
    if (lane == 0) {
      loss_acc += loss_i;
      if (p.loss_out != nullptr) p.loss_out[i] = loss_i;
    }
  }
  if (p.ws_loss != nullptr) {
    if (lane == 0) s_loss[warp] = loss_acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t t = 0;
      for (int w = 0; w < kWarps; ++w) t += s_loss[w];
      p.ws_loss[blockIdx.x] = t;
    }
  }
}

// Partial mean denominators of cross entropy: per block, the sum of class_weight[target]
// (1 without weights) over rows that are not ignored (an out-of-range class index, not
// ignore_index, raises a device assert).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ce_den_partial_kernel(const int64_t* target, const acc_t* cw, int64_t N, int64_t C,
                          int64_t ignore_index, acc_t* den_ws) {
  __shared__ acc_t sbuf[kThreads];
  acc_t v = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < N; i += step) {
    const int64_t y = target[i];
    if (y != ignore_index) {
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "linear_ce_fwd: target class index out of range");
    }
    if (y != ignore_index && y >= 0 && y < C) v += cw != nullptr ? cw[y] : acc_t(1);
  }
  v = block_sum(v, sbuf);
  if (threadIdx.x == 0) den_ws[blockIdx.x] = v;
}

// Final mean denominator of cross entropy, in one element: the fixed-order sum of the
// ce_den_partial_kernel partials (block_sum_partials, the same order finalize_kernel and
// ce_rows_kernel use). One block. The fused multinomial kernel reads it for the dX scale.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ce_den_final_kernel(const acc_t* den_ws, int64_t n_den, acc_t* den_out) {
  __shared__ acc_t sbuf[kThreads];
  const acc_t d = block_sum_partials(den_ws, n_den, sbuf);
  if (threadIdx.x == 0) den_out[0] = d;
}

// ---------------------------------------------------------------------------------------
// Fused multinomial kernel (path 1b; see the file comment)
// ---------------------------------------------------------------------------------------

constexpr int kCeRowsPerWarp = 2;                    // rows a warp handles per tile
constexpr int kCeTile = kWarps * kCeRowsPerWarp;      // rows per tile (16)
constexpr int kCeColStep = 128;                       // 32 lanes x 4 columns (phase A)

template <typename scalar_t, typename acc_t>
struct CeFusedParams {
  const scalar_t* x;       // (N, D)
  const acc_t* w;          // (C, D) weight in acc_t
  const acc_t* bias;       // (C,) or nullptr
  const int64_t* target;   // (N,)
  const acc_t* cw;         // (C,) class weights or nullptr
  const acc_t* den;        // (1,) finalized mean denominator, or nullptr (sum: 1)
  acc_t* res;              // (N, C) residual / den, or nullptr (need_x)
  acc_t* ws_gw;            // (B, C, D) or nullptr (need_weight)
  acc_t* ws_gb;            // (B, C) or nullptr (need_bias)
  acc_t* ws_loss;          // (B,)
  int64_t N;
  int64_t ignore_index;
  int D;                   // <= 1024 (ce_fused_config)
  int C;                   // <= CMAX <= 32
  acc_t eps;               // label smoothing
  bool vec_ok;             // x: 16-byte vector loads aligned for every row
};

// Four consecutive values of p (aligned to 4 elements) converted to acc_t: one vector load
// when 4 elements fit in 16 bytes, else scalar loads (double).
template <typename T, typename acc_t>
__device__ __forceinline__ void load4(const T* p, acc_t (&o)[4]) {
  if constexpr (sizeof(T) * 4 <= 16) {
    const AlignedVec<T, 4> v = *reinterpret_cast<const AlignedVec<T, 4>*>(p);
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = static_cast<acc_t>(v.val[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = static_cast<acc_t>(p[e]);
  }
}

// Shared memory of ce_fused_kernel, in bytes, for C classes, row stride DS (= D rounded up to
// kCeColStep). Layout (every part starts at a multiple of 16 bytes):
//   sW  [C][DS]            acc_t  weight, columns >= D zero
//   sR  [kCeTile][CMAX]    acc_t  residuals of the tile's rows (unscaled), classes >= C zero
//   sB  [CMAX]             acc_t  bias (0 without)
//   sCW [CMAX]             acc_t  class weights (1 without; 0 for classes >= C)
//   sX  [kCeTile][DS]      scalar_t  the tile's rows of x, columns >= D zero
template <typename scalar_t>
size_t ce_fused_smem(int64_t C, int64_t DS, int64_t cmax) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<size_t>(C * DS + kCeTile * cmax + 2 * cmax) * sizeof(acc_t) +
         static_cast<size_t>(kCeTile * DS) * sizeof(scalar_t);
}

// CMAX: classes held per row in registers (C <= CMAX, classes >= C skipped by warp-uniform
// branches). DJ: grad_W columns per thread in phase B (D <= 256 * DJ). CMAX * DJ <= 64.
template <typename scalar_t, typename acc_t, int CMAX, int DJ>
__global__ void __launch_bounds__(kThreads)
    ce_fused_kernel(const CeFusedParams<scalar_t, acc_t> p) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));
  constexpr int RVEC = 16 / static_cast<int>(sizeof(acc_t));
  constexpr int RW = kCeRowsPerWarp;
  static_assert(CMAX % RVEC == 0, "CMAX must be a multiple of the acc_t vector width");
  using XVec = AlignedVec<scalar_t, VEC>;
  using RVec = AlignedVec<acc_t, RVEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t s_loss[kWarps];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int C = p.C;
  const int D = p.D;
  const int DS = (D + kCeColStep - 1) / kCeColStep * kCeColStep;
  acc_t* sW = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sR = sW + C * DS;
  acc_t* sB = sR + kCeTile * CMAX;
  acc_t* sCW = sB + CMAX;
  scalar_t* sX = reinterpret_cast<scalar_t*>(sCW + CMAX);
  const bool need_w = p.ws_gw != nullptr;

  // Stage W, bias, class weights; zero sR and sX (their padding stays zero for good: tiles
  // only ever write columns < D of sX, and phase A writes all CMAX entries of an sR row).
  for (int k = tid; k < C * DS; k += kThreads) {
    const int c = k / DS;
    const int d = k - c * DS;
    sW[k] = d < D ? p.w[static_cast<int64_t>(c) * D + d] : acc_t(0);
  }
  for (int k = tid; k < kCeTile * CMAX; k += kThreads) sR[k] = acc_t(0);
  if (tid < CMAX) {
    sB[tid] = (p.bias != nullptr && tid < C) ? p.bias[tid] : acc_t(0);
    sCW[tid] = tid < C ? (p.cw != nullptr ? p.cw[tid] : acc_t(1)) : acc_t(0);
  }
  for (int k = tid; k < kCeTile * DS; k += kThreads) sX[k] = static_cast<scalar_t>(0.0f);
  __syncthreads();

  const acc_t den = p.den != nullptr ? p.den[0] : acc_t(1);
  const acc_t eps = p.eps;
  const acc_t eps_c = eps / static_cast<acc_t>(C);
  const bool smooth = eps != acc_t(0);
  acc_t wsum = 0;  // sum_c w_c, same fixed order in every thread
  for (int c = 0; c < C; ++c) wsum += sCW[c];

  acc_t gw[DJ][CMAX];  // grad_W partials of columns tid + 256 j, all classes
#pragma unroll
  for (int j = 0; j < DJ; ++j)
#pragma unroll
    for (int c = 0; c < CMAX; ++c) gw[j][c] = acc_t(0);
  acc_t gb_acc = 0;    // grad_b partial of class tid (tid < C)
  acc_t loss_acc = 0;  // lane 0 of each warp: loss of the warp's rows

  const int64_t N = p.N;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kCeTile;
  // The loop condition depends on blockIdx only: every thread runs the same iterations, so
  // the __syncthreads inside are reached by all of them.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kCeTile; base < N; base += step) {
    const int nvalid = static_cast<int>(N - base < kCeTile ? N - base : kCeTile);

    // Phase A0: the tile's rows of x into sX (each row read from global memory once).
    for (int r = warp; r < nvalid; r += kWarps) {
      const scalar_t* xrow = p.x + (base + r) * static_cast<int64_t>(D);
      scalar_t* srow = sX + r * DS;
      if (p.vec_ok) {  // D % VEC == 0 and every row start 16-byte aligned
#pragma unroll 2
        for (int v = lane; v < D / VEC; v += 32)
          *reinterpret_cast<XVec*>(srow + v * VEC) = *reinterpret_cast<const XVec*>(xrow + v * VEC);
      } else {
        for (int d = lane; d < D; d += 32) srow[d] = xrow[d];
      }
    }
    __syncthreads();

    // Phase A1: logits of the warp's RW rows (rows >= nvalid compute on stale data and are
    // discarded). Lane holds columns d0 .. d0 + 3, d0 = 4 lane + 128 k; padding is zero.
    acc_t z[RW][CMAX];
#pragma unroll
    for (int rr = 0; rr < RW; ++rr)
#pragma unroll
      for (int c = 0; c < CMAX; ++c) z[rr][c] = acc_t(0);
    for (int d0 = lane * 4; d0 < DS; d0 += kCeColStep) {  // same trip count in every lane
      acc_t xv[RW][4];
#pragma unroll
      for (int rr = 0; rr < RW; ++rr) load4(sX + (warp * RW + rr) * DS + d0, xv[rr]);
#pragma unroll
      for (int c = 0; c < CMAX; ++c) {
        if (c < C) {
          acc_t wv[4];
          load4(sW + c * DS + d0, wv);
#pragma unroll
          for (int rr = 0; rr < RW; ++rr)
#pragma unroll
            for (int e = 0; e < 4; ++e) z[rr][c] += xv[rr][e] * wv[e];
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < RW; ++rr)
#pragma unroll
      for (int c = 0; c < CMAX; ++c)
        if (c < C) z[rr][c] = warp_sum(z[rr][c]) + sB[c];  // every lane: all logits

    // Phase A2/A3: loss term, residual r (to sR and, scaled, to res). Branches are
    // warp-uniform.
#pragma unroll
    for (int rr = 0; rr < RW; ++rr) {
      const int r = warp * RW + rr;
      if (r >= nvalid) continue;
      const int64_t i = base + r;
      const int64_t y = p.target[i];
      const bool ignored = y == p.ignore_index;
      const bool in_range = y >= 0 && y < static_cast<int64_t>(C);
      if (!ignored) {
        CUDA_KERNEL_ASSERT(in_range && "linear_ce_fwd: target class index out of range");
      }
      const bool active = !ignored && in_range;  // out of range: only if asserts are off
      acc_t res[CMAX];
      acc_t loss_i = 0;
      if (active) {
        const int yi = static_cast<int>(y);
        acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma unroll
        for (int c = 0; c < CMAX; ++c)
          if (c < C) m = z[rr][c] > m ? z[rr][c] : m;
        acc_t s = 0;
#pragma unroll
        for (int c = 0; c < CMAX; ++c)
          if (c < C) s += dev_exp(z[rr][c] - m);
        const acc_t lse = m + dev_log(s);
        acc_t zy = 0;
#pragma unroll
        for (int c = 0; c < CMAX; ++c)
          if (c == yi) zy = z[rr][c];  // no dynamic register indexing
        const acc_t wy = sCW[yi];
        acc_t sm = 0;
        if (smooth) {
#pragma unroll
          for (int c = 0; c < CMAX; ++c)
            if (c < C) sm += sCW[c] * (lse - z[rr][c]);
        }
        loss_i = (acc_t(1) - eps) * wy * (lse - zy) + eps_c * sm;
        // r_c = ((1-eps) w_y + (eps/C) sum_k w_k) p_c - (1-eps) w_y [c == y] - (eps/C) w_c
        const acc_t a = (acc_t(1) - eps) * wy + eps_c * wsum;
#pragma unroll
        for (int c = 0; c < CMAX; ++c) {
          acc_t v = 0;
          if (c < C) {
            v = a * dev_exp(z[rr][c] - lse);
            if (c == yi) v -= (acc_t(1) - eps) * wy;
            if (smooth) v -= eps_c * sCW[c];
          }
          res[c] = v;
        }
      } else {
#pragma unroll
        for (int c = 0; c < CMAX; ++c) res[c] = acc_t(0);
      }
      if (lane == 0) {
        loss_acc += loss_i;
#pragma unroll
        for (int c = 0; c < CMAX; ++c) sR[r * CMAX + c] = res[c];
      }
      // The residual for backward's dX = (g res) W (csrc/logreg.h): C values per row.
      if (p.res != nullptr && lane == 0) {
        acc_t* rrow = p.res + i * static_cast<int64_t>(C);
#pragma unroll
        for (int c = 0; c < CMAX; ++c)
          if (c < C) rrow[c] = grad_div(res[c], den);
      }
    }
    __syncthreads();  // sR of every row of the tile written

    // Phase B: grad_W partials (thread owns columns tid + 256 j, all classes) and grad_b
    // partials (thread tid < C owns class tid), rows in tile order.
    for (int r = 0; r < nvalid; ++r) {
      if (need_w) {
        acc_t rv[CMAX];
#pragma unroll
        for (int q = 0; q < CMAX / RVEC; ++q) {
          const RVec t = *reinterpret_cast<const RVec*>(sR + r * CMAX + q * RVEC);
#pragma unroll
          for (int e = 0; e < RVEC; ++e) rv[q * RVEC + e] = t.val[e];
        }
#pragma unroll
        for (int j = 0; j < DJ; ++j) {
          const int d = tid + j * kThreads;
          if (d < D) {
            const acc_t xv = static_cast<acc_t>(sX[r * DS + d]);
#pragma unroll
            for (int c = 0; c < CMAX; ++c)
              if (c < C) gw[j][c] += rv[c] * xv;
          }
        }
      }
      if (tid < C) gb_acc += sR[r * CMAX + tid];
    }
    __syncthreads();  // before the next tile overwrites sX and sR
  }

  // Block partials: threads own disjoint columns, so no cross-thread sum for grad_W.
  if (need_w) {
    acc_t* out = p.ws_gw + static_cast<int64_t>(blockIdx.x) * C * D;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = tid + j * kThreads;
      if (d < D) {
#pragma unroll
        for (int c = 0; c < CMAX; ++c)
          if (c < C) out[static_cast<int64_t>(c) * D + d] = gw[j][c];
      }
    }
  }
  if (p.ws_gb != nullptr && tid < C) p.ws_gb[static_cast<int64_t>(blockIdx.x) * C + tid] = gb_acc;
  if (lane == 0) s_loss[warp] = loss_acc;
  __syncthreads();
  if (tid == 0) {
    acc_t t = 0;
    for (int w = 0; w < kWarps; ++w) t += s_loss[w];  // fixed order
    p.ws_loss[blockIdx.x] = t;
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid for the row-wise kernels: enough blocks to fill the GPU, at least 1.
int64_t row_grid(int64_t rows, int64_t rows_per_block) {
  const int64_t want = ceil_div(rows, rows_per_block);
  const int64_t cap = static_cast<int64_t>(num_sms()) * 8;
  return std::max<int64_t>(1, std::min(want, cap));
}

const void* opt_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Outputs for N == 0 (no kernel launches): torch gives NaN for mean, 0 for sum.
LossOut empty_batch(const at::Tensor& x, int64_t C, int64_t D, int64_t reduction, bool need_x,
                    bool need_w, bool need_b) {
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  auto none = [&] { return at::empty({0}, acc_opts); };
  if (reduction == kNone) {
    const bool any = need_x || need_w || need_b;
    return {at::empty({0}, acc_opts), none(), none(),
            any ? at::empty({0, C}, acc_opts) : none()};
  }
  at::Tensor loss = reduction == kMean
                        ? at::full({}, std::numeric_limits<double>::quiet_NaN(), acc_opts)
                        : at::zeros({}, acc_opts);
  return {loss, need_w ? at::zeros({C, D}, acc_opts) : none(),
          need_b ? at::zeros({C}, acc_opts) : none(),
          need_x ? at::empty({0, C}, acc_opts) : none()};
}

// Everything the launchers need, prepared once (dtypes converted, contiguous).
struct Prepared {
  at::Tensor x, weight, w_acc, bias_acc, ftarget, itarget, pw_acc, sw, cw_acc;
  int64_t N = 0, D = 0, C = 0;
};

// Path 2 (see the file comment). binary selects the BCE row kernel.
template <typename scalar_t>
LossOut gemm_path(const Prepared& q, bool binary, int64_t ignore_index, double label_smoothing,
                  int64_t reduction, bool need_x, bool need_w, bool need_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& x = q.x;
  const int64_t N = q.N, C = q.C;
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  const bool any_grad = need_x || need_w || need_b;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor logits = at::mm(x, q.weight.t()).contiguous();  // (N, C), x's dtype

  RowParams<scalar_t, acc_t> rp{};
  rp.logits = logits.data_ptr<scalar_t>();
  rp.bias = static_cast<const acc_t*>(opt_ptr(q.bias_acc));
  rp.N = N;
  rp.C = C;
  rp.ignore_index = ignore_index;
  rp.eps = static_cast<acc_t>(label_smoothing);
  rp.host_den = acc_t(1);
  if (binary) {
    rp.ftarget = q.ftarget.data_ptr<scalar_t>();
    rp.pos_weight = static_cast<const acc_t*>(opt_ptr(q.pw_acc));
    rp.sw = static_cast<const scalar_t*>(opt_ptr(q.sw));
  } else {
    rp.itarget = q.itarget.data_ptr<int64_t>();
    rp.cw = static_cast<const acc_t*>(opt_ptr(q.cw_acc));
  }

  const int64_t grid = binary ? row_grid(N, kThreads) : row_grid(N, kWarps);
  at::Tensor den_ws;
  if (reduction == kMean) {
    if (binary) {
      rp.host_den = static_cast<acc_t>(N);
    } else {
      den_ws = at::empty({grid}, acc_opts);
      ce_den_partial_kernel<acc_t><<<grid, kThreads, 0, stream>>>(
          rp.itarget, rp.cw, N, C, ignore_index, den_ws.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      rp.den_ws = den_ws.data_ptr<acc_t>();
      rp.n_den = grid;
    }
  }

  // The residual R = dloss/dlogits (N, C) in acc_t, divided by the mean denominator for
  // mean/sum (unscaled for none).
  at::Tensor R = any_grad ? at::empty({N, C}, acc_opts) : at::Tensor();
  rp.res = any_grad ? R.data_ptr<acc_t>() : nullptr;
  at::Tensor loss, ws_loss;
  if (reduction == kNone) {
    loss = at::empty({N}, acc_opts);
    rp.loss_out = loss.data_ptr<acc_t>();
  } else {
    ws_loss = at::empty({grid}, acc_opts);
    rp.ws_loss = ws_loss.data_ptr<acc_t>();
  }
  if (binary) {
    bce_rows_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(rp);
  } else {
    ce_rows_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(rp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto none = [&] { return at::empty({0}, acc_opts); };
  if (reduction == kNone) {
    return {loss, none(), none(), any_grad ? R : none()};
  }

  loss = at::empty({}, acc_opts);
  FinalizeParams<scalar_t, acc_t> fp{};
  fp.ws_loss = ws_loss.data_ptr<acc_t>();
  fp.den_ws = rp.den_ws;
  fp.n_den = rp.n_den;
  fp.host_den = rp.host_den;
  fp.loss_out = loss.data_ptr<acc_t>();
  fp.B = grid;
  fp.D = q.D;
  fp.nb = C;
  finalize_kernel<scalar_t, acc_t><<<1, kThreads, 0, stream>>>(fp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // grad_W = R^T x through cuBLAS (x read a second time on this path), grad_b = R.sum(0) in
  // acc_t; both returned in acc_t (csrc/logreg.h). R itself is the residual for dX.
  at::Tensor gw = need_w ? at::mm(R.to(x.scalar_type()).t(), x).to(acc_opts.dtype()) : none();
  at::Tensor gb = need_b ? R.sum(0) : none();
  return {loss, gw, gb, need_x ? R : none()};
}

// Path 1 configuration for a given D, or false when D is too large for it.
template <typename scalar_t>
bool fused_config(int64_t D, int* chunks, int* wpr) {
  constexpr int64_t VEC = 16 / sizeof(scalar_t);
  const int64_t nchunks = std::max<int64_t>(1, ceil_div(D, 32 * VEC));
  if (nchunks <= 4) {
    *chunks = nchunks <= 1 ? 1 : (nchunks <= 2 ? 2 : 4);
    *wpr = 1;
    return true;
  }
  *chunks = 4;
  if (nchunks <= 8) *wpr = 2;
  else if (nchunks <= 16) *wpr = 4;
  else if (nchunks <= 32) *wpr = 8;
  else return false;
  return true;
}

// Grid of the fused kernel: as many blocks as can be resident at once, at most grid_cap.
template <typename scalar_t, int CHUNKS>
int64_t fused_grid(int64_t grid_cap, size_t smem) {
  using acc_t = at::opmath_type<scalar_t>;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, bce_fused_kernel<scalar_t, acc_t, CHUNKS>, kThreads, smem));
  per_sm = std::max(per_sm, 1);
  return std::max<int64_t>(
      1, std::min<int64_t>(static_cast<int64_t>(per_sm) * num_sms(), grid_cap));
}

template <typename scalar_t, int CHUNKS>
void run_bce_fused(const BceFusedParams<scalar_t, at::opmath_type<scalar_t>>& p, int64_t grid,
                   size_t smem, cudaStream_t stream) {
  bce_fused_kernel<scalar_t, at::opmath_type<scalar_t>, CHUNKS>
      <<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
LossOut bce_fused_path(const Prepared& q, int chunks, int wpr, int64_t reduction, bool need_x,
                       bool need_w, bool need_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& x = q.x;
  const int64_t N = q.N, D = q.D;
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int64_t VEC = 16 / sizeof(scalar_t);

  auto none = [&] { return at::empty({0}, acc_opts); };
  at::Tensor res = need_x ? at::empty({N, 1}, acc_opts) : none();
  BceFusedParams<scalar_t, acc_t> p{};
  p.x = x.data_ptr<scalar_t>();
  p.w = q.w_acc.data_ptr<acc_t>();
  p.bias = static_cast<const acc_t*>(opt_ptr(q.bias_acc));
  p.target = q.ftarget.data_ptr<scalar_t>();
  p.pos_weight = static_cast<const acc_t*>(opt_ptr(q.pw_acc));
  p.sw = static_cast<const scalar_t*>(opt_ptr(q.sw));
  p.res = need_x ? res.data_ptr<acc_t>() : nullptr;
  p.N = N;
  p.D = D;
  p.den = reduction == kMean ? static_cast<acc_t>(N) : acc_t(1);
  p.wpr = wpr;
  // Every row start is 16-byte aligned iff the base is and a row is a multiple of 16 bytes.
  p.vec_ok = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && (D % VEC == 0);

  const int64_t gpb = kWarps / wpr;
  const size_t smem = need_w ? static_cast<size_t>(gpb * D) * sizeof(acc_t) : 0;
  const int64_t grid_cap = ceil_div(N, gpb);
  int64_t grid = 1;
  switch (chunks) {
    case 1: grid = fused_grid<scalar_t, 1>(grid_cap, smem); break;
    case 2: grid = fused_grid<scalar_t, 2>(grid_cap, smem); break;
    default: grid = fused_grid<scalar_t, 4>(grid_cap, smem); break;
  }
  at::Tensor ws_gw = need_w ? at::empty({grid, D}, acc_opts) : at::Tensor();
  at::Tensor ws_loss = at::empty({grid}, acc_opts);
  at::Tensor ws_gb = at::empty({grid}, acc_opts);
  p.ws_gw = need_w ? ws_gw.data_ptr<acc_t>() : nullptr;
  p.ws_loss = ws_loss.data_ptr<acc_t>();
  p.ws_gb = ws_gb.data_ptr<acc_t>();
  switch (chunks) {
    case 1: run_bce_fused<scalar_t, 1>(p, grid, smem, stream); break;
    case 2: run_bce_fused<scalar_t, 2>(p, grid, smem, stream); break;
    default: run_bce_fused<scalar_t, 4>(p, grid, smem, stream); break;
  }

  at::Tensor loss = at::empty({}, acc_opts);
  at::Tensor gw = need_w ? at::empty({1, D}, acc_opts) : none();
  at::Tensor gb = need_b ? at::empty({1}, acc_opts) : none();
  FinalizeParams<scalar_t, acc_t> fp{};
  fp.ws_gw = p.ws_gw;
  fp.ws_loss = p.ws_loss;
  fp.ws_gb = p.ws_gb;
  fp.gw_out = need_w ? gw.data_ptr<acc_t>() : nullptr;
  fp.gb_out = need_b ? gb.data_ptr<acc_t>() : nullptr;
  fp.loss_out = loss.data_ptr<acc_t>();
  fp.B = grid;
  fp.D = D;
  fp.nb = 1;
  fp.host_den = p.den;
  const int64_t fgrid = need_w ? std::max<int64_t>(1, ceil_div(D, 32)) : 1;
  finalize_kernel<scalar_t, acc_t><<<fgrid, kThreads, 0, stream>>>(fp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, gw, gb, res};
}

// Path 1b configuration (see the file comment), or false when the shape is outside its limits.
struct CeFusedConfig {
  int cmax = 0;    // 16 or 32
  int dj = 0;      // 1, 2 or 4
  size_t smem = 0; // dynamic shared memory per block, bytes
};

constexpr int64_t kCeMaxWBytes = 48 * 1024;     // W staged in shared memory (acc_t)
constexpr int64_t kCeMaxSmemBytes = 96 * 1024;  // all dynamic shared memory of a block

template <typename scalar_t>
bool ce_fused_config(int64_t C, int64_t D, CeFusedConfig* cfg) {
  using acc_t = at::opmath_type<scalar_t>;
  if (C < 1 || C > 32 || D < 1 || D > 4 * kThreads) return false;
  const int cmax = C <= 16 ? 16 : 32;
  const int64_t dj_need = ceil_div(D, kThreads);
  const int dj = dj_need <= 1 ? 1 : (dj_need <= 2 ? 2 : 4);
  if (cmax * dj > 64) return false;  // grad_W register accumulators per thread
  // fp64: the (16, 4), (32, 1) and (32, 2) instances spill registers (ptxas, sm_90): not built.
  if (sizeof(acc_t) == 8 && (cmax > 16 || dj > 2)) return false;
  const int64_t DS = ceil_div(D, kCeColStep) * kCeColStep;
  if (C * DS * static_cast<int64_t>(sizeof(acc_t)) > kCeMaxWBytes) return false;
  const size_t smem = ce_fused_smem<scalar_t>(C, DS, cmax);
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  // Leave 1 KB of the opt-in limit for the kernel's static shared memory (s_loss).
  const int64_t optin = static_cast<int64_t>(prop->sharedMemPerBlockOptin) - 1024;
  if (static_cast<int64_t>(smem) > std::min<int64_t>(kCeMaxSmemBytes, optin)) return false;
  cfg->cmax = cmax;
  cfg->dj = dj;
  cfg->smem = smem;
  return true;
}

template <typename scalar_t>
using CeFusedKernel = void (*)(CeFusedParams<scalar_t, at::opmath_type<scalar_t>>);

template <typename scalar_t>
CeFusedKernel<scalar_t> ce_fused_kernel_for(int cmax, int dj) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (sizeof(acc_t) == 8) {  // ce_fused_config allows only these for fp64
    TORCH_INTERNAL_ASSERT(cmax == 16 && dj <= 2, "ce_fused_kernel_for: fp64 config ", cmax, "/", dj);
    if (dj == 1) return ce_fused_kernel<scalar_t, acc_t, 16, 1>;
    return ce_fused_kernel<scalar_t, acc_t, 16, 2>;
  } else {
    if (cmax == 16) {
      if (dj == 1) return ce_fused_kernel<scalar_t, acc_t, 16, 1>;
      if (dj == 2) return ce_fused_kernel<scalar_t, acc_t, 16, 2>;
      return ce_fused_kernel<scalar_t, acc_t, 16, 4>;
    }
    if (dj == 1) return ce_fused_kernel<scalar_t, acc_t, 32, 1>;
    return ce_fused_kernel<scalar_t, acc_t, 32, 2>;
  }
}

template <typename scalar_t>
LossOut ce_fused_path(const Prepared& q, const CeFusedConfig& cfg, int64_t ignore_index,
                      double label_smoothing, int64_t reduction, bool need_x, bool need_w,
                      bool need_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& x = q.x;
  const int64_t N = q.N, D = q.D, C = q.C;
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int64_t VEC = 16 / sizeof(scalar_t);

  CeFusedParams<scalar_t, acc_t> p{};
  p.x = x.data_ptr<scalar_t>();
  p.w = q.w_acc.data_ptr<acc_t>();
  p.bias = static_cast<const acc_t*>(opt_ptr(q.bias_acc));
  p.target = q.itarget.data_ptr<int64_t>();
  p.cw = static_cast<const acc_t*>(opt_ptr(q.cw_acc));
  p.N = N;
  p.ignore_index = ignore_index;
  p.D = static_cast<int>(D);
  p.C = static_cast<int>(C);
  p.eps = static_cast<acc_t>(label_smoothing);

  // Mean denominator on the device, finalized before the main kernel (same stream), which
  // needs it for the dX scale; no host sync.
  at::Tensor den_ws, den_final;
  if (reduction == kMean) {
    const int64_t n_den = row_grid(N, kThreads);
    den_ws = at::empty({n_den}, acc_opts);
    ce_den_partial_kernel<acc_t><<<n_den, kThreads, 0, stream>>>(
        p.target, p.cw, N, C, ignore_index, den_ws.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    den_final = at::empty({1}, acc_opts);
    ce_den_final_kernel<acc_t><<<1, kThreads, 0, stream>>>(den_ws.data_ptr<acc_t>(), n_den,
                                                           den_final.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    p.den = den_final.data_ptr<acc_t>();
  }

  auto none = [&] { return at::empty({0}, acc_opts); };
  at::Tensor res = need_x ? at::empty({N, C}, acc_opts) : none();
  p.res = need_x ? res.data_ptr<acc_t>() : nullptr;
  // Every row start is aligned iff the base is and a row is a whole number of vectors.
  p.vec_ok = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && (D % VEC == 0);

  CeFusedKernel<scalar_t> kernel = ce_fused_kernel_for<scalar_t>(cfg.cmax, cfg.dj);
  if (cfg.smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(cfg.smem)));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, cfg.smem));
  per_sm = std::max(per_sm, 1);
  const int64_t grid = std::max<int64_t>(
      1, std::min<int64_t>(static_cast<int64_t>(per_sm) * num_sms(), ceil_div(N, kCeTile)));

  at::Tensor ws_gw = need_w ? at::empty({grid, C * D}, acc_opts) : at::Tensor();
  at::Tensor ws_gb = need_b ? at::empty({grid, C}, acc_opts) : at::Tensor();
  at::Tensor ws_loss = at::empty({grid}, acc_opts);
  p.ws_gw = need_w ? ws_gw.data_ptr<acc_t>() : nullptr;
  p.ws_gb = need_b ? ws_gb.data_ptr<acc_t>() : nullptr;
  p.ws_loss = ws_loss.data_ptr<acc_t>();
  kernel<<<grid, kThreads, cfg.smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // finalize_kernel over the flattened (C * D) grad_W columns; grad_b has C entries.
  at::Tensor loss = at::empty({}, acc_opts);
  at::Tensor gw = need_w ? at::empty({C, D}, acc_opts) : none();
  at::Tensor gb = need_b ? at::empty({C}, acc_opts) : none();
  FinalizeParams<scalar_t, acc_t> fp{};
  fp.ws_gw = p.ws_gw;
  fp.ws_loss = p.ws_loss;
  fp.ws_gb = p.ws_gb;
  fp.den_ws = p.den;  // (1,) finalized denominator (n_den 1), or nullptr: host_den 1
  fp.n_den = p.den != nullptr ? 1 : 0;
  fp.host_den = acc_t(1);
  fp.gw_out = need_w ? gw.data_ptr<acc_t>() : nullptr;
  fp.gb_out = need_b ? gb.data_ptr<acc_t>() : nullptr;
  fp.loss_out = loss.data_ptr<acc_t>();
  fp.B = grid;
  fp.D = C * D;
  fp.nb = C;
  const int64_t fgrid = need_w ? std::max<int64_t>(1, ceil_div(C * D, 32)) : 1;
  finalize_kernel<scalar_t, acc_t><<<fgrid, kThreads, 0, stream>>>(fp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, gw, gb, res};
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

Prepared prepare_common(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& target) {
  check_linear_args(op, x, weight, bias);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  check_same_device(op, "target", target, x);
  Prepared q;
  q.x = x.contiguous();
  q.weight = weight.contiguous();
  q.N = x.size(0);
  q.D = x.size(1);
  q.C = weight.size(0);
  TORCH_CHECK(target.numel() == q.N, op, ": target must have N = ", q.N, " elements, got shape ",
              target.sizes());
  const auto acc = acc_type_of(x.scalar_type());
  if (bias.has_value() && bias->defined()) q.bias_acc = bias->to(acc).contiguous();
  return q;
}

}  // namespace

LossOut linear_bce_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& pos_weight,
                            const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                            bool need_x, bool need_weight, bool need_bias) {
  const char* op = "linear_bce_fwd";
  check_reduction(reduction);
  c10::cuda::CUDAGuard guard(x.device());
  Prepared q = prepare_common(op, x, weight, bias, target);
  TORCH_CHECK(q.C == 1, op, ": weight must have one output (shape (1, D)), got ", weight.sizes());
  const auto acc = acc_type_of(x.scalar_type());
  q.ftarget = target.reshape({-1}).to(x.scalar_type()).contiguous();
  if (pos_weight.has_value() && pos_weight->defined()) {
    check_same_device(op, "pos_weight", *pos_weight, x);
    TORCH_CHECK(pos_weight->numel() == 1, op, ": pos_weight must have one element, got shape ",
                pos_weight->sizes());
    q.pw_acc = pos_weight->reshape({1}).to(acc).contiguous();
  }
  if (sample_weight.has_value() && sample_weight->defined()) {
    check_same_device(op, "sample_weight", *sample_weight, x);
    TORCH_CHECK(sample_weight->numel() == q.N, op, ": sample_weight must have N = ", q.N,
                " elements, got shape ", sample_weight->sizes());
    q.sw = sample_weight->reshape({-1}).to(x.scalar_type()).contiguous();
  }
  if (q.N == 0) return empty_batch(x, 1, q.D, reduction, need_x, need_weight, need_bias);

  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "linear_bce_fwd_cuda", [&]() -> LossOut {
        int chunks = 1, wpr = 1;
        if (reduction != kNone && fused_config<scalar_t>(q.D, &chunks, &wpr)) {
          q.w_acc = q.weight.reshape({-1}).to(acc).contiguous();
          return bce_fused_path<scalar_t>(q, chunks, wpr, reduction, need_x, need_weight,
                                          need_bias);
        }
        return gemm_path<scalar_t>(q, /*binary=*/true, 0, 0.0, reduction, need_x, need_weight,
                                   need_bias);
      });
}

LossOut linear_ce_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                           const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                           double label_smoothing, int64_t reduction, bool need_x,
                           bool need_weight, bool need_bias) {
  const char* op = "linear_ce_fwd";
  check_reduction(reduction);
  c10::cuda::CUDAGuard guard(x.device());
  Prepared q = prepare_common(op, x, weight, bias, target);
  TORCH_CHECK(target.scalar_type() == at::kLong, op,
              ": target must hold int64 class indices, got ", target.scalar_type());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  const auto acc = acc_type_of(x.scalar_type());
  q.itarget = target.reshape({-1}).contiguous();
  if (class_weight.has_value() && class_weight->defined()) {
    check_same_device(op, "class_weight", *class_weight, x);
    TORCH_CHECK(class_weight->numel() == q.C, op, ": class_weight must have C = ", q.C,
                " elements, got shape ", class_weight->sizes());
    q.cw_acc = class_weight->reshape({-1}).to(acc).contiguous();
  }
  if (q.N == 0) return empty_batch(x, q.C, q.D, reduction, need_x, need_weight, need_bias);

  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "linear_ce_fwd_cuda", [&]() -> LossOut {
        CeFusedConfig cfg;
        if (reduction != kNone && ce_fused_config<scalar_t>(q.C, q.D, &cfg)) {
          q.w_acc = q.weight.to(acc).contiguous();
          return ce_fused_path<scalar_t>(q, cfg, ignore_index, label_smoothing, reduction,
                                         need_x, need_weight, need_bias);
        }
        return gemm_path<scalar_t>(q, /*binary=*/false, ignore_index, label_smoothing, reduction,
                                   need_x, need_weight, need_bias);
      });
}

}  // namespace manual_layers

TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) {
  m.impl("_linear_bce_fwd", &manual_layers::linear_bce_fwd_cuda);
  m.impl("_linear_ce_fwd", &manual_layers::linear_ce_fwd_cuda);
}
