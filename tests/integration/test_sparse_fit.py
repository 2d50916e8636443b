"""Sparse X (CSR) in the logistic-regression fits: the fit engine, the estimator and the layer
on sparse X against the same fits on dense X and against scikit-learn's lbfgs; float32 fits;
X read in place (memory maps, no copy). The op itself: test_sparse_op.py."""

import tracemalloc
import warnings

import numpy as np
import pytest
import torch

sp = pytest.importorskip("scipy.sparse")
sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression as SkLR  # noqa: E402

import manual_layers as ml  # noqa: E402
from manual_layers import _fit, _sparse  # noqa: E402
from manual_layers.sklearn import LogisticRegression  # noqa: E402
from conftest import assert_rel  # noqa: E402
from sparse_inputs import _dense, _random_csr, _rng  # noqa: E402

TIGHT = dict(tol=1e-10, max_iter=10000)


pytestmark = pytest.mark.usefixtures("one_blas_thread")  # conftest.py


# ---- fits on sparse X ------------------------------------------------------------------------
def _classification(rng, N, D, K, density=0.2, dtype=np.float64):
    """Sparse features with a few heavy columns, labels from a noisy linear model."""
    A = sp.random(N, D, density=density, format="csr", random_state=rng, dtype=np.float64)
    A.data = rng.normal(size=A.nnz)
    Wt = rng.normal(size=(K, D))
    y = np.asarray((A @ Wt.T) + rng.gumbel(size=(N, K))).argmax(1)
    return A.astype(dtype), y


def _rel(a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    return np.abs(a - e).max() / max(np.abs(e).max(), 1e-12)


OPTIONS = [dict(), dict(sw=True), dict(cw="balanced"), dict(cw="dict"), dict(fit_intercept=False),
           dict(penalty=None), dict(sw=True, cw="balanced", fit_intercept=False)]


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "default")
def test_estimator_sparse_equals_dense(K, dtype, opt):
    """The same fit on a CSR matrix and on its dense array, for every option; predictions and
    scores too."""
    rng = _rng()
    A, y = _classification(rng, 400, 25, K, dtype=dtype)
    sw = rng.random(len(y)) + 0.5 if opt.get("sw") else None
    cw = {"balanced": "balanced", "dict": {c: 1 + c for c in range(K)}}.get(opt.get("cw"))
    kw = dict(TIGHT, class_weight=cw, fit_intercept=opt.get("fit_intercept", True),
              penalty=opt.get("penalty", "l2"), C=0.5)
    a = LogisticRegression(**kw).fit(A, y, sample_weight=sw)
    d = LogisticRegression(**kw).fit(A.toarray(), y, sample_weight=sw)
    assert a.coef_.dtype == dtype and a.module_.weight.dtype == torch.from_numpy(
        np.zeros(0, dtype)).dtype
    tol = 1e-6 if dtype == np.float64 else 2e-3  # both stop near the optimum, not on it
    assert _rel(np.r_[a.coef_.ravel(), a.intercept_], np.r_[d.coef_.ravel(), d.intercept_]) <= tol
    B = _classification(rng, 50, 25, K, dtype=dtype)[0]
    for m in ("decision_function", "predict_proba", "predict_log_proba"):
        assert _rel(getattr(a, m)(B), getattr(a, m)(B.toarray())) <= 1e-10 * (
            1 if dtype == np.float64 else 1e4), m
    assert np.array_equal(a.predict(B), a.predict(B.toarray()))
    assert a.score(A, y, sample_weight=sw) == a.score(A.toarray(), y, sample_weight=sw)


@pytest.mark.parametrize("K", [2, 5])
def test_estimator_sparse_matches_sklearn(K):
    """Fresh sparse data, scikit-learn's lbfgs on the same CSR matrix (float64)."""
    rng = _rng()
    A, y = _classification(rng, 600, 80, K, density=0.05)
    sw = rng.random(len(y)) + 0.2
    ours = LogisticRegression(C=2.0, **TIGHT).fit(A, y, sample_weight=sw)
    ref = SkLR(C=2.0, **TIGHT).fit(A, y, sample_weight=sw)
    assert _rel(np.r_[ours.coef_.ravel(), ours.intercept_],
                np.r_[ref.coef_.ravel(), ref.intercept_]) <= 1e-6
    assert _rel(ours.predict_proba(A), ref.predict_proba(A)) <= 1e-6



