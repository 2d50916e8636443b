"""Bad and unusual inputs to the layer's (manual_layers.LogisticRegression) and the
estimator's (manual_layers.sklearn.LogisticRegression) fit / predict / score / load_state_dict:
scikit-learn's behaviour, or a clear error naming the argument. And the one vocabulary: the
layer takes what the estimator takes (class_weight="balanced", dicts of labels) with the same
result."""

import io
import math
import warnings

import numpy as np
import pytest
import torch

import manual_layers as ml

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression as SkLR  # noqa: E402

from manual_layers.sklearn import LogisticRegression  # noqa: E402


def _rng():
    seed = np.random.SeedSequence().entropy  # fresh data every run
    print(f"data seed: {seed}")
    return np.random.default_rng(seed)


def _data(n=40, d=3, k=2):
    rng = _rng()
    X = rng.normal(size=(n, d))
    return X, np.arange(n) % k


def test_predict_on_nan_row_raises_as_sklearn():
    X, y = _data()
    layer = ml.LogisticRegression(3).fit(X, y)
    bad = X.copy()
    bad[5] = np.nan
    for method in ("predict", "predict_proba"):
        with pytest.raises(ValueError, match=r"X contains NaN or infinity"):
            getattr(layer, method)(bad)
        with pytest.raises(ValueError, match=r"X contains NaN or infinity"):
            getattr(layer, method)(torch.tensor(bad))
    with pytest.raises(ValueError, match=r"X contains NaN or infinity"):
        layer.score(bad, y)
    with pytest.raises(ValueError, match=r"Input X contains NaN"):  # scikit-learn's own
        SkLR().fit(X, y).predict(bad)
    with pytest.raises(ValueError, match=r"Input X contains NaN"):
        LogisticRegression().fit(X, y).predict(bad)


def test_score_with_string_labels_after_integer_fit_raises_as_sklearn():
    X, y = _data()
    with pytest.raises(ValueError, match=r"Mix of label input types \(string and number\)"):
        SkLR().fit(X, y).score(X, y.astype(str))
    with pytest.raises(ValueError, match=r"Mix of label input types \(string and number\)"):
        LogisticRegression().fit(X, y).score(X, y.astype(str))
    layer = ml.LogisticRegression(3).fit(X, y)
    with pytest.raises(ValueError, match=r"Mix of label input types \(string and number\)"):
        layer.score(X, y.astype(str))
    names = np.array(["a", "b"])
    layer.fit(X, names[y])
    with pytest.raises(ValueError, match=r"Mix of label input types \(string and number\)"):
        layer.score(X, y)
    assert layer.score(X, names[y]) > 0.3


def test_state_dict_with_another_number_of_classes_refuses_to_load():
    X, _ = _data(60, k=5)
    five = ml.LogisticRegression(3, num_classes=5).fit(X, np.arange(60) % 5)
    sd = five.state_dict()
    binary = ml.LogisticRegression(3)
    sd_binary = binary.state_dict()
    sd_binary["_extra_state"] = sd["_extra_state"]  # the weights fit, the classes do not
    with pytest.raises(RuntimeError, match=r"fitted on 5 classes .* this LogisticRegression "
                                           r"has num_classes=2"):
        binary.load_state_dict(sd_binary)
    assert binary.classes_ is None
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    again = ml.LogisticRegression(3, num_classes=5)
    again.load_state_dict(torch.load(buf, weights_only=True))  # the matching layer loads it
    np.testing.assert_array_equal(again.classes_, np.arange(5))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(num_classes=2.5), TypeError, r"num_classes must be an integer, got 2.5"),
    (dict(num_classes="3"), TypeError, r"num_classes must be an integer, got '3'"),
    (dict(num_classes=True), TypeError, r"num_classes must be an integer, got True"),
    (dict(num_classes=1), ValueError, r"num_classes must be >= 2, got 1"),
    (dict(in_features=-1), ValueError, r"in_features must be >= 0, got -1"),
    (dict(in_features=3.0), TypeError, r"in_features must be an integer, got 3.0"),
])
def test_layer_constructor_checks(kw, exc, match):
    args = {"in_features": 3, **kw}
    with pytest.raises(exc, match=match):
        ml.LogisticRegression(**args)


@pytest.mark.parametrize("kw, match", [
    (dict(tol="1e-4"), r"tol must be a number >= 0, got '1e-4'"),
    (dict(max_iter="100"), r"max_iter must be an integer >= 0, got '100'"),
    (dict(C="1"), r"C must be a number > 0, got '1'"),
    (dict(class_weight="auto"), r"class_weight must be None, 'balanced', a dict"),
])
def test_layer_fit_wrong_types_name_the_argument(kw, match):
    X, y = _data()
    with pytest.raises((TypeError, ValueError), match=match):
        ml.LogisticRegression(3).fit(X, y, **kw)


def test_string_sample_weight_names_the_argument():
    X, y = _data()
    sw = np.array(["a"] * len(y))
    with pytest.raises(ValueError, match=r"sample_weight must be numbers"):
        ml.LogisticRegression(3).fit(X, y, sample_weight=sw)
    with pytest.raises(ValueError, match=r"sample_weight must be numbers"):
        LogisticRegression().fit(X, y, sample_weight=sw)


