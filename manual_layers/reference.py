"""The same math as the fused kernels, in plain PyTorch: the yardstick of the tests and
benchmarks. Nothing here is used by the layers themselves."""

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    None: lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,  # exact erf GELU, as nn.GELU()
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}

# The torch module that each activation replaces (for convert() and the tests).
ACTIVATION_MODULES = {
    "relu": lambda: torch.nn.ReLU(),
    "gelu": lambda: torch.nn.GELU(),
    "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
    "silu": lambda: torch.nn.SiLU(),
    "sigmoid": lambda: torch.nn.Sigmoid(),
    "tanh": lambda: torch.nn.Tanh(),
}


def linear(x, weight, bias=None, activation=None):
    """act(x W^T + b)."""
    return ACTIVATIONS[activation](F.linear(x, weight, bias))


def linear_binary_cross_entropy_with_logits(x, weight, bias, target, *, pos_weight=None,
                                            sample_weight=None, reduction="mean"):
    logits = F.linear(x, weight, bias).squeeze(-1)
    return F.binary_cross_entropy_with_logits(logits, target, weight=sample_weight,
                                              pos_weight=pos_weight, reduction=reduction)


def linear_cross_entropy(x, weight, bias, target, *, class_weight=None, ignore_index=-100,
                         label_smoothing=0.0, reduction="mean"):
    logits = F.linear(x, weight, bias)
    if logits.dim() > 2:  # F.cross_entropy wants the class dim second
        logits = logits.reshape(-1, logits.shape[-1])
        target = target.reshape(-1)
        out = F.cross_entropy(logits, target, weight=class_weight, ignore_index=ignore_index,
                              label_smoothing=label_smoothing, reduction=reduction)
        return out.reshape(x.shape[:-1]) if reduction == "none" else out
    return F.cross_entropy(logits, target, weight=class_weight, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def logistic_regression(x, weight, bias=None):
    """sigmoid(x w + b) for one output (binary), softmax over classes otherwise."""
    z = F.linear(x, weight, bias)
    return torch.sigmoid(z) if weight.shape[0] == 1 else torch.softmax(z, dim=-1)
