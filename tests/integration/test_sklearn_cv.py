"""manual_layers.sklearn.LogisticRegressionCV against scikit-learn's LogisticRegressionCV: the
same folds, grid, scores, chosen C / l1_ratio and fitted attributes in the shapes of the
installed scikit-learn."""

import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegressionCV as SkCV  # noqa: E402
from sklearn.model_selection import KFold, StratifiedKFold  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from manual_layers.sklearn import LogisticRegressionCV  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_blas_thread")  # conftest.py


def _rng():
    seed = np.random.SeedSequence().entropy  # fresh data every run
    print(f"data seed: {seed}")
    return np.random.default_rng(seed)


def _data(rng, N, D, K):
    X = rng.normal(size=(N, D)) * rng.uniform(0.5, 2, size=D)
    W = rng.normal(size=(K, D)) * (rng.random((K, D)) < 0.5)
    y = (X @ W.T + rng.gumbel(size=(N, K))).argmax(1)
    return X, y


NEW = dict(use_legacy_attributes=False, scoring="neg_log_loss")


def _expected_failed_checks(est):
    if est.max_iter > 5 and est.Cs == 10:
        return {"check_non_transformer_estimators_n_iter":
                "a C warm-started from a solution already within tol takes 0 iterations; "
                "scikit-learn's own LogisticRegressionCV(max_iter=50, cv=3) fails this check "
                "the same way"}
    return {}


