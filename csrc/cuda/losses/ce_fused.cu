// CUDA logistic-regression losses, path 1b: fused multinomial cross entropy (linear_ce_fwd,
// reduction mean/sum, small C and D). X is read exactly once and no (N, C) buffer exists.
// loss_fwd.cu chooses the path (ce_fused_config) and prepares the inputs; common.cuh
// describes the op path file by file.
//
// Limits: C <= 32, D <= 1024 (D <= 512 when C > 16), W staged in shared memory as acc_t with
// C * round_up(D, 128) * sizeof(acc_t) <= 48 KB, all dynamic shared memory <= 96 KB (and the
// device's opt-in limit); fp64 only for C <= 16, D <= 512.
//
// ce_fused_kernel runs a fixed grid of B blocks (occupancy x SM count, at most ceil(N / 16)),
// 256 threads = 8 warps, over tiles of 16 rows (grid-stride loop):
//   A0  the block copies the tile's rows of X into shared memory (16-byte vector loads when
//       every row start is 16-byte aligned and D % VEC == 0, scalar otherwise);
//   A1  each warp takes 2 rows: lane holds columns 4 lane + 128 k, multiplies them with W
//       (shared, fp32) for all classes of both rows at once (each W load serves two rows),
//       then C warp butterflies per row give every lane all the logits (+ bias);
//   A2  stable log-softmax, loss term, residual r_c = dloss_i/dz_ic (csrc/contracts/losses.h formulas;
//       ignore_index: loss 0, r = 0), r to shared memory;
//   A3  when grad_x is wanted, the residual r_c / den (C acc_t values per row) to global
//       memory (backward writes dX = (g res) W by GEMM: csrc/contracts/losses.h);
//   B   thread t owns grad_W columns t + 256 j (j < DJ <= 4) for all classes in registers
//       (CMAX * DJ <= 64 accumulators) and adds r_c x_ic over the tile's rows in order;
//       thread c < C owns grad_b[c].
// At the end each block writes its disjoint columns to a [B, C, D] fp32 (fp64) workspace
// (O(B*C*D), never O(N)) plus [B, C] grad_b and [B] loss partials; finalize_kernel
// (common.cu) sums the B partials in a fixed order (bitwise deterministic, no float
// atomics) and divides by the mean denominator. For mean, ce_den_partial_kernel +
// ce_den_final_kernel (common.cu) put the
// denominator in one device element before the main kernel runs (same stream; no host
// sync), so the kernel can scale the residual. Shared-memory traffic for W (2 C D fp32 reads
// per two rows) and the C butterflies per row are the main costs beyond the X read;
// the kernel has not been timed (no GPU when written).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

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

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

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

// Left out of the host emulation of tests/cuda_emu, which runs the kernel above on the CPU.
#ifndef ML_CUDA_HOST_EMU
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
LossOut ce_fused_path(const Prepared& q, const CeFusedConfig& cfg, int64_t ignore_index,
                      double label_smoothing, int64_t reduction, bool need_x, bool need_w,
                      bool need_b) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t VEC = 16 / sizeof(scalar_t);
  CeFusedParams<scalar_t, acc_t> p{};
  p.x = q.x.data_ptr<scalar_t>();
  p.w = q.w_acc.data_ptr<acc_t>();
  // Every row start is aligned iff the base is and a row is a whole number of vectors.
  p.vec_ok = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && (q.D % VEC == 0);
  return ce_single_pass<scalar_t>(q, p, ce_fused_kernel_for<scalar_t>(cfg.cmax, cfg.dj), cfg.smem,
                                  kCeTile, ignore_index, label_smoothing, reduction, need_x,
                                  need_w, need_b);
}

