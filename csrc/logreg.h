// Fused logistic-regression losses: declarations shared by the CPU and CUDA kernels.
// Schemas live in csrc/ops.cpp. Shapes (flattened): x (N, D), weight (C, D), bias (C,) or
// None; binary: C == 1, target (N,) floats in [0, 1] of x's dtype; multinomial: target (N,)
// int64 class indices.
//
// Both forward ops return (loss, grad_x, grad_weight, grad_bias, residual):
//  - reduction mean (1) or sum (2): loss is a 0-d tensor of x's dtype; the gradients of the
//    loss with respect to x (N, D), weight (C, D) and bias (C,) are computed in the same
//    single pass over x (each only when its need_* flag is set, else an empty (0,) tensor);
//    residual is an empty (0,) tensor. Backward scales them by grad_output.
//  - reduction none (0): loss is (N,); the gradients are empty (0,) tensors; residual is
//    dloss_i/dlogits_i, (N, C) of x's dtype, when any need_* flag is set (else empty), and
//    backward calls linear_loss_bwd with grad_output.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace manual_layers {

using LossOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

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

// Backward of reduction="none": G = residual * grad_loss[:, None];
// returns (G W, G^T x, G.sum(0)), each only where needed (else an empty (0,) tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_loss_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& residual, const at::Tensor& x,
    const at::Tensor& weight, bool need_x, bool need_weight, bool need_bias);

#ifdef WITH_CUDA
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
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_loss_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& residual, const at::Tensor& x,
    const at::Tensor& weight, bool need_x, bool need_weight, bool need_bias);
#endif

}  // namespace manual_layers
