"""manual_layers.sklearn.LogisticRegression (the scikit-learn estimator), the fit engine
(manual_layers/_fit.py) and manual_layers.LogisticRegression.fit (the nn.Module), against
scikit-learn's LogisticRegression(solver="lbfgs")."""

import io
import pickle
import warnings

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn")
from sklearn import datasets  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression as SkLR  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import manual_layers as ml  # noqa: E402
from manual_layers.sklearn import LogisticRegression  # noqa: E402
from conftest import DEVICES  # noqa: E402

TIGHT = dict(tol=1e-10, max_iter=10000)


pytestmark = pytest.mark.usefixtures("one_blas_thread")  # conftest.py


def _rng():
    seed = np.random.SeedSequence().entropy  # fresh data every run
    print(f"data seed: {seed}")  # shown with a failure, to reproduce it
    return np.random.default_rng(seed)


# ---- scikit-learn's own estimator checks --------------------------------------------------------
def _expected_failed_checks(est):
    if est.dtype == "float32":
        why = ("dtype='float32' computes the loss and gradient in float32, so the weighted and "
               "the repeated-rows fits agree to float32 rounding (about 1e-6 relative), not to "
               "the rtol=1e-7 of assert_allclose; float64 (the default for float64 X) passes")
        return {"check_sample_weight_equivalence_on_dense_data": why,
                "check_sample_weight_equivalence_on_sparse_data": why}
    return {}


@parametrize_with_checks([LogisticRegression(dtype="float64"), LogisticRegression(dtype="float32")],
                         expected_failed_checks=_expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ---- equality with scikit-learn ---------------------------------------------------------------
def _rel(a, e):
    return np.abs(np.asarray(a, np.float64) - e).max() / max(np.abs(e).max(), 1e-12)


def _objective(model, X, y, sample_weight, params):
    """scikit-learn's objective, up to its constant factor 1/S: sum_i s_i (-log p(y_i | x_i)) +
    ||coef||^2 / (2 C), s_i = sample weight x class weight of y_i."""
    classes = list(model.classes_)
    idx = np.array([classes.index(v) for v in y])
    s = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, float).copy()
    cw = params.get("class_weight")
    if isinstance(cw, dict):
        s *= np.array([cw[v] for v in y])
    elif cw == "balanced":
        counts = np.bincount(idx, weights=None, minlength=len(classes))
        s *= (len(y) / (len(classes) * counts))[idx]
    p = model.predict_proba(X)[np.arange(len(y)), idx]
    C = params.get("C", 1.0)
    return float(np.sum(s * -np.log(p)) + np.sum(model.coef_ ** 2) / (2 * C))


def _assert_same_as_sklearn(X, y, sample_weight=None, **params):
    sk = SkLR(**TIGHT, **params).fit(X, y, sample_weight=sample_weight)
    ours = LogisticRegression(**TIGHT, **params).fit(X, y, sample_weight=sample_weight)
    assert ours.coef_.shape == sk.coef_.shape and ours.intercept_.shape == sk.intercept_.shape
    intercept_gap = np.abs(ours.intercept_ - sk.intercept_).max() / max(
        1.0, np.abs(sk.intercept_).max())
    if _rel(ours.coef_, sk.coef_) > 1e-4 or intercept_gap > 1e-4:
        # Fresh random data is sometimes ill-conditioned enough (intercepts of a softmax are
        # flat in their common shift) that L-BFGS-B's relative-decrease stop leaves the two
        # solutions further apart than 1e-4, in the weights or only in the intercepts (seen in
        # ~3% of 7-class draws: intercepts 2e-4 apart, weights 2e-5, our objective the lower by
        # 3e-11 relative); then ours must be at least as good a minimum of the shared objective
        # as scikit-learn's, and the predictions must still agree.
        f_ours, f_sk = (_objective(m, X, y, sample_weight, params) for m in (ours, sk))
        assert f_ours <= f_sk * (1 + 1e-10), (_rel(ours.coef_, sk.coef_), intercept_gap, f_ours,
                                              f_sk, params)
        assert np.abs(ours.predict_proba(X) - sk.predict_proba(X)).max() <= 1e-3
        return ours, sk
    assert np.abs(ours.predict_proba(X) - sk.predict_proba(X)).max() <= 1e-4
    assert np.abs(ours.decision_function(X) - sk.decision_function(X)).max() <= 1e-4 * max(
        1.0, np.abs(sk.decision_function(X)).max())
    assert (ours.predict(X) == sk.predict(X)).mean() >= 0.999
    np.testing.assert_array_equal(ours.classes_, sk.classes_)
    return ours, sk