@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
def test_l1_elasticnet_sparse_equals_dense_and_sklearn(K, l1_ratio):
    """OWL-QN (solver="saga") on a CSR matrix: the same coefficients as on its dense array, the
    same zeros, and scikit-learn's saga optimum on the same sparse matrix."""
    rng = _rng()
    A, y = _classification(rng, 500, 40, K, density=0.1)
    kw = dict(C=0.3, l1_ratio=l1_ratio, solver="saga", tol=1e-10, max_iter=20000)
    a = LogisticRegression(**kw).fit(A, y)
    d = LogisticRegression(**kw).fit(A.toarray(), y)
    ca, cd = np.r_[a.coef_.ravel(), a.intercept_], np.r_[d.coef_.ravel(), d.intercept_]
    assert _rel(ca, cd) <= 1e-6
    assert np.array_equal(a.coef_ == 0, d.coef_ == 0) and (a.coef_ == 0).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SkLR(**dict(kw, tol=1e-8, max_iter=5000)).fit(A, y)
    assert _rel(ca, np.r_[ref.coef_.ravel(), ref.intercept_]) <= 1e-3


def test_cv_sparse_equals_dense():
    """LogisticRegressionCV on a CSR matrix picks the same C and l1_ratio and fits the same
    paths as on its dense array (folds, scores and refit)."""
    from manual_layers.sklearn import LogisticRegressionCV
    rng = _rng()
    A, y = _classification(rng, 300, 20, 3, density=0.2)
    kw = dict(Cs=4, cv=3, l1_ratios=[0.0, 1.0], solver="saga", tol=1e-8, max_iter=5000,
              scoring="neg_log_loss",
              use_legacy_attributes=False)
    a = LogisticRegressionCV(**kw).fit(A, y)
    d = LogisticRegressionCV(**kw).fit(A.toarray(), y)
    assert a.C_ == d.C_ and a.l1_ratio_ == d.l1_ratio_
    assert _rel(a.scores_, d.scores_) <= 1e-5  # log-losses of fits stopped at tol, summed in another order
    assert _rel(np.r_[a.coef_.ravel(), a.intercept_], np.r_[d.coef_.ravel(), d.intercept_]) <= 1e-5
    assert np.array_equal(a.predict(A), d.predict(A.toarray()))

def test_estimator_float32_like_sklearn():
    """float32 X is fitted in float32, as scikit-learn's lbfgs (coef_ float32); dense and sparse
    agree with scikit-learn's float32 fit to float32 accuracy of the optimum."""
    rng = _rng()
    A, y = _classification(rng, 500, 20, 3, density=0.3, dtype=np.float32)
    ref = SkLR(**TIGHT).fit(A, y)
    assert ref.coef_.dtype == np.float32
    for X in (A, A.toarray()):
        ours = LogisticRegression(**TIGHT).fit(X, y)
        assert ours.coef_.dtype == np.float32 and ours.intercept_.dtype == np.float32
        assert ours.module_.weight.dtype == torch.float32
        assert _rel(ours.coef_, ref.coef_) <= 2e-3
    ours64 = LogisticRegression(dtype="float64", **TIGHT).fit(A, y)
    assert ours64.module_.weight.dtype == torch.float64


@pytest.mark.parametrize("fmt", ["csc", "coo", "csr_array", "torch_csr", "torch_csc", "int32",
                                 "float32_as_float64"])
