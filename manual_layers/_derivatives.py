"""The derivatives of the fused ops, written in differentiable PyTorch ops.

The fused kernels compute first-order gradients, and their outputs carry no graph. Wherever a
graph of the derivative itself is needed, the derivative is computed from the formulas here:

- double backward (``create_graph=True``: gradient penalties, Hessian-vector products,
  ``gradgradcheck``): the C++ autograd kernels (csrc/autograd/*.cpp) call the ``_*_backward_graph``
  ops registered below, the Python Functions (manual_layers/autograd.py) call the functions;
- ``torch.func`` transforms (``grad``, ``jacrev``, ``hessian``, ``vmap`` of a backward): their
  wrapped tensors cannot enter the kernels' backward, and transforms may nest;
- forward-mode AD (``jvp``, ``jacfwd``, ``torch.autograd.forward_ad``): the Functions' ``jvp``;
- ``vmap`` with batched parameters (model ensembling), where no fused kernel applies.

Each formula is the hand-derived derivative that the kernels implement (csrc/contracts/linear.h,
csrc/contracts/losses.h), not autograd of a reference forward: pre-activations and logits are recomputed
from the saved inputs (one GEMM), the derivative is written out, and autograd, functorch and vmap
trace those ops. 16-bit inputs are widened to float32 for the elementwise parts, as the kernels
accumulate, and the results are rounded to the input's dtype once.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["act_backward", "linear_forward", "linear_backward", "linear_jvp", "mlp_backward",
           "bce_forward", "bce_backward", "bce_jvp", "ce_forward", "ce_backward", "ce_jvp"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def _wide(t):
    """float32 for 16-bit tensors (the kernels' accumulation type), else t."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _code(reduction):
    return reduction if isinstance(reduction, int) else _REDUCTIONS[reduction]


# ---- Linear ----------------------------------------------------------------------------------

def _activate(pre, activation):
    """act(pre), as the kernels' epilogue (csrc/common.h's Act)."""
    if activation in (None, "none"):
        return pre
    z = _wide(pre)
    if activation == "relu":
        y = torch.relu(z)
    elif activation == "gelu":
        y = 0.5 * z * (1.0 + torch.erf(z * _SQRT1_2))
    elif activation == "gelu_tanh":
        y = 0.5 * z * (1.0 + torch.tanh(_SQRT_2_PI * (z + 0.044715 * z * z * z)))
    elif activation == "silu":
        y = z * torch.sigmoid(z)
    elif activation == "sigmoid":
        y = torch.sigmoid(z)
    elif activation == "tanh":
        y = torch.tanh(z)
    elif activation == "softmax":
        y = torch.softmax(z, dim=-1)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return y.to(pre.dtype)


def act_backward(g, pre, activation):
    """g * act'(pre) elementwise; for softmax (row-wise) y * (g - sum(g * y)). The softmax
    Jacobian is symmetric, so the same map takes a pre-activation tangent to the output's (jvp).
    relu'(0) = 0, as torch's relu."""
    if activation in (None, "none"):
        return g
    z, gg = _wide(pre), _wide(g)
    if activation == "relu":
        r = gg * (z > 0).to(z.dtype)
    elif activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _SQRT1_2))
        r = gg * (cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI)
    elif activation == "gelu_tanh":
        t = torch.tanh(_SQRT_2_PI * (z + 0.044715 * z * z * z))
        r = gg * (0.5 * (1.0 + t) +
                  0.5 * z * (1.0 - t * t) * _SQRT_2_PI * (1.0 + 3.0 * 0.044715 * z * z))
    elif activation == "silu":
        s = torch.sigmoid(z)
        r = gg * s * (1.0 + z * (1.0 - s))
    elif activation == "sigmoid":
        s = torch.sigmoid(z)
        r = gg * s * (1.0 - s)
    elif activation == "tanh":
        t = torch.tanh(z)
        r = gg * (1.0 - t * t)
    elif activation == "softmax":
        y = torch.softmax(z, dim=-1)
        r = y * (gg - (gg * y).sum(-1, keepdim=True))
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return r.to(g.dtype)


def linear_forward(x, weight, bias, activation):
    """act(x W^T + b): the forward written in PyTorch ops (vmap over stacked parameters)."""
    return _activate(F.linear(x, weight, bias), activation)


def _rows(t, n_last):
    return t.reshape(-1, n_last)


def linear_backward(g, x, weight, bias, activation, need_x=True, need_weight=True,
                    need_bias=True):
    """(dx, dW, db) of y = act(x W^T + b) for the output gradient g, each None unless needed."""
    gp = act_backward(g, F.linear(x, weight, bias), activation)
    out_f, in_f = weight.shape
    gx = gp.matmul(weight) if need_x else None
    gw = _rows(gp, out_f).t().matmul(_rows(x, in_f)) if need_weight else None
    gb = _rows(gp, out_f).sum(0) if need_bias and bias is not None else None
    return gx, gw, gb