def _standardised(name):
    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.mark.parametrize("name, weights", [
    (name, w) for name in ("breast_cancer", "wine") for w in ("none", "sample", "class",
                                                              "balanced+sample")] +
    [("digits", "none"), ("digits", "balanced+sample")])
def test_matches_sklearn_on_datasets(name, weights):
    X, y = _standardised(name)
    rng = _rng()
    kw = {}
    sw = None
    if weights in ("sample", "balanced+sample"):
        sw = rng.uniform(0.1, 3.0, size=len(y))
    if weights == "class":
        kw["class_weight"] = {c: float(rng.uniform(0.2, 5.0)) for c in np.unique(y)}
    if weights == "balanced+sample":
        kw["class_weight"] = "balanced"
    _assert_same_as_sklearn(X, y, sample_weight=sw, C=float(rng.choice([0.1, 1.0])), **kw)


@pytest.mark.parametrize("n_classes", [2, 3, 7])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_matches_sklearn_on_synthetic(n_classes, fit_intercept):
    rng = _rng()
    N, D = int(rng.integers(200, 1500)), int(rng.integers(1, 40))
    X = rng.normal(size=(N, D)) * rng.uniform(0.5, 2, size=D) + rng.normal(size=D)
    W = rng.normal(size=(n_classes, D))
    y = (X @ W.T + rng.gumbel(size=(N, n_classes))).argmax(1)
    labels = np.array([f"class_{k}" for k in range(n_classes)])  # string labels too
    sw = rng.exponential(size=N)
    cw = {labels[k]: float(rng.uniform(0.3, 3)) for k in range(n_classes)}
    _assert_same_as_sklearn(X, labels[y], sample_weight=sw, class_weight=cw, C=0.5,
                            fit_intercept=fit_intercept)


def test_no_penalty_matches_sklearn_C_inf():
    rng = _rng()
    X = rng.normal(size=(400, 5))
    y = (X[:, 0] + rng.normal(size=400) > 0).astype(int)  # overlapping: a finite optimum
    sk = SkLR(C=np.inf, **TIGHT).fit(X, y)
    ours = LogisticRegression(C=np.inf, **TIGHT).fit(X, y)
    assert _rel(ours.coef_, sk.coef_) <= 1e-4


def test_default_tol_same_iterations_as_sklearn():
    """Same objective, same optimizer and options, same start: the same path."""
    X, y = _standardised("digits")
    sk = SkLR().fit(X, y)
    ours = LogisticRegression().fit(X, y)
    assert abs(int(ours.n_iter_[0]) - int(sk.n_iter_[0])) <= 2
    assert _rel(ours.coef_, sk.coef_) <= 1e-4


def test_float32_close_to_float64():
    X, y = _standardised("wine")
    a = LogisticRegression(dtype="float32").fit(X.astype(np.float32), y)
    b = LogisticRegression(dtype="float64").fit(X, y)
    assert a.module_.weight.dtype == torch.float32 and a.coef_.dtype == np.float32
    assert _rel(a.coef_, b.coef_) <= 1e-3
    assert (a.predict(X) == b.predict(X)).mean() >= 0.99


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["sgd", "adam"])
def test_minibatch_solvers(device, solver):
    X, y = _standardised("breast_cancer")
    clf = LogisticRegression(solver=solver, max_iter=30, tol=0, device=device).fit(X, y)
    assert clf.score(X, y) > 0.95 and clf.n_iter_[0] == 30
    assert str(clf.module_.weight.device).startswith(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_device_matches_cpu(device, dtype):
    X, y = _standardised("digits")
    rng = _rng()
    sw = rng.uniform(0.5, 2, size=len(y))
    a = LogisticRegression(device=device, dtype=dtype, **TIGHT).fit(X, y, sample_weight=sw)
    b = SkLR(**TIGHT).fit(X, y, sample_weight=sw)
    assert _rel(a.coef_, b.coef_) <= (1e-4 if dtype == "float64" else 2e-2)
    assert a.module_.weight.device.type == device


# ---- scikit-learn machinery -------------------------------------------------------------------
def test_pickle_clone_pipeline_gridsearch():
    X, y = _standardised("breast_cancer")
    clf = LogisticRegression(C=0.5).fit(X, y)
    back = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))
    assert isinstance(back.module_, ml.LogisticRegression)
    c = clone(clf)
    assert c.get_params() == clf.get_params() and not hasattr(c, "coef_")
    Xr, _ = datasets.load_breast_cancer(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(Xr, y)
    sk_pipe = make_pipeline(StandardScaler(), SkLR()).fit(Xr, y)
    assert abs(pipe.score(Xr, y) - sk_pipe.score(Xr, y)) <= 0.005
    gs = GridSearchCV(LogisticRegression(), {"C": [0.01, 1.0, 100.0]}, cv=3).fit(X, y)
    sk_gs = GridSearchCV(SkLR(), {"C": [0.01, 1.0, 100.0]}, cv=3).fit(X, y)
    assert gs.best_params_ in ({"C": 1.0}, {"C": 100.0}, {"C": 0.01})
    np.testing.assert_allclose(gs.cv_results_["mean_test_score"],
                               sk_gs.cv_results_["mean_test_score"], atol=0.01)


def test_pandas_dataframe_and_feature_names():
    pd = pytest.importorskip("pandas")
    X, y = _standardised("wine")
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    clf = LogisticRegression().fit(df, pd.Series(y))
    assert list(clf.feature_names_in_) == list(df.columns) and clf.n_features_in_ == X.shape[1]
    np.testing.assert_allclose(clf.predict_proba(df), LogisticRegression().fit(X, y)
                               .predict_proba(X), rtol=1e-12)
    module = ml.LogisticRegression(X.shape[1], num_classes=3).fit(df, pd.Series(y))
    assert module.score(df, y) > 0.95


def test_predict_log_proba_is_stable():
    X = _rng().normal(size=(50, 1))
    y = (X[:, 0] > 0).astype(int)
    clf = LogisticRegression().fit(X, y)
    lp = clf.predict_log_proba(np.array([[1e4], [-1e4]]))
    assert np.isfinite(lp).all() and lp.min() < -100  # log(0) would be -inf
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(X)), clf.predict_proba(X),
                               rtol=1e-12, atol=1e-15)


