// The fused losses linear_bce and linear_ce: Autograd, CPU/CUDA (no autograd) and Autocast
// kernels of the public ops (csrc/autograd/common.h). The kernels they call: _linear_bce_fwd,
// _linear_ce_fwd and _linear_loss_bwd (contracts in csrc/contracts/losses.h), and the chunked cross
// entropy _linear_ce_chunked_fwd/_bwd (csrc/generic/ce_chunked.cpp); csrc/policy/ce_path.cpp chooses
// between the cross entropy's paths.
#include <ATen/ExpandUtils.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "../policy/ce_path.h"
#include "common.h"
#include "handles.h"

namespace manual_layers {
namespace {

constexpr const char* kBce = "manual_layers.functional.linear_binary_cross_entropy_with_logits";
constexpr const char* kCe = "manual_layers.functional.linear_cross_entropy";

// The loss in the dtype the caller gets: `dtype` if given (autocast asks for float32, as
// F.cross_entropy under autocast returns), else x's. The kernels return it in acc_t, so a
// float32 loss of 16-bit x is not rounded to 16 bits on the way.
at::Tensor loss_out(const at::Tensor& loss, const at::Tensor& x,
                    c10::optional<at::ScalarType> dtype) {
  const at::ScalarType want = dtype.value_or(x.scalar_type());
  return loss.scalar_type() == want ? loss : loss.to(want);
}

at::Tensor reshape_loss(const at::Tensor& loss, const at::Tensor& x, int64_t reduction) {
  if (reduction != 0) return loss;
  return loss.reshape_symint(x.sym_sizes().slice(0, x.dim() - 1));
}

void check_loss_dtype(const char* fn, c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK_TYPE(!dtype || at::isFloatingType(*dtype), fn,
                   ": dtype must be a floating-point dtype, got ", py_dtype(*dtype));
}

// What the single-pass losses' Function keeps (csrc/contracts/losses.h): the forward's residual and
// weight/bias gradients for the kernel backward, and the inputs for a backward with a graph.
void save_loss(AutogradContext* ctx, const LossOut& outs, std::vector<at::Tensor> inputs,
               int64_t reduction, bool nx, bool nw, bool nb) {
  const auto& [loss, gw, gb, residual] = outs;
  std::vector<at::Tensor> saved{residual, gw, gb};
  saved.insert(saved.end(), inputs.begin(), inputs.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["reduction"] = reduction;
  ctx->saved_data["need"] = std::vector<bool>{nx, nw, nb};
}

// The kernel backward of the single-pass losses; saved = [residual, gw, gb, x, weight, ...].
Grads3 loss_kernel_backward(const at::Tensor& grad, const variable_list& s, int64_t reduction,
                            const std::vector<bool>& need) {
  const at::Tensor& weight = s[4];
  auto e = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, weight.options()); };
  return loss_bwd_op().call(grad, e(s[0]), s[3], weight, e(s[1]), e(s[2]), reduction, need[0],
                            need[1], need[2]);
}

// ---- linear_bce ----------------------------------------------------------------------------

class BceFn : public torch::autograd::Function<BceFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& pos_weight,
                            const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                            c10::optional<at::ScalarType> dtype, bool nx, bool nw, bool nb) {
    at::AutoDispatchBelowADInplaceOrView below;
    LossOut outs = bce_fwd_op().call(x, weight, bias, target, pos_weight, sample_weight,
                                     reduction, nx, nw, nb);
    save_loss(ctx, outs,
              {x, weight, value_or_undef(bias), target, value_or_undef(pos_weight),
               value_or_undef(sample_weight)},
              reduction, nx, nw, nb);
    return loss_out(std::get<0>(outs), x, dtype);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto need = ctx->saved_data["need"].toBoolList().vec();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    if (backward_needs_graph({grads[0], s[3], s[4], s[5]})) {
      return grads_out(bce_graph_op().call(grads[0], s[3], s[4], opt(s[5]), s[6], opt(s[7]),
                                           opt(s[8]), reduction, need[0], need[1], need[2]),
                       need, 8);
    }
    return grads_out(loss_kernel_backward(grads[0], s, reduction, need), need, 8);
  }
};