def linear_jvp(x, weight, bias, x_t, w_t, b_t, activation):
    """The tangent of act(x W^T + b) for tangents x_t, w_t, b_t (None: zero)."""
    pre = F.linear(x, weight, bias)
    pre_t = None
    for t in (F.linear(x_t, weight) if x_t is not None else None,
              F.linear(x, w_t) if w_t is not None else None,
              b_t):
        if t is not None:
            pre_t = t if pre_t is None else pre_t + t
    if pre_t is None:
        return torch.zeros_like(pre)
    return act_backward(pre_t.expand_as(pre), pre, activation)


def mlp_backward(g, x, w1, b1, w2, b2, activation, needs=(True,) * 5):
    """(dx, dW1, db1, dW2, db2) of act(x W1^T + b1) W2^T + b2."""
    h = linear_forward(x, w1, b1, activation)
    gh, gw2, gb2 = linear_backward(g, h, w2, b2, None, any(needs[:3]), needs[3], needs[4])
    if not any(needs[:3]):
        return None, None, None, gw2, gb2
    gx, gw1, gb1 = linear_backward(gh, x, w1, b1, activation, *needs[:3])
    return gx, gw1, gb1, gw2, gb2


# ---- the losses ------------------------------------------------------------------------------
# dloss_i/dz_i ("the residual") is the one per-row quantity of each loss; the gradients are
# r W (dx), r^T x (dW), sum r (db) with r = coef * residual, coef the reduction's scale times the
# output gradient (csrc/contracts/losses.h).

def _scale(loss_or_res, g, reduction, den, row_dims):
    """The residual times grad_output and the reduction's scale (1/den for mean)."""
    r = _code(reduction)
    gg = _wide(g) if torch.is_tensor(g) else g
    if r == 0:
        return loss_or_res * (gg.unsqueeze(-1) if row_dims else gg)
    return loss_or_res * (gg / den if r == 1 else gg)


def _reduce(rows, reduction, den):
    r = _code(reduction)
    if r == 0:
        return rows
    s = rows.sum()
    return s / den if r == 1 else s


def _loss_grads(r, x, weight, bias, needs):
    """dx, dW, db from the scaled residual r (..., C), in x's dtype."""
    c, d = weight.shape
    wide = r.dtype
    gx = r.matmul(weight.to(wide)).to(x.dtype) if needs[0] else None
    gw = _rows(r, c).t().matmul(_rows(x, d).to(wide)).to(weight.dtype) if needs[1] else None
    gb = _rows(r, c).sum(0).to(bias.dtype) if needs[2] and bias is not None else None
    return gx, gw, gb


def _bce_parts(x, weight, bias, target, pos_weight, sample_weight):
    """(z, per-row loss, per-row dloss/dz): loss_i = sw_i [(1 - y_i) z_i + (1 + (pw - 1) y_i)
    softplus(-z_i)], dloss_i/dz_i = sw_i [(1 + (pw - 1) y_i) sigmoid(z_i) - pw y_i]."""
    z = _wide(F.linear(x, weight, bias)).squeeze(-1)
    y = _wide(target)
    sp = F.softplus(-z)
    if pos_weight is None:
        loss = (1.0 - y) * z + sp
        res = torch.sigmoid(z) - y
    else:
        pw = _wide(pos_weight).reshape(())
        coef = 1.0 + (pw - 1.0) * y
        loss = (1.0 - y) * z + coef * sp
        res = coef * torch.sigmoid(z) - pw * y
    if sample_weight is not None:
        sw = _wide(sample_weight)
        loss, res = loss * sw, res * sw
    return z, loss, res


def bce_forward(x, weight, bias, target, pos_weight=None, sample_weight=None, reduction=1):
    _, loss, _ = _bce_parts(x, weight, bias, target, pos_weight, sample_weight)
    return _reduce(loss, reduction, target.numel()).to(x.dtype)


def bce_backward(g, x, weight, bias, target, pos_weight, sample_weight, reduction,
                 needs=(True, True, True)):
    _, _, res = _bce_parts(x, weight, bias, target, pos_weight, sample_weight)
    r = _scale(res, g, reduction, target.numel(), False).unsqueeze(-1)
    return _loss_grads(r, x, weight, bias, needs)


def bce_jvp(x, weight, bias, target, pos_weight, sample_weight, reduction, x_t, w_t, b_t):
    _, _, res = _bce_parts(x, weight, bias, target, pos_weight, sample_weight)
    z_t = linear_jvp(x, weight, bias, x_t, w_t, b_t, None)
    return _reduce(res * _wide(z_t).squeeze(-1), reduction, target.numel()).to(x.dtype)


