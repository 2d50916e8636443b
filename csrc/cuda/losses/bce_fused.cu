// CUDA logistic-regression losses, path 1: fused binary cross entropy (linear_bce_fwd, C == 1,
// reduction mean/sum, D <= 8 warps x CHUNKS x 32 lanes x VEC with CHUNKS <= 4, i.e. D <= 4096
// fp32 / 8192 fp16,bf16 / 2048 fp64, and for fp32 an 8-chunk instance up to D = 8192). X is
// read exactly once. loss_fwd.cu chooses the path (bce_fused_config) and prepares the inputs;
// common.cuh describes the op path file by file.
//
// bce_fused_kernel runs a fixed grid of B blocks (B = occupancy x SM count, at most one
// block per group of rows), 256 threads = 8 warps. A "group" of WPR warps (WPR in 1,2,4,8)
// owns one row at a time; warp j of the group holds columns
//   [(j*CHUNKS + k)*32*VEC + lane*VEC, +VEC), k < CHUNKS
// of the row in registers (16-byte vector loads when the row start is 16-byte aligned and D is a
// multiple of VEC; a scalar path otherwise), together with the same columns of w and of its fp32
// (fp64) partial grad_w. Per row: z = x.w (warp shuffles; plus a fixed-order sum over the group's
// warps through shared memory when WPR > 1) + b, the loss term (bce_term: log-sigmoid in its stable
// form), r = dloss/dz, grad_w += r x, and the residual r / den (one acc_t per row) when x needs a
// gradient (backward writes dX from it: csrc/contracts/losses.h). Rows go to blocks in a
// grid-stride loop. At the end each block sums its groups' grad_w in a fixed order (shared memory)
// and writes one row of a [B, D] fp32 (fp64) workspace, plus its loss and grad_b partials ([B]
// each): O(B*D) temporary memory, never O(N). finalize_kernel (common.cu) then sums the B partials
// in a fixed order (bitwise deterministic, no float atomics) and writes grad_w, grad_b and the loss
// in acc_t, divided by the mean denominator (N for mean, 1 for sum).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace manual_layers {
namespace cuda_logreg {

// ---------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------

// Whether scalar_t has the 8-chunk instance of bce_fused_kernel (fp32 only: see
// bce_fused_config).
template <typename scalar_t>
constexpr bool kBce8Chunks = std::is_same_v<scalar_t, float>;

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
// fp32 with four), else 2 (ptxas: four chunks of fp16/bf16 spill 4 bytes at 2; fp32's eight
// chunks hold 96 registers of row, w and grad_w per thread and fit 128 at 2).
template <int CHUNKS, int BYTES>
constexpr int bce_min_blocks() {
  return (CHUNKS <= 2 || (BYTES == 4 && CHUNKS <= 4)) ? 3 : 2;
}

template <typename scalar_t, typename acc_t, int CHUNKS>
__global__ void __launch_bounds__(kThreads, (bce_min_blocks<CHUNKS, sizeof(scalar_t)>()))
    bce_fused_kernel(const BceFusedParams<scalar_t, acc_t> p) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));
  using Vec = AlignedVec<scalar_t, VEC>;
  ML_DYNAMIC_SMEM(smem_raw);
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

  // w in x's dtype (the weight has x's dtype, so w_acc -> scalar_t is exact): for 16-bit
  // types half the registers of an acc_t copy, which the row-ahead buffer below needs.
  Vec wr[CHUNKS];
  acc_t gw[CHUNKS][VEC];
  Vec xr[CHUNKS];  // the row's values in x's dtype (half the registers for 16-bit types)
  // 16-bit rows of one or two chunks (D <= 512 per warp) are loaded one row AHEAD: the next
  // row's vectors are in flight while this row's dot, loss and grad_w run. One 16-byte load
  // per chunk and thread and row kept too few bytes in flight for the copy rate (H100 profile,
  // docs/perf-notes-from-code.md). Other instances have the
  // bytes in flight already, or not the registers to spare (ptxas: 16-bit four chunks spill). ptxas
  // (CUDA 13.0, sm_90) fits the bf16 two-chunk instance in its 80 registers with 20 bytes of spill,
  // reloaded from L1 once per row; sm_80 and fp16 do not spill. NOT YET RUN ON A GPU: written
  // against the H100 profile in docs/perf-h100-2026-11-28.md, compiled for 8.0 and 9.0.
  constexpr bool kAhead = sizeof(scalar_t) == 2 && CHUNKS <= 2;
  Vec xn[kAhead ? CHUNKS : 1];
