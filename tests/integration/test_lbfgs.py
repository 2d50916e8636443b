"""The L2 fit's L-BFGS (manual_layers/_lbfgs.py) against scipy's L-BFGS-B, whose algorithm it
follows: the same iterates on fresh random logistic objectives, the compact direction against the
two-loop recursion, the Moré-Thuente line search's conditions, and the estimator's results with
either solver."""

import math

import numpy as np
import pytest
import torch

import manual_layers._fit as fit_mod
from manual_layers._lbfgs import LineSearch, _History, lbfgs
from manual_layers._solvers import _two_loop

scipy_optimize = pytest.importorskip("scipy.optimize")


def _logistic(seed, N=300, D=40, lam=1e-3):
    """A fresh binary logistic loss with an L2 term: (f, g) in numpy float64."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D)) * rng.uniform(0.1, 3.0, size=D)  # uneven scales
    y = (X @ rng.normal(size=D) + rng.logistic(size=N) > 0).astype(float)

    def fun(w):
        z = X @ w
        f = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * lam * float(w @ w)
        g = X.T @ (1.0 / (1.0 + np.exp(-z)) - y) / N + lam * w
        return f, g
    return fun, D


def _scipy(fun, x0, max_iter, tol):
    res = scipy_optimize.minimize(fun, x0, method="L-BFGS-B", jac=True,
                                  options={"maxiter": max_iter, "maxls": 50, "gtol": tol,
                                           "ftol": 64 * np.finfo(float).eps})
    return res.x, int(res.nit)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_iter", [1, 4, 15, 60])
def test_iterates_match_scipy_lbfgsb(seed, max_iter):
    fun, D = _logistic(seed)
    x0 = np.random.default_rng(seed + 100).normal(size=D) * 0.1
    ref, nit = _scipy(fun, x0, max_iter, 1e-12)
    x, n_iter, _, _ = lbfgs(fun, x0, max_iter=max_iter, tol=1e-12)
    assert n_iter == nit
    assert np.abs(x - ref).max() <= 1e-7 * max(1.0, np.abs(ref).max())


def test_converges_where_scipy_does_and_reports_why():
    fun, D = _logistic(3)
    x, n_iter, conv, msg = lbfgs(fun, np.zeros(D), max_iter=1000, tol=1e-6)
    ref, nit = _scipy(fun, np.zeros(D), 1000, 1e-6)
    assert conv and "tol" in msg and n_iter == nit
    assert np.abs(fun(x)[1]).max() <= 1e-6
    _, n_iter, conv, msg = lbfgs(fun, np.zeros(D), max_iter=3, tol=1e-12)
    assert (n_iter, conv) == (3, False) and "max_iter=3" in msg
    _, n_iter, conv, _ = lbfgs(fun, x, max_iter=10, tol=1.0)
    assert (n_iter, conv) == (0, True)


def test_non_finite_gradient_ends_the_fit_without_raising():
    def fun(x):
        return float(x @ x), np.full_like(x, np.nan)
    x, n_iter, conv, msg = lbfgs(fun, np.ones(4), max_iter=10, tol=1e-8)
    assert (n_iter, conv) == (0, False) and "not finite" in msg


@pytest.mark.parametrize("m,pairs", [(3, 2), (3, 7), (10, 25)])
def test_compact_direction_equals_two_loop(m, pairs):
    """Pairs pushed through the ring (with the incremental R and Y'Y) give -H g equal to the
    two-loop recursion over the same last m pairs."""
    rng = np.random.default_rng(m * 100 + pairs)
    P = 57
    A = rng.normal(size=(P, P))
    A = A @ A.T / P + np.eye(P)  # a positive definite Hessian: s.y > 0
    h = _History(P, m)
    g = rng.normal(size=P)
    S, Y, RHO = [], [], []
    for _ in range(pairs):
        d = rng.normal(size=P)
        t = rng.uniform(0.1, 2.0)
        g_new = g + A @ (t * d)
        sy = float((t * d) @ (g_new - g))
        h.push(d, t, g_new, g, sy)
        h.update_products(g_new, True)
        S.append(t * d), Y.append(g_new - g), RHO.append(1.0 / sy)
        S, Y, RHO = S[-m:], Y[-m:], RHO[-m:]
        g = g_new
    out, tmp = np.empty(P), np.empty(P)
    h.direction(g, out, tmp)
    ref = -_two_loop(g, S, Y, RHO)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


def _search(phi, t0, **kw):
    ls = LineSearch(**kw)
    f0, d0 = phi(0.0)
    t = ls.start(t0, f0, d0)
    for n in range(1, 60):
        f, d = phi(t)
        t = ls.step(f, d)
        if ls.done:
            return t, n, ls, f0, d0
    raise AssertionError("no step in 60 evaluations")


@pytest.mark.parametrize("t0", [1e-3, 1e-1, 1.0, 10.0, 1e3])
@pytest.mark.parametrize("case", ["mt1", "mt2", "mt3", "quadratic"])
def test_line_search_meets_strong_wolfe(case, t0):
    """Moré and Thuente's first three test functions and a quadratic: the step found satisfies
    sufficient decrease and the curvature condition."""
    if case == "mt1":  # phi(t) = -t / (t^2 + 2)
        def phi(t):
            return -t / (t * t + 2.0), (t * t - 2.0) / (t * t + 2.0) ** 2
        kw = dict(ftol=1e-3, gtol=0.1)
    elif case == "mt2":  # phi(t) = (t + 0.004)^5 - 2 (t + 0.004)^4
        def phi(t):
            u = t + 0.004
            return u ** 5 - 2 * u ** 4, 5 * u ** 4 - 8 * u ** 3
        kw = dict(ftol=0.1, gtol=0.1, xtol=1e-10)  # at L-BFGS-B's 0.1 the interval test ends it
    elif case == "mt3":
        phi = _mt3
        kw = dict(ftol=0.1, gtol=0.1, xtol=1e-10)
    else:
        def phi(t):
            return (t - 3.0) ** 2, 2.0 * (t - 3.0)
        kw = dict()
    t, n, ls, f0, d0 = _search(phi, t0, **kw)
    f, d = phi(t)
    assert not ls.warning, ls.warning
    assert f <= f0 + ls.ftol * t * d0
    assert abs(d) <= ls.gtol * abs(d0)
    assert n <= 20


def _mt1(t):  # Moré-Thuente's function 1, beta = 2
    return -t / (t * t + 2.0), (t * t - 2.0) / (t * t + 2.0) ** 2


def _mt3(t, b=0.01, l=39):  # function 3: a convex kink plus a wiggle
    if t <= 1 - b:
        f0, d0 = 1 - t, -1.0
    elif t >= 1 + b:
        f0, d0 = t - 1, 1.0
    else:
        f0, d0 = (t - 1) ** 2 / (2 * b) + b / 2, (t - 1) / b
    return (f0 + 2 * (1 - b) / (l * math.pi) * math.sin(l * math.pi * t / 2),
            d0 + (1 - b) * math.cos(l * math.pi * t / 2))


@pytest.mark.parametrize("t0", [1e-3, 1e-1, 10.0, 1e3])
@pytest.mark.parametrize("case", ["mt1", "mt3"])
def test_line_search_steps_equal_minpack_dcsrch(case, t0):
    """The same trial steps, in the same order, as MINPACK-2's dcsrch (scipy's translation, a
    private module: skipped where it moved), at L-BFGS-B's parameters and tighter ones."""
    dcsrch = pytest.importorskip("scipy.optimize._dcsrch")
    phi = _mt1 if case == "mt1" else _mt3
    for ftol, gtol, xtol in ((1e-3, 0.9, 0.1), (0.1, 0.1, 0.1), (1e-3, 0.1, 1e-10)):
        theirs = []

        def f(t):
            theirs.append(t)
            return phi(t)[0]
        ref = dcsrch.DCSRCH(f, lambda t: phi(t)[1], ftol, gtol, xtol, 0.0, 1e10)
        ref(t0, maxiter=100)
        ls = LineSearch(ftol, gtol, xtol, 0.0, 1e10)
        t = ls.start(t0, *phi(0.0))
        ours = []
        while True:
            ours.append(t)
            t = ls.step(*phi(t))
            if ls.done:
                break
        theirs = [t for t in theirs if t != 0.0]  # its evaluation of phi(0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_line_search_backs_off_from_overflow():
    """f is inf beyond t = 1 (an overflow in the loss): the search returns a finite step."""
    def phi(t):
        if t > 1.0:
            return math.inf, math.nan
        return (t - 0.8) ** 2, 2 * (t - 0.8)
    t, n, ls, f0, d0 = _search(phi, 100.0)
    assert 0 < t <= 1.0 and phi(t)[0] < f0


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_estimator_same_fit_with_either_solver(monkeypatch, sparse, n_classes):
    """The estimator's fit with our L-BFGS (forced on a small problem) equals the one with
    scipy's L-BFGS-B: same n_iter, coefficients to 1e-8 relative."""
    sp = pytest.importorskip("scipy.sparse")
    from manual_layers.sklearn import LogisticRegression
    rng = np.random.default_rng(n_classes + 10 * sparse)
    N, D = 400, 30
    X = rng.normal(size=(N, D))
    if sparse:
        X[rng.random((N, D)) < 0.7] = 0.0
        X = sp.csr_matrix(X)
    y = rng.integers(0, n_classes, size=N)
    fits = {}
    for own in (True, False):
        monkeypatch.setattr(fit_mod, "OWN_LBFGS_FROM", 0 if own else 10 ** 9)
        clf = LogisticRegression(C=0.5, tol=1e-6, max_iter=500).fit(X, y)
        fits[own] = (np.hstack([clf.coef_, clf.intercept_[:, None]]), int(clf.n_iter_[0]))
    (a, na), (b, nb) = fits[True], fits[False]
    assert na == nb
    assert np.abs(a - b).max() <= 1e-8 * np.abs(b).max()


