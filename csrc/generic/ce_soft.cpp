// Chunked linear + cross entropy with probability targets (soft labels): the ops
// _linear_ce_soft_fwd / _linear_ce_soft_bwd, whose contract is at the top of csrc/generic/ce_chunked.cpp.
// They run the chunk driver of the class-index ops (run_chunks, csrc/contracts/ce_chunked.h: a GEMM per
// chunk of rows, no N x C logits beyond one chunk) with their own row pass:
//  - CPU: ce_soft_rows_cpu (csrc/cpu/kernels/ce_rows.cpp, compiled per ISA: at::vec, at::parallel_for
//    over rows, acc_t accumulation, the bias gradient summed per fixed block of rows);
//  - CUDA: ce_soft_rows_aten below, a composition of ATen ops on each chunk (log_softmax, sums),
//    not a CUDA kernel of ours. No GPU has run or timed a CUDA kernel for these targets yet, so
//    none is written; this composition is device-generic and is tested on CPU tensors through
//    MANUAL_LAYERS_CE_SOFT_ROWS=aten (read per call), which makes CPU tensors take it too.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../contracts/ce_chunked.h"
#include "../checks.h"
#include "../common.h"

namespace manual_layers {

// The ATen row pass (csrc/contracts/ce_chunked.h has its contract). It makes a few chunk-sized acc_t
// temporaries (the widened logits, log-probabilities, weighted targets), bounded like the chunk.
// The bias gradient is summed by ATen from the acc_t residual, before it is rounded to the logits'
// dtype.
void ce_soft_rows_aten(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                       const at::Tensor& class_weight, double scale, const at::Tensor& row_scale,
                       at::Tensor& loss_rows, double label_smoothing, bool write_residual,
                       at::Tensor* bias_grad) {
  const auto acc = loss_rows.scalar_type();
  const int64_t C = logits.size(1);
  at::Tensor z = logits.to(acc);
  if (bias.defined()) z = z + bias;
  at::Tensor logp = at::log_softmax(z, 1);
  at::Tensor wq = target.to(acc);  // w_c q'_ic
  if (label_smoothing != 0.0) wq = wq * (1.0 - label_smoothing) + label_smoothing / C;
  if (class_weight.defined()) wq = wq * class_weight;
  loss_rows.copy_((wq * logp).sum(1).neg_());
  if (!write_residual) return;
  // residual = coef (S softmax - wq), S = sum_c wq_c; logp's memory becomes the residual
  at::Tensor res = logp.exp_().mul_(wq.sum(1, /*keepdim=*/true)).sub_(wq);
  if (row_scale.defined()) {
    res.mul_(row_scale.unsqueeze(1) * scale);
  } else if (scale != 1.0) {
    res.mul_(scale);
  }
  if (bias_grad != nullptr) bias_grad->add_(res.sum(0));
  logits.copy_(res);
}

namespace {

// MANUAL_LAYERS_CE_SOFT_ROWS=aten: CPU tensors take the ATen row pass too (tests).
bool aten_rows_forced() {
  const char* env = std::getenv("MANUAL_LAYERS_CE_SOFT_ROWS");
  return env != nullptr && std::strcmp(env, "aten") == 0;
}

void check_soft(const char* op, const at::Tensor& x, const at::Tensor& weight,
                const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                const c10::optional<at::Tensor>& class_weight, double label_smoothing) {
  check_linear_args(op, x, weight, bias);
  const int64_t N = x.size(0), C = weight.size(0);
  TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == C, op,
              ": target of class probabilities must have shape (", N, ", ", C,
              ") (x's rows by weight's classes), got ", target.sizes());
  TORCH_CHECK(at::isFloatingType(target.scalar_type()), op,
              ": target of class probabilities must be floating, got ", target.scalar_type());
  check_same_device(op, "target", target, x);
  check_class_weight(op, class_weight, x, C);
  // torch's rule: only a positive label_smoothing is applied, and it must be at most 1.
  TORCH_CHECK(!(label_smoothing > 1.0), op,
              ": label_smoothing must be between 0.0 and 1.0, got ", label_smoothing);
#ifndef WITH_CUDA
  if (x.is_cuda()) ce_no_cuda_build();
#endif
}

// grad_rows defined: the backward of reduction none (residual_i *= grad_rows_i).
ChunkedOut run_soft(const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                    const c10::optional<at::Tensor>& class_weight, double label_smoothing,
                    int64_t reduction, const at::Tensor& grad_rows, bool need_x,
                    bool need_weight, bool need_bias) {
  const int64_t N = x.size(0);
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor b_acc = bias.has_value() && bias->defined() ? bias->to(acc).contiguous()
                                                               : at::Tensor();
  const at::Tensor cw_acc = class_weight.has_value() && class_weight->defined()
                                ? class_weight->to(acc).contiguous()
                                : at::Tensor();
  const double eps = label_smoothing > 0.0 ? label_smoothing : 0.0;
  // mean divides by N (torch: not by a sum of class weights); N is a host value, no sync.
  const double scale = reduction == kMean && !grad_rows.defined() && N > 0 ? 1.0 / N : 1.0;
  const bool aten = !x.is_cpu() || aten_rows_forced();
  auto rows = [&](at::Tensor& L, int64_t s, const at::Tensor& rs, at::Tensor& lrows,
                  bool write_residual, at::Tensor* bias_grad) {
    at::Tensor q = target.narrow(0, s, L.size(0));
    if (aten) {
      ce_soft_rows_aten(L, b_acc, q, cw_acc, scale, rs, lrows, eps, write_residual, bias_grad);
      return;
    }
    // The CPU kernel reads the target in acc_t or in the logits' dtype, row-major: anything
    // else is converted, one chunk at a time.
    const auto qt = q.scalar_type();
    if (!q.is_contiguous() || (qt != acc && qt != L.scalar_type()))
      q = q.to(acc, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
    ce_soft_rows_cpu(L, b_acc, q, cw_acc, scale, rs, lrows, eps, write_residual, bias_grad);
  };
  return run_chunks(x, weight, reduction, grad_rows, need_x, need_weight, need_bias, rows);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_soft_fwd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& class_weight,
    double label_smoothing, int64_t reduction, bool need_x, bool need_weight, bool need_bias) {
  constexpr const char* op = "manual_layers._linear_ce_soft_fwd";
  check_soft(op, x, weight, bias, target, class_weight, label_smoothing);
  check_reduction(reduction);
  ChunkedOut c = run_soft(x, weight, bias, target, class_weight, label_smoothing, reduction,
                          at::Tensor(), need_x, need_weight, need_bias);
  if (reduction == kNone) {
    auto e = [&] { return at::empty({0}, c.loss_rows.options()); };
    return {c.loss_rows, e(), e(), at::empty({0}, x.options())};
  }
  const at::Tensor den = at::full({}, static_cast<double>(x.size(0)),
                                  x.options().dtype(at::kDouble));
  return {reduce_chunk_losses(c.loss_rows, reduction, den), c.gw, c.gb, c.gx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_soft_bwd(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    const c10::optional<at::Tensor>& class_weight, double label_smoothing, bool need_x,
    bool need_weight, bool need_bias) {
  constexpr const char* op = "manual_layers._linear_ce_soft_bwd";
  check_soft(op, x, weight, bias, target, class_weight, label_smoothing);
  TORCH_CHECK(grad_loss.numel() == x.size(0), op, ": grad_loss must have ", x.size(0),
              " elements (one per row), got shape ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.device() == x.device(), op, ": grad_loss is on ", grad_loss.device(),
              " but x is on ", x.device());
  ChunkedOut c = run_soft(x, weight, bias, target, class_weight, label_smoothing, kNone,
                          grad_loss, need_x, need_weight, need_bias);
  const auto dt = x.scalar_type();
  auto e = [&] { return at::empty({0}, x.options()); };
  return {need_x ? c.gx : e(), need_weight ? c.gw.to(dt) : e(), need_bias ? c.gb.to(dt) : e()};
}

}  // namespace manual_layers

// One driver for both devices (the row pass is chosen by x's device); in a CPU-only build CUDA
// tensors get the "built without CUDA" error (check_soft).
TORCH_LIBRARY_IMPL(manual_layers, CPU, m) {
  m.impl("_linear_ce_soft_fwd", &manual_layers::linear_ce_soft_fwd);
  m.impl("_linear_ce_soft_bwd", &manual_layers::linear_ce_soft_bwd);
}
TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) {
  m.impl("_linear_ce_soft_fwd", &manual_layers::linear_ce_soft_fwd);
  m.impl("_linear_ce_soft_bwd", &manual_layers::linear_ce_soft_bwd);
}