// Arguments of linear_bce after checks: flattened x, (N,) target and sample weights, (1,)
// pos_weight.
struct BceArgs {
  at::Tensor x2, target, pos_weight, sample_weight;
};

BceArgs prepare_bce(const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                    const c10::optional<at::Tensor>& pos_weight,
                    const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                    c10::optional<at::ScalarType> dtype, bool grad_mode) {
  check_loss_reduction(kBce, reduction);
  check_loss_dtype(kBce, dtype);
  TORCH_CHECK_VALUE(!(weight.dim() == 2 && weight.size(0) != 1), kBce,
                    ": weight must have shape (1, D) for a binary classifier, got ",
                    py_shape(weight.sizes()), "; use linear_cross_entropy for ", weight.size(0),
                    " classes");
  check_linear_public(kBce, x, weight, bias);
  const auto lead = x.sym_sizes().slice(0, x.dim() - 1);
  TORCH_CHECK_VALUE(target.sym_sizes() == lead, kBce, ": target must have shape ",
                    py_shape(x.sizes().slice(0, x.dim() - 1)), " (x.shape[:-1]), got ",
                    py_shape(target.sizes()));
  TORCH_CHECK_TYPE(at::isFloatingType(target.scalar_type()), kBce,
                   ": target must be a floating-point tensor of probabilities, got dtype ",
                   py_dtype(target.scalar_type()));
  check_same_device(kBce, "target", target, x);
  check_no_grad(kBce, "target", target, grad_mode);
  BceArgs a;
  a.x2 = flatten_rows(x);
  a.target = target.reshape({-1});
  if (has(pos_weight)) {
    check_no_grad(kBce, "pos_weight", pos_weight, grad_mode);
    TORCH_CHECK_VALUE(pos_weight->numel() == 1, kBce,
                      ": pos_weight must have one element (a binary classifier has one class), "
                      "got shape ", py_shape(pos_weight->sizes()));
    check_same_device(kBce, "pos_weight", *pos_weight, x);
    // Finite check only where it costs no device synchronisation, and only on real tensors.
    if (pos_weight->device().is_cpu() && !is_traced(*pos_weight)) {
      const double pw = pos_weight->to(at::kDouble).item<double>();
      TORCH_CHECK_VALUE(std::isfinite(pw), kBce, ": pos_weight must be finite, got ", pw);
    }
    a.pos_weight = pos_weight->reshape({1});
  }
  if (has(sample_weight)) {
    check_no_grad(kBce, "sample_weight", sample_weight, grad_mode);
    check_same_device(kBce, "sample_weight", *sample_weight, x);
    TORCH_CHECK_VALUE(at::is_expandable_to(sample_weight->sym_sizes(), lead), kBce,
                      ": sample_weight of shape ", py_shape(sample_weight->sizes()),
                      " does not broadcast to the target's shape ",
                      py_shape(x.sizes().slice(0, x.dim() - 1)));
    a.sample_weight = sample_weight->expand_symint(lead).reshape({-1}).contiguous();
  }
  return a;
}

at::Tensor linear_bce_autograd(const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                               const c10::optional<at::Tensor>& pos_weight,
                               const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                               c10::optional<at::ScalarType> dtype) {
  const bool grad = at::GradMode::is_enabled();
  BceArgs a = prepare_bce(x, weight, bias, target, pos_weight, sample_weight, reduction, dtype,
                          grad);
  const bool nx = grad && x.requires_grad(), nw = grad && weight.requires_grad();
  const bool nb = grad && has(bias) && bias->requires_grad();
  at::Tensor loss;
  if (nx || nw || nb) {
    loss = BceFn::apply(a.x2, weight, bias, a.target, opt(a.pos_weight), opt(a.sample_weight),
                        reduction, dtype, nx, nw, nb);
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    loss = loss_out(std::get<0>(bce_fwd_op().call(a.x2, weight, bias, a.target, opt(a.pos_weight),
                                                  opt(a.sample_weight), reduction, false, false,
                                                  false)),
                    x, dtype);
  }
  return reshape_loss(loss, x, reduction);
}

