// manual_layers.MLP: Linear -> activation -> Linear. Schemas in csrc/ops.cpp; the public op
// mlp and its autograd in csrc/autograd.cpp (forward: _linear_fwd twice; backward: _mlp_bwd).
// Shapes (flattened): x (N, K), w1 (H, K), b1 (H,), w2 (O, H), b2 (O,), h (N, H), y (N, O).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>
#include <utility>

#include "../common.h"

namespace manual_layers {

// (grad_x, grad_w1, grad_b1, grad_w2, grad_b2), x's dtype; a gradient not needed is an empty
// (0,) tensor.
using MlpGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// _mlp_bwd(grad_out, x, w1, w2, h, saved, activation, need_x, need_w1, need_b1, need_w2,
//          need_b2): saved is the pre-activation for gelu/gelu_tanh/silu, h for
// relu/sigmoid/tanh, ignored for none (csrc/common.h saved_for).
MlpGrads mlp_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                     const at::Tensor& w2, const at::Tensor& h, const at::Tensor& saved,
                     c10::string_view activation, bool need_x, bool need_w1, bool need_b1,
                     bool need_w2, bool need_b2);
// Device-generic composition of _linear_bwd (the CUDA kernel of _mlp_bwd).
MlpGrads mlp_bwd_composed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                          const at::Tensor& w2, const at::Tensor& h, const at::Tensor& saved,
                          c10::string_view activation, bool need_x, bool need_w1, bool need_b1,
                          bool need_w2, bool need_b2);

#ifdef WITH_CUDA
// CUDA (csrc/cuda/linear/linear.cu), with MANUAL_LAYERS_CUTLASS=1 on an sm_90 GPU, 16-bit: the first
// layer's activation gradient G1 = (grad_out w2) * act'(saved) (N, H) and, when need_b1, its
// bias gradient (H,) from one CUTLASS kernel (csrc/cuda/experimental/linear_sm90.h: mlp_dgrad_act).
// Undefined tensors when that path does not apply (mlp_bwd_composed then composes _linear_bwd).
std::pair<at::Tensor, at::Tensor> mlp_dgrad_act_cuda(const at::Tensor& grad_out,
                                                     const at::Tensor& w2,
                                                     const at::Tensor& saved, Act act,
                                                     bool need_b1);
#endif

// The shape checks both _mlp_bwd kernels make (memory safety; the public op checked the rest).
inline void check_mlp_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w1,
                   const at::Tensor& w2, const at::Tensor& h, const at::Tensor& saved, Act act) {
  constexpr const char* op = "manual_layers._mlp_bwd";
  check_linear_args(op, x, w1, c10::nullopt);
  check_linear_args(op, h, w2, c10::nullopt);
  const int64_t N = x.size(0), H = w1.size(0), O = w2.size(0);
  TORCH_CHECK(h.size(0) == N && h.size(1) == H, op, ": h must be (", N, ", ", H, "), got ",
              h.sizes());
  TORCH_CHECK(g.dim() == 2 && g.size(0) == N && g.size(1) == O, op, ": grad_out must be (", N,
              ", ", O, "), got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), op, ": grad_out dtype ", g.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  if (act != Act::None) {
    TORCH_CHECK(saved.sizes() == h.sizes(), op, ": saved tensor must be ", h.sizes(), ", got ",
                saved.sizes());
  }
}

}  // namespace manual_layers
