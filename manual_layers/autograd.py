"""The fused ops as Python ``torch.autograd.Function`` subclasses, for layers you write yourself.

Each Function's ``forward`` runs the fused forward kernel and its ``backward`` the hand-written
backward kernel (the ops in ``torch.ops.manual_layers``), like the ``MyLinear`` of an introduction to autograd, only fast::

    import torch
    from manual_layers.autograd import LinearFunction

    class MyLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 3) / 3)
            self.bias = torch.nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return LinearFunction.apply(x, self.weight, self.bias, "gelu")

    y = MyLayer()(torch.randn(2, 3))
    y.sum().backward()

They are written the way ``torch.func`` requires (``setup_context``, a ``vmap`` rule, a ``jvp``),
so ``torch.func.grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``hessian``, ``jvp`` and
``torch.autograd.forward_ad`` work through them, and double backward (``create_graph=True``)
works too. ``manual_layers.functional`` and the layers use them whenever a ``torch.func``
transform or forward-mode AD is active; otherwise they call the ops, whose autograd is in C++
(one dispatcher call, less host overhead).

Which backward runs:

- the kernels, for first-order gradients of plain tensors;
- the formulas of ``manual_layers._derivatives`` (the same derivatives in differentiable PyTorch
  ops), when the backward itself must be differentiable or traced: ``create_graph=True`` with
  inputs that require grad, and any ``torch.func`` transform (its wrapped tensors cannot enter
  the kernels).

What is saved: the inputs (and, for relu, sigmoid, tanh and softmax, the output). A
``torch.func``-compatible Function can save only its inputs and outputs, so the intermediate
results the C++ autograd of the ops keeps (GELU's and SiLU's pre-activation, the losses' residual
and weight gradients) are recomputed by the kernel backward here: one more GEMM for GELU/SiLU,
one more pass of the fused loss kernel for the losses.
"""

import torch

from . import _derivatives as D
from ._ops import ops

__all__ = ["LinearFunction", "LinearBCEFunction", "LinearCrossEntropyFunction"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_SAVES_OUTPUT = ("relu", "sigmoid", "tanh", "softmax")
_peek_transform = torch._C._functorch.peek_interpreter_stack


def _needs_graph(*tensors):
    """Whether a backward must be built from differentiable ops: inside a torch.func transform,
    or under create_graph=True with an input that requires grad."""
    if _peek_transform() is not None:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rows(t):
    """(..., K) -> (N, K), a view where strides allow (the kernels take 2-D problems)."""
    return t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t


def _reduction(reduction):
    if isinstance(reduction, str):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        return _REDUCTIONS[reduction]
    return int(reduction)


class LinearFunction(torch.autograd.Function):
    """``y = act(x @ weight.T + bias)``: ``LinearFunction.apply(x, weight, bias, activation)``.

    Parameters
    ----------
    x : Tensor (..., in_features)
    weight : Tensor (out_features, in_features), x's dtype and device
    bias : Tensor (out_features,) or None
    activation : None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh" or "softmax"

    Returns
    -------
    Tensor (..., out_features), x's dtype.

    Examples
    --------
    >>> import torch
    >>> from manual_layers.autograd import LinearFunction
    >>> x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    >>> w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    >>> torch.autograd.gradcheck(lambda x, w: LinearFunction.apply(x, w, None, "tanh"), (x, w))
    True
    """

    @staticmethod
    def forward(x, weight, bias, activation):
        return ops.linear(x, weight, bias, activation or "none")

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, activation = inputs
        ctx.activation = activation or "none"
        ctx.save_for_backward(x, weight, bias,
                              output if ctx.activation in _SAVES_OUTPUT else None)
        ctx.save_for_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, out = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        act = ctx.activation
        if _needs_graph(grad, x, weight, bias):
            gx, gw, gb = D.linear_backward(grad, x, weight, bias, act, nx, nw, nb)
            return gx, gw, gb, None
        x2 = _rows(x)
        if act in _SAVES_OUTPUT:
            saved = _rows(out)
        elif act == "none":
            saved = x.new_empty(0)
        else:  # gelu, gelu_tanh, silu: the pre-activation, recomputed (one GEMM)
            saved = ops._linear_fwd(x2, weight, bias, "none", False)[0]
        g = _rows(grad).to(x.dtype)
        gx, gw, gb = ops._linear_bwd(g, x2, weight, saved, act, nx, nw,
                                     nb and bias is not None)
        return (gx.reshape(x.shape) if nx else None, gw if nw else None,
                gb if nb and bias is not None else None, None)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, _):
        x, weight, bias = ctx.saved_tensors
        return D.linear_jvp(x, weight, bias, x_t, w_t, b_t, ctx.activation)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, activation):
        xd, wd, bd, _ = in_dims
        if wd is None and bd is None:
            # Only x is batched: the batch is more rows for the same kernel.
            return LinearFunction.apply(x.movedim(xd, 0), weight, bias, activation), 0
        # Stacked parameters (model ensembling): no fused kernel applies; PyTorch ops, batched.
        f = torch.vmap(D.linear_forward, in_dims=(xd, wd, bd, None),
                       randomness=info.randomness)
        return f(x, weight, bias, activation), 0