def test_large_problem_uses_own_solver(monkeypatch):
    """At OWN_LBFGS_FROM parameters and above, the fit does not call scipy's minimize."""
    import scipy.optimize

    def boom(*a, **k):
        raise AssertionError("scipy.optimize.minimize was called")
    monkeypatch.setattr(scipy.optimize, "minimize", boom)
    monkeypatch.setattr(fit_mod, "OWN_LBFGS_FROM", 10)
    X = torch.randn(200, 12, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    res = fit_mod.fit_logistic_regression(X, y, 2, tol=1e-8, max_iter=200)
    assert res.converged and res.n_iter > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("sparse", [False, True])
def test_objective_cpu_path_equals_its_sums(dtype, n_classes, sparse):
    """LinearObjective.evaluate's one-process CPU path (the kernel's outputs divided straight
    into the gradient, into `out` or a fresh array) gives bitwise the values of the general path:
    local_sums' float64 vector divided by S, plus the L2 term."""
    sp = pytest.importorskip("scipy.sparse")
    from manual_layers import _sparse
    from manual_layers._fit_objective import LinearObjective
    rng = np.random.default_rng(n_classes + 10 * sparse)
    Xn = rng.normal(size=(300, 20))
    Xn[rng.random(Xn.shape) < 0.5] = 0.0
    X = (_sparse.to_csr(sp.csr_matrix(Xn), torch.device("cpu"), dtype) if sparse
         else torch.as_tensor(Xn, dtype=dtype))
    y = torch.as_tensor(rng.integers(0, n_classes, 300))
    s = torch.as_tensor(rng.random(300), dtype=dtype)
    obj = LinearObjective(X, y.to(dtype) if n_classes == 2 else y, n_classes, s=s, C=0.7)
    p = rng.normal(size=obj.n_params)
    KD = obj.K * obj.D
    sums = obj.local_sums(p)
    f_ref = sums[0] / obj.S + 0.5 * obj.l2_inv_C * float(p[:KD] @ p[:KD]) / obj.S
    g_ref = sums[1:] / obj.S
    g_ref[:KD] += (obj.l2_inv_C / obj.S) * p[:KD]
    out = np.full(obj.n_params, np.nan)
    for f, g in (obj.evaluate(p), obj.evaluate(p, out=out)):
        assert f == f_ref
        np.testing.assert_array_equal(g, g_ref)
    assert not np.isnan(out).any()