def test_estimator_sparse_formats(fmt):
    """CSC / COO / csr_array / torch sparse input, int32 indices, float32 values fitted in
    float64 (dtype="float64": the values cast, a copy of the values only): the fit of the CSR
    float64 matrix."""
    rng = _rng()
    A, y = _classification(rng, 300, 15, 3)
    kw = dict(TIGHT)
    if fmt == "float32_as_float64":
        A = A.astype(np.float32)
        kw["dtype"] = "float64"
    ref = LogisticRegression(**kw).fit(A.astype(np.float64), y)
    X = {"csc": lambda: A.tocsc(), "coo": lambda: A.tocoo(), "csr_array": lambda: sp.csr_array(A),
         "torch_csr": lambda: torch.sparse_csr_tensor(torch.from_numpy(A.indptr).long(),
                                                      torch.from_numpy(A.indices).long(),
                                                      torch.from_numpy(A.data), A.shape),
         "torch_csc": lambda: torch.from_numpy(A.toarray()).to_sparse_csc(),
         "int32": lambda: A, "float32_as_float64": lambda: A}[fmt]()
    if fmt == "int32":
        assert A.indices.dtype == np.int32
    ours = LogisticRegression(**kw).fit(X, y)
    assert ours.module_.weight.dtype == torch.float64
    assert ours.coef_.dtype == A.dtype  # coef_ in X's dtype, as scikit-learn's
    assert _rel(ours.coef_, ref.coef_) <= (1e-8 if A.dtype == np.float64 else 1e-6)
    assert np.array_equal(ours.predict(X), ref.predict(A.astype(np.float64)))


def test_layer_fit_sparse_equals_dense():
    rng = _rng()
    for K in (2, 3):
        A, y = _classification(rng, 300, 12, K)
        sw = rng.random(len(y)) + 0.5
        cw = rng.random(K) + 0.5
        for X in (A, A.tocsc(), torch.sparse_csr_tensor(torch.from_numpy(A.indptr),
                                                       torch.from_numpy(A.indices),
                                                       torch.from_numpy(A.data), A.shape)):
            s = ml.LogisticRegression(12, num_classes=K, dtype=torch.float64).fit(
                X, y, sample_weight=sw, class_weight=cw, **TIGHT)
            d = ml.LogisticRegression(12, num_classes=K, dtype=torch.float64).fit(
                A.toarray(), y, sample_weight=sw, class_weight=cw, **TIGHT)
            assert _rel(s.weight.detach(), d.weight.detach().numpy()) <= 1e-7
            B = _classification(rng, 20, 12, K)[0]
            assert _rel(s.predict_proba(B), s.predict_proba(B.toarray())) <= 1e-12
            assert np.array_equal(s.predict(B), s.predict(B.toarray()))
            assert s.score(A, y) == s.score(A.toarray(), y)


@pytest.mark.parametrize("solver", ["sgd", "adam"])
def test_minibatch_solvers_on_sparse(solver):
    """The mini-batch solvers take row subsets of the CSR matrix: the same batches (same seed)
    as the dense fit, so the same weights to rounding."""
    rng = _rng()
    A, y = _classification(rng, 700, 10, 3)
    fits = []
    for X in (A, A.toarray()):
        torch.manual_seed(7)
        layer = ml.LogisticRegression(10, num_classes=3, dtype=torch.float64)
        fits.append(layer.fit(X, y, optimizer=solver, epochs=3, batch_size=64).weight.detach())
    assert_rel(fits[0], fits[1], 1e-9, solver)


def test_csr_row_subset():
    rng = _rng()
    A = _random_csr(rng, 50, 8, duplicates=True, empty_rows=0.3)
    X = _sparse.to_csr(A)
    idx = torch.from_numpy(rng.integers(0, 50, size=23))
    sub = X[idx]
    got = torch.sparse_csr_tensor(sub.crow.long(), sub.col.long(), sub.values, sub.shape)
    assert torch.equal(got.to_dense(), _dense(A)[idx])
    assert X[torch.zeros(0, dtype=torch.long)].shape == (0, 8)


