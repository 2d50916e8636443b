// Small float64 vector helpers shared by the fit loops (csrc/fit/lbfgs.cpp, owlqn.cpp): plain
// loops, their vectors being the P parameters of a small fit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace manual_layers {
namespace fit {

// The relative-reduction stopping test's tolerance: 64 machine epsilons, L-BFGS-B's factr that
// scikit-learn passes (manual_layers/_lbfgs.py and _solvers.py use the same).
constexpr double kFtol = 64 * std::numeric_limits<double>::epsilon();

inline double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  return dot(a.data(), b.data(), static_cast<int64_t>(a.size()));
}

inline double absmax(const std::vector<double>& v) {
  double m = 0;
  for (double e : v) m = std::max(m, std::fabs(e));
  return m;
}

}  // namespace fit
}  // namespace manual_layers
