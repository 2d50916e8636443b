// Fused logistic-regression losses: declarations shared by the CPU and CUDA kernels.
// Schemas live in csrc/ops.cpp; the public ops (linear_bce, linear_ce) and their autograd are in
// csrc/autograd.cpp. Shapes (flattened): x (N, D), weight (C, D), bias (C,) or None; binary:
// C == 1, target (N,) floats in [0, 1]; multinomial: target (N,) int64 class indices.
// acc_t below is float for float/bfloat16/half x and double for double x.
//
// Both forward ops return (loss, grad_weight, grad_bias, residual):
//  - reduction mean (1) or sum (2): loss is a 0-d acc_t tensor; grad_weight (C, D) and
//    grad_bias (C,) are the acc_t gradients of the loss for grad_output 1, computed in the same
//    single pass over x that computes the loss (each only when its need_* flag is set, else an
//    empty (0,) tensor); residual is dloss/dlogits (N, C) acc_t, already divided by the mean's
//    denominator, when need_x (else empty).
//  - reduction none (0): loss is (N,) acc_t; grad_weight and grad_bias are empty; residual is
//    dloss_i/dlogits_i (N, C) acc_t when any need_* flag is set (else empty).
//
// Why this split (issue #6: no host synchronisation, X read once, no extra pass over dX):
// backward gets grad_output as a device tensor and must not read it on the host. The weight and
// bias gradients are small (C x D), so forward computes them in its single pass over X and
// backward scales them by grad_output on the device. dX is as large as X, so forward does not
// write it (it would have to be scaled in backward: a second pass over N x D); instead forward
// keeps the residual, N x C (tiny next to dX), and backward writes dX = (grad_output * residual)
// W once, in its one pass. X is still read once, dX written once, and nothing waits on the host.
// acc_t residual and gradients keep full accuracy for 16-bit x until the final rounding.
//
// _linear_loss_bwd (csrc/generic/loss_bwd.cpp, device-generic ATen code, no host sync) is the backward
// of both: mean/sum: dX = (g r) W, grad_W = g grad_weight, grad_b = g grad_bias; none:
// G = r * g[:, None], dX = G W, grad_W = G^T x, grad_b = G.sum(0) (X read a second time: the
// per-row grad_output is only known in backward). Outputs in x's dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdlib>
#include <string>
#include <tuple>

namespace manual_layers {

using LossOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// loss_i = sw_i * [(1 - y_i) z_i + (1 + (pw - 1) y_i) * softplus(-z_i)],  z_i = x_i . w + b
// (F.binary_cross_entropy_with_logits with weight=sample_weight, pos_weight=pos_weight).
// pos_weight: one-element tensor or None; sample_weight: (N,) or None. mean divides by N.
LossOut linear_bce_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                           const c10::optional<at::Tensor>& pos_weight,
                           const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                           bool need_x, bool need_weight, bool need_bias);

// F.cross_entropy(x W^T + b, target, weight=class_weight, ignore_index, label_smoothing,
// reduction): with eps = label_smoothing, w = class_weight (ones if None), row i not ignored:
//   loss_i = (1 - eps) w_{y_i} (-log p_{i,y_i}) + (eps / C) sum_c w_c (-log p_{i,c})
// ignored rows contribute 0; mean divides by sum_{i not ignored} w_{y_i}.
LossOut linear_ce_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                          const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                          double label_smoothing, int64_t reduction, bool need_x,
                          bool need_weight, bool need_bias);

// The backward of both losses (see above); grad_weight/grad_bias: the forward's (mean/sum) or
// empty (none). Device-generic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_loss_bwd(
    const at::Tensor& grad_loss, const at::Tensor& residual, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
    int64_t reduction, bool need_x, bool need_weight, bool need_bias);

// CPU, small C (csrc/generic/loss_bwd.cpp decides): dX = coef * residual W, residual (N, C) acc_t,
// coef a one-element or (N,) acc_t tensor (grad_output), weight (C, D); dX (N, D) in weight's
// dtype.
at::Tensor loss_dx_cpu(const at::Tensor& residual, const at::Tensor& coef,
                       const at::Tensor& weight);

