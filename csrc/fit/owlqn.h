// OWL-QN for f(x) + sum_j l1_j |x_j|: the algorithm of manual_layers/_solvers.py (Andrew and Gao,
// 2007; that file's docstring says why OWL-QN and how it stops), in C++ for the same reason as
// csrc/fit/lbfgs.h: on small data the Python around each evaluation cost more than the kernel.
// The two take the same steps up to rounding (tests/integration/test_sklearn_l1.py).
#pragma once

#include <vector>

#include "lbfgs.h"

namespace manual_layers {
namespace fit {

// Minimises fun (the smooth part f and its gradient) plus sum_j l1[j] |x_j| from x (in: the
// start, out: the solution); l1[j] >= 0. LbfgsResult::f is the whole objective F.
LbfgsResult owlqn(const Objective& fun, std::vector<double>& x, const std::vector<double>& l1,
                  int64_t max_iter, double tol, int64_t m = 10, int64_t maxls = 50);

}  // namespace fit
}  // namespace manual_layers