# ---- bad input: clear errors --------------------------------------------------------------------
def _data(n=20, d=3):
    rng = _rng()
    return rng.normal(size=(n, d)), np.arange(n) % 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_in_X_raises(bad):
    X, y = _data()
    X[3, 1] = bad
    with pytest.raises(ValueError, match=r"Input X contains (NaN|infinity)"):
        LogisticRegression().fit(X, y)
    for opt in ("lbfgs", "adam"):
        with pytest.raises(ValueError, match=r"X contains NaN or infinity"):
            ml.LogisticRegression(3).fit(X, y, solver=opt)
        with pytest.raises(ValueError, match=r"X contains NaN or infinity"):
            ml.LogisticRegression(3).fit(torch.tensor(X), torch.tensor(y), solver=opt)


def test_nan_in_sample_weight_raises():
    X, y = _data()
    sw = np.ones(len(y))
    sw[0] = np.nan
    with pytest.raises(ValueError, match=r"sample_weight contains NaN"):
        LogisticRegression().fit(X, y, sample_weight=sw)
    with pytest.raises(ValueError, match=r"sample_weight contains NaN"):
        ml.LogisticRegression(3).fit(X, y, sample_weight=sw)


@pytest.mark.parametrize("labels", [np.zeros(20, dtype=int), np.full(20, 3), np.array(["a"] * 20)])
def test_one_class_raises_the_same_error(labels):
    X, _ = _data()
    with pytest.raises(ValueError, match=r"y must contain at least 2 classes, but it contains "
                                         r"only one class"):
        LogisticRegression().fit(X, labels)
    with pytest.raises(ValueError, match=r"y must contain at least 2 classes, but it contains "
                                         r"only one class"):
        ml.LogisticRegression(3).fit(X, labels)


@pytest.mark.parametrize("labels", [
    np.array([0, 1, 1, 0]), np.array([7, -3, 7, 2], dtype=np.int8), np.array([-128, 127, 0], np.int8),
    np.array([250, 3, 3], dtype=np.uint8), np.array([2**64 - 1, 2**64 - 3], dtype=np.uint64),
    np.array([-(2**63), 2**63 - 1, 0]), np.array([2**62, 2**62 + 5, 2**62]),
    np.array([5, 1000000, 5]), np.array(["b", "a", "b"]), np.array([0.5, -1.0, 0.5])])
def test_label_encoding_matches_np_unique(labels):
    """The counting label encoder of fit() gives np.unique's classes and inverse exactly, for
    every integer width and sign, ranges too wide to count, and other dtypes."""
    from manual_layers.sklearn import _encode_labels
    rng = np.random.default_rng(0)
    y = labels[rng.integers(0, len(labels), 50)]
    classes, idx = _encode_labels(y)
    ref_classes, ref_idx = np.unique(y, return_inverse=True)
    assert classes.dtype == ref_classes.dtype and np.array_equal(classes, ref_classes)
    assert idx.dtype == ref_idx.dtype and np.array_equal(idx, ref_idx)


