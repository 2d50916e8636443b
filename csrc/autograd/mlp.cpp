// mlp: Linear(w1, b1) -> activation -> Linear(w2, b2). Autograd, CPU/CUDA (no autograd) and
// Autocast kernels of the public op (csrc/autograd/common.h); forward is two _linear_fwd calls,
// backward one _mlp_bwd (contract in csrc/contracts/mlp.h).
#include <torch/library.h>

#include <string>

#include "../checks.h"
#include "common.h"
#include "handles.h"

namespace manual_layers {
namespace {

constexpr const char* kMlp = "manual_layers.functional.mlp";

// Forward: _linear_fwd for the first layer with the activation (keeping what act' needs), then
// _linear_fwd for the second layer (activation none: one addmm). Backward: one _mlp_bwd.
class MlpFn : public torch::autograd::Function<MlpFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                            const c10::optional<at::Tensor>& b2, const std::string& activation,
                            bool nx, bool nw1, bool nb1, bool nw2, bool nb2) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [h, pre] = linear_fwd_op().call(x, w1, b1, activation, true);
    at::Tensor y = std::get<0>(linear_fwd_op().call(h, w2, b2, "none", false));
    const Saved what = saved_for(parse_activation(activation));
    const bool first = nx || nw1 || nb1;
    // h: for dW2 = g^T h, and as act's saved output (relu, sigmoid, tanh) when the first layer
    // needs gradients; pre: act's input (gelu, silu).
    const bool keep_h = nw2 || (first && what == Saved::Output);
    ctx->save_for_backward({x, w1, value_or_undef(b1), w2, value_or_undef(b2),
                            keep_h ? h : undef(),
                            first && what == Saved::Pre ? pre : undef()});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["need"] = std::vector<bool>{nx, nw1, nb1, nw2, nb2};
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto need = ctx->saved_data["need"].toBoolList().vec();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const at::Tensor &x = s[0], &w1 = s[1], &b1 = s[2], &w2 = s[3], &b2 = s[4];
    at::Tensor g = grads[0];
    MlpGrads r;
    if (backward_needs_graph({g, x, w1, b1, w2, b2})) {
      r = mlp_graph_op().call(g, x, w1, opt(b1), w2, opt(b2), activation, need[0], need[1],
                              need[2], need[3], need[4]);
    } else {
      // A placeholder of the right shape (never read) where h was not kept.
      const at::Tensor h = s[5].defined() ? s[5] : at::empty_symint(
                                                             {x.sym_size(0), w1.sym_size(0)},
                                                             w1.options());
      const Saved what = saved_for(parse_activation(activation));
      const at::Tensor saved = what == Saved::Pre ? (s[6].defined() ? s[6] : h)
                                                  : (what == Saved::Output ? h
                                                                           : at::empty({0}, w1.options()));
      if (g.scalar_type() != w1.scalar_type()) g = g.to(w1.scalar_type());
      r = mlp_bwd_op().call(g, x, w1, w2, h, saved, activation, need[0], need[1], need[2],
                            need[3], need[4]);
    }
    auto [gx, gw1, gb1, gw2, gb2] = r;
    return {need[0] ? gx : undef(), need[1] ? gw1 : undef(), need[2] ? gb1 : undef(),
            need[3] ? gw2 : undef(), need[4] ? gb2 : undef(), undef(), undef(), undef(),
            undef(), undef(), undef()};
  }
};

