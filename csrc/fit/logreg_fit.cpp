// manual_layers::_logreg_fit (CPU only): a whole logistic-regression fit on a dense X over
// scikit-learn's objective, each evaluation one call of the fused loss+gradient kernel
// (csrc/contracts/losses.h): the L-BFGS of csrc/fit/lbfgs.h (L2 or no penalty), or the OWL-QN
// of csrc/fit/owlqn.h when l1_weight > 0 (the L1 share of elastic-net; the intercepts are not
// penalised). Its smooth part is manual_layers/_fit_objective.py's LinearObjective.evaluate in
// C++: manual_layers/_fit.py calls this op for small local CPU fits on dense X instead of
// running its Python loops, because on small data (a fold of breast_cancer: 455 x 30) Python
// around each evaluation cost several times the kernel. Anything else (sparse X, CUDA,
// data-parallel fits, per-sample weights with several classes, a progress bar) keeps them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../common.h"
#include "../contracts/losses.h"
#include "lbfgs.h"
#include "owlqn.h"

namespace manual_layers {
namespace {

// (params (P,) float64, info (4,) float64: [n_iter, status (fit::LbfgsStatus), n_evals, f])
std::tuple<at::Tensor, at::Tensor> logreg_fit_cpu(
    const at::Tensor& x, const at::Tensor& target, const c10::optional<at::Tensor>& sample_weight,
    const c10::optional<at::Tensor>& class_weight, int64_t n_classes, bool fit_intercept,
    double weight_sum, double l2_inv_c, double l1_weight, const at::Tensor& x0, int64_t max_iter,
    double tol) {
  constexpr const char* op = "manual_layers._logreg_fit";
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              op, ": x must be a 2-D float32 or float64 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(n_classes >= 2, op, ": n_classes must be at least 2, got ", n_classes);
  const bool binary = n_classes == 2;
  const int64_t K = binary ? 1 : n_classes, D = x.size(1);
  const int64_t KD = K * D, P = KD + (fit_intercept ? K : 0);
  TORCH_CHECK(x0.dim() == 1 && x0.size(0) == P && x0.scalar_type() == at::kDouble, op,
              ": x0 must be a float64 vector of ", P, " parameters, got ", x0.scalar_type(), " ",
              x0.sizes());
  TORCH_CHECK(binary || !sample_weight.has_value(), op,
              ": sample_weight with several classes is not supported here (the Python fit "
              "handles it)");
  TORCH_CHECK(weight_sum > 0, op, ": weight_sum must be positive, got ", weight_sum);
  TORCH_CHECK(max_iter >= 0, op, ": max_iter must be non-negative, got ", max_iter);
  TORCH_CHECK(l1_weight >= 0, op, ": l1_weight must be non-negative, got ", l1_weight);

  const at::Tensor xc = x.contiguous();
  // The parameters in X's dtype, W (K, D) and b (K,) views of one buffer
  at::Tensor pbuf = at::empty({P}, x.options());
  const at::Tensor W = pbuf.narrow(0, 0, KD).view({K, D});
  const c10::optional<at::Tensor> b =
      fit_intercept ? c10::optional<at::Tensor>(pbuf.narrow(0, KD, K)) : c10::nullopt;
  int64_t n_evals = 0;

  fit::Objective fun = [&](const double* p, double* g) -> double {
    ++n_evals;
    if (pbuf.scalar_type() == at::kDouble) {
      std::memcpy(pbuf.data_ptr<double>(), p, P * sizeof(double));
    } else {
      float* q = pbuf.data_ptr<float>();
      for (int64_t j = 0; j < P; ++j) q[j] = static_cast<float>(p[j]);
    }
    const LossOut out =
        binary ? linear_bce_fwd_cpu(xc, W, b, target, c10::nullopt, sample_weight, kSum, false,
                                    true, fit_intercept)
               : linear_ce_fwd_cpu(xc, W, b, target, class_weight, -100, 0.0, kSum, false, true,
                                   fit_intercept);
    const at::Tensor& loss = std::get<0>(out);
    const at::Tensor gw = std::get<1>(out).contiguous();
    const at::Tensor& gb = std::get<2>(out);
    // the sums in float64, then / S, as LinearObjective.evaluate
    double f;
    if (gw.scalar_type() == at::kDouble) {
      f = loss.item<double>();
      const double* a = gw.const_data_ptr<double>();
      for (int64_t j = 0; j < KD; ++j) g[j] = a[j] / weight_sum;
      if (fit_intercept) {
        const double* c = gb.const_data_ptr<double>();
        for (int64_t j = 0; j < K; ++j) g[KD + j] = c[j] / weight_sum;
      }
    } else {
      f = static_cast<double>(loss.item<float>());
      const float* a = gw.const_data_ptr<float>();
      for (int64_t j = 0; j < KD; ++j) g[j] = static_cast<double>(a[j]) / weight_sum;
      if (fit_intercept) {
        const float* c = gb.const_data_ptr<float>();
        for (int64_t j = 0; j < K; ++j) g[KD + j] = static_cast<double>(c[j]) / weight_sum;
      }
    }
    f /= weight_sum;
    if (l2_inv_c != 0) {
      double ww = 0;
      for (int64_t j = 0; j < KD; ++j) ww += p[j] * p[j];
      f += 0.5 * l2_inv_c * ww / weight_sum;
      const double scale = l2_inv_c / weight_sum;
      for (int64_t j = 0; j < KD; ++j) g[j] += p[j] * scale;
    }
    return f;
  };

  const at::Tensor x0c = x0.contiguous();
  std::vector<double> params(x0c.const_data_ptr<double>(), x0c.const_data_ptr<double>() + P);
  fit::LbfgsResult r;
  if (l1_weight > 0) {
    std::vector<double> l1(P, 0.0);  // W's entries; the intercepts are not penalised
    std::fill(l1.begin(), l1.begin() + KD, l1_weight);
    r = fit::owlqn(fun, params, l1, max_iter, tol);
  } else {
    r = fit::lbfgs(fun, params, max_iter, tol);
  }
  at::Tensor result = at::empty({P}, x0.options());
  std::memcpy(result.data_ptr<double>(), params.data(), P * sizeof(double));
  at::Tensor info = at::empty({4}, x0.options());
  double* ip = info.data_ptr<double>();
  ip[0] = static_cast<double>(r.n_iter);
  ip[1] = static_cast<double>(static_cast<int64_t>(r.status));
  ip[2] = static_cast<double>(n_evals);
  ip[3] = r.f;
  return {result, info};
}

}  // namespace
}  // namespace manual_layers

TORCH_LIBRARY_IMPL(manual_layers, CPU, m) {
  m.impl("_logreg_fit", &manual_layers::logreg_fit_cpu);
}