@pytest.mark.parametrize("kw, match", [
    (dict(solver="sgd", max_iter=-1), r"max_iter must be an integer >= 0, got -1"),
    (dict(solver="adam", batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    (dict(solver="sgd", batch_size=-8), r"batch_size must be an integer >= 1, got -8"),
    (dict(max_iter=-5), r"max_iter must be an integer >= 0, got -5"),
    (dict(solver="adam", max_iter=2.5), r"max_iter must be an integer >= 0, got 2.5"),
    (dict(C=0), r"C must be a number > 0, got 0"),
    (dict(tol=-1), r"tol must be a number >= 0, got -1"),
    (dict(tol="1e-4"), r"tol must be a number >= 0, got '1e-4'"),
    (dict(solver="newton"), r"solver must be one of 'lbfgs', 'owlqn', 'saga'"),
    (dict(lr=-0.1, solver="sgd"), r"lr must be a number > 0"),
    (dict(distributed="auto"), r"distributed='auto' was removed"),
    (dict(warm_start="yes"), r"warm_start must be True or False"),
])
def test_module_fit_bad_arguments_raise(kw, match):
    X, y = _data()
    with pytest.raises(ValueError, match=match):
        ml.LogisticRegression(3).fit(X, y, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(optimizer="sgd", epochs=0), r"epochs must be an integer >= 1, got 0"),
    (dict(optimizer="adam", epochs=2.5), r"epochs must be an integer >= 1, got 2.5"),
    (dict(optimizer="newton"), r"solver must be one of"),
    (dict(optimizer="sgd", solver="adam"), r"got solver='adam' and the deprecated "
                                           r"optimizer='sgd'"),
])
def test_module_fit_old_keywords_warn_then_check(kw, match):
    X, y = _data()
    with pytest.warns(FutureWarning, match=r"optimizer= is deprecated.*use solver="):
        with pytest.raises(ValueError, match=match):
            ml.LogisticRegression(3).fit(X, y, **kw)


def test_module_fit_old_keywords_still_work_for_one_release():
    X, y = _standardised("breast_cancer")
    with pytest.warns(FutureWarning, match=r"epochs= is deprecated.*use max_iter=7"):
        a = ml.LogisticRegression(X.shape[1], dtype=torch.float64)
        torch.manual_seed(0)
        a.fit(X, y, optimizer="sgd", epochs=7, tol=0)
    torch.manual_seed(0)
    b = ml.LogisticRegression(X.shape[1], dtype=torch.float64)
    torch.manual_seed(0)
    b.fit(X, y, solver="sgd", max_iter=7, tol=0)
    assert a.n_iter_ == b.n_iter_ == 7
    with pytest.warns(FutureWarning, match=r"C=None is deprecated.*C=math.inf"):
        c = ml.LogisticRegression(X.shape[1], dtype=torch.float64).fit(X[:100], y[:100], C=None,
                                                                      max_iter=5)
    assert c.n_iter_ == 5


@pytest.mark.parametrize("kw, match", [
    (dict(max_iter=-5), r"max_iter must be an integer >= 0, got -5"),
    (dict(C=-1.0), r"C must be a number > 0, got -1.0"),
    (dict(tol=-1e-3), r"tol must be a number >= 0"),
    (dict(tol="1e-4"), r"tol must be a number >= 0, got '1e-4'"),
    (dict(solver="newton"), r"solver must be one of 'lbfgs', 'owlqn', 'saga'"),
    (dict(l1_ratio=1), r"Solver lbfgs supports only 'l2' or None penalties, got l1 penalty"),
    (dict(class_weight="auto"), r"class_weight must be None, 'balanced' or a dict"),
    (dict(device="meta"), r"device must be a CPU or CUDA device"),
    (dict(distributed="auto"), r"distributed='auto' was removed"),
    (dict(class_weight={7: 2.0}), r"classes, \[0, 1\], are not in class_weight"),  # as sklearn
    (dict(dtype="float16"), r"dtype must be None, 'float32', 'float64'"),
    (dict(device="gpu0"), r"device must be None, 'cpu', 'cuda'"),
])
def test_estimator_bad_params_raise(kw, match):
    X, y = _data()
    with pytest.raises(ValueError, match=match):
        LogisticRegression(**kw).fit(X, y)


