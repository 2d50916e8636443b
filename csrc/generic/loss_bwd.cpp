// _linear_loss_bwd: the backward of the fused losses (csrc/contracts/losses.h explains the split between
// forward and backward). Device-generic ATen code: the same function serves CPU and CUDA
// tensors, reads grad_output only on the device (no host synchronisation, so a training step
// can be captured in a CUDA graph), and writes each output once.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common.h"
#include "../contracts/losses.h"

namespace manual_layers {

// Few classes: dX by our kernels, which write each row of dX once from registers, with the
// acc_t residual (the GEMM needs it rounded to x's dtype first). CPU (csrc/cpu/kernels/losses.cpp,
// loss_dx_cpu), C <= 32: ATen's GEMM with K = C this small runs well below the copy rate. CUDA
// (csrc/cuda/losses/loss_dx.cu), C <= 16: cuBLAS ran this shape below the copy rate on an H100
// (the kernel has not been timed yet). Figures: docs/perf-notes-from-code.md. Otherwise, and
// where the CUDA kernel declines a shape (undefined result), the GEMM.
constexpr int64_t kSmallDxClasses = 32;
inline bool small_c(const at::Tensor& residual, const at::Tensor& weight) {
  return (residual.device().is_cpu() || residual.is_cuda()) &&
         weight.size(0) <= kSmallDxClasses &&
         residual.scalar_type() == at::toOpMathType(weight.scalar_type());
}

// dX = coef * residual W by our kernel, or an undefined tensor (then the caller's GEMM).
at::Tensor small_c_dx(const at::Tensor& residual, const at::Tensor& coef,
                      const at::Tensor& weight) {
  if (residual.device().is_cpu()) return loss_dx_cpu(residual, coef, weight);
#ifdef WITH_CUDA
  return loss_dx_cuda(residual, coef, weight);
#else
  return at::Tensor();
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_loss_bwd(
    const at::Tensor& grad_loss, const at::Tensor& residual, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
    int64_t reduction, bool need_x, bool need_weight, bool need_bias) {
  constexpr const char* op = "manual_layers._linear_loss_bwd";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be (C, D), got ", weight.sizes());
  const auto dt = weight.scalar_type();
  const auto acc = at::toOpMathType(dt);
  const int64_t C = weight.size(0), D = weight.size(1);
  // Each output that is not computed is its own empty tensor: outputs must not alias.
  auto none = [&] { return at::empty({0}, weight.options()); };
  at::Tensor gx = none(), gw = none(), gb = none();
  if (need_x || reduction == 0) {
    TORCH_CHECK(residual.dim() == 2 && residual.size(1) == C, op,
                ": residual must be (N, ", C, "), got ", residual.sizes());
  }
  if (reduction != 0) {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ",
                grad_loss.sizes());
    const at::Tensor g = grad_loss.reshape({}).to(acc);
    if (need_x) {
      const at::Tensor own = small_c(residual, weight) ? small_c_dx(residual, g, weight)
                                                       : at::Tensor();
      gx = own.defined() ? own : gemm::mm((residual * g).to(dt), weight);
    }
    if (need_weight) {
      TORCH_CHECK(grad_weight.sizes() == weight.sizes(), op, ": grad_weight must be ",
                  weight.sizes(), ", got ", grad_weight.sizes());
      gw = (grad_weight * g).to(dt);
    }
    if (need_bias) {
      TORCH_CHECK(grad_bias.dim() == 1 && grad_bias.size(0) == C, op, ": grad_bias must be (",
                  C, ",), got ", grad_bias.sizes());
      gb = (grad_bias * g).to(dt);
    }
    return {gx, gw, gb};
  }
  const int64_t N = residual.size(0);
  TORCH_CHECK(grad_loss.numel() == N, op, ": grad_loss must have ", N, " elements, got shape ",
              grad_loss.sizes());
  // G = residual * grad_loss in acc_t (the bias gradient sums it at full precision); the
  // GEMMs run in x's dtype (fp32 accumulation inside for 16-bit types).
  const at::Tensor gl = grad_loss.reshape({N}).to(acc);
  const at::Tensor own = need_x && small_c(residual, weight) ? small_c_dx(residual, gl, weight)
                                                             : at::Tensor();
  const bool own_dx = own.defined();
  if (own_dx) gx = own;
  if (!need_weight && !need_bias && (own_dx || !need_x)) return {gx, gw, gb};
  const at::Tensor G = residual.to(acc) * gl.reshape({N, 1});
  const at::Tensor Gd = G.to(dt);
  if (need_x && !own_dx) gx = gemm::mm(Gd, weight);
  if (need_weight) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == N && x.size(1) == D, op, ": x must be (", N, ", ",
                D, "), got ", x.sizes());
    gw = gemm::mm(Gd.t(), x);
  }
  if (need_bias) gb = G.sum(0).to(dt);
  return {gx, gw, gb};
}

}  // namespace manual_layers

TORCH_LIBRARY_IMPL(manual_layers, CPU, m) {
  m.impl("_linear_loss_bwd", &manual_layers::linear_loss_bwd);
}
TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) {
  m.impl("_linear_loss_bwd", &manual_layers::linear_loss_bwd);
}
