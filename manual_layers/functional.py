"""The functional API: thin wrappers around the public ops in torch.ops.manual_layers.

Each call is normally one dispatcher call: the op's C++ kernels (csrc/autograd/) check the
arguments, flatten the leading dimensions, cast under autocast, run the forward kernel and record
one backward node. Python keeps what the ops cannot do: string codes (reduction), Python-level
argument types, and the route for callers the C++ autograd cannot serve:

- inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``hessian``,
  ``jvp``, ``functional_call`` under them) or with forward-mode AD (``torch.autograd.forward_ad``)
  the call goes through the Python ``torch.autograd.Function`` subclasses of
  ``manual_layers.autograd`` (functorch runs only those; a C++ autograd Function has no forward
  derivative and no batching rule);
- with DTensor arguments (tensor parallelism) the same math in PyTorch ops, which DTensor shards
  (``manual_layers._derivatives``): the fused kernels have no sharding rules. This is the one
  place the functional API falls back to plain PyTorch.
"""

import numbers
import operator

import torch
import torch.autograd.forward_ad as _fwd_ad

from . import _derivatives as D
from ._ops import ops

#: The accepted values of ``activation``: ``None``, ``"relu"``, ``"gelu"`` (exact, as
#: ``nn.GELU()``), ``"gelu_tanh"`` (``nn.GELU(approximate="tanh")``), ``"silu"``, ``"sigmoid"``,
#: ``"tanh"``.
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
# The ops' overloads, bound once (calling the packet resolves the overload on every call).
_LINEAR, _MLP = ops.linear.default, ops.mlp.default
_LINEAR_BCE, _LINEAR_CE = ops.linear_bce.default, ops.linear_ce.default
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

__all__ = ["linear", "mlp", "linear_binary_cross_entropy_with_logits", "linear_cross_entropy",
           "logistic_regression", "ACTIVATIONS"]


def _check_tensor(name, t, fn):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_activation(activation, fn="manual_layers.functional.linear"):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: unknown activation {activation!r}; expected one of "
                         f"{', '.join(repr(a) for a in ACTIVATIONS)}")


_peek_transform = torch._C._functorch.peek_interpreter_stack
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _routed(*tensors):
    """Whether this call leaves the C++ op path: a torch.func transform or forward-mode AD is
    active, or an argument is a DTensor or not a tensor at all (the routed path then raises the
    TypeError naming it). Costs well under a microsecond on the common path."""
    if _peek_transform() is not None or _fwd_ad._current_level >= 0:
        return not torch.compiler.is_compiling()
    for t in tensors:
        if t is not None and type(t) not in _PLAIN and (
                not isinstance(t, torch.Tensor) or _is_dtensor(t)):
            return True
    return False


def _is_dtensor(t):
    return t is not None and type(t).__name__ == "DTensor" and isinstance(t, torch.Tensor)


def _autocast(x, weight, bias):
    """Cast as nn.Linear does under torch.autocast, for the Python Function route (the C++ ops
    cast in their Autocast kernels): floating tensors other than float64 to the autocast dtype of
    x's device."""
    dev = x.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(dt) if t is not None and t.is_floating_point() and \
        t.dtype != torch.float64 else t
    return cast(x), cast(weight), cast(bias)


def _check_args(fn, **tensors):
    for name, t in tensors.items():
        if t is not None:
            _check_tensor(name, t, fn)


def linear(x, weight, bias=None, activation=None):
    """``act(x @ weight.T + bias)`` with hand-written forward and backward kernels: ``F.linear``
    followed by an activation, in one op.

    Parameters
    ----------
    x : Tensor, shape (..., in_features)
        Any leading dimensions, any strides; float32, float64, bfloat16 or float16.
    weight : Tensor, shape (out_features, in_features)
        x's dtype and device.
    bias : Tensor, shape (out_features,), or None
    activation : {None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"}
        ``"gelu"`` is the exact erf GELU of ``nn.GELU()``, ``"gelu_tanh"`` the tanh approximation
        of ``nn.GELU(approximate="tanh")``.

    Returns
    -------
    Tensor, shape (..., out_features), x's dtype; under ``torch.autocast`` the autocast dtype,
    as ``F.linear``'s.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> from manual_layers.functional import linear
    >>> x, w, b = torch.randn(2, 5, 8), torch.randn(4, 8), torch.randn(4)
    >>> y = linear(x, w, b, "gelu")
    >>> y.shape
    torch.Size([2, 5, 4])
    >>> torch.allclose(y, F.gelu(F.linear(x, w, b)), atol=1e-5)
    True
    """
    if activation not in ACTIVATIONS:
        _check_activation(activation)
    if _routed(x, weight, bias):
        return _linear_routed("manual_layers.functional.linear", x, weight, bias,
                              activation or "none")
    return _LINEAR(x, weight, bias, activation or "none")