// The chunked cross entropy (csrc/generic/ce_chunked.cpp) bounds each R x C logits chunk by
// kCeChunkBytes: large enough that the GEMMs are not skinny (R = 262 rows at C = 32000 fp32;
// 8 MiB would give R < 64), small next to the N x C logits it replaces (a choice, not swept by
// measurement). Its CPU row pass (csrc/cpu/kernels/ce_rows.cpp, per ISA) on one chunk: logits (R, C) in
// x's dtype (fp32 for fp16 widened by gemm::widens), contiguous, overwritten with the residual
// when write_residual; bias / class_weight (C,) acc_t or undefined; aux (2,) acc_t = [residual
// scale, sum of class weights]; row_scale (R,) acc_t or undefined (multiplies each row's
// residual); loss_rows (R,) acc_t, the unscaled per-row losses; bias_grad null or (C,) acc_t, to
// which the acc_t residual's column sums are added (per fixed block of rows, in block order).
constexpr int64_t kCeChunkBytes = int64_t(32) << 20;
void ce_rows_cpu(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                 const at::Tensor& class_weight, const at::Tensor& aux, const at::Tensor& row_scale,
                 at::Tensor& loss_rows, int64_t ignore_index, double label_smoothing,
                 bool write_residual, at::Tensor* bias_grad);

// The shapes the CUDA tensor-core cross-entropy kernel covers (csrc/cuda/losses/ce_tc.cu, for
// reduction mean/sum): D a multiple of 8; 16-bit x with C <= 16 and D <= 1024, C <= 32 and
// D <= 512, or C <= 64 and D <= 256 (its dW accumulators, C x D / 256 floats per thread, live
// in registers); fp32 x (3xTF32: fp32 accuracy) with half those D (its X tiles take twice the
// shared memory). It also needs sm_80 or newer and the shared memory, which that file checks.
// Device-agnostic, so that the path choice in csrc/autograd.cpp (ce_use_chunked) can keep these
// shapes on the single pass.
// MANUAL_LAYERS_CE_TC=0 turns the kernel off (the CUDA-core kernel or the chunked path run).
inline bool ce_tc_enabled() {
  const char* env = std::getenv("MANUAL_LAYERS_CE_TC");
  return env == nullptr || std::string(env) != "0";
}
// The cluster instances of that kernel (sm_90a: a device of compute capability 9.0 and a build
// whose TORCH_CUDA_ARCH_LIST holds 9.0) take the larger class counts: ceil(C / 32) blocks of a
// thread-block cluster each own 32 classes of every row and receive the same tiles of X through
// one multicast copy, so X is still read once; 33 <= C <= 256, D a multiple of 8 up to 512
// (fp32: 256), for the shapes ce_tc_shape_ok leaves out. Not yet run on a GPU: off unless
// MANUAL_LAYERS_CE_CLUSTER=1 (README, "Known limitations").
inline bool ce_tc_cluster_enabled() {
  const char* env = std::getenv("MANUAL_LAYERS_CE_CLUSTER");
  return env != nullptr && std::string(env) == "1";
}
// The largest D of the one-block kernel (C <= 16): 1024 for 16-bit x, 512 for fp32 (whose X
// tiles take twice the shared memory); 0 for other dtypes.
inline int64_t ce_tc_dmax(at::ScalarType dtype) {
  if (dtype == at::kHalf || dtype == at::kBFloat16) return 1024;
  return dtype == at::kFloat ? 512 : 0;
}
inline bool ce_tc_shape_ok(at::ScalarType dtype, int64_t C, int64_t D) {
  const int64_t dmax = ce_tc_dmax(dtype);
  if (dmax == 0 || D < 8 || D % 8 != 0 || C < 1 || C > 64) return false;
  return D <= (C <= 16 ? dmax : (C <= 32 ? dmax / 2 : dmax / 4));
}
inline bool ce_tc_cluster_shape_ok(at::ScalarType dtype, int64_t C, int64_t D) {
  // Each block of a cluster is the one-block kernel's C <= 32 instance: half the largest D.
  const int64_t dmax = ce_tc_dmax(dtype) / 2;
  return dmax > 0 && C > 32 && C <= 256 && D >= 8 && D % 8 == 0 && D <= dmax &&
         !ce_tc_shape_ok(dtype, C, D);
}

#ifdef WITH_CUDA
// Whether the cluster instances of the tensor-core cross entropy can run on CUDA device
// `device`: switched on (ce_tc_cluster_enabled), the build holds sm_90a code and the device is
// of compute capability 9.0 (csrc/cuda/losses/ce_tc.cu).
bool ce_tc_cluster_device_ok(int device);
// CUDA, C <= 16 (csrc/cuda/losses/loss_dx.cu): loss_dx_cpu's contract; an undefined tensor when the
// shape or W's alignment does not suit the kernel (the caller then runs the GEMM).
at::Tensor loss_dx_cuda(const at::Tensor& residual, const at::Tensor& coef,
                        const at::Tensor& weight);
LossOut linear_bce_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& pos_weight,
                            const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                            bool need_x, bool need_weight, bool need_bias);
LossOut linear_ce_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                           const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                           double label_smoothing, int64_t reduction, bool need_x,
                           bool need_weight, bool need_bias);
#endif

}  // namespace manual_layers
