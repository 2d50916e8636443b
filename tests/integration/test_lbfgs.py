"""The L2 fit's L-BFGS (manual_layers/_lbfgs.py, and its C++ port csrc/fit/lbfgs.cpp behind the
op _logreg_fit) against scipy's L-BFGS-B, whose algorithm both follow: the same iterates on
fresh random logistic objectives, the compact direction against the two-loop recursion, the
Moré-Thuente line search's conditions, and the estimator's results with each solver."""

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


def _solver(monkeypatch, which):
    """Route the L2 fit to one L-BFGS: "cpp" (the C++ op, dense CPU X only), "python"
    (manual_layers/_lbfgs.py) or "scipy" (scipy's L-BFGS-B)."""
    monkeypatch.setattr(fit_mod, "CPP_FIT", which == "cpp")
    monkeypatch.setattr(fit_mod, "OWN_LBFGS_FROM", 0 if which != "scipy" else 10 ** 9)


def _objective(seed, n_classes, dtype=torch.float64, N=300, D=40, C=1.0, weights=None,
               fit_intercept=True):
    """A fresh LinearObjective (uneven feature scales; weights: None, "sample" or "class")."""
    from manual_layers._fit_objective import LinearObjective
    rng = np.random.default_rng(seed)
    Xn = rng.normal(size=(N, D)) * rng.uniform(0.1, 3.0, size=D)
    K = 1 if n_classes == 2 else n_classes
    y = (Xn @ rng.normal(size=(D, K)) + rng.logistic(size=(N, K))).argmax(1) if K > 1 else \
        (Xn @ rng.normal(size=D) + rng.logistic(size=N) > 0).astype(np.int64)
    X = torch.as_tensor(Xn, dtype=dtype)
    yt = torch.as_tensor(y)
    target = yt.to(dtype) if n_classes == 2 else yt
    s = cw_only = None
    if weights == "sample":
        s = torch.as_tensor(rng.uniform(0.2, 2.0, size=N), dtype=dtype)
    elif weights == "class":
        cw_only = torch.as_tensor(rng.uniform(0.5, 2.0, size=n_classes), dtype=dtype)
        s = cw_only[yt] if n_classes > 2 else None
        if n_classes == 2:
            s, cw_only = cw_only[yt], None
    return LinearObjective(X, target, n_classes, s=s, class_weight_only=cw_only, C=C,
                           fit_intercept=fit_intercept)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_iter", [1, 4, 15, 60])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_cpp_iterates_match_scipy_lbfgsb(monkeypatch, seed, max_iter, n_classes):
    """The C++ fit loop (csrc/fit/lbfgs.cpp, op _logreg_fit) takes scipy's L-BFGS-B's
    iterations on the same objective: same count, iterates within 1e-7, after 1, 4, 15, 60."""
    out = {}
    for which in ("cpp", "scipy"):
        _solver(monkeypatch, which)
        obj = _objective(seed, n_classes, C=0.3)
        x0 = np.random.default_rng(seed + 100).normal(size=obj.n_params) * 0.1
        out[which] = fit_mod._lbfgs(obj, x0, max_iter, 1e-12, 0)
    (x, n_iter, conv, _), (ref, nit, _, _) = out["cpp"], out["scipy"]
    assert n_iter == nit
    assert np.abs(x - ref).max() <= 1e-7 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("weights", [None, "sample", "class"])
@pytest.mark.parametrize("fit_intercept,C", [(True, 0.5), (False, None)])
def test_cpp_fit_equals_python_fit(monkeypatch, dtype, n_classes, weights, fit_intercept, C):
    """The C++ loop against manual_layers/_lbfgs.py on the same objective (the same kernels,
    in X's dtype). float64: same n_iter, evaluations, convergence and message, parameters to
    1e-8. float32: the two loops' float64 dot products round differently, and a float32
    objective's own rounding (1e-7 relative) then changes line-search decisions, so only the
    outcome is compared: both converge, to objectives within 1e-6 relative."""
    if weights == "sample" and n_classes > 2:
        weights = "class"  # per-sample weights with several classes keep the Python loop
    out = {}
    for which in ("cpp", "python"):
        _solver(monkeypatch, which)
        obj = _objective(7, n_classes, dtype, C=C, weights=weights, fit_intercept=fit_intercept)
        assert fit_mod._cpp_fit_applies(obj, 0) == (which == "cpp")
        out[which] = fit_mod._lbfgs(obj, np.zeros(obj.n_params), 200, 1e-5, 0) + (obj.n_evals,)
    (x, n, conv, msg, ne), (xr, nr, convr, msgr, ner) = out["cpp"], out["python"]
    if dtype == torch.float64:
        assert (n, conv, msg) == (nr, convr, msgr) and ne == ner > 0
        assert np.abs(x - xr).max() <= 1e-8 * max(1.0, np.abs(xr).max())
    else:
        f, fr = obj.evaluate(x)[0], obj.evaluate(xr)[0]
        assert conv and convr and n > 0 and abs(f - fr) <= 1e-6 * abs(fr)