void check_mlp_public(const at::Tensor& x, const at::Tensor& w1,
                      const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                      const c10::optional<at::Tensor>& b2) {
  check_linear_public(kMlp, x, w1, b1);
  TORCH_CHECK_VALUE(w2.dim() == 2, kMlp, ": w2 must be 2-D (out_features, hidden_features), got "
                    "shape ", py_shape(w2.sizes()));
  TORCH_CHECK_VALUE(w2.size(1) == w1.size(0), kMlp, ": w2 expects ", w2.size(1),
                    " hidden features (w2.shape=", py_shape(w2.sizes()), ") but w1 has ",
                    w1.size(0), " outputs (w1.shape=", py_shape(w1.sizes()), ")");
  if (has(b2)) {
    TORCH_CHECK_VALUE(b2->dim() == 1 && b2->size(0) == w2.size(0), kMlp,
                      ": b2 must have shape (", w2.size(0), ",) to match w2.shape=",
                      py_shape(w2.sizes()), ", got ", py_shape(b2->sizes()));
  }
  const at::Tensor* others[2] = {&w2, has(b2) ? &*b2 : nullptr};
  const char* names[2] = {"w2", "b2"};
  for (int k = 0; k < 2; ++k) {
    if (others[k] == nullptr) continue;
    TORCH_CHECK_TYPE(others[k]->scalar_type() == x.scalar_type(), kMlp, ": x and ", names[k],
                     " must have the same dtype, got x.dtype=", py_dtype(x.scalar_type()),
                     " and ", names[k], ".dtype=", py_dtype(others[k]->scalar_type()));
    TORCH_CHECK(others[k]->device() == x.device(), kMlp, ": x and ", names[k],
                " must be on the same device, got x on ", x.device(), " and ", names[k], " on ",
                others[k]->device());
  }
}

void check_mlp_activation(const std::string& act) {
  TORCH_CHECK_VALUE(parse_activation(act) != Act::Softmax, kMlp,
                    ": activation 'softmax' is not supported");
}

at::Tensor mlp_autograd(const at::Tensor& x, const at::Tensor& w1,
                        const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const c10::optional<at::Tensor>& b2, c10::string_view activation) {
  const std::string act(activation);
  check_mlp_activation(act);
  check_mlp_public(x, w1, b1, w2, b2);
  const bool grad = at::GradMode::is_enabled();
  const bool nx = grad && x.requires_grad(), nw1 = grad && w1.requires_grad();
  const bool nb1 = grad && has(b1) && b1->requires_grad();
  const bool nw2 = grad && w2.requires_grad();
  const bool nb2 = grad && has(b2) && b2->requires_grad();
  const at::Tensor x2 = flatten_rows(x);
  at::Tensor out;
  if (nx || nw1 || nb1 || nw2 || nb2) {
    out = MlpFn::apply(x2, w1, b1, w2, b2, act, nx, nw1, nb1, nw2, nb2);
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    const at::Tensor h = std::get<0>(linear_fwd_op().call(x2, w1, b1, act, false));
    out = std::get<0>(linear_fwd_op().call(h, w2, b2, "none", false));
  }
  return unflatten_rows(out, x);
}

at::Tensor mlp_plain(const at::Tensor& x, const at::Tensor& w1,
                     const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                     const c10::optional<at::Tensor>& b2, c10::string_view activation) {
  check_mlp_activation(std::string(activation));
  check_mlp_public(x, w1, b1, w2, b2);
  const at::Tensor h = std::get<0>(linear_fwd_op().call(flatten_rows(x), w1, b1, activation,
                                                        false));
  return unflatten_rows(std::get<0>(linear_fwd_op().call(h, w2, b2, "none", false)), x);
}

// As nn.Sequential(nn.Linear, act, nn.Linear) under autocast: every GEMM operand in the
// autocast dtype (float64 untouched).
template <c10::DeviceType device>
at::Tensor mlp_autocast(const at::Tensor& x, const at::Tensor& w1,
                        const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const c10::optional<at::Tensor>& b2, c10::string_view activation) {
  const Autocast<device> cast;
  return mlp_op().call(cast(x), cast(w1), cast(b1), cast(w2), cast(b2), activation);
}

}  // namespace
}  // namespace manual_layers

TORCH_LIBRARY_IMPL(manual_layers, Autograd, m) { m.impl("mlp", &manual_layers::mlp_autograd); }
TORCH_LIBRARY_IMPL(manual_layers, CPU, m) { m.impl("mlp", &manual_layers::mlp_plain); }
TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) { m.impl("mlp", &manual_layers::mlp_plain); }
TORCH_LIBRARY_IMPL(manual_layers, AutocastCPU, m) {
  m.impl("mlp", &manual_layers::mlp_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(manual_layers, AutocastCUDA, m) {
  m.impl("mlp", &manual_layers::mlp_autocast<c10::DeviceType::CUDA>);
}
