// CUDA row pass of the chunked linear + cross entropy (csrc/ce_chunked.cpp holds the
// contract and the device-generic chunk loop with its ATen GEMMs; this file is only the row
// kernel). One warp per row, lanes over classes, as ce_rows_kernel in csrc/cuda/logreg_gemm.cu
// (an own copy): bias added in acc_t, stable log-softmax,
// the loss term of csrc/logreg.h, and the residual written over the logits in place, times
// aux[0] (1/den for mean, 1 otherwise; computed on the device by the driver: no host sync) and
// the row's grad_output for the backward of reduction none. Targets out of range (and not
// ignore_index) raise a device-side assert; were asserts compiled out, such a row is treated as
// ignored and never indexes memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

#include "cuda_common.cuh"

namespace manual_layers {
namespace {

constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;

__device__ __forceinline__ float ce_exp(float a) { return expf(a); }
__device__ __forceinline__ double ce_exp(double a) { return exp(a); }
__device__ __forceinline__ float ce_log(float a) { return logf(a); }
__device__ __forceinline__ double ce_log(double a) { return log(a); }

using cuda_common::warp_max;  // fixed butterfly order: deterministic
using cuda_common::warp_sum;

template <typename scalar_t, typename acc_t>
struct ChunkRowParams {
  scalar_t* logits;          // (R, C), row-major; overwritten with the residual
  const acc_t* bias;         // (C,) or nullptr
  const int64_t* target;     // (R,)
  const acc_t* cw;           // (C,) or nullptr
  const acc_t* aux;          // [scale, sum of class weights]
  const acc_t* row_scale;    // (R,) or nullptr
  acc_t* loss_rows;          // (R,)
  int64_t R;
  int64_t C;
  int64_t ignore_index;
  acc_t eps;
  bool write_residual;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    ce_chunk_rows_kernel(const ChunkRowParams<scalar_t, acc_t> p) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t C = p.C;
  const acc_t eps = p.eps;
  const acc_t eps_c = eps / static_cast<acc_t>(C);
  const bool smooth = eps != acc_t(0);
  const acc_t scale = p.aux[0];
  const acc_t cw_sum = p.aux[1];
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp; i < p.R; i += step) {
    scalar_t* zr = p.logits + i * C;
    const int64_t y = p.target[i];  // warp-uniform
    if (y != p.ignore_index) {
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "linear_cross_entropy: target class index out of range");
    }
    const bool active = y != p.ignore_index && y >= 0 && y < C;
    if (!active) {
      if (p.write_residual)
        for (int64_t c = lane; c < C; c += 32) zr[c] = static_cast<scalar_t>(0);
      if (lane == 0) p.loss_rows[i] = acc_t(0);
      continue;
    }
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t z = static_cast<acc_t>(zr[c]) + (p.bias != nullptr ? p.bias[c] : acc_t(0));
      m = z > m ? z : m;
    }
    m = warp_max(m);
    acc_t s = 0, sm = 0;
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t z = static_cast<acc_t>(zr[c]) + (p.bias != nullptr ? p.bias[c] : acc_t(0));
      s += ce_exp(z - m);
      if (smooth) sm += (p.cw != nullptr ? p.cw[c] : acc_t(1)) * (m - z);
    }
    s = warp_sum(s);
    if (smooth) sm = warp_sum(sm);
    const acc_t lse = m + ce_log(s);
    const acc_t wy = p.cw != nullptr ? p.cw[y] : acc_t(1);
    const acc_t zy = static_cast<acc_t>(zr[y]) + (p.bias != nullptr ? p.bias[y] : acc_t(0));
    acc_t loss_i = (acc_t(1) - eps) * wy * (lse - zy);
    if (smooth) loss_i += eps_c * ((lse - m) * cw_sum + sm);
    if (lane == 0) p.loss_rows[i] = loss_i;
    // Every lane has read zr[y] above; the shuffles make the warp converge before the writes.
    __syncwarp();
    if (p.write_residual) {
      const acc_t coef = p.row_scale != nullptr ? scale * p.row_scale[i] : scale;
      const acc_t a = coef * ((acc_t(1) - eps) * wy + eps_c * cw_sum);
      for (int64_t c = lane; c < C; c += 32) {
        const acc_t z = static_cast<acc_t>(zr[c]) + (p.bias != nullptr ? p.bias[c] : acc_t(0));
        acc_t r = a * ce_exp(z - lse);
        if (c == y) r -= coef * (acc_t(1) - eps) * wy;
        if (smooth) r -= coef * eps_c * (p.cw != nullptr ? p.cw[c] : acc_t(1));
        zr[c] = static_cast<scalar_t>(r);
      }
    }
  }
}

}  // namespace

void ce_rows_cuda(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                  const at::Tensor& class_weight, const at::Tensor& aux,
                  const at::Tensor& row_scale, at::Tensor& loss_rows, int64_t ignore_index,
                  double label_smoothing, bool write_residual) {
  const int64_t R = logits.size(0), C = logits.size(1);
  if (R == 0) return;
  TORCH_CHECK(logits.is_contiguous() && target.is_contiguous() && loss_rows.is_contiguous(),
              "ce_rows_cuda: contiguous chunk buffers expected");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t blocks = (R + kRowWarps - 1) / kRowWarps;
  if (blocks > sms * 8) blocks = sms * 8;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_rows_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ChunkRowParams<scalar_t, acc_t> p{};
    p.logits = logits.mutable_data_ptr<scalar_t>();
    p.bias = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    p.target = target.const_data_ptr<int64_t>();
    p.cw = class_weight.defined() ? class_weight.const_data_ptr<acc_t>() : nullptr;
    p.aux = aux.const_data_ptr<acc_t>();
    p.row_scale = row_scale.defined() ? row_scale.const_data_ptr<acc_t>() : nullptr;
    p.loss_rows = loss_rows.mutable_data_ptr<acc_t>();
    p.R = R;
    p.C = C;
    p.ignore_index = ignore_index;
    p.eps = static_cast<acc_t>(label_smoothing);
    p.write_residual = write_residual;
    ce_chunk_rows_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace manual_layers