def test_cpp_fit_reports_why_it_stopped(monkeypatch):
    _solver(monkeypatch, "cpp")
    obj = _objective(3, 2)
    x, n_iter, conv, msg = fit_mod._lbfgs(obj, np.zeros(obj.n_params), 1000, 1e-6, 0)
    assert conv and "tol" in msg and n_iter > 3
    g = obj.evaluate(x)[1]
    assert np.abs(g).max() <= 1e-6
    _, n, conv, msg = fit_mod._lbfgs(obj, np.zeros(obj.n_params), 3, 1e-12, 0)
    assert (n, conv, msg) == (3, False, "max_iter=3 iterations reached")
    _, n, conv, msg = fit_mod._lbfgs(obj, x, 10, 1.0, 0)
    assert (n, conv) == (0, True) and "starting point" in msg


def test_cpp_fit_only_where_it_applies(monkeypatch):
    """The C++ loop takes small dense CPU fits (L2 or an L1 share); large ones (interruptible
    between Python evaluations), sparse X, a progress bar and weighted multinomial fits keep the
    Python loop."""
    from manual_layers import _sparse
    from manual_layers._fit_objective import LinearObjective
    sp = pytest.importorskip("scipy.sparse")
    obj = _objective(0, 3)
    assert fit_mod._cpp_fit_applies(obj, 0)
    assert not fit_mod._cpp_fit_applies(obj, 1)  # verbose: the progress bar
    monkeypatch.setattr(fit_mod, "CPP_FIT_MAX_WORK", obj.X.numel() * obj.K)
    assert not fit_mod._cpp_fit_applies(obj, 0)
    monkeypatch.undo()
    assert not fit_mod._cpp_fit_applies(_objective(0, 3, weights="sample"), 0)
    assert fit_mod._cpp_fit_applies(_objective(0, 3, weights="class"), 0)
    assert fit_mod._cpp_fit_applies(_objective(0, 2, weights="sample"), 0)
    X = _sparse.to_csr(sp.random(50, 8, density=0.3, format="csr", random_state=0),
                       torch.device("cpu"), torch.float64)
    y = torch.randint(0, 2, (50,)).double()
    assert not fit_mod._cpp_fit_applies(LinearObjective(X, y, 2), 0)
    Xd = torch.randn(50, 8, dtype=torch.float64)
    assert fit_mod._cpp_fit_applies(LinearObjective(Xd, y, 2, l1_ratio=0.5), 0)  # OWL-QN


