// CUDA row pass of the chunked linear + cross entropy (csrc/generic/ce_chunked.cpp holds the
// contract and the device-generic chunk loop with its ATen GEMMs; this file is only its CUDA entry,
// ce_rows_cuda). The kernel is the cross-entropy row kernel of the GEMM path (ce_rows_kernel in
// gemm_path.cu, CeRowsParams in common.cuh), so both compute the same loss and residual: a warp per
// row (a group of lanes for C <= 16), lanes over classes, bias added in acc_t, stable log-softmax,
// the loss term of csrc/contracts/losses.h, and the residual written over the logits chunk in
// place, times aux[0] (1/den for mean, 1 otherwise; computed on the device by the driver: no host
// sync) and the row's grad_output for the backward of reduction none. The sum of the class weights
// (aux[1] on the CPU) is taken by the kernel itself, per row in a fixed order. Targets out of range
// (and not ignore_index) raise a device-side assert; were asserts compiled out, such a row is
// treated as ignored and never indexes memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "common.cuh"

namespace manual_layers {

void ce_rows_cuda(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                  const at::Tensor& class_weight, const at::Tensor& aux,
                  const at::Tensor& row_scale, at::Tensor& loss_rows, int64_t ignore_index,
                  double label_smoothing, bool write_residual) {
  using cuda_common::opt_data;
  const int64_t R = logits.size(0), C = logits.size(1);
  if (R == 0) return;
  TORCH_CHECK(logits.is_contiguous() && target.is_contiguous() && loss_rows.is_contiguous(),
              "ce_rows_cuda: contiguous chunk buffers expected");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t grid = cuda_common::grid_for(R, cuda_logreg::kWarps);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_rows_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* L = logits.mutable_data_ptr<scalar_t>();
    cuda_logreg::CeRowsParams<scalar_t, scalar_t> p{};
    p.logits = L;
    p.res = write_residual ? L : nullptr;  // in place
    p.loss_out = loss_rows.mutable_data_ptr<acc_t>();
    p.bias = opt_data<acc_t>(bias);
    p.target = target.const_data_ptr<int64_t>();
    p.cw = opt_data<acc_t>(class_weight);
    p.res_scale = aux.const_data_ptr<acc_t>();  // aux[0]
    p.row_scale = opt_data<acc_t>(row_scale);
    p.host_den = acc_t(1);  // unused: res_scale is set
    p.N = R;
    p.C = C;
    p.ignore_index = ignore_index;
    p.eps = static_cast<acc_t>(label_smoothing);
    cuda_logreg::launch_ce_rows(p, grid, stream);
  });
}

}  // namespace manual_layers