at::Tensor linear_bce_plain(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& pos_weight,
                            const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                            c10::optional<at::ScalarType> dtype) {
  BceArgs a = prepare_bce(x, weight, bias, target, pos_weight, sample_weight, reduction, dtype,
                          false);
  const at::Tensor loss = std::get<0>(bce_fwd_op().call(a.x2, weight, bias, a.target,
                                                        opt(a.pos_weight), opt(a.sample_weight),
                                                        reduction, false, false, false));
  return reshape_loss(loss_out(loss, x, dtype), x, reduction);
}

// ---- linear_ce -----------------------------------------------------------------------------

class CeFn : public torch::autograd::Function<CeFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                            double label_smoothing, int64_t reduction,
                            c10::optional<at::ScalarType> dtype, bool nx, bool nw, bool nb) {
    at::AutoDispatchBelowADInplaceOrView below;
    // Probability targets: the chunked path's soft-target op (same contract as the chunked op).
    const bool soft = target.is_floating_point();
    const bool chunked = soft || ce_use_chunked(x, weight, reduction);
    ctx->saved_data["chunked"] = chunked;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    const std::vector<at::Tensor> inputs{x, weight, value_or_undef(bias), target,
                                         value_or_undef(class_weight)};
    LossOut outs =
        soft ? ce_soft_fwd_op().call(x, weight, bias, target, class_weight, label_smoothing,
                                     reduction, nx, nw, nb)
             : (chunked ? ce_chunked_fwd_op() : ce_fwd_op())
                   .call(x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                         reduction, nx, nw, nb);
    if (!chunked) {
      save_loss(ctx, outs, inputs, reduction, nx, nw, nb);
    } else {
      // Chunked: mean/sum compute every gradient in forward (for grad_output 1; the N x C
      // residual never exists) and backward scales them; none recomputes from the inputs.
      const auto& [loss, gw, gb, gx] = outs;
      std::vector<at::Tensor> saved{gx, gw, gb};
      saved.insert(saved.end(), inputs.begin(), inputs.end());
      ctx->save_for_backward(saved);
      ctx->saved_data["reduction"] = reduction;
      ctx->saved_data["need"] = std::vector<bool>{nx, nw, nb};
    }
    return loss_out(std::get<0>(outs), x, dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();  // [3 kernel results, x, weight, bias, target, cw]
    const auto need = ctx->saved_data["need"].toBoolList().vec();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double smoothing = ctx->saved_data["label_smoothing"].toDouble();
    const at::Tensor &x = s[3], &weight = s[4];
    if (backward_needs_graph({grads[0], x, weight, s[5]})) {
      return grads_out(ce_graph_op().call(grads[0], x, weight, opt(s[5]), s[6], opt(s[7]),
                                          ignore_index, smoothing, reduction, need[0], need[1],
                                          need[2]),
                       need, 9);
    }
    if (!ctx->saved_data["chunked"].toBool())
      return grads_out(loss_kernel_backward(grads[0], s, reduction, need), need, 9);
    if (reduction == 0) {
      if (s[6].is_floating_point()) {
        return grads_out(ce_soft_bwd_op().call(grads[0], x, weight, opt(s[5]), s[6], opt(s[7]),
                                               smoothing, need[0], need[1], need[2]),
                         need, 9);
      }
      return grads_out(ce_chunked_bwd_op().call(grads[0], x, weight, opt(s[5]), s[6], opt(s[7]),
                                                ignore_index, smoothing, need[0], need[1],
                                                need[2]),
                       need, 9);
    }
    // Scale the forward's gradients by grad_output on the device (no host sync).
    const auto dt = weight.scalar_type();
    const at::Tensor g = grads[0].reshape({}).to(at::toOpMathType(dt));
    variable_list out(12);
    if (need[0]) {  // x's dtype (a 0-d tensor does not promote it); CPU: the output cache
      at::Tensor gx = empty_output_like(s[0]);
      out[0] = at::mul_out(gx, s[0], g);
    }
    if (need[1]) out[1] = (s[1] * g).to(dt);
    if (need[2]) out[2] = (s[2] * g).to(dt);
    return out;
  }
};

