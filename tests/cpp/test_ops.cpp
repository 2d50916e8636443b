// C++ smoke test (run by ctest): the manual_layers ops called through the dispatcher, without
// Python, compared with ATen's composition on random inputs.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>

namespace {
int passed = 0, failed = 0;

void expect_close(const char* what, const at::Tensor& a, const at::Tensor& b, double tol) {
  const double err = (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
  const bool ok = a.sizes() == b.sizes() && err <= tol;
  std::printf("%s %s (max abs err %.3g)\n", ok ? "PASS" : "FAIL", what, err);
  ok ? ++passed : ++failed;
}

// fn() must throw a c10::Error whose message holds `want`.
template <typename Fn>
void expect_error(const char* what, Fn fn, const std::string& want) {
  std::string got = "(no error)";
  try {
    fn();
  } catch (const c10::Error& e) {
    got = e.what_without_backtrace();
  }
  const bool ok = got.find(want) != std::string::npos;
  std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", what, ok ? "" : ": got ", ok ? "" : got.c_str());
  ok ? ++passed : ++failed;
}

template <typename Sig>
auto op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
}  // namespace

int main() {
  at::manual_seed(0);
  const auto x = at::randn({37, 19}, at::kDouble), w = at::randn({11, 19}, at::kDouble);
  const auto b = at::randn({11}, at::kDouble);

  auto fwd = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   const c10::optional<at::Tensor>&,
                                                   c10::string_view, bool)>("manual_layers::_linear_fwd");
  auto [y, pre] = fwd.call(x, w, b, "gelu", true);
  expect_close("linear_fwd gelu", y, at::gelu(at::linear(x, w, b)), 1e-12);
  expect_close("linear_fwd pre", pre, at::linear(x, w, b), 1e-12);

  auto bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      c10::string_view, bool, bool, bool)>("manual_layers::_linear_bwd");
  const auto g = at::randn({37, 11}, at::kDouble);
  auto [gx, gw, gb] = bwd.call(g, x, w, pre, "gelu", true, true, true);
  const auto G = at::gelu_backward(g, pre);
  expect_close("linear_bwd grad_x", gx, at::mm(G, w), 1e-12);
  expect_close("linear_bwd grad_weight", gw, at::mm(G.t(), x), 1e-12);
  expect_close("linear_bwd grad_bias", gb, G.sum(0), 1e-12);

  auto bce = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t, bool, bool,
      bool)>("manual_layers::_linear_bce_fwd");
  const auto w1 = at::randn({1, 19}, at::kDouble), b1 = at::randn({1}, at::kDouble);
  const auto t = at::rand({37}, at::kDouble);
  auto [loss, lgw, lgb, res] = bce.call(x, w1, b1, t, c10::nullopt, c10::nullopt, 1, true, true, true);
  const auto z = at::linear(x, w1, b1).squeeze(-1);
  expect_close("_linear_bce_fwd loss", loss, at::binary_cross_entropy_with_logits(z, t), 1e-12);
  const auto r = (at::sigmoid(z) - t) / 37.0;
  expect_close("_linear_bce_fwd grad_weight", lgw, at::mm(r.unsqueeze(0), x), 1e-12);
  expect_close("_linear_bce_fwd residual", res, r.unsqueeze(1), 1e-12);

  // The private loss kernels' argument checks, one set for every device (csrc/checks.h): the
  // same messages from the CPU kernels as from the CUDA ones.
  const auto none = c10::optional<at::Tensor>();
  expect_error("_linear_bce_fwd integer target",
               [&] { bce.call(x, w1, b1, t.to(at::kLong), none, none, 1, false, true, true); },
               "manual_layers._linear_bce_fwd: target must be a floating tensor of probabilities");
  expect_error("_linear_bce_fwd target (N, 1)",
               [&] { bce.call(x, w1, b1, t.unsqueeze(1), none, none, 1, false, true, true); },
               "manual_layers._linear_bce_fwd: target must have shape (37,)");
  expect_error("_linear_bce_fwd sample_weight (N, 1)",
               [&] { bce.call(x, w1, b1, t, none, at::ones({37, 1}, at::kDouble), 1, false, true,
                              true); },
               "manual_layers._linear_bce_fwd: sample_weight must have shape (37,)");
  expect_error("_linear_bce_fwd weight of 2 outputs",
               [&] { bce.call(x, w.narrow(0, 0, 2), none, t, none, none, 1, false, true, true); },
               "manual_layers._linear_bce_fwd: binary logistic regression needs weight of shape (1, 19)");
  auto ce = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
      const c10::optional<at::Tensor>&, int64_t, double, int64_t, bool, bool,
      bool)>("manual_layers::_linear_ce_fwd");
  const auto cls = at::randint(0, 11, {37}, at::kLong);
  expect_error("_linear_ce_fwd label_smoothing 1.5",
               [&] { ce.call(x, w, b, cls, none, -100, 1.5, 1, false, true, true); },
               "manual_layers._linear_ce_fwd: label_smoothing must be between 0.0 and 1.0, got 1.5");
  expect_error("_linear_ce_fwd label_smoothing -0.5",
               [&] { ce.call(x, w, b, cls, none, -100, -0.5, 1, false, true, true); },
               "label_smoothing must be between 0.0 and 1.0, got -0.5");
  expect_error("_linear_ce_fwd class_weight (1, C)",
               [&] { ce.call(x, w, b, cls, at::ones({1, 11}, at::kDouble), -100, 0.0, 1, false,
                             true, true); },
               "manual_layers._linear_ce_fwd: class_weight must have shape (11,)");
  expect_error("_linear_ce_fwd class_weight (C + 1,)",
               [&] { ce.call(x, w, b, cls, at::ones({12}, at::kDouble), -100, 0.0, 1, false, true,
                             true); },
               "manual_layers._linear_ce_fwd: class_weight must have shape (11,)");
  expect_error("_linear_ce_fwd float target",
               [&] { ce.call(x, w, b, cls.to(at::kDouble), none, -100, 0.0, 1, false, true, true); },
               "manual_layers._linear_ce_fwd: target must hold int64 class indices");

  // The public op through its C++ autograd kernel: forward and backward without Python.
  auto lin = op<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           c10::string_view)>("manual_layers::linear");
  const auto xr = x.clone().requires_grad_(true), wr = w.clone().requires_grad_(true);
  const auto yr = lin.call(xr, wr, b, "gelu");
  yr.backward(g);
  expect_close("linear (autograd) output", yr.detach(), at::gelu(at::linear(x, w, b)), 1e-12);
  expect_close("linear (autograd) grad_x", xr.grad(), at::mm(G, w), 1e-12);
  expect_close("linear (autograd) grad_weight", wr.grad(), at::mm(G.t(), x), 1e-12);

  // The CPU kernels' ISA copy chosen at load (MANUAL_LAYERS_CPU_ISA / ATEN_CPU_CAPABILITY).
  const std::string isa = op<std::string()>("manual_layers::_cpu_kernels_isa").call();
  const bool isa_ok = isa == "DEFAULT" || isa == "AVX2" || isa == "AVX512";
  std::printf("%s CPU kernels ISA %s\n", isa_ok ? "PASS" : "FAIL", isa.c_str());
  isa_ok ? ++passed : ++failed;

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
