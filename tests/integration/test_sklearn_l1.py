"""L1 and elastic-net logistic regression (OWL-QN, manual_layers/_solvers.py) against
scikit-learn's saga, and scikit-learn 1.8+'s penalty / l1_ratio / solver rules."""

import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression as SkLR  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import manual_layers as ml  # noqa: E402
from manual_layers._solvers import owlqn, pseudo_gradient  # noqa: E402
from manual_layers.sklearn import LogisticRegression  # noqa: E402

SAGA_TIGHT = dict(solver="saga", tol=1e-10, max_iter=100000)
OURS_TIGHT = dict(solver="saga", tol=1e-10, max_iter=10000)


pytestmark = pytest.mark.usefixtures("one_blas_thread")  # conftest.py


@parametrize_with_checks([LogisticRegression(solver="saga", l1_ratio=1.0),
                          LogisticRegression(solver="saga", l1_ratio=0.5, C=0.5)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def _rng():
    seed = np.random.SeedSequence().entropy  # fresh data every run
    print(f"data seed: {seed}")
    return np.random.default_rng(seed)


def _data(rng, N, D, K, sparse_truth=0.3):
    """Well-conditioned standardised features and labels from a sparse true model."""
    X = rng.normal(size=(N, D))
    W = rng.normal(size=(K, D)) * (rng.random((K, D)) < sparse_truth) * 2
    y = (X @ W.T + rng.gumbel(size=(N, K))).argmax(1) if K > 2 else \
        (X @ W[0] + rng.logistic(size=N) > 0).astype(int)
    return X, y


def objective(model, X, y, C, l1_ratio, sample_weight=None, class_weight=None):
    """scikit-learn saga's objective times S: sum_i s_i (-log p(y_i | x_i)) +
    ((1 - r) ||W||^2 / 2 + r ||W||_1) / C."""
    classes = list(model.classes_)
    idx = np.array([classes.index(v) for v in y])
    s = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, float).copy()
    if isinstance(class_weight, dict):
        s *= np.array([class_weight[v] for v in y])
    p = np.clip(model.predict_proba(X)[np.arange(len(y)), idx], 1e-300, None)
    W = model.coef_
    pen = ((1 - l1_ratio) * 0.5 * np.sum(W ** 2) + l1_ratio * np.abs(W).sum()) / C
    return float(np.sum(s * -np.log(p)) + pen)


def _quiet_fit(est, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saga's ConvergenceWarning on hard draws
        return est.fit(*a, **kw)


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_matches_saga_objective_and_zero_pattern(K, l1_ratio, fit_intercept):
    rng = _rng()
    N, D = int(rng.integers(300, 800)), int(rng.integers(5, 25))
    X, y = _data(rng, N, D, K)
    C = float(rng.choice([0.05, 0.2, 1.0]))
    kw = dict(C=C, l1_ratio=l1_ratio, fit_intercept=fit_intercept)
    sk = _quiet_fit(SkLR(**kw, **SAGA_TIGHT), X, y)
    ours = LogisticRegression(**kw, **OURS_TIGHT).fit(X, y)
    assert ours.coef_.shape == sk.coef_.shape and ours.intercept_.shape == sk.intercept_.shape
    f_ours, f_sk = objective(ours, X, y, C, l1_ratio), objective(sk, X, y, C, l1_ratio)
    assert f_ours <= f_sk * (1 + 1e-6), (f_ours, f_sk)
    assert abs(f_ours - f_sk) <= 1e-6 * abs(f_sk), (f_ours, f_sk)
    # exact zeros, in the same places as saga's; a coefficient whose optimum sits next to the
    # kink (below 1e-6 in either solution) may round to either side
    zeros_ours, zeros_sk = ours.coef_ == 0, sk.coef_ == 0
    assert zeros_sk.any() <= zeros_ours.any()
    near_kink = (zeros_ours ^ zeros_sk) & (np.maximum(np.abs(ours.coef_), np.abs(sk.coef_))
                                           <= 1e-6)
    decided = ~near_kink
    assert np.array_equal(zeros_ours[decided], zeros_sk[decided]), (ours.coef_, sk.coef_)
    assert decided.mean() >= 0.9


@pytest.mark.parametrize("K", [2, 4])
def test_weights_match_saga(K):
    rng = _rng()
    N, D = 500, 12
    X, y = _data(rng, N, D, K)
    labels = np.array([f"c{k}" for k in range(K)])
    sw = rng.uniform(0.2, 3.0, size=N)
    cw = {labels[k]: float(rng.uniform(0.5, 2)) for k in range(K)}
    kw = dict(C=0.1, l1_ratio=0.7, class_weight=cw)
    sk = _quiet_fit(SkLR(**kw, **SAGA_TIGHT), X, labels[y], sample_weight=sw)
    ours = LogisticRegression(**kw, **OURS_TIGHT).fit(X, labels[y], sample_weight=sw)
    f_ours = objective(ours, X, labels[y], 0.1, 0.7, sw, cw)
    f_sk = objective(sk, X, labels[y], 0.1, 0.7, sw, cw)
    assert abs(f_ours - f_sk) <= 1e-6 * abs(f_sk), (f_ours, f_sk)
    np.testing.assert_array_equal(ours.classes_, sk.classes_)


def test_l1_solution_is_optimal_by_the_subgradient_rule():
    """At the OWL-QN solution the pseudo-gradient is ~0: every zero coefficient has
    |dloss/dw_j| <= l1 weight, every non-zero one dloss/dw_j = -l1 sign(w_j)."""
    rng = _rng()
    X, y = _data(rng, 400, 30, 2, sparse_truth=0.2)
    clf = LogisticRegression(C=0.05, l1_ratio=1, solver="owlqn", tol=1e-9,
                             max_iter=5000).fit(X, y)
    from manual_layers import _fit
    obj = _fit.LinearObjective(torch.as_tensor(X), torch.as_tensor(y, dtype=torch.float64), 2,
                               C=0.05, l1_ratio=1.0)
    p = np.concatenate([clf.coef_.ravel(), clf.intercept_])
    _, g = obj.evaluate(p)
    pg = pseudo_gradient(p, g, obj.l1_weights())
    assert np.abs(pg).max() <= 1e-7
    assert (clf.coef_ == 0).sum() >= 5


def test_owlqn_reduces_to_least_squares_lasso_soft_threshold():
    """A separable quadratic: f = sum (x - a)^2 / 2, L1 weight l: x* = soft_threshold(a, l)."""
    a = np.array([3.0, -0.5, 0.2, -4.0, 1.0, 0.0])
    lam = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    x, n, conv, msg = owlqn(lambda x: (0.5 * float((x - a) @ (x - a)), x - a), np.zeros(6), lam,
                            max_iter=100, tol=1e-12)
    expect = np.sign(a) * np.maximum(np.abs(a) - lam, 0)
    assert conv, msg
    np.testing.assert_allclose(x, expect, atol=1e-10)
    assert (x[[1, 2, 5]] == 0).all()  # exact zeros


def test_l1_ratio_zero_and_c_inf_give_the_l2_and_unpenalised_fits():
    rng = _rng()
    X, y = _data(rng, 300, 6, 3)
    a = LogisticRegression(solver="saga", l1_ratio=0.0, tol=1e-10, max_iter=1000).fit(X, y)
    b = LogisticRegression(tol=1e-10, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-12)
    c = LogisticRegression(solver="saga", l1_ratio=1.0, C=np.inf, tol=1e-10,
                           max_iter=1000).fit(X, y)
    d = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(c.coef_, d.coef_, rtol=0, atol=1e-12)


def test_module_fit_l1_matches_estimator():
    rng = _rng()
    X, y = _data(rng, 300, 10, 3)
    est = LogisticRegression(C=0.1, l1_ratio=1, solver="saga", tol=1e-10,
                             max_iter=2000).fit(X, y)
    layer = ml.LogisticRegression(10, num_classes=3, dtype=torch.float32)
    layer.fit(torch.tensor(X, dtype=torch.float32), torch.tensor(y), C=0.1, l1_ratio=1,
              solver="owlqn", tol=1e-10, max_iter=2000)
    w = layer.weight.detach().double().numpy()
    assert np.array_equal(w == 0, est.coef_ == 0)
    np.testing.assert_allclose(w, est.coef_, atol=1e-5)


# ---- scikit-learn 1.8+'s penalty rules ------------------------------------------------------
def _xy():
    rng = _rng()
    return _data(rng, 60, 4, 2)


@pytest.mark.parametrize("kw, category, match", [
    (dict(penalty="l2"), FutureWarning, r"'penalty' was deprecated in version 1.8"),
    (dict(penalty="l1", solver="saga"), UserWarning, r"Inconsistent values: penalty=l1 with "
                                                     r"l1_ratio=0.0"),
    (dict(l1_ratio=None), FutureWarning, r"'l1_ratio=None' was deprecated in version 1.8"),
    (dict(penalty="l2", l1_ratio=0.5), UserWarning, r"l1_ratio parameter is only used when "
                                                    r"penalty is 'elasticnet'"),
    (dict(penalty=None, C=2.0), UserWarning, r"Setting penalty=None will ignore the C"),
    (dict(n_jobs=2), FutureWarning, r"'n_jobs' has no effect since 1.8"),
])
def test_penalty_warnings_as_sklearn(kw, category, match):
    X, y = _xy()
    with pytest.warns(category, match=match):
        LogisticRegression(**kw).fit(X, y)
    with pytest.warns(category, match=match):  # scikit-learn says the same
        SkLR(**kw).fit(X, y)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(C=-1.0), ValueError, r"C must be a number > 0, got -1.0"),
    (dict(C="1"), TypeError, r"C must be a number > 0, got '1'"),
    (dict(l1_ratio=1.5, solver="saga"), ValueError, r"l1_ratio must be a number >= 0 and <= 1"),
    (dict(l1_ratio=-0.1, solver="saga"), ValueError, r"l1_ratio must be a number >= 0 and <= 1"),
    (dict(l1_ratio=0.5), ValueError, r"Solver lbfgs supports only 'l2' or None penalties, got "
                                     r"elasticnet penalty"),
    (dict(l1_ratio=1, solver="sgd"), ValueError, r"Solver sgd supports only 'l2' or None"),
    (dict(penalty="elasticnet", l1_ratio=None, solver="saga"), ValueError,
     r"l1_ratio must be specified when penalty is elasticnet"),
    (dict(solver="liblinear", l1_ratio=1), ValueError, r"solver='liblinear' is not supported"),
    (dict(solver="newton"), ValueError, r"solver must be one of 'lbfgs', 'owlqn', 'saga'"),
    (dict(penalty="l3"), ValueError, r"penalty must be 'l1', 'l2', 'elasticnet' or None"),
])
def test_bad_penalty_parameters_raise(kw, exc, match):
    X, y = _xy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(exc, match=match):
            LogisticRegression(**kw).fit(X, y)
        with pytest.raises(exc, match=match):  # the layer: the same words, the same rules
            ml.LogisticRegression(4).fit(X, y, **kw)


