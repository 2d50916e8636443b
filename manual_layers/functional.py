"""The functional API: argument checks, autocast, flattening of leading dimensions, then the
autograd Functions of manual_layers.autograd (which call the C++/CUDA kernels)."""

import torch

from .autograd import LinearBCEFunction, LinearCrossEntropyFunction, LinearFunction

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

__all__ = ["linear", "linear_binary_cross_entropy_with_logits", "linear_cross_entropy",
           "logistic_regression", "ACTIVATIONS"]


def _check_tensor(name, t, fn):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_activation(activation, fn="manual_layers.functional.linear"):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: unknown activation {activation!r}; expected one of "
                         f"{', '.join(repr(a) for a in ACTIVATIONS)}")


def _check_linear(x, weight, bias, fn):
    _check_tensor("x", x, fn)
    _check_tensor("weight", weight, fn)
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least one dimension (..., in_features), got a "
                         f"0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: x has {x.shape[-1]} features (x.shape={tuple(x.shape)}) but "
                         f"weight expects in_features={weight.shape[1]} "
                         f"(weight.shape={tuple(weight.shape)})")
    if bias is not None:
        _check_tensor("bias", bias, fn)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) to match "
                             f"weight.shape={tuple(weight.shape)}, got {tuple(bias.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        return  # autocast casts all three to one dtype below
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{fn}: x and {name} must have the same dtype, got x.dtype={x.dtype} "
                            f"and {name}.dtype={t.dtype}")
        if t.device != x.device:
            raise RuntimeError(f"{fn}: x and {name} must be on the same device, got x on "
                               f"{x.device} and {name} on {t.device}")


def _autocast(x, weight, bias):
    """Cast as nn.Linear does under torch.autocast (to the autocast dtype of x's device)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    return x, weight, bias


def _flatten(x):
    """(..., K) -> (N, K) without copying when possible; kernels accept strided rows."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _unflatten(out, x):
    """(N, M) -> (..., M) with x's leading dims."""
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def linear(x, weight, bias=None, activation=None):
    """y = act(x @ weight.T + bias) with hand-written forward and backward kernels.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None;
    activation: None, "relu", "gelu" (exact erf, as nn.GELU()), "gelu_tanh"
    (nn.GELU(approximate="tanh")), "silu", "sigmoid" or "tanh". Returns (..., out_features).
    """
    fn = "manual_layers.functional.linear"
    _check_activation(activation, fn)
    _check_linear(x, weight, bias, fn)
    x, weight, bias = _autocast(x, weight, bias)
    out = LinearFunction.apply(_flatten(x), weight, bias, activation or "none",
                               torch.is_grad_enabled())
    return _unflatten(out, x)


def logistic_regression(x, weight, bias=None):
    """Class probabilities of a linear classifier: sigmoid(x w^T + b) for weight (1, D)
    (returns (..., 1)), softmax(x W^T + b) over the last dim for weight (C, D), C > 1
    (returns (..., C)). The GEMV/GEMM and the activation run as one fused op."""
    fn = "manual_layers.functional.logistic_regression"
    _check_linear(x, weight, bias, fn)
    x, weight, bias = _autocast(x, weight, bias)
    act = "sigmoid" if weight.shape[0] == 1 else "softmax"
    out = LinearFunction.apply(_flatten(x), weight, bias, act, torch.is_grad_enabled())
    return _unflatten(out, x)


def _reduction_code(reduction, fn):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return _REDUCTIONS[reduction]


def _no_grad_for(name, t, fn):
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: gradients with respect to {name} are not supported by the "
                         f"fused kernel; pass {name}.detach()")


