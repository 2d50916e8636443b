"""The functional API: thin wrappers around the public ops in torch.ops.manual_layers.

Each call is one dispatcher call: the op's C++ Autograd kernel (csrc/autograd.cpp) checks the
arguments, flattens the leading dimensions, runs the forward kernel and records one backward
node. Python keeps only what the ops cannot do: autocast (cast as nn.Linear does), string codes
(reduction) and Python-level argument types."""

import numbers
import operator

import torch

from ._ops import ops

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
# The ops' overloads, bound once (calling the packet resolves the overload on every call).
_LINEAR, _MLP = ops.linear.default, ops.mlp.default
_LINEAR_BCE, _LINEAR_CE = ops.linear_bce.default, ops.linear_ce.default
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")

__all__ = ["linear", "mlp", "linear_binary_cross_entropy_with_logits", "linear_cross_entropy",
           "logistic_regression", "ACTIVATIONS"]


def _check_tensor(name, t, fn):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_activation(activation, fn="manual_layers.functional.linear"):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: unknown activation {activation!r}; expected one of "
                         f"{', '.join(repr(a) for a in ACTIVATIONS)}")


# torch._C._is_any_autocast_enabled (torch >= 2.4): one call that says no autocast region is
# open on any device, the common case, before the per-device test (x.device.type alone costs
# about 0.3 us).
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast_on(x):
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():
        return False
    dev = x.device.type
    return dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev)


def _autocast(x, weight, bias, fn):
    """Cast as nn.Linear does under torch.autocast: floating tensors other than float64 go to
    the autocast dtype of x's device. Returns (x, weight, bias, autocast_active)."""
    _check_tensor("x", x, fn)
    _check_tensor("weight", weight, fn)
    if bias is not None:
        _check_tensor("bias", bias, fn)
    if not _autocast_on(x):
        return x, weight, bias, False
    dt = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: t.to(dt) if t is not None and t.is_floating_point() and \
        t.dtype != torch.float64 else t
    return cast(x), cast(weight), cast(bias), True


def linear(x, weight, bias=None, activation=None):
    """y = act(x @ weight.T + bias) with hand-written forward and backward kernels.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None;
    activation: None, "relu", "gelu" (exact erf, as nn.GELU()), "gelu_tanh"
    (nn.GELU(approximate="tanh")), "silu", "sigmoid" or "tanh". Returns (..., out_features).
    """
    fn = "manual_layers.functional.linear"
    _check_activation(activation, fn)
    x, weight, bias, _ = _autocast(x, weight, bias, fn)
    return _LINEAR(x, weight, bias, activation or "none")


def mlp(x, w1, b1, w2, b2, activation="gelu"):
    """y = act(x @ w1.T + b1) @ w2.T + b2: nn.Sequential(nn.Linear, act, nn.Linear) as one op,
    whose backward is one hand-written op (on the CPU the (N, hidden) gradient of the hidden
    layer is never materialised whole).

    x: (..., in_features); w1: (hidden, in_features); b1: (hidden,) or None;
    w2: (out_features, hidden); b2: (out_features,) or None; activation as in linear().
    Returns (..., out_features).
    """
    fn = "manual_layers.functional.mlp"
    _check_activation(activation, fn)
    _check_tensor("w2", w2, fn)
    if b2 is not None:
        _check_tensor("b2", b2, fn)
    x, w1, b1, amp = _autocast(x, w1, b1, fn)
    if amp:
        _, w2, b2, _ = _autocast(x, w2, b2, fn)
    return _MLP(x, w1, b1, w2, b2, activation or "none")


def logistic_regression(x, weight, bias=None):
    """Class probabilities of a linear classifier: sigmoid(x w^T + b) for weight (1, D)
    (returns (..., 1)), softmax(x W^T + b) over the last dim for weight (C, D), C > 1
    (returns (..., C)). The GEMV/GEMM and the activation run as one fused op."""
    fn = "manual_layers.functional.logistic_regression"
    x, weight, bias, _ = _autocast(x, weight, bias, fn)
    act = "sigmoid" if weight.dim() == 2 and weight.shape[0] == 1 else "softmax"
    return _LINEAR(x, weight, bias, act)


def _reduction_code(reduction, fn):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return _REDUCTIONS[reduction]


def linear_binary_cross_entropy_with_logits(x, weight, bias, target, *, pos_weight=None,
                                            sample_weight=None, reduction="mean"):
    """F.binary_cross_entropy_with_logits(F.linear(x, weight, bias).squeeze(-1), target,
    weight=sample_weight, pos_weight=pos_weight, reduction=reduction), fused: one pass over x
    computes the loss and the gradients with respect to x, weight and bias.

    x: (..., D); weight: (1, D); bias: (1,) or None; target: x.shape[:-1], floats in [0, 1]
    (soft labels allowed); pos_weight: one-element tensor or None; sample_weight: broadcastable
    to target's shape, or None. Returns a scalar (mean, sum) or x.shape[:-1] (none).
    """
    fn = "manual_layers.functional.linear_binary_cross_entropy_with_logits"
    red = _reduction_code(reduction, fn)
    x, weight, bias, amp = _autocast(x, weight, bias, fn)
    _check_tensor("target", target, fn)
    for name, t in (("pos_weight", pos_weight), ("sample_weight", sample_weight)):
        if t is not None:
            _check_tensor(name, t, fn)
    return _LINEAR_BCE(x, weight, bias, target, pos_weight, sample_weight, red, amp)


def linear_cross_entropy(x, weight, bias, target, *, class_weight=None, ignore_index=-100,
                         label_smoothing=0.0, reduction="mean"):
    """F.cross_entropy(F.linear(x, weight, bias), target, weight=class_weight,
    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction), fused:
    one pass over x computes the logits, the loss and the gradients; the N x C logits are never
    stored.

    x: (..., D); weight: (C, D); bias: (C,) or None; target: x.shape[:-1] class indices
    (integers); class_weight: (C,) or None. Returns a scalar (mean, sum) or x.shape[:-1] (none).
    """
    fn = "manual_layers.functional.linear_cross_entropy"
    red = _reduction_code(reduction, fn)
    x, weight, bias, amp = _autocast(x, weight, bias, fn)
    _check_tensor("target", target, fn)
    if class_weight is not None:
        _check_tensor("class_weight", class_weight, fn)
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
    return _LINEAR_CE(x, weight, bias, target, class_weight, ignore_index, label_smoothing, red,
                      amp)