@pytest.mark.parametrize("solver", ["newton-cg", "newton-cholesky", "sag"])
def test_sklearn_l2_solver_names_run_lbfgs(solver):
    X, y = _xy()
    a = LogisticRegression(solver=solver, tol=1e-10, max_iter=1000).fit(X, y)
    b = SkLR(solver=solver, tol=1e-10, max_iter=10000).fit(X, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-5, atol=1e-7)


def test_c_inf_is_no_penalty_without_warning():
    X, y = _xy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = LogisticRegression(C=math.inf, tol=1e-10, max_iter=1000).fit(X, y)
    b = SkLR(C=np.inf, tol=1e-10, max_iter=10000).fit(X, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("l1_ratio", [1.0, 0.3])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_cpp_owlqn_equals_python_owlqn(monkeypatch, dtype, K, l1_ratio, fit_intercept):
    """The C++ OWL-QN (csrc/fit/owlqn.cpp, the op _logreg_fit with an L1 weight, which small
    dense CPU fits run) against manual_layers/_solvers.py's owlqn on the same objective. float64:
    the same iterations, evaluations and message, parameters to 1e-8 and the same exact zeros.
    float32 (the objective's rounding changes line-search decisions): both converge to objectives
    within 1e-6 relative."""
    import manual_layers._fit as fit_mod
    from manual_layers._fit_objective import LinearObjective
    rng = np.random.default_rng(K + 10 * fit_intercept + int(10 * l1_ratio))
    Xn = rng.normal(size=(300, 12)) * rng.uniform(0.3, 3.0, size=12)
    W = rng.normal(size=(K, 12)) * (rng.random((K, 12)) < 0.4) * 2
    y = (Xn @ W.T + rng.gumbel(size=(300, K))).argmax(1)
    X, yt = torch.as_tensor(Xn, dtype=dtype), torch.as_tensor(y)
    out = {}
    for cpp in (True, False):
        monkeypatch.setattr(fit_mod, "CPP_FIT", cpp)
        obj = LinearObjective(X, yt.to(dtype) if K == 2 else yt, K, C=0.2,
                              fit_intercept=fit_intercept, l1_ratio=l1_ratio)
        assert fit_mod._cpp_fit_applies(obj, 0) == cpp
        res = fit_mod.fit_logistic_regression(X, yt, K, C=0.2, l1_ratio=l1_ratio,
                                              solver="owlqn", fit_intercept=fit_intercept,
                                              max_iter=500, tol=1e-6)
        p = np.r_[res.coef.double().numpy().ravel(), res.intercept.double().numpy()]
        out[cpp] = (p, res.n_iter, res.converged, res.message, res.n_evals, obj)
    (p, n, conv, msg, ne, _), (pr, nr, convr, msgr, ner, obj) = out[True], out[False]
    assert conv and convr
    if dtype == torch.float64:
        assert (n, msg, ne) == (nr, msgr, ner)
        assert np.abs(p - pr).max() <= 1e-8 * max(1.0, np.abs(pr).max())
        np.testing.assert_array_equal(p == 0, pr == 0)
        assert (p == 0).any()  # the L1 share zeroed some coefficients
    else:
        def F(q):  # the whole objective at a parameter vector (intercepts as fitted)
            KD = obj.K * obj.D
            x = np.r_[q[:KD], q[KD:] if fit_intercept else []]
            return obj.evaluate(x)[0] + float(obj.l1_weights() @ np.abs(x))
        assert abs(F(p) - F(pr)) <= 1e-6 * abs(F(pr))
