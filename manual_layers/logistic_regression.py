"""The logistic-regression layer: nn.Linear + nn.Sigmoid (or softmax) with scikit-learn's fit,
predict and score (the fit itself: _layer_fit.py and the fit engine, _fit.py)."""

import math
import numbers

import numpy as np
import torch
from torch import nn

from . import _sparse
from . import functional as MF
from ._layer_fit import LayerFitMixin
from .layers import _no_script

__all__ = ["LogisticRegression"]


class LogisticRegression(LayerFitMixin, nn.Module):
    """Logistic regression as a layer, with a scikit-learn-like fit.

    num_classes=2 (binary): weight (1, in_features), bias (1,); forward(x) returns
    P(class 1) of shape (..., 1), as nn.Sequential(nn.Linear(D, 1), nn.Sigmoid()).
    num_classes=C > 2: weight (C, in_features), bias (C,); forward returns softmax
    probabilities (..., C). Parameters are initialised as nn.Linear's.

    The layer (forward, logits, loss, predict_proba) works fitted or not: it uses the current
    weights. Labels need a fit: predict and score map to the labels seen by fit() (classes_,
    any sortable labels, strings included) and raise NotFittedError before fit() (or before
    loading a fitted state_dict). A layer trained by your own loop predicts class indices once
    you set layer.classes_ = numpy.arange(num_classes).

    fit() takes the scikit-learn estimator's words (C, l1_ratio, solver, max_iter, tol,
    class_weight, sample_weight, ...) and minimises its objective (weighted mean log-loss +
    ((1 - l1_ratio) ||W||^2 / 2 + l1_ratio ||W||_1) / (C sum of sample weights); the intercept
    is not penalised) through the fused loss kernels, on CPU or CUDA tensors or numpy arrays.
    For a full scikit-learn estimator (clone, Pipeline, GridSearchCV, pandas) use
    manual_layers.sklearn.LogisticRegression.

    Parameters
    ----------
    in_features : int
    num_classes : int, default 2
    bias : bool, default True
    device, dtype : as nn.Linear's

    state_dict: weight, bias (nn.Linear's keys) and, once fitted, "_extra_state" holding
    classes_ (plain Python lists, loadable with torch.load(weights_only=True)). A state_dict
    without it (an unfitted layer's, an nn.Linear's) still loads, leaving the layer unfitted;
    one whose classes_ count differs from num_classes is refused (load_state_dict raises).

    Examples
    --------
    >>> import numpy as np, manual_layers as ml
    >>> X = np.random.default_rng(0).normal(size=(200, 5))
    >>> y = (X[:, 0] + X[:, 1] > 0).astype(int)
    >>> clf = ml.LogisticRegression(5).fit(X, y)
    >>> clf.score(X, y) > 0.9
    True
    >>> clf.predict_proba(X[:3]).shape
    (3, 2)
    """

    def __init__(self, in_features, num_classes=2, bias=True, device=None, dtype=None):
        super().__init__()
        for name, v, low in (("in_features", in_features, 0), ("num_classes", num_classes, 2)):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
                raise TypeError(f"LogisticRegression: {name} must be an integer, got {v!r}")
            if v < low:
                raise ValueError(f"LogisticRegression: {name} must be >= {low}, got {v}")
        in_features, num_classes = int(in_features), int(num_classes)
        self.in_features = in_features
        self.num_classes = num_classes
        out = 1 if num_classes == 2 else num_classes
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out, **kw))
        else:
            self.register_parameter("bias", None)
        self.classes_ = None
        self.n_iter_ = None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _get_name(self):
        return "manual_layers.LogisticRegression"

    def __prepare_scriptable__(self):
        _no_script("LogisticRegression")

    def extra_repr(self):
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.bias is not None}")

    @property
    def binary(self):
        return self.num_classes == 2

    # ---- classes_ in the state_dict --------------------------------------------------------
    def get_extra_state(self):
        c = self.classes_
        if c is None:
            return {"classes_": None}
        return {"classes_": c.tolist(), "classes_dtype": c.dtype.str}

    def set_extra_state(self, state):
        classes = state.get("classes_") if isinstance(state, dict) else None
        if classes is None:
            self.classes_ = None
            return
        self.classes_ = np.asarray(classes, dtype=np.dtype(state.get("classes_dtype", "O")))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.classes_ is None:  # unfitted: exactly nn.Linear's keys
            destination.pop(prefix + "_extra_state", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "_extra_state"
        had = key in state_dict
        bad = False
        if had:  # a fitted state_dict: its classes_ must be this layer's number of classes
            st = state_dict[key]
            classes = st.get("classes_") if isinstance(st, dict) else None
            if classes is not None and len(classes) != self.num_classes:
                error_msgs.append(
                    f"{key}: the state_dict was fitted on {len(classes)} classes "
                    f"({list(classes)[:10]}) but this LogisticRegression has "
                    f"num_classes={self.num_classes}; build the layer with "
                    f"num_classes={len(classes)}")
                state_dict = {k: v for k, v in state_dict.items() if k != key}
                bad = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if bad and key in missing_keys:  # reported in error_msgs, not as missing
            missing_keys.remove(key)
        if not had:  # an unfitted layer's (or nn.Linear's) state_dict: load it as unfitted
            if key in missing_keys:
                missing_keys.remove(key)
            self.classes_ = None

    # ---- the layer -------------------------------------------------------------------------
    def forward(self, x):
        if isinstance(x, _sparse.CSR):  # sparse X (from predict_proba): ATen's sparse matmul
            z = self.logits(x)
            return torch.sigmoid(z) if self.binary else torch.softmax(z, dim=-1)
        return MF.logistic_regression(x, self.weight, self.bias)

    def logits(self, x):
        if isinstance(x, _sparse.CSR):
            return _sparse.logits(x, self.weight, self.bias)
        return MF.linear(x, self.weight, self.bias)

    def loss(self, x, target, **kwargs):
        """The fused loss: binary cross-entropy with logits (float targets, kwargs pos_weight,
        sample_weight, reduction) or cross-entropy (class indices; kwargs class_weight,
        ignore_index, label_smoothing, reduction)."""
        if self.binary:
            return MF.linear_binary_cross_entropy_with_logits(x, self.weight, self.bias, target,
                                                              **kwargs)
        return MF.linear_cross_entropy(x, self.weight, self.bias, target, **kwargs)
