// CUDA dX of the fused losses' backward for few classes (csrc/generic/loss_bwd.cpp chooses it; the
// contract is loss_dx_cpu's in csrc/contracts/losses.h): dX = coef * (residual W), residual (N, C)
// acc_t, coef one element (mean/sum: grad_output) or (N,) (none: grad_output per row), W (C, D).
//
// Why not at::mm: with K = C this small the GEMM is bound by writing dX, and cuBLAS's kernel for it
// ran below the copy rate on an H100 (docs/perf-h100-2026-11-28.md, docs/perf-notes-from-code.md);
// the GEMM also needs the residual rounded to x's dtype first. Here each thread keeps its VEC
// columns of W for all classes in registers (acc_t) and walks rows: per row it reads the C
// residuals (one broadcast load per warp) and writes VEC outputs with one vector store; the
// residual stays acc_t (no rounding before the product). Each dX element is written once; nothing
// waits on the host.
//
// Not yet run or timed on a GPU (none was lent when it was written); the CUDA tests of the
// losses' gradients (tests/test_logreg.py, tests/test_ce_tc.py) exercise it wherever one is,
// and tests/cuda_emu/test_cuda_emu.py runs the kernel in a host emulation everywhere.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "../../contracts/losses.h"
#include "../common/cuda_common.cuh"

namespace manual_layers {
namespace cuda_dx {

using cuda_common::AlignedVec;
using cuda_common::ceil_div;
using cuda_common::is_aligned;
using cuda_common::kThreads;
using cuda_common::num_sms;

constexpr int kDxMaxClasses = 16;  // W columns for 16 classes stay in registers

// VEC output elements per thread: 8 bytes of 16-bit values, 16 bytes of fp32 / fp64.
template <typename scalar_t>
constexpr int dx_vec() {
  return sizeof(scalar_t) == 2 ? 4 : 16 / static_cast<int>(sizeof(scalar_t));
}

// Thread gid < rows_per_step * nvec owns column vector v = gid % nvec for the rows
// gid / nvec + k rows_per_step.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    loss_dx_kernel(const at::opmath_type<scalar_t>* res, const at::opmath_type<scalar_t>* coef,
                   bool per_row, const scalar_t* w, scalar_t* out, int64_t N, int C, int D,
                   int64_t rows_per_step) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = AlignedVec<scalar_t, VEC>;
  const int nvec = D / VEC;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (gid >= rows_per_step * nvec) return;
  const int v = static_cast<int>(gid % nvec);
  acc_t wv[kDxMaxClasses][VEC];
#pragma unroll
  for (int c = 0; c < kDxMaxClasses; ++c) {
    if (c < C) {
      const Vec t = *reinterpret_cast<const Vec*>(w + static_cast<int64_t>(c) * D + v * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) wv[c][e] = static_cast<acc_t>(t.val[e]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) wv[c][e] = acc_t(0);
    }
  }
  const acc_t s0 = coef[0];
  for (int64_t i = gid / nvec; i < N; i += rows_per_step) {
    const acc_t* r = res + i * C;
    acc_t o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = acc_t(0);
#pragma unroll
    for (int c = 0; c < kDxMaxClasses; ++c) {
      if (c < C) {
        const acc_t rc = r[c];
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[e] += rc * wv[c][e];
      }
    }
    const acc_t s = per_row ? coef[i] : s0;
    Vec st;
#pragma unroll
    for (int e = 0; e < VEC; ++e) st.val[e] = static_cast<scalar_t>(o[e] * s);
    *reinterpret_cast<Vec*>(out + i * static_cast<int64_t>(D) + v * VEC) = st;
  }
}

}  // namespace cuda_dx

// The host side (tests/cuda_emu/kernels_emu.cpp compiles the kernel above without it).
#ifndef ML_CUDA_HOST_EMU
at::Tensor loss_dx_cuda(const at::Tensor& residual, const at::Tensor& coef,
                        const at::Tensor& weight) {
  using namespace cuda_dx;
  const int64_t N = residual.size(0), C = weight.size(0), D = weight.size(1);
  if (C > kDxMaxClasses || D == 0) return at::Tensor();
  c10::cuda::CUDAGuard guard(residual.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor r = residual.contiguous();
  const at::Tensor k = coef.reshape({-1}).contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "loss_dx_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int VEC = dx_vec<scalar_t>();
        const int64_t nvec = D / VEC;
        // Whole vectors per row, aligned W rows (the output is a fresh, aligned allocation),
        // and enough threads for one row: else the caller's GEMM.
        if (D % VEC != 0 || !is_aligned(w.data_ptr(), VEC * sizeof(scalar_t)) ||
            nvec > int64_t(1) << 20) {
          return;
        }
        out = at::empty({N, D}, weight.options());
        if (N == 0) return;
        // Threads: enough for 8 resident blocks per SM, at most one per output vector, a
        // whole number of rows per step.
        const int64_t cap = static_cast<int64_t>(num_sms()) * 8 * kThreads;
        const int64_t rows_per_step = std::max<int64_t>(1, std::min<int64_t>(N, cap / nvec));
        const int64_t grid = ceil_div(rows_per_step * nvec, kThreads);
        loss_dx_kernel<scalar_t, VEC><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            r.data_ptr<acc_t>(), k.data_ptr<acc_t>(), k.numel() > 1, w.data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(), N, static_cast<int>(C), static_cast<int>(D),
            rows_per_step);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}
#endif  // ML_CUDA_HOST_EMU

}  // namespace manual_layers