template <typename scalar_t>
LossOut ce_single_pass(const Prepared& q, CeFusedParams<scalar_t, at::opmath_type<scalar_t>> p,
                       CeFusedKernel<scalar_t> kernel, size_t smem, int64_t tile_rows,
                       int64_t ignore_index, double label_smoothing, int64_t reduction,
                       bool need_x, bool need_w, bool need_b, int cluster,
                       int64_t max_clusters) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& x = q.x;
  const int64_t N = q.N, D = q.D, C = q.C;
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  p.bias = opt_data<acc_t>(q.bias_acc);
  p.target = q.itarget.data_ptr<int64_t>();
  p.cw = opt_data<acc_t>(q.cw_acc);
  p.N = N;
  p.ignore_index = ignore_index;
  p.D = static_cast<int>(D);
  p.C = static_cast<int>(C);
  p.eps = static_cast<acc_t>(label_smoothing);

  // Mean denominator on the device, finalized before the main kernel (same stream), which
  // needs it for the dX scale; no host sync.
  at::Tensor den_ws, den_final;
  if (reduction == kMean) {
    const int64_t n_den = grid_for(N, kThreads);
    den_ws = at::empty({n_den}, acc_opts);
    launch_ce_den_partial(p.target, p.cw, N, C, ignore_index, den_ws.data_ptr<acc_t>(), n_den,
                          stream);
    den_final = at::empty({1}, acc_opts);
    launch_ce_den_final(den_ws.data_ptr<acc_t>(), n_den, den_final.data_ptr<acc_t>(), stream);
    p.den = den_final.data_ptr<acc_t>();
  }

  at::Tensor res = need_x ? at::empty({N, C}, acc_opts) : empty0(acc_opts);
  p.res = need_x ? res.data_ptr<acc_t>() : nullptr;

  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  // grid: the partials' count (blocks, or clusters of `cluster` blocks), at most one per tile.
  cudaLaunchConfig_t lc{};
  cudaLaunchAttribute attr[1];
  int64_t grid = 0;
  if (cluster > 1) {
    TORCH_INTERNAL_ASSERT(max_clusters > 0, "ce_single_pass: no cluster of ", cluster,
                          " blocks fits (ce_tc_config checks this)");
    grid = std::max<int64_t>(1, std::min<int64_t>(max_clusters, ceil_div(N, tile_rows)));
    lc = cluster_launch_config(cluster, grid, smem, stream, attr);
  } else {
    int per_sm = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    per_sm = std::max(per_sm, 1);
    grid = std::max<int64_t>(
        1, std::min<int64_t>(static_cast<int64_t>(per_sm) * num_sms(), ceil_div(N, tile_rows)));
  }

  at::Tensor ws_gw = need_w ? at::empty({grid, C * D}, acc_opts) : at::Tensor();
  at::Tensor ws_gb = need_b ? at::empty({grid, C}, acc_opts) : at::Tensor();
  at::Tensor ws_loss = at::empty({grid}, acc_opts);
  p.ws_gw = need_w ? ws_gw.data_ptr<acc_t>() : nullptr;
  p.ws_gb = need_b ? ws_gb.data_ptr<acc_t>() : nullptr;
  p.ws_loss = ws_loss.data_ptr<acc_t>();
  if (cluster > 1) {
    C10_CUDA_CHECK(cudaLaunchKernelEx(&lc, kernel, p));
  } else {
    kernel<<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // finalize_kernel over the flattened (C * D) grad_W columns; grad_b has C entries.
  at::Tensor loss = at::empty({}, acc_opts);
  at::Tensor gw = need_w ? at::empty({C, D}, acc_opts) : empty0(acc_opts);
  at::Tensor gb = need_b ? at::empty({C}, acc_opts) : empty0(acc_opts);
  FinalizeParams<acc_t> fp{};
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
  launch_finalize(fp, fgrid, stream);
  return {loss, gw, gb, res};
}

cudaLaunchConfig_t cluster_launch_config(int cluster, int64_t clusters, size_t smem,
                                         cudaStream_t stream, cudaLaunchAttribute* attr) {
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t lc{};
  lc.gridDim = dim3(static_cast<unsigned>(clusters * cluster));
  lc.blockDim = dim3(kThreads);
  lc.dynamicSmemBytes = smem;
  lc.stream = stream;
  lc.attrs = attr;
  lc.numAttrs = 1;
  return lc;
}

int max_active_clusters(const void* kernel, int cluster, size_t smem) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t lc = cluster_launch_config(cluster, 1, smem, nullptr, attr);
  int clusters = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &lc));
  return clusters;
}

#define ML_INSTANTIATE_CE_FUSED(scalar_t)                                                     \
  template bool ce_fused_config<scalar_t>(int64_t, int64_t, CeFusedConfig*);                 \
  template LossOut ce_fused_path<scalar_t>(const Prepared&, const CeFusedConfig&, int64_t,   \
                                           double, int64_t, bool, bool, bool);               \
  template LossOut ce_single_pass<scalar_t>(                                                  \
      const Prepared&, CeFusedParams<scalar_t, at::opmath_type<scalar_t>>,                    \
      CeFusedKernel<scalar_t>, size_t, int64_t, int64_t, double, int64_t, bool, bool, bool, int, \
      int64_t);
ML_INSTANTIATE_CE_FUSED(float)
ML_INSTANTIATE_CE_FUSED(double)
ML_INSTANTIATE_CE_FUSED(at::Half)
ML_INSTANTIATE_CE_FUSED(at::BFloat16)
#undef ML_INSTANTIATE_CE_FUSED
#endif  // ML_CUDA_HOST_EMU

}  // namespace cuda_logreg
}  // namespace manual_layers