def test_convergence_warning_at_max_iter():
    X, y = _standardised("digits")
    with pytest.warns(ConvergenceWarning, match=r"did not converge in max_iter=3"):
        clf = LogisticRegression(max_iter=3).fit(X, y)
    assert clf.n_iter_[0] == 3
    with pytest.warns(ConvergenceWarning, match=r"did not converge in max_iter=3"):
        ml.LogisticRegression(64, num_classes=10).fit(X, y, max_iter=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        LogisticRegression(max_iter=1000).fit(X, y)  # converges: no warning


def test_predict_before_fit_raises():
    X, y = _data()
    with pytest.raises(NotFittedError, match=r"not fitted"):
        LogisticRegression().predict(X)
    layer = ml.LogisticRegression(3)
    with pytest.raises(NotFittedError, match=r"has not been fitted.*classes_"):
        layer.predict(X)
    with pytest.raises(NotFittedError, match=r"has not been fitted"):
        layer.score(X, y)
    assert layer.predict_proba(X).shape == (20, 2)  # the layer itself works unfitted
    layer.classes_ = np.arange(2)  # a layer trained by hand: indices on request
    assert set(layer.predict(X)) <= {0, 1}


def test_score_with_wrong_length_raises():
    X, y = _data()
    clf = LogisticRegression().fit(X, y)
    with pytest.raises(ValueError, match=r"inconsistent numbers of samples"):
        clf.score(X, y[:-1])
    layer = ml.LogisticRegression(3).fit(X, y)
    with pytest.raises(ValueError, match=r"y must have shape \(20,\).*got \(19,\)"):
        layer.score(X, y[:-1])
    with pytest.raises(ValueError, match=r"y must have shape \(20,\).*got \(21,\)"):
        layer.fit(X, np.arange(21) % 2)


def test_empty_X_raises():
    with pytest.raises(ValueError, match=r"0 sample\(s\)"):
        LogisticRegression().fit(np.empty((0, 3)), np.array([], dtype=int))
    with pytest.raises(ValueError, match=r"X is empty \(0 rows\)"):
        ml.LogisticRegression(3).fit(np.empty((0, 3)), np.array([], dtype=int))


# ---- the nn.Module ------------------------------------------------------------------------------
def test_state_dict_round_trip_keeps_classes():
    X, _ = _data(40)
    names = np.array(["cat", "dog", "emu"])
    y = names[np.arange(40) % 3]
    layer = ml.LogisticRegression(3, num_classes=3).fit(X, y)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = ml.LogisticRegression(3, num_classes=3)
    other.load_state_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(other.classes_, names)
    np.testing.assert_array_equal(other.predict(X), layer.predict(X))
    # An unfitted layer's state_dict has nn.Linear's keys and loads as unfitted.
    fresh = ml.LogisticRegression(3, num_classes=3)
    assert set(fresh.state_dict()) == {"weight", "bias"}
    other.load_state_dict(fresh.state_dict())
    assert other.classes_ is None
    # Nested in a model, too.
    seq = torch.nn.Sequential(layer)
    seq2 = torch.nn.Sequential(ml.LogisticRegression(3, num_classes=3))
    seq2.load_state_dict(seq.state_dict())
    np.testing.assert_array_equal(seq2[0].classes_, names)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_fit_matches_sklearn(device, dtype):
    X, y = _standardised("wine")
    rng = _rng()
    sw = rng.uniform(0.2, 2, size=len(y))
    layer = ml.LogisticRegression(X.shape[1], num_classes=3, device=device, dtype=dtype)
    Xt = torch.tensor(X, device=device, dtype=dtype)
    layer.fit(Xt, torch.tensor(y, device=device), C=0.3, sample_weight=sw, class_weight=[1, 2, 3],
              **TIGHT)
    sk = SkLR(C=0.3, class_weight={0: 1, 1: 2, 2: 3}, **TIGHT).fit(X, y, sample_weight=sw)
    tol = 1e-4 if dtype == torch.float64 else 1e-5 * 10
    assert layer.weight.dtype == dtype and layer.weight.device.type == device
    assert _rel(layer.weight.detach().cpu().numpy(), sk.coef_) <= tol
    assert _rel(layer.bias.detach().cpu().numpy(), sk.intercept_) <= tol
    pred = layer.predict(Xt)
    assert isinstance(pred, torch.Tensor) and (pred.cpu().numpy() == sk.predict(X)).all()


def test_module_fit_warm_start_and_no_bias():
    X, y = _standardised("breast_cancer")
    layer = ml.LogisticRegression(X.shape[1], bias=False).fit(X, y, **TIGHT)
    sk = SkLR(fit_intercept=False, **TIGHT).fit(X, y)
    assert _rel(layer.weight.detach().numpy(), sk.coef_) <= 1e-4
    n_cold = layer.n_iter_
    layer.fit(X, y, warm_start=True, **TIGHT)  # from the optimum: next to no iterations
    assert layer.n_iter_ < n_cold
