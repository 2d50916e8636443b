// linear: y = act(x W^T + b). Autograd, CPU/CUDA (no autograd) and Autocast kernels of the
// public op (csrc/autograd/common.h says what each does); the kernels it calls are the private
// ops _linear_fwd / _linear_bwd (contracts in csrc/contracts/linear.h).
#include <torch/library.h>

#include <string>

#include "../checks.h"
#include "../contracts/linear.h"
#include "common.h"
#include "handles.h"

namespace manual_layers {

namespace {

constexpr const char* kLinear = "manual_layers.functional.linear";

class LinearFn : public torch::autograd::Function<LinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const std::string& activation,
                            bool need_x, bool need_w, bool need_b) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, pre] = linear_fwd_op().call(x, weight, bias, activation, true);
    const Saved what = saved_for(parse_activation(activation));
    at::Tensor saved = what == Saved::Pre ? pre : (what == Saved::Output ? out : undef());
    ctx->save_for_backward({x, weight, value_or_undef(bias), saved});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["need"] = std::vector<bool>{need_x, need_w, need_b};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto need = ctx->saved_data["need"].toBoolList().vec();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const at::Tensor &x = s[0], &weight = s[1], &bias = s[2];
    at::Tensor g = grads[0];
    if (backward_needs_graph({g, x, weight, bias})) {
      return grads_out(linear_graph_op().call(g, x, weight, opt(bias), activation, need[0],
                                              need[1], need[2]),
                       need, 4);
    }
    const at::Tensor saved = s[3].defined() ? s[3] : at::empty({0}, x.options());
    if (g.scalar_type() != x.scalar_type()) g = g.to(x.scalar_type());
    return grads_out(
        linear_bwd_op().call(g, x, weight, saved, activation, need[0], need[1], need[2]), need,
        4);
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  const std::string act(activation);
  parse_activation(act);  // ValueError on an unknown name, before anything else
  check_linear_public(kLinear, x, weight, bias);
  const bool grad = at::GradMode::is_enabled();
  const bool nx = grad && x.requires_grad(), nw = grad && weight.requires_grad();
  const bool nb = grad && has(bias) && bias->requires_grad();
  const at::Tensor x2 = flatten_rows(x);
  at::Tensor out;
  if (nx || nw || nb) {
    out = LinearFn::apply(x2, weight, bias, act, nx, nw, nb);
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    out = std::get<0>(linear_fwd_op().call(x2, weight, bias, act, false));
  }
  return unflatten_rows(out, x);
}

// CPU / CUDA key: no autograd involved.
at::Tensor linear_plain(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  parse_activation(std::string(activation));
  check_linear_public(kLinear, x, weight, bias);
  const at::Tensor out = std::get<0>(linear_fwd_op().call(flatten_rows(x), weight, bias,
                                                          activation, false));
  return unflatten_rows(out, x);
}

// As F.linear under autocast: x, weight and bias in the autocast dtype (float64 untouched).
template <c10::DeviceType device>
at::Tensor linear_autocast(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  const Autocast<device> cast;
  return linear_op().call(cast(x), cast(weight), cast(bias), activation);
}

}  // namespace
}  // namespace manual_layers

TORCH_LIBRARY_IMPL(manual_layers, Autograd, m) {
  m.impl("linear", &manual_layers::linear_autograd);
}
TORCH_LIBRARY_IMPL(manual_layers, CPU, m) { m.impl("linear", &manual_layers::linear_plain); }
TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) { m.impl("linear", &manual_layers::linear_plain); }
TORCH_LIBRARY_IMPL(manual_layers, AutocastCPU, m) {
  m.impl("linear", &manual_layers::linear_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(manual_layers, AutocastCUDA, m) {
  m.impl("linear", &manual_layers::linear_autocast<c10::DeviceType::CUDA>);
}
