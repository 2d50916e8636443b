"""The nn.Modules: drop-in replacements for nn.Linear (+ activation), nn.Linear + nn.Sigmoid /
BCEWithLogitsLoss / CrossEntropyLoss, and scikit-learn's LogisticRegression."""

import math

import numpy as np
import torch
from torch import nn

import numbers

from . import _fit, _sparse
from . import functional as MF
from ._layer_fit import LayerFitMixin, _not_fitted_error_class  # noqa: F401

__all__ = ["Linear", "FusedLinear", "MLP", "convert", "LogisticRegression", "LinearBCEWithLogitsLoss",
           "LinearCrossEntropyLoss"]


def _no_script(name):
    raise RuntimeError(
        f"manual_layers.{name}: torch.jit.script is not supported (TorchScript cannot compile "
        f"the Python wrapper of its custom ops); use torch.compile or torch.export, which trace "
        f"the ops as single graph nodes")


class Linear(nn.Linear):
    """nn.Linear whose forward and backward run the manual_layers kernels; with an activation,
    nn.Linear + activation fused in one kernel: y = act(x W^T + b).

    Same constructor arguments, parameters (weight (out_features, in_features), bias
    (out_features,)), initialisation and state_dict keys as nn.Linear, so state dicts load
    both ways. activation: None, "relu", "gelu" (exact, as nn.GELU()), "gelu_tanh"
    (nn.GELU(approximate="tanh")), "silu", "sigmoid", "tanh".

    Without an activation the layer computes exactly what nn.Linear computes and IS an
    nn.Linear (a subclass), so code and tools that look for nn.Linear (initialisation loops, LoRA,
    tensor parallelism, pruning) find it and are right about it. With an activation,
    ``Linear(..., activation="gelu")`` returns a ``FusedLinear``, which is deliberately not an
    nn.Linear: its output is not linear in x and W, and a tool that special-cases nn.Linear would
    silently compute the wrong thing with it (LoRA adds its update after the activation instead of
    before; row-wise tensor parallelism sums activated partial outputs). Such tools refuse a
    FusedLinear with their own "not supported" error instead.

    Any float dtype, any leading dimensions, CPU and CUDA; under torch.autocast the GEMM runs in
    the autocast dtype, as nn.Linear's. Works under torch.compile, torch.export, torch.func
    (grad, vmap, jacrev, jacfwd, hessian, jvp) and double backward.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    activation : one of :data:`manual_layers.functional.ACTIVATIONS`, default None
    device, dtype : as nn.Linear's

    Examples
    --------
    >>> import torch, manual_layers as ml
    >>> layer = ml.Linear(8, 4)
    >>> layer(torch.randn(2, 3, 8)).shape
    torch.Size([2, 3, 4])
    >>> type(ml.Linear(8, 4, activation="gelu")).__name__
    'FusedLinear'
    """

    def __new__(cls, *args, **kwargs):
        if cls is Linear and _activation_arg(args, kwargs) is not None:
            return FusedLinear(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, in_features, out_features, bias=True, activation=None, device=None,
                 dtype=None):
        MF._check_activation(activation, "manual_layers.Linear")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x):
        """x (..., in_features) -> (..., out_features), x's dtype and device."""
        return MF.linear(x, self.weight, self.bias, self.activation)

    def _get_name(self):
        return "manual_layers.Linear"

    def extra_repr(self):
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")

    def __prepare_scriptable__(self):
        _no_script("Linear")

    @classmethod
    def from_linear(cls, linear, activation=None):
        """A manual_layers layer that shares linear's parameters (no copy): a Linear, or a
        FusedLinear when activation is given."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear.from_linear: expected an nn.Linear, got "
                            f"{type(linear).__name__}")
        if activation is not None and cls is Linear:
            return FusedLinear.from_linear(linear, activation)
        MF._check_activation(activation, "manual_layers.Linear.from_linear")
        return _sharing(cls, linear, activation)


def _sharing(cls, linear, activation):
    """A `cls` layer whose weight and bias ARE linear's Parameters (no copy)."""
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    m.in_features, m.out_features = linear.in_features, linear.out_features
    m.weight = linear.weight
    m.bias = linear.bias
    m.activation = activation
    m.train(linear.training)
    return m


def _activation_arg(args, kwargs):
    """The activation argument of Linear(in_features, out_features, bias, activation, ...)."""
    return args[3] if len(args) > 3 else kwargs.get("activation")