@parametrize_with_checks([LogisticRegressionCV(max_iter=5, cv=3, l1_ratios=(0.0,), **NEW),
                          LogisticRegressionCV(max_iter=50, cv=3),  # the defaults (warnings)
                          LogisticRegressionCV(max_iter=50, cv=3, Cs=3, solver="saga",
                                               l1_ratios=(0.0, 0.5, 1.0), scoring="accuracy",
                                               use_legacy_attributes=True)],
                         expected_failed_checks=_expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ConvergenceWarning at max_iter=5
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's, for the defaults
        check(estimator)


def _pair(X, y, sample_weight=None, **kw):
    kw = {**dict(tol=1e-10, max_iter=2000), **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkCV(**kw).fit(X, y, sample_weight=sample_weight)
        ours = LogisticRegressionCV(**kw).fit(X, y, sample_weight=sample_weight)
    return ours, sk


def _assert_shapes_equal(a, b):
    for name in ("C_", "l1_ratio_", "Cs_", "l1_ratios_", "coef_", "intercept_", "classes_",
                 "n_iter_"):
        va, vb = getattr(a, name), getattr(b, name)
        assert np.shape(va) == np.shape(vb), (name, np.shape(va), np.shape(vb))
    for name in ("scores_", "coefs_paths_"):
        va, vb = getattr(a, name), getattr(b, name)
        assert type(va) is type(vb), name
        if isinstance(vb, dict):
            assert list(va) == list(vb), name
            for k in vb:
                assert va[k].shape == vb[k].shape, (name, k, va[k].shape, vb[k].shape)
        else:
            assert va.shape == vb.shape, (name, va.shape, vb.shape)


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("legacy", [True, False])
def test_matches_sklearn_l2(K, legacy):
    rng = _rng()
    X, y = _data(rng, int(rng.integers(200, 400)), 6, K)
    sw = rng.uniform(0.5, 2, size=len(y))
    ours, sk = _pair(X, y, sample_weight=sw, Cs=6, cv=4, l1_ratios=(0.0,),
                     scoring="neg_log_loss", use_legacy_attributes=legacy)
    _assert_shapes_equal(ours, sk)
    s_o = ours.scores_ if not legacy else ours.scores_[ours.classes_[-1]]
    s_s = sk.scores_ if not legacy else sk.scores_[sk.classes_[-1]]
    np.testing.assert_allclose(s_o, s_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.C_, sk.C_)
    np.testing.assert_allclose(ours.Cs_, sk.Cs_)
    np.testing.assert_allclose(ours.coef_, sk.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ours.predict(X), sk.predict(X))
    # score() uses `scoring`, as scikit-learn's LogisticRegressionCV.score does
    assert ours.score(X, y, sample_weight=sw) == pytest.approx(sk.score(X, y, sample_weight=sw),
                                                               rel=1e-4)
    assert ours.score(X, y) < 0  # neg_log_loss


def test_matches_sklearn_elasticnet_grid():
    rng = _rng()
    X, y = _data(rng, 300, 8, 3)
    kw = dict(Cs=[0.01, 0.1, 1.0], l1_ratios=[0.0, 0.5, 1.0], solver="saga", cv=3,
              scoring="neg_log_loss", use_legacy_attributes=False)
    ours, sk = _pair(X, y, **kw)
    _assert_shapes_equal(ours, sk)
    # Where the L1 share zeroes every weight, the optimum is the intercepts alone: the log class
    # frequencies of the fold's training rows (saga stops early there: its test is the relative
    # change of the weights, all zero); elsewhere the scores agree.
    folds = list(StratifiedKFold(3).split(X, y))
    all_zero = (ours.coefs_paths_[..., :-1] == 0).all(axis=(-1, -2))
    for f, j, i in zip(*np.nonzero(all_zero)):
        freq = np.bincount(y[folds[f][0]], minlength=3) / len(folds[f][0])
        b = ours.coefs_paths_[f, j, i, :, -1]
        np.testing.assert_allclose(b - b.mean(), np.log(freq) - np.log(freq).mean(), atol=1e-6)
    np.testing.assert_allclose(ours.scores_[~all_zero], sk.scores_[~all_zero], rtol=1e-4,
                               atol=1e-5)
    assert ours.C_ == sk.C_ and ours.l1_ratio_ == sk.l1_ratio_
    assert np.array_equal(ours.coef_ == 0, sk.coef_ == 0) or \
        np.abs(ours.coef_ - sk.coef_).max() <= 1e-4


@pytest.mark.parametrize("refit", [True, False])
def test_default_parameters_warn_and_shape_like_sklearn(refit):
    """scoring="warn", l1_ratios="warn", use_legacy_attributes="warn": scikit-learn's
    FutureWarnings, accuracy, legacy dict attributes; refit=False averages the folds' best."""
    rng = _rng()
    X, y = _data(rng, 240, 5, 3)
    labels = np.array(["x", "y", "z"])[y]
    with pytest.warns(FutureWarning) as rec:
        ours = LogisticRegressionCV(Cs=4, refit=refit, tol=1e-8, max_iter=500).fit(X, labels)
    msgs = " ".join(str(w.message) for w in rec)
    for part in ("l1_ratios will change", "'scoring' will change", "use_legacy_attributes"):
        assert part in msgs, part
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkCV(Cs=4, refit=refit, tol=1e-8, max_iter=500).fit(X, labels)
    _assert_shapes_equal(ours, sk)
    np.testing.assert_allclose(ours.scores_["x"], sk.scores_["x"], atol=1e-9)
    np.testing.assert_allclose(ours.C_, sk.C_)
    assert ours.score(X, labels) == pytest.approx(sk.score(X, labels), abs=0.02)


def test_custom_cv_and_class_weight():
    rng = _rng()
    X, y = _data(rng, 200, 4, 2)
    cw = {0: 1.0, 1: 3.0}
    ours, sk = _pair(X, y, Cs=[0.1, 1, 10], cv=KFold(3, shuffle=True, random_state=0),
                     class_weight=cw, l1_ratios=(0,), scoring="accuracy",
                     use_legacy_attributes=False)
    np.testing.assert_allclose(ours.scores_, sk.scores_)
    assert ours.C_ == sk.C_
    ours_b, sk_b = _pair(X, y, Cs=3, class_weight="balanced", l1_ratios=(0,),
                         scoring="roc_auc", use_legacy_attributes=False)
    np.testing.assert_allclose(ours_b.scores_, sk_b.scores_, atol=1e-6)


def test_warm_start_along_the_path_saves_iterations():
    rng = _rng()
    X, y = _data(rng, 500, 10, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cv = LogisticRegressionCV(Cs=[1.0, 1.0 + 1e-9], l1_ratios=(0,), **NEW).fit(X, y)
    # the second C is the first to 1e-9: from its solution next to no iterations are needed
    assert (cv.n_iter_[:, 0, 1] <= 2).all() and (cv.n_iter_[:, 0, 0] > 5).all()


@pytest.mark.parametrize("kw, match", [
    (dict(Cs=0), r"Cs must be an integer >= 1"),
    (dict(Cs=[1.0, -2.0]), r"each of Cs must be a number > 0"),
    (dict(l1_ratios=[0.5, 2.0], solver="saga"), r"l1_ratios must be an array-like of numbers "
                                                r"between 0 and 1"),
    (dict(l1_ratios=[0.5]), r"Solver lbfgs supports only 'l2' or None penalties"),
    (dict(class_weight={0: 1.0, 9: 2.0}), r"class_weight dict must have the class labels"),
    (dict(tol="1e-4"), r"tol must be a number >= 0"),
])
def test_bad_parameters_raise(kw, match):
    X, y = _data(_rng(), 60, 3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ValueError, match=match):
            LogisticRegressionCV(**{"scoring": None, **kw}).fit(X, y)


@pytest.mark.parametrize("scoring", ["neg_log_loss", "balanced_accuracy"])
@pytest.mark.parametrize("n_jobs", [2, None])
def test_n_jobs_threads_give_the_same_result(n_jobs, scoring):
    """Folds in threads (n_jobs=2, or None's choice on small dense L2 data) give bitwise the
    sequential fit's results; with a scorer of scikit-learn's too (it scores an estimator
    shell, which the threads must not share)."""
    import torch
    rng = _rng()
    X, y = _data(rng, 400, 6, 3)
    kw = dict(Cs=5, cv=4, l1_ratios=(0.0,), tol=1e-8, max_iter=500,
              **{**NEW, "scoring": scoring})
    threads = torch.get_num_threads()
    one = LogisticRegressionCV(n_jobs=1, **kw).fit(X, y)
    two = LogisticRegressionCV(n_jobs=n_jobs, **kw).fit(X, y)
    assert torch.get_num_threads() == threads  # restored after the threaded folds
    np.testing.assert_array_equal(one.scores_, two.scores_)
    np.testing.assert_array_equal(one.coefs_paths_, two.coefs_paths_)
    np.testing.assert_array_equal(one.coef_, two.coef_)


def test_n_jobs_none_chooses_threads_only_where_the_fits_run_in_cpp():
    import torch
    import scipy.sparse as sp
    rng = _rng()
    X, y = _data(rng, 400, 6, 3)
    folds, cpu = 4, torch.device("cpu")
    want = max(1, min(torch.get_num_threads(), folds))
    est = LogisticRegressionCV()
    assert est._workers(folds, cpu, X, 3, [0.0], "elasticnet", False) == want
    assert est._workers(folds, cpu, X, 3, [0.0], "l2", False) == want
    assert est._workers(folds, cpu, X, 2, [0.0], "l2", True) == want  # binary: weights in C++
    assert est._workers(folds, cpu, X, 3, [0.0], "l2", True) == 1  # weights: the Python loop
    assert est._workers(folds, cpu, X, 3, [0.0, 0.5], "elasticnet", False) == 1  # OWL-QN
    assert est._workers(folds, cpu, X, 3, [0.0], "l1", False) == 1
    assert est._workers(folds, cpu, sp.csr_matrix(X), 3, [0.0], "l2", False) == 1
    assert est._workers(folds, cpu, np.zeros((10 ** 6, 8)), 3, [0.0], "l2", False) == 1  # large
    assert LogisticRegressionCV(n_jobs=1)._workers(folds, cpu, X, 3, [0.0], "l2", False) == 1
