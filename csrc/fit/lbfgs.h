// L-BFGS for smooth objectives: the algorithm of manual_layers/_lbfgs.py (L-BFGS-B's iterates,
// tests and Moré-Thuente line search without bounds; that file's docstring says what is the same
// as scipy's L-BFGS-B and why), in C++ so that a fit whose evaluations take tens of microseconds
// (the small dense data of LogisticRegressionCV's folds) does not spend most of its time in the
// Python around each evaluation. The two implementations take the same steps up to rounding
// (tests/integration/test_lbfgs.py runs both against scipy's L-BFGS-B).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace manual_layers {
namespace fit {

// How the solve ended; Python's messages for these are in manual_layers/_fit.py.
enum class LbfgsStatus : int64_t {
  kGradientTol = 0,      // max |g_j| <= tol (converged)
  kFtol = 1,             // relative reduction of f <= ftol (converged)
  kStartGradientTol = 2, // already below tol at the start (converged)
  kMaxIter = 3,          // max_iter iterations (not converged)
  kLineSearch = 4,       // no acceptable step with an empty history (not converged)
  kNotFinite = 5,        // f or the gradient not finite (not converged)
  // OWL-QN (csrc/fit/owlqn.h) only:
  kNoDescent = 6,        // no direction descends: a stationary point (converged)
  kNoDecrease = 7,       // the line search found no decrease (not converged)
};

struct LbfgsResult {
  int64_t n_iter = 0;
  LbfgsStatus status = LbfgsStatus::kMaxIter;
  double f = 0;
};

// f = fun(x, g): the objective at x (P values) and its gradient written to g (P values).
using Objective = std::function<double(const double* x, double* g)>;

// Minimises fun from x (in: the start, out: the solution), at most max_iter iterations.
LbfgsResult lbfgs(const Objective& fun, std::vector<double>& x, int64_t max_iter, double tol,
                  int64_t m = 10, int64_t maxls = 50);

}  // namespace fit
}  // namespace manual_layers