class FusedLinear(nn.Module):
    """nn.Linear followed by an activation, in one kernel: y = act(x W^T + b); what
    ``manual_layers.Linear(..., activation=...)`` returns.

    nn.Linear's constructor arguments, parameters (weight, bias), initialisation and state_dict
    keys, so state dicts load both ways with nn.Linear. Not an nn.Linear subclass, on purpose
    (see Linear). Any float dtype, any leading dimensions, CPU and CUDA; autocast as nn.Linear.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    activation : {"relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"}
        ``"gelu"`` is exact (``nn.GELU()``), ``"gelu_tanh"`` is ``nn.GELU(approximate="tanh")``.
    device, dtype : as nn.Linear's

    Examples
    --------
    >>> import torch, manual_layers as ml
    >>> layer = ml.Linear(8, 4, activation="gelu")
    >>> x = torch.randn(5, 8)
    >>> ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, layer.weight, layer.bias))
    >>> torch.allclose(layer(x), ref, atol=1e-6)
    True
    """

    def __init__(self, in_features, out_features, bias=True, activation="gelu", device=None,
                 dtype=None):
        super().__init__()
        MF._check_activation(activation, "manual_layers.FusedLinear")
        if activation is None:
            raise ValueError("manual_layers.FusedLinear: activation must be given; use "
                             "manual_layers.Linear for a layer without one")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self.activation = activation
        self.reset_parameters()

    def reset_parameters(self):
        """nn.Linear's initialisation."""
        nn.Linear.reset_parameters(self)

    def forward(self, x):
        """x (..., in_features) -> act(x W^T + b) (..., out_features)."""
        return MF.linear(x, self.weight, self.bias, self.activation)

    def _get_name(self):
        return "manual_layers.FusedLinear"

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")

    def __prepare_scriptable__(self):
        _no_script("FusedLinear")

    @classmethod
    def from_linear(cls, linear, activation):
        """A FusedLinear sharing linear's parameters (no copy), with the activation fused."""
        if not isinstance(linear, (nn.Linear, FusedLinear)):
            raise TypeError(f"FusedLinear.from_linear: expected an nn.Linear, got "
                            f"{type(linear).__name__}")
        MF._check_activation(activation, "manual_layers.FusedLinear.from_linear")
        return _sharing(cls, linear, activation)


class MLP(nn.Sequential):
    """nn.Sequential(nn.Linear(in, hidden), act, nn.Linear(hidden, out)) as one fused op:
    y = act(x W1^T + b1) W2^T + b2, forward and backward hand-written (functional.mlp).

    State dict: the keys of that nn.Sequential, "0.weight", "0.bias", "2.weight", "2.bias"
    (it IS an nn.Sequential of nn.Linear, the activation module and nn.Linear, with forward
    replaced), so state dicts load both ways with no renaming, and nn.Sequential(...) converted
    by convert() keeps its keys. `fc1` / `fc2` name the two layers (self[0], self[2]).
    Parameters and initialisation are nn.Linear's. activation: None, "relu", "gelu" (exact, as
    nn.GELU()), "gelu_tanh", "silu", "sigmoid", "tanh".

    The fused op runs while the three layers are exactly nn.Linear, the activation module and
    nn.Linear, without hooks. When a tool replaces or hooks them (PEFT's LoRA wraps the
    nn.Linear layers, Opacus and pruning register hooks, parametrizations change their class),
    forward runs the layers one by one instead, as nn.Sequential does, so the tool sees the
    calls it expects.

    Parameters
    ----------
    in_features, hidden_features, out_features : int
    activation : one of :data:`manual_layers.functional.ACTIVATIONS`, default "gelu"
    bias : bool, default True
    device, dtype : as nn.Linear's

    Examples
    --------
    >>> import torch, manual_layers as ml
    >>> mlp = ml.MLP(16, 64, 8, activation="gelu")
    >>> mlp(torch.randn(4, 16)).shape
    torch.Size([4, 8])
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
        self._act_type = type(act)

    @property
    def fc1(self):
        """The first nn.Linear (self[0])."""
        return self[0]

    @property
    def fc2(self):
        """The second nn.Linear (self[2])."""
        return self[2]

    @property
    def in_features(self):
        """fc1's in_features."""
        return self[0].in_features

    @property
    def hidden_features(self):
        """fc1's out_features."""
        return self[0].out_features

    @property
    def out_features(self):
        """fc2's out_features."""
        return self[2].out_features

    def _fusable(self):
        """The three layers are the ones the fused op computes, and nobody hooks them."""
        mods = self._modules
        l1, act, l2 = mods.get("0"), mods.get("1"), mods.get("2")
        if type(l1) is not nn.Linear or type(l2) is not nn.Linear or \
                type(act) is not self._act_type or len(mods) != 3:
            return False
        for m in (l1, act, l2):
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or \
                    m._backward_pre_hooks:
                return False
        return True

    def forward(self, x):
        """x (..., in_features) -> (..., out_features)."""
        if self._fusable():
            return MF.mlp(x, self[0].weight, self[0].bias, self[2].weight, self[2].bias,
                          self.activation)
        return super().forward(x)

    def _get_name(self):
        return "manual_layers.MLP"

    def extra_repr(self):
        return f"activation={self.activation!r}"

    def __prepare_scriptable__(self):
        _no_script("MLP")

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
        m._act_type = type(seq[1])
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
    """The fused-activation name of a torch activation module (exactly that class, no hooks),
    or None if not foldable."""
    if module is None or module._forward_hooks or module._forward_pre_hooks:
        return None
    t = type(module)
    if t is nn.ReLU:
        return "relu"
    if t is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    return {nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}.get(t)