def _loss_inputs(x, weight, bias, fn):
    _check_linear(x, weight, bias, fn)
    x, weight, bias = _autocast(x, weight, bias)
    return _flatten(x), weight, bias


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
    _check_tensor("target", target, fn)
    if weight.dim() == 2 and weight.shape[0] != 1:
        raise ValueError(f"{fn}: weight must have shape (1, D) for a binary classifier, got "
                         f"{tuple(weight.shape)}; use linear_cross_entropy for {weight.shape[0]} "
                         f"classes")
    lead = x.shape[:-1]
    if target.shape != lead:
        raise ValueError(f"{fn}: target must have shape {tuple(lead)} (x.shape[:-1]), got "
                         f"{tuple(target.shape)}")
    if not target.is_floating_point():
        raise TypeError(f"{fn}: target must be a floating-point tensor of probabilities, got "
                        f"dtype {target.dtype}")
    _no_grad_for("target", target, fn)
    x2, weight, bias = _loss_inputs(x, weight, bias, fn)
    if target.device != x2.device:
        raise RuntimeError(f"{fn}: target is on {target.device} but x is on {x2.device}")
    t = target.reshape(-1).to(x2.dtype)
    pw = None
    if pos_weight is not None:
        _check_tensor("pos_weight", pos_weight, fn)
        _no_grad_for("pos_weight", pos_weight, fn)
        if pos_weight.numel() != 1:
            raise ValueError(f"{fn}: pos_weight must have one element (a binary classifier has "
                             f"one class), got shape {tuple(pos_weight.shape)}")
        if pos_weight.device != x2.device:
            raise RuntimeError(f"{fn}: pos_weight is on {pos_weight.device} but x is on "
                               f"{x2.device}")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(pos_weight).all()):
            raise ValueError(f"{fn}: pos_weight must be finite, got {pos_weight.item()}")
        pw = pos_weight.reshape(1).to(x2.dtype)
    sw = None
    if sample_weight is not None:
        _check_tensor("sample_weight", sample_weight, fn)
        _no_grad_for("sample_weight", sample_weight, fn)
        try:
            sw = torch.broadcast_to(sample_weight, lead)
        except RuntimeError:
            raise ValueError(f"{fn}: sample_weight of shape {tuple(sample_weight.shape)} does not "
                             f"broadcast to the target's shape {tuple(lead)}") from None
        if sw.device != x2.device:
            raise RuntimeError(f"{fn}: sample_weight is on {sw.device} but x is on {x2.device}")
        sw = sw.reshape(-1).to(x2.dtype).contiguous()
    loss = LinearBCEFunction.apply(x2, weight, bias, t, pw, sw, red, torch.is_grad_enabled())
    return loss.reshape(lead) if red == 0 else loss


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
    _check_tensor("target", target, fn)
    lead = x.shape[:-1]
    if target.shape != lead:
        raise ValueError(f"{fn}: target must have shape {tuple(lead)} (x.shape[:-1]) of class "
                         f"indices, got {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must hold integer class indices, got dtype {target.dtype}"
                        f" (probability targets are not supported by the fused kernel)")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    x2, weight, bias = _loss_inputs(x, weight, bias, fn)
    if target.device != x2.device:
        raise RuntimeError(f"{fn}: target is on {target.device} but x is on {x2.device}")
    C = weight.shape[0]
    cw = None
    if class_weight is not None:
        _check_tensor("class_weight", class_weight, fn)
        _no_grad_for("class_weight", class_weight, fn)
        if class_weight.shape != (C,):
            raise ValueError(f"{fn}: class_weight must have shape ({C},), one weight per class, "
                             f"got {tuple(class_weight.shape)}")
        if class_weight.device != x2.device:
            raise RuntimeError(f"{fn}: class_weight is on {class_weight.device} but x is on "
                               f"{x2.device}")
        cw = class_weight.to(x2.dtype).contiguous()
    t = target.reshape(-1).long()
    loss = LinearCrossEntropyFunction.apply(x2, weight, bias, t, cw, int(ignore_index),
                                            float(label_smoothing), red, torch.is_grad_enabled())
    return loss.reshape(lead) if red == 0 else loss
