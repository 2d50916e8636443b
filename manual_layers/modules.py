"""The nn.Modules: drop-in replacements for nn.Linear (+ activation), nn.Linear + nn.Sigmoid /
BCEWithLogitsLoss / CrossEntropyLoss, and scikit-learn's LogisticRegression."""

import math

import numpy as np
import torch
from torch import nn

from . import _fit, _sparse
from . import functional as MF

__all__ = ["Linear", "MLP", "convert", "LogisticRegression", "LinearBCEWithLogitsLoss",
           "LinearCrossEntropyLoss"]


class Linear(nn.Linear):
    """nn.Linear with an optional fused activation: y = act(x W^T + b).

    Same constructor arguments, parameters (weight (out_features, in_features), bias
    (out_features,)), initialisation and state_dict keys as nn.Linear, so state dicts load
    both ways; it is an nn.Linear subclass, so code that looks for nn.Linear still finds it.
    activation: None, "relu", "gelu" (exact, as nn.GELU()), "gelu_tanh"
    (nn.GELU(approximate="tanh")), "silu", "sigmoid", "tanh".
    """

    def __init__(self, in_features, out_features, bias=True, activation=None, device=None,
                 dtype=None):
        MF._check_activation(activation, "manual_layers.Linear")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x):
        return MF.linear(x, self.weight, self.bias, self.activation)

    def extra_repr(self):
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "manual_layers.Linear: torch.jit.script is not supported (TorchScript cannot compile "
            "the Python wrapper of its custom ops); use torch.compile or torch.export, which "
            "trace the ops as single graph nodes")

    @classmethod
    def from_linear(cls, linear, activation=None):
        """A manual_layers.Linear that shares linear's parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear.from_linear: expected an nn.Linear, got "
                            f"{type(linear).__name__}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight = linear.weight
        m.bias = linear.bias
        MF._check_activation(activation, "manual_layers.Linear.from_linear")
        m.activation = activation
        m.train(linear.training)
        return m


class MLP(nn.Sequential):
    """nn.Sequential(nn.Linear(in, hidden), act, nn.Linear(hidden, out)) as one fused op:
    y = act(x W1^T + b1) W2^T + b2, forward and backward hand-written (functional.mlp).

    State dict: the keys of that nn.Sequential, "0.weight", "0.bias", "2.weight", "2.bias"
    (it IS an nn.Sequential of nn.Linear, the activation module and nn.Linear, with forward
    replaced), so state dicts load both ways with no renaming, and nn.Sequential(...) converted
    by convert() keeps its keys. `fc1` / `fc2` name the two layers (self[0], self[2]).
    Parameters and initialisation are nn.Linear's. activation: None, "relu", "gelu" (exact, as
    nn.GELU()), "gelu_tanh", "silu", "sigmoid", "tanh".
    """

    def __init__(self, in_features, hidden_features, out_features, activation="gelu", bias=True,
                 device=None, dtype=None):
        MF._check_activation(activation, "manual_layers.MLP")
        from .reference import ACTIVATION_MODULES
        act = ACTIVATION_MODULES[activation]() if activation is not None else nn.Identity()
        kw = dict(bias=bias, device=device, dtype=dtype)
        super().__init__(nn.Linear(in_features, hidden_features, **kw), act,
                         nn.Linear(hidden_features, out_features, **kw))
        self.activation = activation

    @property
    def fc1(self):
        return self[0]

    @property
    def fc2(self):
        return self[2]

    @property
    def in_features(self):
        return self[0].in_features

    @property
    def hidden_features(self):
        return self[0].out_features

    @property
    def out_features(self):
        return self[2].out_features

    def forward(self, x):
        return MF.mlp(x, self[0].weight, self[0].bias, self[2].weight, self[2].bias,
                      self.activation)

    def extra_repr(self):
        return f"activation={self.activation!r}"

    @classmethod
    def from_sequential(cls, seq):
        """An MLP sharing the parameters (no copy) of nn.Sequential(nn.Linear, act, nn.Linear)
        with a supported activation module (or nn.Identity); same state_dict keys."""
        act = _mlp_activation(seq)
        if act is False:
            raise TypeError("MLP.from_sequential: expected nn.Sequential(nn.Linear, activation, "
                            f"nn.Linear) with matching sizes, got {seq!r}")
        m = cls.__new__(cls)
        nn.Sequential.__init__(m, seq[0], seq[1], seq[2])
        m.activation = act
        m.train(seq.training)
        return m


def _mlp_activation(seq):
    """The activation name if `seq` is exactly nn.Sequential(nn.Linear, act, nn.Linear) with
    foldable parts (None for nn.Identity), else False."""
    if type(seq) is not nn.Sequential or len(seq) != 3:
        return False
    l1, a, l2 = seq[0], seq[1], seq[2]
    if type(l1) is not nn.Linear or type(l2) is not nn.Linear:
        return False
    if l1.out_features != l2.in_features or (l1.bias is None) != (l2.bias is None):
        return False
    if l1.weight.dtype != l2.weight.dtype or l1.weight.device != l2.weight.device:
        return False
    if type(a) is nn.Identity:
        return None
    name = _activation_name(a)
    return name if name is not None else False


def _activation_name(module):
    """The fused-activation name of a torch activation module, or None if not foldable."""
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh):
        return "tanh"
    return None


def convert(model):
    """Replace, in place, every nn.Linear in `model` by a manual_layers.Linear that shares its
    parameters, folding an nn.Linear that is directly followed by a supported activation module
    inside an nn.Sequential into one fused layer (the activation becomes nn.Identity, so
    indices and state_dict keys are unchanged). An nn.Sequential that is exactly
    (nn.Linear, activation, nn.Linear) becomes one manual_layers.MLP (same state_dict keys
    "0.weight", ..., "2.bias"); a top-level one is returned as the new model. Returns the
    model; outputs are unchanged."""
    if type(model) is nn.Linear:
        return Linear.from_linear(model)
    if _mlp_activation(model) is not False:
        return MLP.from_sequential(model)
    for name, child in list(model.named_children()):
        if _mlp_activation(child) is not False:
            setattr(model, name, MLP.from_sequential(child))
        elif isinstance(model, nn.Sequential) and type(child) is nn.Linear:
            names = list(model._modules.keys())
            i = names.index(name)
            nxt = model._modules[names[i + 1]] if i + 1 < len(names) else None
            act = _activation_name(nxt) if nxt is not None else None
            setattr(model, name, Linear.from_linear(child, act))
            if act is not None:
                model._modules[names[i + 1]] = nn.Identity()
        elif type(child) is nn.Linear:
            setattr(model, name, Linear.from_linear(child))
        else:
            convert(child)
    return model


class LinearBCEWithLogitsLoss(nn.Module):
    """Fused nn.Linear(D, 1) + nn.BCEWithLogitsLoss for models that keep their own head:
    loss_fn(x, weight, bias, target, sample_weight=None), weight (1, D), bias (1,) or None."""

    def __init__(self, pos_weight=None, reduction="mean"):
        super().__init__()
        MF._reduction_code(reduction, "manual_layers.LinearBCEWithLogitsLoss")
        self.reduction = reduction
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, x, weight, bias, target, sample_weight=None):
        return MF.linear_binary_cross_entropy_with_logits(
            x, weight, bias, target, pos_weight=self.pos_weight, sample_weight=sample_weight,
            reduction=self.reduction)


class LinearCrossEntropyLoss(nn.Module):
    """Fused nn.Linear(D, C) + nn.CrossEntropyLoss (the N x C logits are never stored):
    loss_fn(x, weight, bias, target), weight (C, D), bias (C,) or None, target class indices.
    `weight` in the constructor is nn.CrossEntropyLoss's class weight."""

    def __init__(self, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
        super().__init__()
        MF._reduction_code(reduction, "manual_layers.LinearCrossEntropyLoss")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction

    def forward(self, x, weight, bias, target):
        return MF.linear_cross_entropy(
            x, weight, bias, target, class_weight=self.weight, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, reduction=self.reduction)


_progress = _fit._progress  # the progress bar moved to the fit engine; kept here by name


class _NotFittedError(ValueError, AttributeError):
    """predict/score called on a LogisticRegression layer that has no classes_ (used when
    scikit-learn is absent)."""


def _not_fitted_error_class():
    """scikit-learn's NotFittedError when installed (so `except NotFittedError` works for both),
    imported only when raised: importing scikit-learn costs a second at `import manual_layers`."""
    try:
        from sklearn.exceptions import NotFittedError
        return NotFittedError
    except ImportError:  # pragma: no cover
        return _NotFittedError


def _finite_or_raise(t, name, fn):
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: {name} contains NaN or infinity; remove or impute those "
                         f"values first")


