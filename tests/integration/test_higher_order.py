"""Double backward (create_graph=True) through every public op and the Python Functions of
manual_layers.autograd: gradgradcheck in float64, a WGAN-GP gradient-penalty step and a
logistic-regression Hessian-vector product equal to the torch model's, and first-order gradients
that still come from the fused kernels."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import manual_layers as ml
from manual_layers import reference as R
from manual_layers.autograd import (LinearBCEFunction, LinearCrossEntropyFunction,
                                    LinearFunction)

MF = ml.functional
DT = torch.float64
ACTS = [None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]


def _lin_inputs(seed, rows=4, d_in=3, d_out=2, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows, d_in, dtype=DT, generator=g).requires_grad_()
    w = (torch.randn(d_out, d_in, dtype=DT, generator=g) * 0.8).requires_grad_()
    b = (torch.randn(d_out, dtype=DT, generator=g) * 0.3).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("act", ACTS + ["softmax"])
@pytest.mark.parametrize("route", ["op", "function"])
def test_gradgradcheck_linear(act, route):
    x, w, b = _lin_inputs(1, lead=(2,))
    if act == "relu":  # keep pre-activations away from relu's kink (finite differences)
        with torch.no_grad():
            w.mul_(3)
    if route == "op":
        if act == "softmax":
            f = lambda x, w, b: MF.logistic_regression(x, w, b)
        else:
            f = lambda x, w, b: MF.linear(x, w, b, act)
    else:
        f = lambda x, w, b: LinearFunction.apply(x, w, b, act)
    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("act", ["gelu", "tanh", None])
def test_gradgradcheck_mlp(act):
    x, w1, b1 = _lin_inputs(2, d_out=5)
    w2 = torch.randn(2, 5, dtype=DT, requires_grad=True)
    b2 = torch.randn(2, dtype=DT, requires_grad=True)
    f = lambda *a: MF.mlp(*a, act)
    assert gradgradcheck(f, (x, w1, b1, w2, b2))


BCE_OPTS = [dict(), dict(pos_weight=True), dict(sample_weight=True),
            dict(pos_weight=True, sample_weight=True)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", BCE_OPTS, ids=str)
@pytest.mark.parametrize("route", ["op", "function"])
def test_gradgradcheck_bce(reduction, opts, route):
    x, w, b = _lin_inputs(3, rows=5, d_out=1)
    t = torch.rand(5, dtype=DT)
    pw = torch.tensor([2.0], dtype=DT) if opts.get("pos_weight") else None
    sw = torch.rand(5, dtype=DT) + 0.5 if opts.get("sample_weight") else None
    if route == "op":
        f = lambda x, w, b: MF.linear_binary_cross_entropy_with_logits(
            x, w, b, t, pos_weight=pw, sample_weight=sw, reduction=reduction)
    else:
        f = lambda x, w, b: LinearBCEFunction.apply(x, w, b, t, pw, sw, reduction)
    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


CE_OPTS = [dict(), dict(class_weight=True), dict(label_smoothing=0.2),
           dict(ignore=True), dict(class_weight=True, label_smoothing=0.1, ignore=True)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", CE_OPTS, ids=str)
@pytest.mark.parametrize("C", [3, 130])
@pytest.mark.parametrize("route", ["op", "function"])
def test_gradgradcheck_ce(reduction, opts, C, route):
    """C 3 (the single pass) and 130 (the chunked path); gradcheck's fast mode (a random
    projection of the Jacobian) for the 130-class weight."""
    x, w, b = _lin_inputs(4, rows=5, d_out=C)
    t = torch.randint(0, C, (5,), generator=torch.Generator().manual_seed(5))
    if opts.get("ignore"):
        t[2] = -100
    cw = torch.rand(C, dtype=DT) + 0.5 if opts.get("class_weight") else None
    ls = opts.get("label_smoothing", 0.0)
    if route == "op":
        f = lambda x, w, b: MF.linear_cross_entropy(x, w, b, t, class_weight=cw,
                                                    label_smoothing=ls, reduction=reduction)
    else:
        f = lambda x, w, b: LinearCrossEntropyFunction.apply(x, w, b, t, cw, -100, ls,
                                                             reduction)
    assert gradcheck(f, (x, w, b), fast_mode=C > 8)
    assert gradgradcheck(f, (x, w, b), fast_mode=C > 8)


def _critic(torch_layers):
    torch.manual_seed(0)
    if torch_layers:
        return nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 16), nn.Tanh(),
                             nn.Linear(16, 1)).double()
    return nn.Sequential(ml.Linear(6, 16, activation="silu"), ml.Linear(16, 16, activation="tanh"),
                         ml.Linear(16, 1)).double()


def _wgan_gp_step(critic, real, fake, eps):
    """One critic step of WGAN-GP: the Wasserstein loss plus the gradient penalty on
    interpolates, whose gradient with respect to the critic's weights is a double backward."""
    opt = torch.optim.SGD(critic.parameters(), lr=0.1)
    inter = (eps * real + (1 - eps) * fake).requires_grad_()
    score = critic(inter)
    g, = torch.autograd.grad(score.sum(), inter, create_graph=True)
    penalty = ((g.norm(2, dim=1) - 1) ** 2).mean()
    loss = critic(fake).mean() - critic(real).mean() + 10 * penalty
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in critic.parameters()]
    opt.step()
    return loss.detach(), grads, [p.detach().clone() for p in critic.parameters()]


