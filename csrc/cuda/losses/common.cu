// CUDA logistic-regression losses, the last step of every mean/sum path and the cross-entropy
// mean denominator (common.cuh describes the op path file by file):
//   finalize_kernel        the fixed-order sum of a path's per-block partials (loss, grad_w,
//                          grad_b), divided by the mean denominator;
//   ce_den_partial_kernel  per-block partial sums of class_weight[target] over non-ignored rows;
//   ce_den_final_kernel    their fixed-order sum in one device element.
// Compiled once here, for float and double (the kernels see only acc_t), and launched by the
// paths through the launchers declared in common.cuh.
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>

#include "common.cuh"

namespace manual_layers {
namespace cuda_logreg {

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const FinalizeParams<acc_t> p) {
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
      for (int64_t c = 0; c < p.nb; ++c) {  // nb is 1 on the fused binary path
        acc_t v = 0;
        for (int64_t b = threadIdx.x; b < p.B; b += kThreads) v += p.ws_gb[b * p.nb + c];
        v = block_sum(v, sbuf);
        if (threadIdx.x == 0) p.gb_out[c] = grad_div(v, den);
      }
    }
  }
}

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

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ce_den_final_kernel(const acc_t* den_ws, int64_t n_den, acc_t* den_out) {
  __shared__ acc_t sbuf[kThreads];
  const acc_t d = block_sum_partials(den_ws, n_den, sbuf);
  if (threadIdx.x == 0) den_out[0] = d;
}

// Left out of the host emulation of tests/cuda_emu, which runs the kernels above on the CPU.
#ifndef ML_CUDA_HOST_EMU
template <typename acc_t>
void launch_finalize(const FinalizeParams<acc_t>& p, int64_t grid, cudaStream_t stream) {
  finalize_kernel<acc_t><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_ce_den_partial(const int64_t* target, const acc_t* cw, int64_t N, int64_t C,
                           int64_t ignore_index, acc_t* den_ws, int64_t grid,
                           cudaStream_t stream) {
  ce_den_partial_kernel<acc_t><<<grid, kThreads, 0, stream>>>(target, cw, N, C, ignore_index,
                                                              den_ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_ce_den_final(const acc_t* den_ws, int64_t n_den, acc_t* den_out,
                         cudaStream_t stream) {
  ce_den_final_kernel<acc_t><<<1, kThreads, 0, stream>>>(den_ws, n_den, den_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define ML_INSTANTIATE_SHARED(acc_t)                                                          \
  template void launch_finalize<acc_t>(const FinalizeParams<acc_t>&, int64_t, cudaStream_t); \
  template void launch_ce_den_partial<acc_t>(const int64_t*, const acc_t*, int64_t, int64_t,  \
                                             int64_t, acc_t*, int64_t, cudaStream_t);         \
  template void launch_ce_den_final<acc_t>(const acc_t*, int64_t, acc_t*, cudaStream_t);
ML_INSTANTIATE_SHARED(float)
ML_INSTANTIATE_SHARED(double)
#undef ML_INSTANTIATE_SHARED

#endif  // ML_CUDA_HOST_EMU

}  // namespace cuda_logreg
}  // namespace manual_layers
