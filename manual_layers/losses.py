"""The fused losses: nn.Linear + nn.BCEWithLogitsLoss and nn.Linear + nn.CrossEntropyLoss in one
op each, for models that keep their own head's parameters."""

from torch import nn

from . import functional as MF
from .layers import _no_script

__all__ = ["LinearBCEWithLogitsLoss", "LinearCrossEntropyLoss"]


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

