// Device code of path 1b, the CUDA-core fused multinomial cross entropy (ce_fused.cu describes it
// and holds its host side): ce_fused_kernel and its shared-memory size. tests/cuda_emu runs it
// on the CPU.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common.cuh"

namespace manual_layers {
namespace cuda_logreg {

// ---------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------

constexpr int kCeRowsPerWarp = 2;                    // rows a warp handles per tile
constexpr int kCeTile = kWarps * kCeRowsPerWarp;      // rows per tile (16)
constexpr int kCeColStep = 128;                       // 32 lanes x 4 columns (phase A)

// CeFusedParams: common.cuh (shared with path 1c).

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
  ML_DYNAMIC_SMEM(smem_raw);
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
          if (c < C) s += ml_exp(z[rr][c] - m);
        const acc_t lse = m + ml_log(s);
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
            v = a * ml_exp(z[rr][c] - lse);
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
      // The residual for backward's dX = (g res) W (csrc/contracts/losses.h): C values per row.
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

}  // namespace cuda_logreg
}  // namespace manual_layers