#pragma unroll
  for (int k = 0; k < CHUNKS; ++k) {
    const int64_t c0 = (static_cast<int64_t>(j * CHUNKS + k) * 32 + lane) * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      wr[k].val[e] = static_cast<scalar_t>(c0 + e < D ? p.w[c0 + e] : acc_t(0));
      gw[k][e] = acc_t(0);
    }
  }
  const acc_t bias = p.bias != nullptr ? p.bias[0] : acc_t(0);
  const acc_t pw = has_pw ? p.pos_weight[0] : acc_t(1);
  const acc_t den = p.den;
  acc_t loss_acc = 0;
  acc_t gb_acc = 0;
  int parity = 0;

  // dst <- this warp's columns of row i (zeros outside the row, or for i >= N).
  const auto load_row = [&](int64_t i, Vec* dst) {
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k)
#pragma unroll
      for (int e = 0; e < VEC; ++e) dst[k].val[e] = static_cast<scalar_t>(0.0f);
    if (i >= N) return;
    const scalar_t* xrow = p.x + i * D;
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      const int64_t c0 = (static_cast<int64_t>(j * CHUNKS + k) * 32 + lane) * VEC;
      if (p.vec_ok) {
        // D % VEC == 0 here, so a vector is either wholly inside the row or wholly outside.
        if (c0 < D) dst[k] = *reinterpret_cast<const Vec*>(xrow + c0);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (c0 + e < D) dst[k].val[e] = xrow[c0 + e];
      }
    }
  };

  const int64_t step = static_cast<int64_t>(gridDim.x) * gpb;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * gpb;
  if (kAhead && first < N) load_row(first + g, xr);
  // The loop condition depends on blockIdx only: every thread of the block runs the same
  // iterations, so the __syncthreads below is reached by all of them.
  for (int64_t base = first; base < N; base += step) {
    const int64_t i = base + g;
    const bool valid = i < N;
    if constexpr (kAhead) {
      load_row(base + step + g, xn);  // the next row: its loads overlap this row's math
    } else {
      load_row(i, xr);
    }
    acc_t part = 0;
    if (valid) {
      // Columns outside the row hold 0 in xr and in wr.
#pragma unroll
      for (int k = 0; k < CHUNKS; ++k)
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          part += static_cast<acc_t>(xr[k].val[e]) * static_cast<acc_t>(wr[k].val[e]);
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
      // The residual for backward's dX = (g res) w (csrc/contracts/losses.h): one value per row.
      if (p.res != nullptr && j == 0 && lane == 0) p.res[i] = r / den;
    }
    if constexpr (kAhead) {
#pragma unroll
      for (int k = 0; k < CHUNKS; ++k) xr[k] = xn[k];
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
// Host side
// ---------------------------------------------------------------------------------------

// Chunks per warp and warps per row for D (false: D is past the fused kernel's range). fp32
// rows past 4096 values (8 warps x 4 chunks) take the 8-chunk instance up to 8192, so that a
// linear probe on 5120- or 8192-wide fp32 features reads X once instead of the GEMM path's
// twice; the 16-bit and fp64 instances would need 128+ registers of grad_w and row there.
template <typename scalar_t>
bool bce_fused_config(int64_t D, int* chunks, int* wpr) {
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
  else if (kBce8Chunks<scalar_t> && nchunks <= 64) {
    *chunks = 8;
    *wpr = 8;
  } else {
    return false;
  }
  return true;
}

// The kernel's dynamic shared memory: the block's (GPB, D) grad_W rows, when grad_W is wanted.
template <typename acc_t>
size_t bce_fused_smem(int64_t gpb, int64_t D, bool need_w) {
  return need_w ? static_cast<size_t>(gpb * D) * sizeof(acc_t) : 0;
}

// Left out of the host emulation of tests/cuda_emu, which runs the kernel above on the CPU.
#ifndef ML_CUDA_HOST_EMU
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

  at::Tensor res = need_x ? at::empty({N, 1}, acc_opts) : empty0(acc_opts);
  BceFusedParams<scalar_t, acc_t> p{};
  p.x = x.data_ptr<scalar_t>();
  p.w = q.w_acc.data_ptr<acc_t>();
  p.bias = opt_data<acc_t>(q.bias_acc);
  p.target = q.ftarget.data_ptr<scalar_t>();
  p.pos_weight = opt_data<acc_t>(q.pw_acc);
  p.sw = opt_data<scalar_t>(q.sw);
  p.res = need_x ? res.data_ptr<acc_t>() : nullptr;
  p.N = N;
  p.D = D;
  p.den = reduction == kMean ? static_cast<acc_t>(N) : acc_t(1);
  p.wpr = wpr;
  // Every row start is 16-byte aligned iff the base is and a row is a multiple of 16 bytes.
  p.vec_ok = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && (D % VEC == 0);

  const int64_t gpb = kWarps / wpr;
  const size_t smem = bce_fused_smem<acc_t>(gpb, D, need_w);
  const int64_t grid_cap = ceil_div(N, gpb);
  int64_t grid = 1;
  switch (chunks) {
    case 1: grid = fused_grid<scalar_t, 1>(grid_cap, smem); break;
    case 2: grid = fused_grid<scalar_t, 2>(grid_cap, smem); break;
    case 4: grid = fused_grid<scalar_t, 4>(grid_cap, smem); break;
    default:
      if constexpr (kBce8Chunks<scalar_t>) {
        grid = fused_grid<scalar_t, 8>(grid_cap, smem);
      } else {
        TORCH_INTERNAL_ASSERT(false, "bce_fused_path: no ", chunks, "-chunk instance");
      }
      break;
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
    case 4: run_bce_fused<scalar_t, 4>(p, grid, smem, stream); break;
    default:
      if constexpr (kBce8Chunks<scalar_t>) {
        run_bce_fused<scalar_t, 8>(p, grid, smem, stream);
      } else {
        TORCH_INTERNAL_ASSERT(false, "bce_fused_path: no ", chunks, "-chunk instance");
      }
      break;
  }

  at::Tensor loss = at::empty({}, acc_opts);
  at::Tensor gw = need_w ? at::empty({1, D}, acc_opts) : empty0(acc_opts);
  at::Tensor gb = need_b ? at::empty({1}, acc_opts) : empty0(acc_opts);
  FinalizeParams<acc_t> fp{};
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
  launch_finalize(fp, fgrid, stream);
  return {loss, gw, gb, res};
}

#define ML_INSTANTIATE_BCE_FUSED(scalar_t)                                                   \
  template bool bce_fused_config<scalar_t>(int64_t, int*, int*);                            \
  template LossOut bce_fused_path<scalar_t>(const Prepared&, int, int, int64_t, bool, bool, \
                                            bool);
ML_INSTANTIATE_BCE_FUSED(float)
ML_INSTANTIATE_BCE_FUSED(double)
ML_INSTANTIATE_BCE_FUSED(at::Half)
ML_INSTANTIATE_BCE_FUSED(at::BFloat16)
#undef ML_INSTANTIATE_BCE_FUSED
#endif  // ML_CUDA_HOST_EMU

}  // namespace cuda_logreg
}  // namespace manual_layers
