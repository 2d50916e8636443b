// CUDA logistic-regression losses, the host side of _linear_bce_fwd and _linear_ce_fwd
// (csrc/contracts/losses.h is the contract): argument checks, dtype conversion (Prepared), the
// empty batch, the choice of path, and the TORCH_LIBRARY_IMPL registration. The kernels are in one
// file per path (common.cuh describes the op path file by file):
//
// 1. Fused binary path (bce_fused.cu): C == 1, reduction mean/sum,
//    D <= 8192 fp32 / 8192 fp16,bf16 / 2048 fp64 (bce_fused_config). X is read exactly once;
//    per-block partials of loss, grad_w and grad_b, summed in a fixed order by finalize_kernel.
//
// 1b. Fused multinomial path (ce_fused.cu): reduction mean/sum, C <= 32, D <= 1024
//    (D <= 512 when C > 16), W staged in shared memory as acc_t with
//    C * round_up(D, 128) * sizeof(acc_t) <= 48 KB, all dynamic shared memory <= 96 KB (and
//    the device's opt-in limit); fp64 only for C <= 16, D <= 512 (ce_fused_config). X is read
//    exactly once and no (N, C) buffer exists.
//
// 1c. Tensor-core multinomial path (ce_tc.cu): path 1b's contract for 16-bit and fp32
//    x (3xTF32), reduction mean/sum, D % 8 == 0, C <= 64 and D up to 1024 (16-bit, C <= 16;
//    ce_tc_shape_ok in csrc/contracts/losses.h has the rest), sm_80+, and the shared memory for two
//    tiles of X (ce_tc_config). Tried before 1b; MANUAL_LAYERS_CE_TC=0 turns it off. Its
//    cluster instances (opt-in, MANUAL_LAYERS_CE_CLUSTER=1; ce_tc_cluster_shape_ok) take
//    33 <= C <= 256 with D up to 512 on sm_90a: clusters of ceil(C / 32) blocks.
//
// 2. GEMM path (gemm_path.cu), everything else: reduction none, binary with larger D,
//    multinomial outside the limits of 1b. logits = x W^T through at::mm, a row kernel of our
//    own (loss terms and the (N, C) acc_t residual), then grad_w = R^T x through at::mm and
//    grad_b = R.sum(0). Reads X twice when grad_w is needed and holds an (N, C) buffer.
//
// Targets: an out-of-range class index (not ignore_index) raises a device-side assert
// (CUDA_KERNEL_ASSERT, as torch's cross_entropy does) in both multinomial paths; should
// device asserts be compiled out, such a row contributes nothing (no loss, no gradient, not
// in the mean denominator) and is never used to index memory. Mean denominator of cross
// entropy: sum over non-ignored rows of class_weight[target] (1 without weights), computed
// on the device by ce_den_partial_kernel (per-block partials, summed in a fixed order by
// every consumer), so no host sync. N == 0 is handled here without launching kernels.
#include <ATen/Dispatch.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../../checks.h"
#include "common.cuh"

namespace manual_layers {
namespace cuda_logreg {

// Outputs for N == 0 (no kernel launches): torch gives NaN for mean, 0 for sum.
LossOut empty_batch(const at::Tensor& x, int64_t C, int64_t D, int64_t reduction, bool need_x,
                    bool need_w, bool need_b) {
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  if (reduction == kNone) {
    const bool any = need_x || need_w || need_b;
    return {at::empty({0}, acc_opts), empty0(acc_opts), empty0(acc_opts),
            any ? at::empty({0, C}, acc_opts) : empty0(acc_opts)};
  }
  at::Tensor loss = reduction == kMean
                        ? at::full({}, std::numeric_limits<double>::quiet_NaN(), acc_opts)
                        : at::zeros({}, acc_opts);
  return {loss, need_w ? at::zeros({C, D}, acc_opts) : empty0(acc_opts),
          need_b ? at::zeros({C}, acc_opts) : empty0(acc_opts),
          need_x ? at::empty({0, C}, acc_opts) : empty0(acc_opts)};
}

// The checks and the preparation both ops share (their own arguments: csrc/checks.h).
Prepared prepare_common(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, int64_t reduction) {
  check_linear_args(op, x, weight, bias);
  check_reduction(reduction);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  Prepared q;
  q.x = x.contiguous();
  q.weight = weight.contiguous();
  q.N = x.size(0);
  q.D = x.size(1);
  q.C = weight.size(0);
  const auto acc = acc_type_of(x.scalar_type());
  if (bias.has_value() && bias->defined()) q.bias_acc = bias->to(acc).contiguous();
  return q;
}

}  // namespace cuda_logreg

LossOut linear_bce_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& pos_weight,
                            const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                            bool need_x, bool need_weight, bool need_bias) {
  using namespace cuda_logreg;
  c10::cuda::CUDAGuard guard(x.device());
  Prepared q = prepare_common(kBceKernelOp, x, weight, bias, reduction);
  check_bce_kernel_args(kBceKernelOp, x, weight, target, pos_weight, sample_weight);
  const auto acc = acc_type_of(x.scalar_type());
  q.ftarget = target.to(x.scalar_type()).contiguous();
  if (has(pos_weight)) q.pw_acc = pos_weight->reshape({1}).to(acc).contiguous();
  if (has(sample_weight)) q.sw = sample_weight->to(x.scalar_type()).contiguous();
  if (q.N == 0) return empty_batch(x, 1, q.D, reduction, need_x, need_weight, need_bias);

  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "linear_bce_fwd_cuda", [&]() -> LossOut {
        int chunks = 1, wpr = 1;
        if (reduction != kNone && bce_fused_config<scalar_t>(q.D, &chunks, &wpr)) {
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
  using namespace cuda_logreg;
  c10::cuda::CUDAGuard guard(x.device());
  Prepared q = prepare_common(kCeKernelOp, x, weight, bias, reduction);
  check_ce_kernel_args(kCeKernelOp, x, weight, target, class_weight, label_smoothing);
  const auto acc = acc_type_of(x.scalar_type());
  q.itarget = target.contiguous();
  if (has(class_weight)) q.cw_acc = class_weight->to(acc).contiguous();
  if (q.N == 0) return empty_batch(x, q.C, q.D, reduction, need_x, need_weight, need_bias);

  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "linear_ce_fwd_cuda", [&]() -> LossOut {
        if constexpr (!std::is_same_v<scalar_t, double>) {
          CeTcConfig tc;
          if (reduction != kNone && ce_tc_config<scalar_t>(q.C, q.D, &tc)) {
            return ce_tc_path<scalar_t>(q, tc, ignore_index, label_smoothing, reduction, need_x,
                                        need_weight, need_bias);
          }
        }
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