def _linear_routed(fn, x, weight, bias, act):
    _check_args(fn, x=x, weight=weight, bias=bias)
    if _is_dtensor(x) or _is_dtensor(weight) or _is_dtensor(bias):
        return D.linear_forward(x, weight, bias, act)
    from .autograd import LinearFunction
    return LinearFunction.apply(*_autocast(x, weight, bias), act)


def mlp(x, w1, b1, w2, b2, activation="gelu"):
    """``act(x @ w1.T + b1) @ w2.T + b2``: ``nn.Sequential(nn.Linear, act, nn.Linear)`` as one op,
    whose backward is one hand-written op (on the CPU the (N, hidden) gradient of the hidden
    layer is never materialised whole).

    Parameters
    ----------
    x : Tensor, shape (..., in_features)
    w1 : Tensor, shape (hidden, in_features)
    b1 : Tensor, shape (hidden,), or None
    w2 : Tensor, shape (out_features, hidden)
    b2 : Tensor, shape (out_features,), or None
    activation : one of :data:`ACTIVATIONS`, default ``"gelu"``

    Returns
    -------
    Tensor, shape (..., out_features), x's dtype.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> from manual_layers.functional import mlp
    >>> x = torch.randn(3, 8)
    >>> w1, b1, w2, b2 = torch.randn(16, 8), torch.randn(16), torch.randn(2, 16), torch.randn(2)
    >>> y = mlp(x, w1, b1, w2, b2, activation="silu")
    >>> torch.allclose(y, F.linear(F.silu(F.linear(x, w1, b1)), w2, b2), atol=1e-4)
    True
    """
    fn = "manual_layers.functional.mlp"
    if activation not in ACTIVATIONS:
        _check_activation(activation, fn)
    if _routed(x, w1, b1, w2, b2):  # as two Linear calls, each routed
        _check_args(fn, x=x, w1=w1, b1=b1, w2=w2, b2=b2)
        h = _linear_routed(fn, x, w1, b1, activation or "none")
        return _linear_routed(fn, h, w2, b2, "none")
    return _MLP(x, w1, b1, w2, b2, activation or "none")


def logistic_regression(x, weight, bias=None):
    """Class probabilities of a linear classifier, the GEMV/GEMM and the activation in one op.

    Parameters
    ----------
    x : Tensor, shape (..., D)
    weight : Tensor, shape (1, D) (binary) or (C, D) (C > 1 classes)
    bias : Tensor, shape (1,) or (C,), or None

    Returns
    -------
    Tensor: ``sigmoid(x w^T + b)`` of shape (..., 1) for one output row, else
    ``softmax(x W^T + b)`` over the last dimension, shape (..., C).

    Examples
    --------
    >>> import torch
    >>> from manual_layers.functional import logistic_regression
    >>> p = logistic_regression(torch.randn(4, 3), torch.randn(5, 3))
    >>> p.shape, bool(torch.allclose(p.sum(-1), torch.ones(4)))
    (torch.Size([4, 5]), True)
    """
    fn = "manual_layers.functional.logistic_regression"
    _check_args(fn, x=x, weight=weight, bias=bias)
    act = "sigmoid" if weight.dim() == 2 and weight.shape[0] == 1 else "softmax"
    if _routed(x, weight, bias):
        return _linear_routed(fn, x, weight, bias, act)
    return _LINEAR(x, weight, bias, act)


def _reduction_code(reduction, fn):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return _REDUCTIONS[reduction]