def _positive_int_or_none(value, name, fn, minimum=1):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class LogisticRegression(nn.Module):
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

    fit() minimises scikit-learn's objective (weighted mean log-loss + ||W||^2 / (2 C sum of
    sample weights); the intercept is not penalised) through the fused loss kernels, on CPU or
    CUDA tensors or numpy arrays; see manual_layers/_fit.py. For a full scikit-learn estimator
    (clone, Pipeline, GridSearchCV, pandas) use manual_layers.sklearn.LogisticRegression.

    state_dict: weight, bias (nn.Linear's keys) and, once fitted, "_extra_state" holding
    classes_ (plain Python lists, loadable with torch.load(weights_only=True)). A state_dict
    without it (an unfitted layer's, an nn.Linear's) still loads, leaving the layer unfitted.
    """

    def __init__(self, in_features, num_classes=2, bias=True, device=None, dtype=None):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"LogisticRegression: num_classes must be >= 2, got {num_classes}")
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
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
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

    # ---- the estimator ---------------------------------------------------------------------
    def _as_tensor(self, X, fn=None, dtype=None):
        """X as a tensor on the layer's device (in the layer's dtype unless given), checked:
        2-D (N, in_features) when fn is given (fit/predict), any (..., in_features) else.
        Sparse X (scipy.sparse, torch sparse tensors) becomes a manual_layers._sparse.CSR over
        its own arrays, never densified (CSC and other formats converted to CSR once)."""
        if _sparse.is_sparse(X):
            X = _sparse.to_csr(X, self.weight.device, dtype or self.weight.dtype,
                               fn or "LogisticRegression")
            if X.shape[1] != self.in_features:
                raise ValueError(f"{fn or 'LogisticRegression'}: X must have shape (N, "
                                 f"{self.in_features}), got {X.shape}")
            return X
        if not isinstance(X, torch.Tensor):
            if hasattr(X, "to_numpy"):  # pandas DataFrame / Series
                X = X.to_numpy()
            X = np.asarray(X)
            if X.dtype.kind not in "biuf":
                raise TypeError(f"{fn or 'LogisticRegression'}: X must be numeric, got dtype "
                                f"{X.dtype}")
            X = torch.as_tensor(X)
        X = X.to(device=self.weight.device, dtype=dtype or self.weight.dtype)
        if fn is not None:
            if X.dim() != 2 or X.shape[1] != self.in_features:
                raise ValueError(f"{fn}: X must have shape (N, {self.in_features}), got "
                                 f"{tuple(X.shape)}")
        return X

    def _check_fitted(self, fn):
        if self.classes_ is None:
            raise _not_fitted_error_class()(
                f"{fn}: this LogisticRegression has not been fitted, so it has no classes_ to "
                f"predict; call fit(X, y) first (or load a fitted state_dict). For the "
                f"probabilities of the current weights use predict_proba(X) or forward(x); to "
                f"predict class indices from weights you trained yourself, set "
                f"layer.classes_ = numpy.arange({self.num_classes})")

    @torch.no_grad()
    def predict_proba(self, X):
        """(N, num_classes) probabilities from the current weights (fitted or not); two
        columns [P(0), P(1)] for binary."""
        p = self(self._as_tensor(X))
        if self.binary:
            p = torch.cat([1 - p, p], dim=-1)
        return p.cpu().numpy() if not isinstance(X, (torch.Tensor, _sparse.CSR)) else p

    @torch.no_grad()
    def predict(self, X):
        """Predicted labels, values of classes_ (set by fit, or by loading a fitted
        state_dict): a tensor for tensor input and numeric labels, else a numpy array.
        Raises NotFittedError when classes_ is None."""
        fn = "LogisticRegression.predict"
        self._check_fitted(fn)
        z = self.logits(self._as_tensor(X, fn))
        idx = (z[..., 0] > 0).long() if self.binary else z.argmax(dim=-1)
        if self.classes_.dtype.kind not in "biuf":  # strings / objects: numpy does it
            return self.classes_[idx.cpu().numpy()]
        idx = torch.as_tensor(self.classes_, device=idx.device)[idx]
        return idx.cpu().numpy() if not isinstance(X, (torch.Tensor, _sparse.CSR)) else idx

    @torch.no_grad()
    def score(self, X, y):
        """Mean accuracy of predict(X) against y (same length required)."""
        as_np = lambda a: a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        pred, y = as_np(self.predict(X)), as_np(y)
        if y.shape != pred.shape:
            raise ValueError(f"LogisticRegression.score: y must have shape {pred.shape} (one "
                             f"label per row of X), got {y.shape}")
        return float(np.mean(pred == y))

    def _encode(self, y, n_rows, fn, classes=None):
        """Map labels to class indices 0..K-1, keeping the labels in classes_ (as scikit-learn
        does); checks K against num_classes. Integer labels in 0..num_classes-1 with some
        classes absent are taken as the indices (at least two present). classes: the label set
        agreed across ranks (data-parallel fit), else y's own."""
        agreed = classes
        if isinstance(y, torch.Tensor):
            if y.is_floating_point() and not bool(torch.isfinite(y).all()):
                raise ValueError(f"{fn}: y contains NaN or infinity")
            if agreed is None:
                classes, idx = torch.unique(y, return_inverse=True)
                classes = classes.cpu().numpy()
            else:
                idx = torch.searchsorted(torch.as_tensor(agreed).to(y.device, y.dtype),
                                         y.contiguous())
            labels = y
        else:
            labels = np.asarray(y.to_numpy() if hasattr(y, "to_numpy") else y)
            if labels.dtype.kind == "f" and not np.isfinite(labels).all():
                raise ValueError(f"{fn}: y contains NaN or infinity")
            if agreed is None:
                classes, idx = np.unique(labels, return_inverse=True)
            else:
                idx = np.searchsorted(agreed, labels) if labels.size else \
                    np.zeros(labels.shape, dtype=np.intp)
            idx = torch.as_tensor(idx.reshape(labels.shape))
        if labels.shape != (n_rows,):
            raise ValueError(f"{fn}: y must have shape ({n_rows},) (one label per row of X), "
                             f"got {tuple(labels.shape)}")
        if len(classes) < 2:
            raise ValueError(f"{fn}: y must contain at least 2 classes, but it contains only "
                             f"one class: {classes[0]!r}")
        if len(classes) > self.num_classes:
            raise ValueError(f"{fn}: y has {len(classes)} classes but "
                             f"num_classes={self.num_classes}")
        if len(classes) < self.num_classes:
            if classes.dtype.kind not in "iu" or classes.min() < 0 or \
                    classes.max() >= self.num_classes:
                raise ValueError(f"{fn}: y has {len(classes)} distinct labels but "
                                 f"num_classes={self.num_classes}")
            classes = np.arange(self.num_classes)
            idx = torch.as_tensor(labels).long()
        return classes, idx.to(self.weight.device)

    def fit(self, X, y, *, C=1.0, optimizer="lbfgs", max_iter=100, tol=1e-4, lr=None,
            batch_size=None, epochs=None, sample_weight=None, class_weight=None,
            warm_start=False, verbose=False, distributed="auto", process_group=None):
        """Fit on X (N, in_features) and labels y (N,): tensors (on any device; moved to the
        layer's), numpy arrays or pandas objects; or sparse X (scipy.sparse CSR/CSC, torch
        sparse CSR tensors), never densified (CSC converted to CSR once). Starts from zero
        weights (as scikit-learn) unless warm_start=True (then from the current weights).

        optimizer: "lbfgs" (scipy's L-BFGS-B as scikit-learn, full batch, computed in float64
        whatever the layer's dtype; up to max_iter iterations, stops when the largest gradient
        component <= tol; ConvergenceWarning when it stops at max_iter), "sgd" or "adam"
        (mini-batches of batch_size (default 256) for epochs (default 10) epochs, lr; in the
        layer's dtype). C: inverse L2 strength as in scikit-learn (None: no penalty).
        sample_weight: (N,) or None; class_weight: (num_classes,) weights per class index, or
        None. Errors: ValueError naming the argument for NaN/inf, empty X, one class, bad
        sizes. Returns self.

        distributed ("auto", True, False) and process_group: data-parallel fit over
        torch.distributed. "auto": when
        process_group is given or the default group is initialised with more than one rank
        (torchrun), X, y, sample_weight are this rank's shard (any size, also 0 rows; classes
        may be missing from a shard) and every rank ends with the same weights, those one
        process fits on all shards concatenated. Every rank must call fit. The label sets and
        in_features are agreed once (ValueError on every rank when they disagree or any rank's
        checks fail), N and the weight total once, then each L-BFGS evaluation all-reduces
        (SUM) one float64 vector of 1 + rows * (in_features + 1) values. sgd/adam: every rank
        takes the same number of steps per epoch (the largest ceil(shard rows / batch_size)),
        each on 1/steps of its shuffled shard, with one all-reduce (SUM) per step of (loss sum,
        gradient sums, batch rows): the same update on every rank. False: local fit."""
        fn = "LogisticRegression.fit"
        group = _fit.resolve_process_group(distributed, process_group, fn)
        if optimizer not in _fit.SOLVERS:
            raise ValueError(f"{fn}: optimizer must be 'lbfgs', 'sgd' or 'adam', got "
                             f"{optimizer!r}")
        if C is not None and (isinstance(C, bool) or not isinstance(C, (int, float)) or
                              not C > 0):
            raise ValueError(f"{fn}: C must be a positive number or None, got {C!r}")
        max_iter = _positive_int_or_none(max_iter, "max_iter", fn, minimum=0)
        batch_size = _positive_int_or_none(batch_size, "batch_size", fn)
        epochs = _positive_int_or_none(epochs, "epochs", fn)
        if tol is None or isinstance(tol, bool) or not tol >= 0:
            raise ValueError(f"{fn}: tol must be a number >= 0, got {tol!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"{fn}: lr must be positive, got {lr!r}")
        lbfgs = optimizer == "lbfgs"
        work = torch.float64 if lbfgs else self.weight.dtype
        if group is None:
            X, sw, cw = self._fit_inputs(X, sample_weight, class_weight, work, fn, True)
            classes, idx = self._encode(y, X.shape[0], fn)
        else:
            # this rank's checks; their outcome, in_features and the label set go to every rank
            err, local, d = None, None, None
            try:
                X, sw, cw = self._fit_inputs(X, sample_weight, class_weight, work, fn, False)
                local, d = self._local_labels(y, X.shape[0], fn), X.shape[1]
            except (ValueError, TypeError) as e:
                err = e
            agreed = _fit.agree_across_ranks(group, fn, err, d, local)
            classes, idx = self._encode(y, X.shape[0], fn, classes=agreed)
        init = {}
        if warm_start:
            init = {"coef_init": self.weight.detach(),
                    "intercept_init": self.bias.detach() if self.bias is not None else None}
        res = _fit.fit_logistic_regression(
            X, idx, self.num_classes, sample_weight=sw, class_weight=cw, C=C,
            fit_intercept=self.bias is not None, solver=optimizer,
            max_iter=max_iter if lbfgs else (10 if epochs is None else epochs),
            tol=tol if lbfgs else 0.0, lr=lr,
            batch_size=256 if batch_size is None else batch_size, verbose=verbose, caller=fn,
            process_group=group, **init)
        return self._load_fit(res, classes)

    def _load_fit(self, res, classes):
        """Take a fit engine result (manual_layers._fit.FitResult) and its labels: parameters
        (cast to the layer's dtype), classes_, n_iter_, fit_time_; eval mode. Returns self."""
        with torch.no_grad():
            self.weight.copy_(res.coef)
            if self.bias is not None:
                self.bias.copy_(res.intercept)
        self.classes_ = classes
        self.n_iter_ = res.n_iter
        self.fit_time_ = res.fit_time
        self.eval()
        return self

    def _local_labels(self, y, n_rows, fn):
        """This rank's label set (numpy), y's shape and values checked."""
        if isinstance(y, torch.Tensor):
            if y.shape != (n_rows,):
                raise ValueError(f"{fn}: y must have shape ({n_rows},) (one label per row of X), "
                                 f"got {tuple(y.shape)}")
            if y.is_floating_point() and not bool(torch.isfinite(y).all()):
                raise ValueError(f"{fn}: y contains NaN or infinity")
            return torch.unique(y).cpu().numpy()
        labels = np.asarray(y.to_numpy() if hasattr(y, "to_numpy") else y)
        if labels.shape != (n_rows,):
            raise ValueError(f"{fn}: y must have shape ({n_rows},) (one label per row of X), got "
                             f"{tuple(labels.shape)}")
        if labels.dtype.kind == "f" and not np.isfinite(labels).all():
            raise ValueError(f"{fn}: y contains NaN or infinity")
        return np.unique(labels)

    def _fit_inputs(self, X, sample_weight, class_weight, work, fn, need_rows):
        """X, sample_weight, class_weight as checked tensors on the layer's device."""
        X = self._as_tensor(X, fn, dtype=work)
        if need_rows and X.shape[0] == 0:
            raise ValueError(f"{fn}: X is empty (0 rows); fit needs at least one sample of each "
                             f"of two classes")
        if not isinstance(X, _sparse.CSR):  # a CSR's values were checked by to_csr
            _finite_or_raise(X, "X", fn)
        sw = cw = None
        if sample_weight is not None:
            sw = torch.as_tensor(np.asarray(sample_weight) if not isinstance(
                sample_weight, torch.Tensor) else sample_weight).to(X.device, work)
            if sw.shape != (X.shape[0],):
                raise ValueError(f"{fn}: sample_weight must have shape ({X.shape[0]},), got "
                                 f"{tuple(sw.shape)}")
            _finite_or_raise(sw, "sample_weight", fn)
        if class_weight is not None:
            cw = torch.as_tensor(np.asarray(class_weight) if not isinstance(
                class_weight, torch.Tensor) else class_weight).to(X.device, work)
            if cw.shape != (self.num_classes,):
                raise ValueError(f"{fn}: class_weight must have shape ({self.num_classes},), "
                                 f"one weight per class index, got {tuple(cw.shape)}")
            _finite_or_raise(cw, "class_weight", fn)
        return X, sw, cw