struct CeArgs {
  at::Tensor x2, target, class_weight;
};

CeArgs prepare_ce(const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                  const c10::optional<at::Tensor>& class_weight, double label_smoothing,
                  int64_t reduction, c10::optional<at::ScalarType> dtype, bool grad_mode) {
  check_loss_reduction(kCe, reduction);
  check_loss_dtype(kCe, dtype);
  check_linear_public(kCe, x, weight, bias);
  const auto lead = x.sym_sizes().slice(0, x.dim() - 1);
  const auto tt = target.scalar_type();
  TORCH_CHECK_TYPE(at::isIntegralType(tt, /*includeBool=*/false) || at::isFloatingType(tt), kCe,
                   ": target must hold integer class indices or floating-point class "
                   "probabilities, got dtype ", py_dtype(tt));
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, kCe,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  check_same_device(kCe, "target", target, x);
  CeArgs a;
  a.x2 = flatten_rows(x);
  if (at::isFloatingType(tt)) {  // probabilities: (..., C), as F.cross_entropy takes them
    std::vector<c10::SymInt> want(lead.begin(), lead.end());
    want.push_back(weight.sym_size(0));
    TORCH_CHECK_VALUE(target.sym_sizes() == c10::SymIntArrayRef(want), kCe,
                      ": probability targets must have shape ",
                      py_shape(x.sizes().slice(0, x.dim() - 1)), " + (", weight.size(0),
                      ",) (x.shape[:-1] + (classes,)), got ", py_shape(target.sizes()));
    check_no_grad(kCe, "target", target, grad_mode);
    a.target = target.reshape_symint({a.x2.sym_size(0), weight.sym_size(0)});
  } else {
    TORCH_CHECK_VALUE(target.sym_sizes() == lead, kCe, ": target must have shape ",
                      py_shape(x.sizes().slice(0, x.dim() - 1)),
                      " (x.shape[:-1]) of class indices, got ", py_shape(target.sizes()));
    a.target = target.reshape({-1});
    if (a.target.scalar_type() != at::kLong) a.target = a.target.to(at::kLong);
  }
  if (has(class_weight)) {
    check_no_grad(kCe, "class_weight", class_weight, grad_mode);
    const int64_t C = weight.size(0);
    TORCH_CHECK_VALUE(class_weight->dim() == 1 && class_weight->size(0) == C, kCe,
                      ": class_weight must have shape (", C, ",), one weight per class, got ",
                      py_shape(class_weight->sizes()));
    check_same_device(kCe, "class_weight", *class_weight, x);
    TORCH_CHECK_TYPE(at::isFloatingType(class_weight->scalar_type()), kCe,
                     ": class_weight must be a floating-point tensor, got dtype ",
                     py_dtype(class_weight->scalar_type()));
    a.class_weight = class_weight->contiguous();
  }
  return a;
}

at::Tensor ce_forward_no_grad(const CeArgs& a, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, int64_t ignore_index,
                              double label_smoothing, int64_t reduction) {
  if (a.target.is_floating_point()) {
    return std::get<0>(ce_soft_fwd_op().call(a.x2, weight, bias, a.target, opt(a.class_weight),
                                             label_smoothing, reduction, false, false, false));
  }
  const auto& op = ce_use_chunked(a.x2, weight, reduction) ? ce_chunked_fwd_op() : ce_fwd_op();
  return std::get<0>(op.call(a.x2, weight, bias, a.target, opt(a.class_weight), ignore_index,
                             label_smoothing, reduction, false, false, false));
}

