"""One torch.autograd.Function per op family. Forward and backward call the custom ops in
torch.ops.manual_layers (so torch.compile traces them as single nodes); the derivatives are
written by hand in the kernels, not recorded by autograd."""

import functools

import torch

from ._ops import ops


def _first_order_only(backward):
    """Backward is written by hand and is not itself differentiable: refuse create_graph=True
    with a clear error (instead of silently returning gradients without a graph), then run the
    kernels without recording."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                f"manual_layers: double backward (create_graph=True) through "
                f"{type(ctx).__name__.replace('Backward', '')} is not supported: its backward is "
                f"a hand-written kernel, not differentiable")
        with torch.no_grad():
            return backward(ctx, *grads)
    return wrapper

# What backward needs saved for each activation's derivative (csrc/common.h saved_for).
_SAVES_PRE = frozenset({"gelu", "gelu_tanh", "silu"})
_SAVES_OUTPUT = frozenset({"relu", "sigmoid", "tanh", "softmax"})


class LinearFunction(torch.autograd.Function):
    """y = act(x W^T + b) for 2-D x (N, K), weight (M, K), bias (M,) or None.

    activation is a string ("none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh",
    or the internal "softmax"). Backward computes only the gradients that are needed and is
    not itself differentiable (double backward raises)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, grad_enabled):
        # needs_input_grad says True under torch.no_grad() too: grad_enabled (the caller's
        # torch.is_grad_enabled()) keeps inference from saving the pre-activation.
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:3])
        out, pre = ops.linear_fwd(x, weight, bias, activation, needs_grad)
        if activation in _SAVES_PRE:
            saved = pre
        elif activation in _SAVES_OUTPUT:
            saved = out
        else:
            saved = None
        ctx.save_for_backward(x, weight, saved)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        x, weight, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        if saved is None:
            saved = grad_out.new_empty((0,))
        gx, gw, gb = ops.linear_bwd(grad_out, x, weight, saved, ctx.activation,
                                    need_x, need_w, need_b)
        return (gx if need_x else None, gw if need_w else None, gb if need_b else None, None,
                None)


def _loss_backward(ctx, grad_loss):
    """Shared backward of the fused losses.

    mean/sum: the gradients were computed in forward; backward returns them scaled by
    grad_output. When grad_output is 1 (loss.backward()) they are returned as they are, with no
    pass over them: the engine frees the saved tensors once this node ran (unless the graph is
    retained), so AccumulateGrad takes them over without a copy. Learning whether grad_output is
    1 costs a device sync on CUDA, far cheaper than a pass over dX. The saved gradients are never
    modified, so retain_graph, gradcheck and jacobians see correct values on every call.
    none: one more pass (G = residual * grad_output, then the GEMMs)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    if ctx.reduction == 0:
        residual, x, weight = ctx.saved_tensors
        gx, gw, gb = ops.linear_loss_bwd(grad_loss, residual, x, weight, need_x, need_w, need_b)
    else:
        gx, gw, gb = ctx.saved_tensors
        if torch.compiler.is_compiling() or not bool(grad_loss == 1):
            gx, gw, gb = (t * grad_loss if need else t
                          for t, need in ((gx, need_x), (gw, need_w), (gb, need_b)))
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None)


def _save_loss_outputs(ctx, reduction, has_bias, outs, x, weight):
    loss, gx, gw, gb, residual = outs
    ctx.reduction = reduction
    ctx.has_bias = has_bias
    if reduction == 0:
        ctx.save_for_backward(residual, x, weight)
    else:
        ctx.save_for_backward(gx, gw, gb)
    return loss


class LinearBCEFunction(torch.autograd.Function):
    """Binary cross-entropy with logits of x (N, D) w^T + b, w (1, D); see csrc/logreg.h."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, pos_weight, sample_weight, reduction,
                grad_enabled):
        nx, nw, nb = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        outs = ops.linear_bce_fwd(x, weight, bias, target, pos_weight, sample_weight, reduction,
                                  nx, nw, nb and bias is not None)
        return _save_loss_outputs(ctx, reduction, bias is not None, outs, x, weight)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_loss):
        return _loss_backward(ctx, grad_loss) + (None,) * 5


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Softmax cross-entropy of x (N, D) W^T + b, W (C, D), class-index targets."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                reduction, grad_enabled):
        nx, nw, nb = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        outs = ops.linear_ce_fwd(x, weight, bias, target, class_weight, ignore_index,
                                 label_smoothing, reduction, nx, nw, nb and bias is not None)
        return _save_loss_outputs(ctx, reduction, bias is not None, outs, x, weight)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_loss):
        return _loss_backward(ctx, grad_loss) + (None,) * 6