from ._convert import convert  # noqa: E402  (uses the classes above)


class LinearBCEWithLogitsLoss(nn.Module):
    """nn.Linear(D, 1) + nn.BCEWithLogitsLoss fused, for models that keep their own head's
    parameters: ``loss_fn(x, weight, bias, target, sample_weight=None)``.

    Call with x (..., D), weight (1, D), bias (1,) or None, target x.shape[:-1] (floating
    probabilities) and sample_weight broadcastable to it (as nn.BCEWithLogitsLoss's ``weight``);
    see :func:`manual_layers.functional.linear_binary_cross_entropy_with_logits`.

    Parameters
    ----------
    pos_weight : one-element Tensor, optional
        As nn.BCEWithLogitsLoss's (a buffer of the module).
    reduction : {"mean", "sum", "none"}

    Examples
    --------
    >>> import torch, manual_layers as ml
    >>> head = torch.nn.Linear(8, 1)
    >>> loss_fn = ml.LinearBCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))
    >>> loss = loss_fn(torch.randn(5, 8), head.weight, head.bias, torch.rand(5))
    >>> loss.backward()
    >>> head.weight.grad.shape
    torch.Size([1, 8])
    """

    def __init__(self, pos_weight=None, reduction="mean"):
        super().__init__()
        MF._reduction_code(reduction, "manual_layers.LinearBCEWithLogitsLoss")
        self.reduction = reduction
        self.register_buffer("pos_weight", pos_weight)

    def _get_name(self):
        return "manual_layers.LinearBCEWithLogitsLoss"

    def __prepare_scriptable__(self):
        _no_script("LinearBCEWithLogitsLoss")

    def forward(self, x, weight, bias, target, sample_weight=None):
        return MF.linear_binary_cross_entropy_with_logits(
            x, weight, bias, target, pos_weight=self.pos_weight, sample_weight=sample_weight,
            reduction=self.reduction)


class LinearCrossEntropyLoss(nn.Module):
    """nn.Linear(D, C) + nn.CrossEntropyLoss fused (the N x C logits are never stored whole):
    ``loss_fn(x, weight, bias, target)``.

    Call with x (..., D), weight (C, D), bias (C,) or None and target: class indices
    (x.shape[:-1]) or class probabilities (x.shape[:-1] + (C,)); see
    :func:`manual_layers.functional.linear_cross_entropy`.

    Parameters
    ----------
    weight : Tensor, shape (C,), optional
        The class weights, as nn.CrossEntropyLoss's ``weight`` (a buffer of the module; the
        layer's weight is the call's argument).
    ignore_index : int, default -100
    label_smoothing : float in [0, 1], default 0
    reduction : {"mean", "sum", "none"}

    Examples
    --------
    >>> import torch, manual_layers as ml
    >>> head = torch.nn.Linear(8, 100)
    >>> loss_fn = ml.LinearCrossEntropyLoss(label_smoothing=0.1)
    >>> x, y = torch.randn(4, 16, 8), torch.randint(0, 100, (4, 16))
    >>> loss = loss_fn(x, head.weight, head.bias, y)
    >>> loss.backward()
    >>> loss.shape, head.bias.grad.shape
    (torch.Size([]), torch.Size([100]))
    """

    def __init__(self, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
        super().__init__()
        MF._reduction_code(reduction, "manual_layers.LinearCrossEntropyLoss")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction

    def _get_name(self):
        return "manual_layers.LinearCrossEntropyLoss"

    def __prepare_scriptable__(self):
        _no_script("LinearCrossEntropyLoss")

    def forward(self, x, weight, bias, target):
        return MF.linear_cross_entropy(
            x, weight, bias, target, class_weight=self.weight, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, reduction=self.reduction)


_progress = _fit._progress  # the progress bar moved to the fit engine; kept here by name


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
