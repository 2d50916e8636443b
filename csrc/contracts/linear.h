// Fused linear layer y = act(x W^T + b): declarations shared by the CPU and CUDA kernels.
// Schemas live in csrc/ops.cpp; shapes are those of the flattened 2-D problem:
//   x (N, K), weight (M, K), bias (M,) or None, y (N, M).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace manual_layers {

// linear_fwd(x, weight, bias, activation, save_pre) -> (out, pre)
//   out: act(x W^T + b), (N, M), x's dtype, contiguous.
//   pre: the pre-activation x W^T + b (N, M) when save_pre and the activation's derivative
//        needs it (gelu, gelu_tanh, silu); otherwise an empty tensor of shape (0,).
std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias,
                                                  c10::string_view activation, bool save_pre);

// linear_bwd(grad_out, x, weight, saved, activation, need_x, need_weight, need_bias)
//   -> (grad_x (N, K), grad_weight (M, K), grad_bias (M,))
//   saved: pre for gelu/gelu_tanh/silu, out for relu/sigmoid/tanh/softmax, ignored (pass an
//   empty tensor) for none. A gradient that is not needed comes back as an empty (0,) tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& saved, c10::string_view activation, bool need_x, bool need_weight,
    bool need_bias);

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias,
                                                   c10::string_view activation, bool save_pre);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& saved, c10::string_view activation, bool need_x, bool need_weight,
    bool need_bias);
#endif

}  // namespace manual_layers
