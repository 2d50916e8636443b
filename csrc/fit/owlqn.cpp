// OWL-QN (csrc/fit/owlqn.h): a line-by-line port of manual_layers/_solvers.py's owlqn, whose
// comments give the reasons; the L-BFGS pairs in a plain two-loop recursion (m is small).
#include "owlqn.h"

#include <algorithm>
#include <cmath>
#include <deque>

#include "vec.h"

namespace manual_layers {
namespace fit {
namespace {

double sign(double v) { return v > 0 ? 1.0 : (v < 0 ? -1.0 : 0.0); }

// The minimum-norm subgradient of f + sum l1 |x| given g = grad f (_solvers.pseudo_gradient).
void pseudo_gradient(const std::vector<double>& x, const std::vector<double>& g,
                     const std::vector<double>& l1, std::vector<double>& pg) {
  for (size_t j = 0; j < x.size(); ++j) {
    if (x[j] != 0) {
      pg[j] = g[j] + l1[j] * sign(x[j]);
    } else {
      const double right = g[j] + l1[j], left = g[j] - l1[j];
      pg[j] = right < 0 ? right : (left > 0 ? left : 0.0);
    }
  }
}

double penalty(const std::vector<double>& x, const std::vector<double>& l1) {
  double s = 0;
  for (size_t j = 0; j < x.size(); ++j) s += l1[j] * std::fabs(x[j]);
  return s;
}

struct Pair {
  std::vector<double> s, y;
  double rho;
};

// q = H v for the pairs (oldest first), scaled by s.y / y.y of the newest (_solvers._two_loop)
void two_loop(const std::vector<double>& v, const std::deque<Pair>& pairs,
              std::vector<double>& q) {
  q = v;
  const size_t P = q.size(), k = pairs.size();
  std::vector<double> alphas(k);
  for (size_t i = k; i-- > 0;) {
    const Pair& p = pairs[i];
    const double a = p.rho * dot(p.s, q);
    alphas[i] = a;
    for (size_t j = 0; j < P; ++j) q[j] -= a * p.y[j];
  }
  if (k > 0) {
    const Pair& p = pairs.back();
    const double scale = dot(p.s, p.y) / dot(p.y, p.y);
    for (size_t j = 0; j < P; ++j) q[j] *= scale;
  }
  for (size_t i = 0; i < k; ++i) {
    const Pair& p = pairs[i];
    const double b = p.rho * dot(p.y, q);
    for (size_t j = 0; j < P; ++j) q[j] += (alphas[i] - b) * p.s[j];
  }
}

}  // namespace

LbfgsResult owlqn(const Objective& fun, std::vector<double>& x, const std::vector<double>& l1,
                  int64_t max_iter, double tol, int64_t m, int64_t maxls) {
  const size_t P = x.size();
  LbfgsResult res;
  std::vector<double> g(P), pg(P), d(P), xi(P), x_new(P), g_new(P), neg(P);
  double F = fun(x.data(), g.data()) + penalty(x, l1);
  pseudo_gradient(x, g, l1, pg);
  res.f = F;
  std::deque<Pair> pairs;
  int64_t n_iter = 0;
  if (!std::isfinite(F)) {
    res.status = LbfgsStatus::kNotFinite;
    return res;
  }
  if (absmax(pg) <= tol) {
    res.status = LbfgsStatus::kStartGradientTol;
    return res;
  }
  while (n_iter < max_iter) {
    for (size_t j = 0; j < P; ++j) neg[j] = -pg[j];
    two_loop(neg, pairs, d);
    bool any = false;
    for (size_t j = 0; j < P; ++j) {
      if (d[j] * pg[j] >= 0) d[j] = 0.0;  // keep only components that descend along -pg
      any |= d[j] != 0;
    }
    if (!any) {
      res.n_iter = n_iter, res.status = LbfgsStatus::kNoDescent, res.f = F;
      return res;
    }
    for (size_t j = 0; j < P; ++j) xi[j] = x[j] != 0 ? sign(x[j]) : sign(-pg[j]);
    double step = pairs.empty() ? 1.0 / std::max(std::sqrt(dot(d, d)), 1.0) : 1.0;
    bool accepted = false;
    double F_new = 0;
    for (int64_t e = 0; e < maxls; ++e) {
      for (size_t j = 0; j < P; ++j) {
        x_new[j] = x[j] + step * d[j];
        if (l1[j] > 0 && sign(x_new[j]) != xi[j]) x_new[j] = 0.0;  // the orthant: exact zeros
      }
      F_new = fun(x_new.data(), g_new.data()) + penalty(x_new, l1);
      double pgs = 0;
      for (size_t j = 0; j < P; ++j) pgs += pg[j] * (x_new[j] - x[j]);
      if (std::isfinite(F_new) && F_new <= F + 1e-4 * pgs) {
        accepted = true;
        break;
      }
      step *= 0.5;
    }
    if (!accepted) {
      if (!pairs.empty()) {  // the quasi-Newton model misleads: restart from steepest descent
        pairs.clear();
        continue;
      }
      res.n_iter = n_iter, res.status = LbfgsStatus::kNoDecrease, res.f = F;
      return res;
    }
    Pair p{std::vector<double>(P), std::vector<double>(P), 0.0};
    for (size_t j = 0; j < P; ++j) p.s[j] = x_new[j] - x[j], p.y[j] = g_new[j] - g[j];
    const double sy = dot(p.s, p.y);
    if (sy > 1e-10 * dot(p.y, p.y)) {  // a usable curvature pair
      if (static_cast<int64_t>(pairs.size()) == m) pairs.pop_front();
      p.rho = 1.0 / sy;
      pairs.push_back(std::move(p));
    }
    const double decrease = (F - F_new) / std::max({std::fabs(F), std::fabs(F_new), 1.0});
    std::swap(x, x_new);
    std::swap(g, g_new);
    F = F_new;
    pseudo_gradient(x, g, l1, pg);
    n_iter += 1;
    res.n_iter = n_iter, res.f = F;
    if (absmax(pg) <= tol) {
      res.status = LbfgsStatus::kGradientTol;
      return res;
    }
    if (decrease <= kFtol) {
      res.status = LbfgsStatus::kFtol;
      return res;
    }
  }
  res.status = LbfgsStatus::kMaxIter;
  return res;
}

}  // namespace fit
}  // namespace manual_layers