def linear_binary_cross_entropy_with_logits(x, weight, bias, target, *, pos_weight=None,
                                            sample_weight=None, reduction="mean"):
    """``F.binary_cross_entropy_with_logits(F.linear(x, weight, bias).squeeze(-1), target,
    weight=sample_weight, pos_weight=pos_weight, reduction=reduction)``, fused: one pass over x
    computes the loss and the gradients with respect to x, weight and bias.

    Parameters
    ----------
    x : Tensor, shape (..., D)
    weight : Tensor, shape (1, D)
    bias : Tensor, shape (1,), or None
    target : Tensor, shape x.shape[:-1], floating
        Probabilities of the positive class (soft labels allowed).
    pos_weight : one-element Tensor, optional
    sample_weight : Tensor broadcastable to target's shape, optional
    reduction : {"mean", "sum", "none"}

    Returns
    -------
    Tensor: a scalar (mean, sum) or of shape x.shape[:-1] (none); x's dtype, float32 under
    autocast.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> from manual_layers.functional import linear_binary_cross_entropy_with_logits as bce
    >>> x, w, b, y = torch.randn(6, 4), torch.randn(1, 4), torch.randn(1), torch.rand(6)
    >>> ref = F.binary_cross_entropy_with_logits(F.linear(x, w, b).squeeze(-1), y)
    >>> torch.allclose(bce(x, w, b, y), ref, atol=1e-6)
    True
    """
    fn = "manual_layers.functional.linear_binary_cross_entropy_with_logits"
    red = _reduction_code(reduction, fn)
    if _routed(x, weight, bias, target, pos_weight, sample_weight):
        _check_args(fn, x=x, weight=weight, bias=bias, target=target, pos_weight=pos_weight,
                    sample_weight=sample_weight)
        if any(_is_dtensor(t) for t in (x, weight, bias, target, pos_weight, sample_weight)):
            return D.bce_forward(x, weight, bias, target, pos_weight, sample_weight, red)
        from .autograd import LinearBCEFunction
        return LinearBCEFunction.apply(*_autocast(x, weight, bias), target, pos_weight,
                                       sample_weight, red)
    return _LINEAR_BCE(x, weight, bias, target, pos_weight, sample_weight, red)


def linear_cross_entropy(x, weight, bias, target, *, class_weight=None, ignore_index=-100,
                         label_smoothing=0.0, reduction="mean"):
    """``F.cross_entropy(F.linear(x, weight, bias), target, weight=class_weight,
    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)``, fused:
    the logits, the loss and the gradients are computed together; the N x C logits are never
    stored whole (large C: chunks of rows).

    Parameters
    ----------
    x : Tensor, shape (..., D)
    weight : Tensor, shape (C, D)
    bias : Tensor, shape (C,), or None
    target : Tensor
        Class indices (integer, shape x.shape[:-1]) or class probabilities (floating, shape
        x.shape[:-1] + (C,): soft labels for distillation and mixup; ignore_index does not
        apply and ``mean`` divides by the number of rows, as in ``F.cross_entropy``).
    class_weight : Tensor, shape (C,), optional
    ignore_index : int, default -100
    label_smoothing : float in [0, 1], default 0
    reduction : {"mean", "sum", "none"}

    Returns
    -------
    Tensor: a scalar (mean, sum) or of shape x.shape[:-1] (none); x's dtype, float32 under
    autocast.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> from manual_layers.functional import linear_cross_entropy
    >>> x, w, b = torch.randn(6, 4), torch.randn(3, 4), torch.randn(3)
    >>> y = torch.tensor([0, 2, 1, 1, 0, 2])
    >>> ref = F.cross_entropy(F.linear(x, w, b), y, label_smoothing=0.1)
    >>> torch.allclose(linear_cross_entropy(x, w, b, y, label_smoothing=0.1), ref, atol=1e-6)
    True
    >>> probs = torch.softmax(torch.randn(6, 3), -1)  # soft targets
    >>> torch.allclose(linear_cross_entropy(x, w, b, probs),
    ...                F.cross_entropy(F.linear(x, w, b), probs), atol=1e-6)
    True
    """
    fn = "manual_layers.functional.linear_cross_entropy"
    red = _reduction_code(reduction, fn)
    if type(ignore_index) is not int:  # the plain int skips the (slower) ABC checks
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"{fn}: ignore_index must be an integer, got "
                            f"{type(ignore_index).__name__} {ignore_index!r}")
        ignore_index = operator.index(ignore_index)
    if not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"{fn}: ignore_index must fit in int64, got {ignore_index}")
    if type(label_smoothing) is not float:
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
            raise TypeError(f"{fn}: label_smoothing must be a float, got "
                            f"{type(label_smoothing).__name__} {label_smoothing!r}")
        label_smoothing = float(label_smoothing)
    if _routed(x, weight, bias, target, class_weight):
        _check_args(fn, x=x, weight=weight, bias=bias, target=target, class_weight=class_weight)
        if any(_is_dtensor(t) for t in (x, weight, bias, target, class_weight)):
            return D.ce_forward(x, weight, bias, target, class_weight, ignore_index,
                                label_smoothing, red)
        from .autograd import LinearCrossEntropyFunction
        return LinearCrossEntropyFunction.apply(*_autocast(x, weight, bias), target,
                                                class_weight, ignore_index, label_smoothing, red)
    return _LINEAR_CE(x, weight, bias, target, class_weight, ignore_index, label_smoothing, red)
