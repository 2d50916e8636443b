"""OWL-QN: the L1 / elastic-net solver of the logistic-regression fit.

It minimises F(x) = f(x) + sum_j l1_j |x_j| where f is smooth (the weighted mean log-loss plus
the L2 part of the penalty, LinearObjective.evaluate: one fused loss+gradient kernel call per
evaluation) and l1_j >= 0 is the L1 weight of coordinate j (0 for the intercepts, which are not
penalised). Orthant-wise limited-memory quasi-Newton (Andrew and Gao, "Scalable training of
L1-regularized log-linear models", ICML 2007):

  - the pseudo-gradient pg (the minimum-norm subgradient of F) replaces the gradient;
  - the L-BFGS two-loop recursion builds the direction from pairs (s, y) of the SMOOTH part's
    gradient only (the L1 term has no curvature); components of the direction that disagree in
    sign with -pg are zeroed;
  - each trial point is projected onto the orthant of the current point (a coordinate that would
    cross zero is set to exactly zero), with a backtracking Armijo line search on F measured
    along the projected step. Coordinates are therefore exact zeros, not small numbers.

Why OWL-QN and not scikit-learn's saga or a coordinate-descent / proximal-Newton method: every
OWL-QN iteration is one or two full passes over X through the same fused kernel that the L2 fit
uses (dense or sparse, CPU or CUDA, data-parallel through LinearObjective's one all-reduce), so it
inherits all of that kernel's speed and determinism; saga and coordinate descent are per-sample
or per-coordinate loops that cannot use a fused full-batch pass, and proximal Newton needs a
Hessian-vector kernel we do not have. OWL-QN converges superlinearly in practice on these
objectives and reaches scikit-learn saga's optimum at tight tolerance in tens to hundreds of
evaluations.

Small dense CPU fits run this algorithm's C++ port (csrc/fit/owlqn.cpp, through the op
_logreg_fit: manual_layers/_fit.py _cpp_fit_applies says when), which takes the same steps up
to rounding (tests/integration/test_sklearn_l1.py compares them).

Stopping rules, as scipy's L-BFGS-B (the L2 solver) applies them, so that `tol` means the same
for every penalty: converged when max_j |pg_j| <= tol (L-BFGS-B's projected-gradient test,
gtol=tol) or when the relative decrease (F_k - F_k+1) / max(|F_k|, |F_k+1|, 1) <= ftol (64
machine epsilons, L-BFGS-B's factr that scikit-learn passes).
"""

import numpy as np

__all__ = ["owlqn", "pseudo_gradient", "run_owlqn"]

_FTOL = 64 * np.finfo(float).eps


def pseudo_gradient(x, g, l1):
    """The minimum-norm subgradient of f(x) + sum_j l1_j |x_j| given g = grad f(x): g + l1 sign(x)
    where x_j != 0; at x_j == 0 the one-sided derivative that descends (g_j + l1_j if it is
    negative, g_j - l1_j if positive), else 0 (0 is in the subdifferential: x_j stays at 0)."""
    pg = g + l1 * np.sign(x)
    right, left = g + l1, g - l1
    at_zero = np.where(right < 0, right, np.where(left > 0, left, 0.0))
    return np.where(x == 0, at_zero, pg)


def owlqn(fun, x0, l1, *, max_iter, tol, m=10, maxls=50, ftol=_FTOL, callback=None):
    """Minimise fun's smooth part plus sum_j l1_j |x_j| from x0.

    fun(x) -> (f, g): the smooth objective and its gradient (float64 numpy). l1: (P,) float64
    L1 weights, >= 0. Returns (x, n_iter, converged, message); n_iter counts accepted steps, at
    most max_iter. callback(x, F) after each accepted step."""
    x = np.array(x0, dtype=np.float64, copy=True)
    l1 = np.asarray(l1, dtype=np.float64)
    pen = l1 > 0  # coordinates under the orthant constraint
    f, g = fun(x)
    F = f + float(l1 @ np.abs(x))
    pg = pseudo_gradient(x, g, l1)
    S, Y, RHO = [], [], []
    n_iter = 0
    if not np.isfinite(F):
        return x, 0, False, f"the objective is {F} at the starting point"
    if np.abs(pg).max(initial=0.0) <= tol:
        return x, 0, True, "the pseudo-gradient is below tol at the starting point"
    while n_iter < max_iter:
        d = _two_loop(-pg, S, Y, RHO)
        d[d * pg >= 0] = 0.0  # keep only components that descend along -pg
        if not d.any():  # no descent direction left: a stationary point of F
            return x, n_iter, True, "no descent direction (the pseudo-gradient is zero)"
        xi = np.where(x != 0, np.sign(x), np.sign(-pg))  # the orthant searched
        step = 1.0 / max(np.linalg.norm(d), 1.0) if not S else 1.0
        accepted = False
        for _ in range(maxls):
            x_new = x + step * d
            cross = pen & (np.sign(x_new) != xi)
            x_new[cross] = 0.0  # projection onto the orthant: exact zeros
            f_new, g_new = fun(x_new)
            F_new = f_new + float(l1 @ np.abs(x_new))
            if np.isfinite(F_new) and F_new <= F + 1e-4 * float(pg @ (x_new - x)):
                accepted = True
                break
            step *= 0.5
        if not accepted:
            if S:  # the quasi-Newton model misleads: restart from steepest descent
                S.clear(), Y.clear(), RHO.clear()
                continue
            return x, n_iter, False, (f"the line search found no decrease in {maxls} steps "
                                      f"(the objective is flat to rounding)")
        s, y = x_new - x, g_new - g
        sy = float(s @ y)
        if sy > 1e-10 * float(y @ y):  # curvature pair usable (positive definite update)
            if len(S) == m:
                S.pop(0), Y.pop(0), RHO.pop(0)
            S.append(s), Y.append(y), RHO.append(1.0 / sy)
        decrease = (F - F_new) / max(abs(F), abs(F_new), 1.0)
        x, g, f, F = x_new, g_new, f_new, F_new
        pg = pseudo_gradient(x, g, l1)
        n_iter += 1
        if callback is not None:
            callback(x, F)
        if np.abs(pg).max(initial=0.0) <= tol:
            return x, n_iter, True, "the pseudo-gradient is below tol"
        if decrease <= ftol:
            return x, n_iter, True, "the relative reduction of the objective is below ftol"
    return x, n_iter, False, f"max_iter={max_iter} iterations reached"


def _two_loop(v, S, Y, RHO):
    """H v for the L-BFGS inverse-Hessian approximation H of the pairs (S, Y), scaled by
    s.y / y.y of the newest pair (the identity when there is none)."""
    q = v.copy()
    alphas = []
    for s, y, rho in zip(reversed(S), reversed(Y), reversed(RHO)):
        a = rho * float(s @ q)
        alphas.append(a)
        q -= a * y
    if S:
        q *= float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1])
    for (s, y, rho), a in zip(zip(S, Y, RHO), reversed(alphas)):
        b = rho * float(y @ q)
        q += (a - b) * s
    return q


def run_owlqn(obj, x0, max_iter, tol, bar=None):
    """OWL-QN on a LinearObjective (its evaluate() the smooth part, its l1_weights() the L1
    share), with an optional progress bar; returns (x, n_iter, converged, message)."""
    def callback(x, F):
        bar.update(1)
        bar.set_postfix(loss=f"{F:.6g}")

    try:
        return owlqn(obj.evaluate, x0, obj.l1_weights(), max_iter=max_iter, tol=tol,
                     callback=callback if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
