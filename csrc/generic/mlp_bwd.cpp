// _mlp_bwd on CUDA (and any device but the CPU): the composition of the existing private op
// _linear_bwd, twice: the second layer with activation none (dH = g W2, dW2, db2), then the
// first layer with the activation (cuBLASLt epilogues where csrc/cuda/linear/linear.cu uses them).
// With MANUAL_LAYERS_CUTLASS=1 on an sm_90 GPU (16-bit, hidden and out multiples of 8) the
// activation gradient and the first bias gradient come out of the dH GEMM's epilogue instead
// (mlp_dgrad_act_cuda): dH is never written, and no separate pass reads it.
// Host code only, ISA-neutral; in a CPU-only build _linear_bwd's CUDA stub raises the "built
// without CUDA" error. The CPU kernel is csrc/cpu/kernels/mlp.cpp (per ISA, csrc/cpu/runtime/dispatch.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

#include "../common.h"
#include "../contracts/mlp.h"

namespace manual_layers {
namespace {
inline at::Tensor none_like(const at::Tensor& x) { return at::empty({0}, x.options()); }
}  // namespace

// Any device: two _linear_bwd calls (correct and simple; the CUDA path).
MlpGrads mlp_bwd_composed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                          const at::Tensor& w2, const at::Tensor& h, const at::Tensor& saved,
                          c10::string_view activation, bool need_x, bool need_w1, bool need_b1,
                          bool need_w2, bool need_b2) {
  using LinearBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      c10::string_view, bool, bool, bool);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("manual_layers::_linear_bwd", "")
                             .typed<LinearBwdSig>();
  const Act act = parse_activation(std::string(activation));
  check_mlp_bwd(grad_out, x, w1, w2, h, saved, act);
  const bool first = need_x || need_w1 || need_b1;
  const at::Tensor empty = at::empty({0}, x.options());
#ifdef WITH_CUDA
  if (first && act != Act::None && act != Act::Softmax && grad_out.is_cuda()) {
    auto [G1, fused_gb1] = mlp_dgrad_act_cuda(grad_out, w2, saved, act, need_b1);
    if (G1.defined()) {
      at::Tensor gx = none_like(x), gw1 = none_like(x), gw2 = none_like(x), gb2 = none_like(x);
      if (need_w2 || need_b2) {
        std::tie(std::ignore, gw2, gb2) =
            op.call(grad_out, h, w2, empty, "none", false, need_w2, need_b2);
      }
      if (need_x || need_w1) {
        std::tie(gx, gw1, std::ignore) = op.call(G1, x, w1, empty, "none", need_x, need_w1, false);
      }
      return {need_x ? gx : none_like(x), need_w1 ? gw1 : none_like(x),
              need_b1 ? fused_gb1 : none_like(x), need_w2 ? gw2 : none_like(x),
              need_b2 ? gb2 : none_like(x)};
    }
  }
#endif
  auto [dh, gw2, gb2] = op.call(grad_out, h, w2, empty, "none", first, need_w2, need_b2);
  at::Tensor gx = none_like(x), gw1 = none_like(x), gb1 = none_like(x);
  if (first) {
    std::tie(gx, gw1, gb1) = op.call(dh, x, w1, act != Act::None ? saved : empty, activation,
                                     need_x, need_w1, need_b1);
  }
  return {need_x ? gx : none_like(x), need_w1 ? gw1 : none_like(x), need_b1 ? gb1 : none_like(x),
          need_w2 ? gw2 : none_like(x), need_b2 ? gb2 : none_like(x)};
}

}  // namespace manual_layers

TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) {
  m.impl("_mlp_bwd", &manual_layers::mlp_bwd_composed);
}