at::Tensor linear_ce_autograd(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                              const c10::optional<at::Tensor>& class_weight,
                              int64_t ignore_index, double label_smoothing, int64_t reduction,
                              c10::optional<at::ScalarType> dtype) {
  const bool grad = at::GradMode::is_enabled();
  CeArgs a = prepare_ce(x, weight, bias, target, class_weight, label_smoothing, reduction, dtype,
                        grad);
  const bool nx = grad && x.requires_grad(), nw = grad && weight.requires_grad();
  const bool nb = grad && has(bias) && bias->requires_grad();
  at::Tensor loss;
  if (nx || nw || nb) {
    loss = CeFn::apply(a.x2, weight, bias, a.target, opt(a.class_weight), ignore_index,
                       label_smoothing, reduction, dtype, nx, nw, nb);
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    loss = loss_out(ce_forward_no_grad(a, weight, bias, ignore_index, label_smoothing,
                                       reduction),
                    x, dtype);
  }
  return reshape_loss(loss, x, reduction);
}

at::Tensor linear_ce_plain(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                           const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                           double label_smoothing, int64_t reduction,
                           c10::optional<at::ScalarType> dtype) {
  CeArgs a = prepare_ce(x, weight, bias, target, class_weight, label_smoothing, reduction, dtype,
                        false);
  const at::Tensor loss =
      ce_forward_no_grad(a, weight, bias, ignore_index, label_smoothing, reduction);
  return reshape_loss(loss_out(loss, x, dtype), x, reduction);
}

// Autocast, as torch casts F.linear and F.cross_entropy: the GEMM operands (x, weight, bias) in
// the autocast dtype, the loss in float32 (float64 for float64 x, which autocast leaves alone).
template <c10::DeviceType device>
c10::optional<at::ScalarType> autocast_loss_dtype(const at::Tensor& x,
                                                  c10::optional<at::ScalarType> dtype) {
  if (dtype) return dtype;
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <c10::DeviceType device>
at::Tensor linear_bce_autocast(const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                               const c10::optional<at::Tensor>& pos_weight,
                               const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                               c10::optional<at::ScalarType> dtype) {
  const Autocast<device> cast;
  return bce_op().call(cast(x), cast(weight), cast(bias), target, pos_weight, sample_weight,
                       reduction, autocast_loss_dtype<device>(x, dtype));
}

template <c10::DeviceType device>
at::Tensor linear_ce_autocast(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                              const c10::optional<at::Tensor>& class_weight,
                              int64_t ignore_index, double label_smoothing, int64_t reduction,
                              c10::optional<at::ScalarType> dtype) {
  const Autocast<device> cast;
  return ce_op().call(cast(x), cast(weight), cast(bias), target, class_weight, ignore_index,
                      label_smoothing, reduction, autocast_loss_dtype<device>(x, dtype));
}

}  // namespace
}  // namespace manual_layers

TORCH_LIBRARY_IMPL(manual_layers, Autograd, m) {
  m.impl("linear_bce", &manual_layers::linear_bce_autograd);
  m.impl("linear_ce", &manual_layers::linear_ce_autograd);
}
TORCH_LIBRARY_IMPL(manual_layers, CPU, m) {
  m.impl("linear_bce", &manual_layers::linear_bce_plain);
  m.impl("linear_ce", &manual_layers::linear_ce_plain);
}
TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) {
  m.impl("linear_bce", &manual_layers::linear_bce_plain);
  m.impl("linear_ce", &manual_layers::linear_ce_plain);
}
TORCH_LIBRARY_IMPL(manual_layers, AutocastCPU, m) {
  m.impl("linear_bce", &manual_layers::linear_bce_autocast<c10::DeviceType::CPU>);
  m.impl("linear_ce", &manual_layers::linear_ce_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(manual_layers, AutocastCUDA, m) {
  m.impl("linear_bce", &manual_layers::linear_bce_autocast<c10::DeviceType::CUDA>);
  m.impl("linear_ce", &manual_layers::linear_ce_autocast<c10::DeviceType::CUDA>);
}
