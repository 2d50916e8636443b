"""The nn.Modules: drop-in replacements for nn.Linear (+ activation), nn.Linear + nn.Sigmoid /
BCEWithLogitsLoss / CrossEntropyLoss, and scikit-learn's LogisticRegression."""

import math
import time

import numpy as np
import torch
from torch import nn

from . import functional as MF
from .functional import ACTIVATIONS

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


def _progress(total, desc, verbose):
    if not verbose:
        return None
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:  # plain-text progress when tqdm is absent
        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k

            def set_postfix(self, **kw):
                print(f"{desc} {self.n}/{total} " + " ".join(f"{k}={v}" for k, v in kw.items()))

            def close(self):
                pass
        return _Plain()


class LogisticRegression(nn.Module):
    """Logistic regression as a layer and as a scikit-learn-like estimator.

    num_classes=2 (binary): weight (1, in_features), bias (1,); forward(x) returns
    P(class 1) of shape (..., 1), as nn.Sequential(nn.Linear(D, 1), nn.Sigmoid()).
    num_classes=C > 2: weight (C, in_features), bias (C,); forward returns softmax
    probabilities (..., C). Parameters are initialised as nn.Linear's.

    fit() minimises mean loss + ||W||^2 / (2 C N) (scikit-learn's objective; the intercept is
    not penalised) through the fused loss kernels, on CPU or CUDA tensors or numpy arrays.
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

    # ---- the layer -------------------------------------------------------------------------
    def forward(self, x):
        return MF.logistic_regression(x, self.weight, self.bias)

    def logits(self, x):
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
    def _as_tensor(self, X):
        if not isinstance(X, torch.Tensor):
            X = torch.as_tensor(X)
        return X.to(device=self.weight.device, dtype=self.weight.dtype)

    @torch.no_grad()
    def predict_proba(self, X):
        """(N, num_classes) probabilities; two columns [P(0), P(1)] for binary."""
        p = self(self._as_tensor(X))
        if self.binary:
            p = torch.cat([1 - p, p], dim=-1)
        return p.cpu().numpy() if not isinstance(X, torch.Tensor) else p

    @torch.no_grad()
    def predict(self, X):
        """Predicted class labels: those seen by fit() (any labels numpy can sort, strings
        included), else 0..num_classes-1. A tensor for tensor input and numeric labels, else a
        numpy array."""
        z = self.logits(self._as_tensor(X))
        idx = (z[..., 0] > 0).long() if self.binary else z.argmax(dim=-1)
        if self.classes_ is not None:
            if self.classes_.dtype.kind not in "biuf":  # strings / objects: numpy does it
                return self.classes_[idx.cpu().numpy()]
            idx = torch.as_tensor(self.classes_, device=idx.device)[idx]
        return idx.cpu().numpy() if not isinstance(X, torch.Tensor) else idx

    @torch.no_grad()
    def score(self, X, y):
        """Mean accuracy of predict(X) against y."""
        as_np = lambda a: a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        return float(np.mean(as_np(self.predict(X)) == as_np(y)))

    def _encode(self, y):
        """Map labels to class indices 0..K-1, keeping the labels in classes_ (as scikit-learn
        does); checks K against num_classes."""
        if isinstance(y, torch.Tensor):
            classes, idx = torch.unique(y, return_inverse=True)
            classes, labels = classes.cpu().numpy(), y
        else:
            labels = np.asarray(y)
            classes, idx = np.unique(labels, return_inverse=True)
            idx = torch.as_tensor(idx)
        if len(classes) > self.num_classes:
            raise ValueError(f"LogisticRegression.fit: y has {len(classes)} classes but "
                             f"num_classes={self.num_classes}")
        if len(classes) < self.num_classes:
            # Integer labels in 0..num_classes-1 with some classes absent: they are the indices.
            if classes.dtype.kind not in "iu" or classes.min() < 0 or \
                    classes.max() >= self.num_classes:
                raise ValueError(f"LogisticRegression.fit: y has {len(classes)} distinct labels "
                                 f"but num_classes={self.num_classes}")
            classes = np.arange(self.num_classes)
            idx = torch.as_tensor(labels).long()
        self.classes_ = classes
        return idx.to(self.weight.device)

    def fit(self, X, y, *, C=1.0, optimizer="lbfgs", max_iter=100, tol=1e-6, lr=None,
            batch_size=None, epochs=None, verbose=False):
        """Fit on X (N, in_features) and labels y (N,) (tensors on the layer's device, or
        numpy arrays). optimizer: "lbfgs" (full batch, torch.optim.LBFGS with strong-Wolfe line
        search, up to max_iter iterations, stopping when the gradient's max-norm < tol),
        "sgd" or "adam" (mini-batches of batch_size, for epochs). C: inverse L2 strength as in
        scikit-learn (None: no penalty). Returns self."""
        if optimizer not in ("lbfgs", "sgd", "adam"):
            raise ValueError(f"LogisticRegression.fit: optimizer must be 'lbfgs', 'sgd' or "
                             f"'adam', got {optimizer!r}")
        if C is not None and not C > 0:
            raise ValueError(f"LogisticRegression.fit: C must be positive or None, got {C}")
        X = self._as_tensor(X)
        if X.dim() != 2 or X.shape[1] != self.in_features:
            raise ValueError(f"LogisticRegression.fit: X must have shape (N, {self.in_features}),"
                             f" got {tuple(X.shape)}")
        idx = self._encode(y)
        if idx.shape != (X.shape[0],):
            raise ValueError(f"LogisticRegression.fit: y must have shape ({X.shape[0]},), got "
                             f"{tuple(idx.shape)}")
        target = idx.to(X.dtype) if self.binary else idx
        N = X.shape[0]
        l2 = 0.0 if C is None else 1.0 / (2.0 * C * N)

        def objective(xb, tb):
            loss = self.loss(xb, tb)
            return loss + l2 * self.weight.pow(2).sum() if l2 else loss

        self.train()
        t0 = time.perf_counter()
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(self.parameters(), lr=1 if lr is None else lr,
                                    max_iter=max_iter, tolerance_grad=tol,
                                    tolerance_change=tol * 1e-3, history_size=20,
                                    line_search_fn="strong_wolfe")
            bar = _progress(max_iter, "LogisticRegression.fit (lbfgs)", verbose)

            def closure():
                opt.zero_grad()
                loss = objective(X, target)
                loss.backward()
                if bar is not None:  # one step runs all iterations: report from inside it
                    n_iter = opt.state[opt._params[0]].get("n_iter", 0)
                    bar.update(max(0, n_iter - bar.n))
                    bar.set_postfix(loss=f"{loss.item():.6f}")
                return loss

            opt.step(closure)
            self.n_iter_ = opt.state[opt._params[0]].get("n_iter", 0)
            if bar is not None:
                bar.close()
        else:
            batch_size = batch_size or 256
            epochs = epochs or 10
            lr = lr if lr is not None else (0.1 if optimizer == "sgd" else 0.01)
            opt = (torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9) if optimizer == "sgd"
                   else torch.optim.Adam(self.parameters(), lr=lr))
            steps = epochs * math.ceil(N / batch_size)
            bar = _progress(steps, f"LogisticRegression.fit ({optimizer})", verbose)
            for _ in range(epochs):
                perm = torch.randperm(N, device=X.device)
                for i in range(0, N, batch_size):
                    b = perm[i:i + batch_size]
                    opt.zero_grad()
                    loss = objective(X[b], target[b])
                    loss.backward()
                    opt.step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss.item():.4f}")
            if bar is not None:
                bar.close()
            self.n_iter_ = steps
        if not self.binary and self.bias is not None:
            # The softmax intercepts are unpenalised and only defined up to a common shift:
            # centre them (as scikit-learn does); probabilities are unchanged.
            with torch.no_grad():
                self.bias -= self.bias.mean()
        self.fit_time_ = time.perf_counter() - t0
        self.eval()
        return self