def test_wgan_gp_step_equals_torch():
    ours, ref = _critic(False), _critic(True)
    ref.load_state_dict({k.replace("1.", "2.", 1) if k.startswith("1.") else
                         (k.replace("2.", "4.", 1) if k.startswith("2.") else k): v
                         for k, v in ours.state_dict().items()})
    torch.manual_seed(1)
    real, fake = torch.randn(32, 6, dtype=DT), torch.randn(32, 6, dtype=DT)
    eps = torch.rand(32, 1, dtype=DT)
    a, b = _wgan_gp_step(ours, real, fake, eps), _wgan_gp_step(ref, real, fake, eps)
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)
    for u, v in zip(a[1] + a[2], b[1] + b[2]):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("C", [1, 4])
def test_logistic_regression_hvp(C):
    """Hessian-vector product of the fused loss (Newton-CG's inner product)."""
    torch.manual_seed(C)
    x = torch.randn(40, 5, dtype=DT)
    w = torch.randn(C, 5, dtype=DT, requires_grad=True)
    v = torch.randn(C, 5, dtype=DT)
    if C == 1:
        t = torch.randint(0, 2, (40,)).to(DT)
        ours = lambda w: MF.linear_binary_cross_entropy_with_logits(x, w, None, t)
        ref = lambda w: R.linear_binary_cross_entropy_with_logits(x, w, None, t)
    else:
        t = torch.randint(0, C, (40,))
        ours = lambda w: MF.linear_cross_entropy(x, w, None, t)
        ref = lambda w: R.linear_cross_entropy(x, w, None, t)
    hv = [torch.autograd.functional.hvp(f, w.detach(), v)[1] for f in (ours, ref)]
    torch.testing.assert_close(hv[0], hv[1], rtol=1e-10, atol=1e-12)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("create_graph", [False, True])
def test_first_order_backward_runs_the_kernels(create_graph):
    x, w, b = _lin_inputs(6)
    y = MF.linear(x, w, b, "gelu")
    with _Ops() as mode:
        torch.autograd.grad(y.sum(), (x, w, b), create_graph=create_graph)
    assert ("manual_layers._linear_bwd" in mode.names) is not create_graph, mode.names


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("route", ["op", "function"])
def test_gradgradcheck_ce_probability_targets(reduction, route):
    x, w, b = _lin_inputs(7, rows=5, d_out=4)
    q = torch.softmax(torch.randn(5, 4, dtype=DT), -1)
    cw = torch.rand(4, dtype=DT) + 0.5
    if route == "op":
        f = lambda x, w, b: MF.linear_cross_entropy(x, w, b, q, class_weight=cw,
                                                    label_smoothing=0.1, reduction=reduction)
    else:
        f = lambda x, w, b: LinearCrossEntropyFunction.apply(x, w, b, q, cw, -100, 0.1,
                                                             reduction)
    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_opcheck_backward_graph_ops():
    """The _*_backward_graph ops (CompositeImplicitAutograd kernels in Python) pass opcheck."""
    ops = torch.ops.manual_layers
    x, w, b = _lin_inputs(8, rows=5, d_out=3)
    w2 = torch.randn(2, 3, dtype=DT, requires_grad=True)
    one = torch.tensor(1.0, dtype=DT)
    for op, args in (
            (ops._linear_backward_graph, (torch.randn(5, 3, dtype=DT), x, w, b, "gelu", True,
                                          True, True)),
            (ops._mlp_backward_graph, (torch.randn(5, 2, dtype=DT), x, w, b, w2, None, "tanh",
                                       True, True, True, True, False)),
            (ops._linear_bce_backward_graph, (one, x, w[:1], b[:1], torch.rand(5, dtype=DT),
                                              None, None, 1, True, True, True)),
            (ops._linear_ce_backward_graph, (one, x, w, b, torch.randint(0, 3, (5,)), None,
                                             -100, 0.1, 1, True, True, True))):
        torch.library.opcheck(op.default, args)