def test_sparse_nan_raises():
    rng = _rng()
    A, y = _classification(rng, 50, 6, 2)
    A.data[3] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        LogisticRegression().fit(A, y)
    with pytest.raises(ValueError, match="X contains NaN"):
        ml.LogisticRegression(6).fit(A, y)
    A.data[3] = np.inf
    with pytest.raises(ValueError, match="X contains"):
        ml.LogisticRegression(6).fit(A.tocsc(), y)
    good, _ = _classification(rng, 50, 6, 2)
    clf = LogisticRegression().fit(good, y)
    A.data[3] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        clf.predict(A)
    with pytest.raises(ValueError, match=r"X must have shape \(N, 7\)"):
        ml.LogisticRegression(7).fit(good, y)
    with pytest.raises(ValueError, match="X has 7 features"):
        clf.predict(sp.random(3, 7, density=0.5, format="csr"))


# ---- X read in place ------------------------------------------------------------------------
def _capture_fit_input(monkeypatch):
    seen = {}
    orig = _fit.fit_logistic_regression

    def spy(X, *a, **kw):
        seen["X"] = X
        return orig(X, *a, **kw)
    import manual_layers.sklearn as mls
    monkeypatch.setattr(mls, "fit_logistic_regression", spy)
    return seen


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_memmap_read_in_place(tmp_path, monkeypatch, dtype):
    """A read-only np.memmap is read, never copied: the fit's tensor shares its memory, and the
    fit's numpy allocations (tracemalloc) stay far below the size of X."""
    rng = _rng()
    N, D = 20000, 40
    path = tmp_path / "X.bin"
    Xw = np.memmap(path, dtype=dtype, mode="w+", shape=(N, D))
    Xw[:] = rng.normal(size=(N, D))
    y = (np.asarray(Xw[:, 0]) + rng.normal(size=N) > 0).astype(int)
    Xw.flush()
    del Xw
    X = np.memmap(path, dtype=dtype, mode="r", shape=(N, D))
    assert not X.flags.writeable
    seen = _capture_fit_input(monkeypatch)
    clf = LogisticRegression(max_iter=5)
    tracemalloc.start()
    try:
        with pytest.warns(sklearn.exceptions.ConvergenceWarning):
            clf.fit(X, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen["X"].data_ptr() == X.ctypes.data
    assert seen["X"].dtype == torch.from_numpy(np.zeros(0, dtype)).dtype
    assert peak < X.nbytes / 4, (peak, X.nbytes)


def test_sparse_memmap_read_in_place(tmp_path, monkeypatch):
    """A CSR matrix over memory-mapped arrays: the fit reads its values and indices in place."""
    rng = _rng()
    A, y = _classification(rng, 20000, 300, 3, density=0.05)
    A.indices = A.indices.astype(np.int32)
    A.indptr = A.indptr.astype(np.int32)
    arrays = {}
    for name in ("data", "indices", "indptr"):
        np.save(tmp_path / f"{name}.npy", getattr(A, name))
        arrays[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
    M = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=A.shape)
    assert M.data.ctypes.data == arrays["data"].ctypes.data
    seen = _capture_fit_input(monkeypatch)
    pairs = []
    orig_pairs = _fit._lbfgs_pairs
    monkeypatch.setattr(_fit, "_lbfgs_pairs", lambda obj: pairs.append(orig_pairs(obj)) or pairs[-1])
    tracemalloc.start()
    try:
        clf = LogisticRegression(**TIGHT).fit(M, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    X = seen["X"]
    assert isinstance(X, _sparse.CSR)
    assert X.values.data_ptr() == arrays["data"].ctypes.data
    assert X.col.data_ptr() == arrays["indices"].ctypes.data
    assert X.crow.data_ptr() == arrays["indptr"].ctypes.data
    # beyond L-BFGS's own workspace (its m pairs of P-vectors, scipy's L-BFGS-B's 11 m^2 too:
    # on this X, large enough for more pairs, _fit._lbfgs_pairs keeps up to X's bytes / 2),
    # less than half the values' bytes: a copy of X would be more
    P, (m,) = 3 * (300 + 1), pairs
    workspace = 8 * (2 * m * P + 5 * P + 11 * m * m + 8 * m)
    assert peak < A.data.nbytes / 2 + workspace, (peak, A.data.nbytes, m, workspace)
    ref = LogisticRegression(**TIGHT).fit(A, y)
    assert _rel(clf.coef_, ref.coef_) <= 1e-8