def _loss_inputs_batched_only_by_rows(in_dims, row_args):
    """Whether only row-wise arguments (x, target, per-row weights) are batched."""
    return all(d is None for i, d in enumerate(in_dims) if i not in row_args)


class LinearBCEFunction(torch.autograd.Function):
    """``F.binary_cross_entropy_with_logits(F.linear(x, weight, bias).squeeze(-1), target,
    weight=sample_weight, pos_weight=pos_weight, reduction=reduction)``, fused:
    ``LinearBCEFunction.apply(x, weight, bias, target, pos_weight, sample_weight, reduction)``.

    Parameters
    ----------
    x : Tensor (..., D)
    weight : Tensor (1, D); bias : Tensor (1,) or None
    target : Tensor x.shape[:-1], floating (probabilities)
    pos_weight : one-element Tensor or None
    sample_weight : Tensor of x.shape[:-1] or None
    reduction : "none", "mean" or "sum"

    Returns
    -------
    Tensor: a scalar (mean, sum) or x.shape[:-1] (none), x's dtype.

    Examples
    --------
    >>> import torch
    >>> from manual_layers.autograd import LinearBCEFunction
    >>> x = torch.randn(5, 3, requires_grad=True)
    >>> w = torch.randn(1, 3, requires_grad=True)
    >>> loss = LinearBCEFunction.apply(x, w, None, torch.rand(5), None, None, "mean")
    >>> loss.backward()
    >>> w.grad.shape
    torch.Size([1, 3])
    """

    @staticmethod
    def forward(x, weight, bias, target, pos_weight, sample_weight, reduction):
        return ops.linear_bce(x, weight, bias, target, pos_weight, sample_weight,
                              _reduction(reduction))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, target, pos_weight, sample_weight, reduction = inputs
        ctx.reduction, ctx.out_dtype = _reduction(reduction), output.dtype
        ctx.save_for_backward(x, weight, bias, target, pos_weight, sample_weight)
        ctx.save_for_forward(x, weight, bias, target, pos_weight, sample_weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, target, pw, sw = ctx.saved_tensors
        if any(ctx.needs_input_grad[3:6]):
            raise RuntimeError("LinearBCEFunction: gradients with respect to target, pos_weight "
                               "or sample_weight are not computed; pass them detached")
        needs = ctx.needs_input_grad[:3]
        if _needs_graph(grad, x, weight, bias):
            grads = D.bce_backward(grad, x, weight, bias, target, pw, sw, ctx.reduction, needs)
        else:
            grads = _recompute(lambda x, w, b: ops.linear_bce(x, w, b, target, pw, sw,
                                                              ctx.reduction),
                               grad, (x, weight, bias), needs)
        return (*grads, None, None, None, None)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, *_):
        x, weight, bias, target, pw, sw = ctx.saved_tensors
        return D.bce_jvp(x, weight, bias, target, pw, sw, ctx.reduction, x_t, w_t,
                         b_t).to(ctx.out_dtype)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, target, pos_weight, sample_weight, reduction):
        return _loss_vmap(LinearBCEFunction, D.bce_forward, info, in_dims,
                          (x, weight, bias, target, pos_weight, sample_weight, reduction),
                          rows=(0, 3, 5), den=lambda t, xb: torch.full(
                              (t.shape[0],), t[0].numel(), dtype=_wide_dtype(xb),
                              device=t.device))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``F.cross_entropy(F.linear(x, weight, bias), target, weight=class_weight,
    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)``, fused:
    ``LinearCrossEntropyFunction.apply(x, weight, bias, target, class_weight, ignore_index,
    label_smoothing, reduction)``.

    Parameters
    ----------
    x : Tensor (..., D)
    weight : Tensor (C, D); bias : Tensor (C,) or None
    target : integer Tensor x.shape[:-1] of class indices, or floating Tensor (..., C) of
        class probabilities
    class_weight : Tensor (C,) or None
    ignore_index : int (class indices only); label_smoothing : float in [0, 1]
    reduction : "none", "mean" or "sum"

    Returns
    -------
    Tensor: a scalar (mean, sum) or x.shape[:-1] (none), x's dtype.

    Examples
    --------
    >>> import torch
    >>> from manual_layers.autograd import LinearCrossEntropyFunction
    >>> x = torch.randn(5, 3, requires_grad=True)
    >>> w = torch.randn(4, 3, requires_grad=True)
    >>> y = torch.tensor([0, 3, 1, 1, 2])
    >>> loss = LinearCrossEntropyFunction.apply(x, w, None, y, None, -100, 0.0, "mean")
    >>> loss.backward()
    >>> x.grad.shape
    torch.Size([5, 3])
    """

    @staticmethod
    def forward(x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                reduction):
        red = _reduction(reduction)
        return ops.linear_ce(x, weight, bias, target, class_weight, ignore_index,
                             label_smoothing, red)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction = inputs
        ctx.args = (ignore_index, float(label_smoothing), _reduction(reduction))
        ctx.out_dtype = output.dtype
        ctx.save_for_backward(x, weight, bias, target, class_weight)
        ctx.save_for_forward(x, weight, bias, target, class_weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, target, cw = ctx.saved_tensors
        if any(ctx.needs_input_grad[3:5]):
            raise RuntimeError("LinearCrossEntropyFunction: gradients with respect to target or "
                               "class_weight are not computed; pass them detached")
        needs = ctx.needs_input_grad[:3]
        ii, ls, red = ctx.args
        if _needs_graph(grad, x, weight, bias):
            grads = D.ce_backward(grad, x, weight, bias, target, cw, ii, ls, red, needs)
        else:
            grads = _recompute(lambda x, w, b: ops.linear_ce(x, w, b, target, cw, ii, ls, red),
                               grad, (x, weight, bias), needs)
        return (*grads, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, *_):
        x, weight, bias, target, cw = ctx.saved_tensors
        ii, ls, red = ctx.args
        return D.ce_jvp(x, weight, bias, target, cw, ii, ls, red, x_t, w_t,
                        b_t).to(ctx.out_dtype)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, target, class_weight, ignore_index,
             label_smoothing, reduction):
        ii = ignore_index

        def den(t, xb):  # the mean's denominator of each batch entry
            if t.is_floating_point():
                return torch.full((t.shape[0],), t[0].numel() // max(t.shape[-1], 1),
                                  dtype=_wide_dtype(xb), device=t.device)
            valid = t != ii
            w = valid.to(_wide_dtype(xb))
            if class_weight is not None:
                w = w * class_weight.to(w.dtype)[torch.where(valid, t, 0)]
            return w.reshape(t.shape[0], -1).sum(1)

        return _loss_vmap(LinearCrossEntropyFunction, D.ce_forward, info, in_dims,
                          (x, weight, bias, target, class_weight, ignore_index,
                           label_smoothing, reduction), rows=(0, 3), den=den)


def _recompute(loss_fn, grad, inputs, needs):
    """The kernel backward of a fused loss: the op's forward again with the gradients wanted (the
    single pass that computes them, and the op's own choice of kernel path), then its C++
    backward. A torch.func-compatible Function cannot keep the forward's residual, which is not
    an output."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip(inputs, needs)]
        loss = loss_fn(*leaves)
        wanted = [t for t, n in zip(leaves, needs) if n and t is not None]
        got = iter(torch.autograd.grad(loss, wanted, grad)) if wanted else iter(())
    return tuple(next(got) if n and t is not None else None for t, n in zip(leaves, needs))


def _wide_dtype(x):
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _loss_vmap(fn, composite, info, in_dims, args, rows, den):
    """The vmap rule of a fused loss: when only row-wise arguments are batched, the batch is more
    rows (reduction none), reduced per batch entry afterwards; otherwise the PyTorch composite,
    vmapped (stacked parameters: no fused kernel applies)."""
    reduction = _reduction(args[-1])
    if _loss_inputs_batched_only_by_rows(in_dims, rows) and in_dims[0] is not None:
        args = list(args)
        B = args[0].shape[in_dims[0]]
        for i in rows:
            if args[i] is not None:
                d = in_dims[i]
                args[i] = args[i].movedim(d, 0) if d is not None else \
                    args[i].expand(B, *args[i].shape)
        x, target = args[0], args[3]
        args[-1] = 0
        per_row = fn.apply(*args)  # (B, ...) per-row losses
        if reduction == 0:
            return per_row, 0
        s = per_row.reshape(B, -1).to(_wide_dtype(x)).sum(1)
        if reduction == 1:
            s = s / den(target, x)
        return s.to(x.dtype), 0
    f = torch.vmap(composite, in_dims=tuple(in_dims), randomness=info.randomness)
    return f(*args), 0
