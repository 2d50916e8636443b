"""The LogisticRegression layer against nn.Linear + nn.Sigmoid / softmax, and its fit against
scikit-learn (L-BFGS-B to the same optimum, the mini-batch solvers, labels, bad input). The
fused losses it computes: tests/ops/test_losses.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manual_layers as ml
from conftest import assert_rel


def test_layer_matches_linear_sigmoid_and_softmax():
    lr = ml.LogisticRegression(9)
    seq = nn.Sequential(nn.Linear(9, 1), nn.Sigmoid())
    seq[0].load_state_dict(lr.state_dict())
    x = torch.randn(4, 3, 9)
    assert lr(x).shape == (4, 3, 1)
    assert_rel(lr(x), seq(x), 1e-6)
    p = lr.predict_proba(x.reshape(-1, 9))
    assert p.shape == (12, 2) and torch.allclose(p.sum(1), torch.ones(12))
    multi = ml.LogisticRegression(9, num_classes=5)
    assert multi.weight.shape == (5, 9) and multi.bias.shape == (5,)
    assert_rel(multi(x), torch.softmax(F.linear(x, multi.weight, multi.bias), -1), 1e-6)
    assert multi.predict_proba(x.reshape(-1, 9)).shape == (12, 5)


def _standardised(loader):
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    X, y = loader(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    sc = StandardScaler().fit(Xtr)
    return sc.transform(Xtr), sc.transform(Xte), ytr, yte


@pytest.mark.parametrize("dataset", ["breast_cancer", "digits"])
def test_fit_matches_scikit_learn(dataset):
    sklearn = pytest.importorskip("sklearn")
    from sklearn import datasets
    from sklearn.linear_model import LogisticRegression as SkLR
    Xtr, Xte, ytr, yte = _standardised(getattr(datasets, f"load_{dataset}"))
    n_classes = len(np.unique(ytr))
    sk = SkLR(C=1.0, tol=1e-10, max_iter=10000).fit(Xtr, ytr)
    ours = ml.LogisticRegression(Xtr.shape[1], num_classes=n_classes, dtype=torch.float64)
    ours.fit(Xtr, ytr, C=1.0, max_iter=1000, tol=1e-10)
    assert abs(ours.score(Xte, yte) - sk.score(Xte, yte)) <= 0.01
    coef = ours.weight.detach().numpy()  # same objective and optimizer (scipy L-BFGS-B)
    assert np.abs(coef - sk.coef_).max() <= 1e-4 * np.abs(sk.coef_).max(), sklearn.__version__
    assert np.abs(ours.bias.detach().numpy() - sk.intercept_).max() <= 1e-4 * max(
        1.0, np.abs(sk.intercept_).max())
    pred = ours.predict(Xte)
    assert isinstance(pred, np.ndarray) and (pred == sk.predict(Xte)).mean() > 0.98


@pytest.mark.parametrize("solver", ["sgd", "adam"])
def test_fit_minibatch_optimizers(solver):
    from sklearn.datasets import load_breast_cancer
    Xtr, Xte, ytr, yte = _standardised(load_breast_cancer)
    clf = ml.LogisticRegression(Xtr.shape[1]).fit(
        torch.tensor(Xtr, dtype=torch.float32), torch.tensor(ytr), solver=solver,
        batch_size=64, max_iter=30)
    assert clf.score(torch.tensor(Xte, dtype=torch.float32), torch.tensor(yte)) > 0.93


def test_fit_rejects_bad_input():
    clf = ml.LogisticRegression(4)
    with pytest.raises(ValueError, match=r"y has 3 classes but num_classes=2"):
        clf.fit(np.random.randn(9, 4), np.arange(9) % 3)
    with pytest.raises(ValueError, match=r"X must have shape \(N, 4\)"):
        clf.fit(np.random.randn(9, 5), np.arange(9) % 2)
    with pytest.raises(ValueError, match=r"solver must be one of"):
        clf.fit(np.random.randn(9, 4), np.arange(9) % 2, solver="newton")
    # Formerly replaced silently by the defaults / fitted on one class: now errors.
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        clf.fit(np.random.randn(9, 4), np.arange(9) % 2, solver="sgd", batch_size=0)
    with pytest.raises(ValueError, match=r"y must contain at least 2 classes"):
        clf.fit(np.random.randn(9, 4), np.zeros(9, dtype=int))
    with pytest.raises(ValueError, match=r"y must have shape \(9,\)"):
        clf.fit(np.random.randn(9, 4), np.arange(8) % 2)


def test_fit_with_string_labels_and_verbose(capsys):
    from sklearn.datasets import load_breast_cancer
    Xtr, Xte, ytr, yte = _standardised(load_breast_cancer)
    names = np.array(["benign", "malignant"])
    clf = ml.LogisticRegression(Xtr.shape[1]).fit(Xtr, names[ytr], verbose=True)
    pred = clf.predict(Xte)
    assert pred.dtype.kind == "U" and set(pred) <= set(names)
    assert clf.score(Xte, names[yte]) > 0.95
    assert list(clf.classes_) == ["benign", "malignant"]
    assert clf.n_iter_ > 0