def _ce_parts(x, weight, bias, target, class_weight, ignore_index, label_smoothing):
    """(per-row loss, per-row dloss/dz (..., C), the mean's denominator) of F.cross_entropy on
    z = x W^T + b: class indices (target integer, shape x.shape[:-1]) or probabilities (target
    floating, shape (..., C)); formulas of csrc/contracts/losses.h."""
    z = _wide(F.linear(x, weight, bias))
    C = z.shape[-1]
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    eps = float(label_smoothing)
    w = None if class_weight is None else _wide(class_weight)
    if target.is_floating_point():  # probabilities: q' = (1 - eps) q + eps / C; mean over rows
        q = _wide(target)
        if eps:
            q = (1.0 - eps) * q + eps / C
        wq = q if w is None else q * w
        loss = -(wq * logp).sum(-1)
        res = wq.sum(-1, keepdim=True) * p - wq
        return loss, res, float(target.numel() // max(C, 1)) if C else 0.0
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    # (not F.one_hot: it checks the indices' range on the host, which vmap cannot)
    onehot = (t.unsqueeze(-1) == torch.arange(C, device=t.device)).to(z.dtype)
    vf = valid.to(z.dtype)
    wt = vf if w is None else w[t] * vf
    nll = -(logp * onehot).sum(-1)
    loss = (1.0 - eps) * wt * nll
    res = ((1.0 - eps) * wt).unsqueeze(-1) * (p - onehot)
    if eps:
        if w is None:
            loss = loss + (eps / C) * vf * -(logp.sum(-1))
            res = res + (eps / C) * vf.unsqueeze(-1) * (C * p - 1.0)
        else:
            loss = loss + (eps / C) * vf * -((logp * w).sum(-1))
            res = res + (eps / C) * vf.unsqueeze(-1) * (w.sum() * p - w)
    return loss, res, wt.sum()


def ce_forward(x, weight, bias, target, class_weight=None, ignore_index=-100,
               label_smoothing=0.0, reduction=1):
    loss, _, den = _ce_parts(x, weight, bias, target, class_weight, ignore_index,
                             label_smoothing)
    return _reduce(loss, reduction, den).to(x.dtype)


def ce_backward(g, x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                reduction, needs=(True, True, True)):
    _, res, den = _ce_parts(x, weight, bias, target, class_weight, ignore_index,
                            label_smoothing)
    return _loss_grads(_scale(res, g, reduction, den, True), x, weight, bias, needs)


def ce_jvp(x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction,
           x_t, w_t, b_t):
    _, res, den = _ce_parts(x, weight, bias, target, class_weight, ignore_index,
                            label_smoothing)
    z_t = _wide(linear_jvp(x, weight, bias, x_t, w_t, b_t, None))
    return _reduce((res * z_t).sum(-1), reduction, den).to(x.dtype)


# ---- the _*_backward_graph ops (schemas in csrc/ops.cpp) -------------------------------------
# CompositeImplicitAutograd: autograd records the ops inside, which is what makes the result
# differentiable. Gradients that are not needed come back as empty tensors (an op cannot return
# None for a Tensor).

_lib = torch.library.Library("manual_layers", "IMPL")


def _filled(grads, like):
    return tuple(g if g is not None else like.new_empty(0) for g in grads)


def _linear_backward_graph(grad, x, weight, bias, activation, need_x, need_weight, need_bias):
    return _filled(linear_backward(grad, x, weight, bias, activation, need_x, need_weight,
                                   need_bias), x)


def _mlp_backward_graph(grad, x, w1, b1, w2, b2, activation, n_x, n_w1, n_b1, n_w2, n_b2):
    return _filled(mlp_backward(grad, x, w1, b1, w2, b2, activation,
                                (n_x, n_w1, n_b1, n_w2, n_b2)), x)


def _linear_bce_backward_graph(grad, x, weight, bias, target, pos_weight, sample_weight,
                               reduction, need_x, need_weight, need_bias):
    return _filled(bce_backward(grad, x, weight, bias, target, pos_weight, sample_weight,
                                reduction, (need_x, need_weight, need_bias)), x)


def _linear_ce_backward_graph(grad, x, weight, bias, target, class_weight, ignore_index,
                              label_smoothing, reduction, need_x, need_weight, need_bias):
    return _filled(ce_backward(grad, x, weight, bias, target, class_weight, ignore_index,
                               label_smoothing, reduction, (need_x, need_weight, need_bias)), x)


for _f in (_linear_backward_graph, _mlp_backward_graph, _linear_bce_backward_graph,
           _linear_ce_backward_graph):
    _lib.impl(_f.__name__, _f, "CompositeImplicitAutograd")