def test_cpp_fit_op_checks():
    """The op's schema, fake kernel and AOT dispatch (torch.library.opcheck), and its errors."""
    X = torch.randn(50, 6, dtype=torch.float64)
    y = (X[:, 0] > 0).double()
    for l1 in (0.0, 0.01):  # L-BFGS, OWL-QN
        args = (X, y, None, None, 2, True, 50.0, 1.0, l1, torch.zeros(7, dtype=torch.float64),
                20, 1e-6)
        torch.library.opcheck(torch.ops.manual_layers._logreg_fit.default, args)
    op = torch.ops.manual_layers._logreg_fit
    with pytest.raises(RuntimeError, match="x0 must be a float64 vector of 7 parameters"):
        op(*args[:9], torch.zeros(6, dtype=torch.float64), 20, 1e-6)
    with pytest.raises(RuntimeError, match="weight_sum must be positive"):
        op(*args[:6], 0.0, *args[7:])
    with pytest.raises(RuntimeError, match="l1_weight must be non-negative"):
        op(*args[:8], -1.0, *args[9:])


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("which", ["cpp", "python"])
def test_estimator_same_fit_with_either_solver(monkeypatch, sparse, n_classes, which):
    """The estimator's fit with our L-BFGS (the C++ loop, or the Python one forced on a small
    problem) equals the one with scipy's L-BFGS-B: same n_iter, coefficients to 1e-8
    relative. (The C++ loop takes dense X only: sparse X runs the Python one either way.)"""
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
    for solver in (which, "scipy"):
        _solver(monkeypatch, solver)
        clf = LogisticRegression(C=0.5, tol=1e-6, max_iter=500).fit(X, y)
        fits[solver] = (np.hstack([clf.coef_, clf.intercept_[:, None]]), int(clf.n_iter_[0]))
    (a, na), (b, nb) = fits[which], fits["scipy"]
    assert na == nb
    assert np.abs(a - b).max() <= 1e-8 * np.abs(b).max()


def test_large_problem_uses_own_solver(monkeypatch):
    """At OWN_LBFGS_FROM parameters and above, the fit does not call scipy's minimize."""
    import scipy.optimize

    def boom(*a, **k):
        raise AssertionError("scipy.optimize.minimize was called")
    monkeypatch.setattr(scipy.optimize, "minimize", boom)
    monkeypatch.setattr(fit_mod, "OWN_LBFGS_FROM", 10)
    monkeypatch.setattr(fit_mod, "CPP_FIT", False)  # the Python loop, not the C++ op
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


@pytest.mark.parametrize("which", ["python", "scipy"])
def test_large_fits_keep_more_pairs(monkeypatch, which):
    """_lbfgs_pairs: scikit-learn's 10 correction pairs for fits below CPP_FIT_MAX_WORK; above
    it as many as fit in half of X's bytes (2 m P float64 <= X's bytes / 2), from 10 up to 100. Both
    L-BFGS loops get the count, and with more pairs the fit reaches the optimum the 10-pair fit
    reaches (tight tol)."""
    import scipy.optimize
    import manual_layers._lbfgs as lbfgs_mod
    _solver(monkeypatch, which)
    seen = []
    own, scipy_min = lbfgs_mod.lbfgs, scipy.optimize.minimize

    def spy_own(*a, m=10, **k):
        seen.append(m)
        return own(*a, m=m, **k)

    def spy_scipy(*a, options=None, **k):
        seen.append(options["maxcor"])
        return scipy_min(*a, options=options, **k)

    monkeypatch.setattr(lbfgs_mod, "lbfgs", spy_own)
    monkeypatch.setattr(scipy.optimize, "minimize", spy_scipy)
    obj = _objective(3, 2, N=1000, D=40, C=0.5)  # X: 320,000 bytes, P = 41
    assert fit_mod._lbfgs_pairs(obj) == fit_mod.LBFGS_PAIRS == 10
    monkeypatch.setattr(fit_mod, "CPP_FIT_MAX_WORK", 1)
    assert fit_mod._lbfgs_pairs(obj) == fit_mod.LBFGS_PAIRS_MAX == 100  # 320,000 // 1,312 = 243
    assert fit_mod._lbfgs_pairs(_objective(3, 2, N=100, D=40)) == 24  # 32,000 // 1,312
    assert fit_mod._lbfgs_pairs(_objective(3, 2, N=30, D=40)) == 10  # 9,600 // 1,312 = 7
    x100, _, conv100, _ = fit_mod._lbfgs(obj, np.zeros(obj.n_params), 1000, 1e-10, 0)
    monkeypatch.setattr(fit_mod, "LBFGS_PAIRS_MAX", 10)
    x10, _, conv10, _ = fit_mod._lbfgs(obj, np.zeros(obj.n_params), 1000, 1e-10, 0)
    assert seen == [100, 10] and conv100 and conv10
    f100, f10 = obj.evaluate(x100)[0], obj.evaluate(x10)[0]
    assert abs(f100 - f10) <= 1e-12 * abs(f10)
    # both stop on ftol (the objective flat to rounding), a few 1e-6 apart
    assert np.abs(x100 - x10).max() <= 1e-5 * np.abs(x10).max()