@pytest.mark.parametrize("cw", [{7: 2.0}, {0: 1.0, 9: 3.0}])
def test_dict_class_weight_of_unknown_labels_names_the_argument(cw):
    X, y = _data()
    with pytest.raises(ValueError, match=r"are not in class_weight"):
        SkLR(class_weight=cw).fit(X, y)  # scikit-learn refuses these dicts too
    with pytest.raises(ValueError, match=r"are not in class_weight"):
        LogisticRegression(class_weight=cw).fit(X, y)
    with pytest.raises(ValueError, match=r"are not in class_weight"):
        ml.LogisticRegression(3).fit(X, y, class_weight=cw)
    with pytest.raises(ValueError, match=r"class_weight\[0\] must be a number"):
        ml.LogisticRegression(3).fit(X, y, class_weight={0: "x", 1: 1.0})


def test_tensor_x_that_requires_grad_is_detached():
    X, y = _data()
    Xt = torch.tensor(X, requires_grad=True)
    layer = ml.LogisticRegression(3, dtype=torch.float64).fit(Xt, torch.tensor(y))
    ref = ml.LogisticRegression(3, dtype=torch.float64).fit(X, y)
    torch.testing.assert_close(layer.weight, ref.weight, rtol=0, atol=0)
    assert layer.predict(Xt).shape == (len(y),) and Xt.grad is None
    assert layer.score(Xt, torch.tensor(y)) == ref.score(X, y)


def test_estimator_takes_tensors_that_require_grad():
    X, y = _data()
    Xt = torch.tensor(X, requires_grad=True)
    a = LogisticRegression().fit(Xt, torch.tensor(y))
    b = LogisticRegression().fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.predict(Xt), b.predict(X))


def test_estimator_device_meta_is_refused():
    X, y = _data()
    with pytest.raises(ValueError, match=r"device must be a CPU or CUDA device .* got 'meta'"):
        LogisticRegression(device="meta").fit(X, y)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(C=-0.5), ValueError, r"C must be a number > 0, got -0.5"),
    (dict(C=0.0), ValueError, r"C must be a number > 0, got 0.0"),
    (dict(C=float("nan")), ValueError, r"C must be a number > 0, got nan"),
    (dict(l1_ratio=1.01, solver="saga"), ValueError, r"l1_ratio must be a number >= 0 and <= 1"),
    (dict(l1_ratio=-1, solver="saga"), ValueError, r"l1_ratio must be a number >= 0 and <= 1"),
    (dict(l1_ratio="0.5", solver="saga"), TypeError, r"l1_ratio must be a number"),
])
def test_bad_penalty_values_raise_on_both(kw, exc, match):
    X, y = _data()
    with pytest.raises(exc, match=match):
        LogisticRegression(**kw).fit(X, y)
    with pytest.raises(exc, match=match):
        ml.LogisticRegression(3).fit(X, y, **kw)


def test_l1_ratio_without_elasticnet_warns_as_sklearn():
    X, y = _data()
    for fit in (lambda: SkLR(penalty="l2", l1_ratio=0.5).fit(X, y),
                lambda: LogisticRegression(penalty="l2", l1_ratio=0.5).fit(X, y),
                lambda: ml.LogisticRegression(3).fit(X, y, penalty="l2", l1_ratio=0.5)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with pytest.warns(UserWarning, match=r"l1_ratio parameter is only used when "
                                                 r"penalty is 'elasticnet'"):
                fit()


@pytest.mark.parametrize("cw", ["balanced", "dict"])
@pytest.mark.parametrize("K", [2, 3])
def test_layer_class_weight_balanced_and_dict_equal_the_estimator(cw, K):
    rng = _rng()
    X = rng.normal(size=(150, 4))
    y = np.array(["p", "q", "r"][:K])[(rng.random(150) * K * rng.random(150)).astype(int) % K]
    weights = "balanced" if cw == "balanced" else {lab: float(rng.uniform(0.5, 3))
                                                  for lab in np.unique(y)}
    sw = rng.uniform(0.5, 2, size=150)
    est = LogisticRegression(class_weight=weights, tol=1e-10, max_iter=1000).fit(
        X, y, sample_weight=sw)
    layer = ml.LogisticRegression(4, num_classes=K, dtype=torch.float64).fit(
        X, y, class_weight=weights, sample_weight=sw, tol=1e-10, max_iter=1000)
    np.testing.assert_allclose(layer.weight.detach().numpy(), est.coef_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.bias.detach().numpy(), est.intercept_, rtol=1e-9,
                               atol=1e-12)


def test_layer_fit_c_inf_and_penalty_none_are_unpenalised():
    X, y = _data(200)
    y = (X[:, 0] + _rng().normal(size=200) > 0).astype(int)
    a = ml.LogisticRegression(3, dtype=torch.float64).fit(X, y, C=math.inf, tol=1e-10,
                                                         max_iter=1000)
    with pytest.warns(FutureWarning, match=r"'penalty' was deprecated"):
        b = ml.LogisticRegression(3, dtype=torch.float64).fit(X, y, penalty=None, tol=1e-10,
                                                             max_iter=1000)
    sk = SkLR(C=np.inf, tol=1e-10, max_iter=10000).fit(X, y)
    for m in (a, b):
        np.testing.assert_allclose(m.weight.detach().numpy(), sk.coef_, rtol=1e-4)
