"""torch.func over every public op: grad, vjp, jacrev, jacfwd, hessian, jvp, vmap (over x and over
stacked parameters) and vmap(grad) per-sample gradients, each equal in float64 to the same
transform of the torch composition the op replaces (manual_layers.reference); forward-mode AD
through torch.autograd.forward_ad; functional_call on the modules."""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import manual_layers as ml
from manual_layers import reference as R

MF = ml.functional
DT = torch.float64
TOL = 1e-10
ACTS = [None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]


def _close(a, b, what):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b)):
            _close(u, v, f"{what}[{i}]")
        return
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    assert err <= TOL * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


class Case:
    """One public op as f(x, w, b) -> Tensor, with its torch composition ref(x, w, b)."""

    def __init__(self, name, ours, ref, d_in=4, d_out=3, rows=5, lead=()):
        self.name, self.ours, self.ref = name, ours, ref
        self.d_in, self.d_out, self.rows, self.lead = d_in, d_out, rows, lead

    def inputs(self, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*self.lead, self.rows, self.d_in, dtype=DT, generator=g)
        w = torch.randn(self.d_out, self.d_in, dtype=DT, generator=g) * 0.7
        b = torch.randn(self.d_out, dtype=DT, generator=g) * 0.3
        return x, w, b

    def __repr__(self):
        return self.name


def _targets(rows, C, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "bce":
        return torch.rand(rows, dtype=DT, generator=g)
    if kind == "soft":
        return torch.softmax(torch.randn(rows, C, dtype=DT, generator=g), -1)
    t = torch.randint(0, C, (rows,), generator=g)
    t[1] = -100  # an ignored row
    return t


def _cases():
    cases = []
    for act in ACTS:
        cases.append(Case(f"linear-{act}", lambda x, w, b, a=act: MF.linear(x, w, b, a),
                          lambda x, w, b, a=act: R.linear(x, w, b, a)))
    cases.append(Case("linear-3d", lambda x, w, b: MF.linear(x, w, b, "gelu"),
                      lambda x, w, b: R.linear(x, w, b, "gelu"), lead=(2,)))
    cases.append(Case("logreg-binary", lambda x, w, b: MF.logistic_regression(x, w, b),
                      lambda x, w, b: R.logistic_regression(x, w, b), d_out=1))
    cases.append(Case("logreg-softmax", lambda x, w, b: MF.logistic_regression(x, w, b),
                      lambda x, w, b: R.logistic_regression(x, w, b)))
    w2 = torch.randn(2, 3, dtype=DT) * 0.5
    b2 = torch.randn(2, dtype=DT) * 0.1
    cases.append(Case("mlp-gelu", lambda x, w, b: MF.mlp(x, w, b, w2, b2, "gelu"),
                      lambda x, w, b: F.linear(F.gelu(F.linear(x, w, b)), w2, b2)))
    t = _targets(5, 1, "bce", 3)
    sw = torch.rand(5, dtype=DT) + 0.5
    pw = torch.tensor([1.7], dtype=DT)
    for red in ("mean", "sum", "none"):
        kw = dict(pos_weight=pw, sample_weight=sw, reduction=red)
        cases.append(Case(
            f"bce-{red}",
            lambda x, w, b, kw=kw: MF.linear_binary_cross_entropy_with_logits(x, w, b, t, **kw),
            lambda x, w, b, kw=kw: R.linear_binary_cross_entropy_with_logits(x, w, b, t, **kw),
            d_out=1))
    tc = _targets(5, 3, "ce", 4)
    cw = torch.rand(3, dtype=DT) + 0.5
    for red in ("mean", "sum", "none"):
        kw = dict(class_weight=cw, label_smoothing=0.1, reduction=red)
        cases.append(Case(
            f"ce-{red}",
            lambda x, w, b, kw=kw: MF.linear_cross_entropy(x, w, b, tc, **kw),
            lambda x, w, b, kw=kw: R.linear_cross_entropy(x, w, b, tc, **kw)))
    ts = _targets(5, 3, "soft", 6)
    for red in ("mean", "none"):
        kw = dict(class_weight=cw, label_smoothing=0.1, reduction=red)
        cases.append(Case(
            f"ce-soft-{red}",
            lambda x, w, b, kw=kw: MF.linear_cross_entropy(x, w, b, ts, **kw),
            lambda x, w, b, kw=kw: R.linear_cross_entropy(x, w, b, ts, **kw)))
    return cases


CASES = _cases()


def _scalar(f):
    """A scalar function of f's output with a fixed, uneven weighting (grad, hessian); no
    random op, which vmap (inside jacrev/hessian) would refuse."""
    def s(x, w, b):
        out = f(x, w, b)
        k = torch.arange(out.numel(), dtype=DT).reshape(out.shape)
        return (out * torch.sin(1.3 * k + 0.7)).sum()
    return s


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_grad_vjp(case):
    x, w, b = case.inputs(1)
    for argnums in (0, 1, 2, (0, 1, 2)):
        _close(grad(_scalar(case.ours), argnums=argnums)(x, w, b),
               grad(_scalar(case.ref), argnums=argnums)(x, w, b), f"grad {argnums}")
    out, pull = vjp(case.ours, x, w, b)
    out_r, pull_r = vjp(case.ref, x, w, b)
    _close(out, out_r, "vjp out")
    ct = torch.randn(out.shape, dtype=DT)
    _close(pull(ct), pull_r(ct), "vjp")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jacrev_jacfwd(case):
    x, w, b = case.inputs(2)
    for jac in (jacrev, jacfwd):
        for argnums in (0, 1):
            _close(jac(case.ours, argnums=argnums)(x, w, b),
                   jac(case.ref, argnums=argnums)(x, w, b), f"{jac.__name__} {argnums}")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_hessian(case):
    x, w, b = case.inputs(3)
    for argnums in (0, 1):
        _close(hessian(_scalar(case.ours), argnums=argnums)(x, w, b),
               hessian(_scalar(case.ref), argnums=argnums)(x, w, b), f"hessian {argnums}")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jvp_and_forward_ad(case):
    x, w, b = case.inputs(4)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    out, tan = jvp(case.ours, (x, w, b), tangents)
    out_r, tan_r = jvp(case.ref, (x, w, b), tangents)
    _close((out, tan), (out_r, tan_r), "jvp")
    assert tan.abs().max() > 0
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip((x, w, b), tangents)]
        got = fwAD.unpack_dual(case.ours(*duals))
    assert got.tangent is not None, "forward AD dropped the tangent"
    _close(got.tangent, tan_r, "forward_ad tangent")


def _no_fallback_warning():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("error", message=".*performance drop.*")
    return ctx


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_vmap_over_x_and_over_parameters(case):
    B = 3
    xs = torch.stack([case.inputs(10 + i)[0] for i in range(B)])
    _, w, b = case.inputs(5)
    ctx = _no_fallback_warning()
    try:
        got = vmap(case.ours, in_dims=(0, None, None))(xs, w, b)
    finally:
        ctx.__exit__(None, None, None)
    _close(got, vmap(case.ref, in_dims=(0, None, None))(xs, w, b), "vmap over x")
    # model ensembling: stacked parameters, one x, and both batched
    ws = torch.stack([case.inputs(20 + i)[1] for i in range(B)])
    bs = torch.stack([case.inputs(20 + i)[2] for i in range(B)])
    x = case.inputs(6)[0]
    _close(vmap(case.ours, in_dims=(None, 0, 0))(x, ws, bs),
           vmap(case.ref, in_dims=(None, 0, 0))(x, ws, bs), "vmap over parameters")
    _close(vmap(case.ours)(xs, ws, bs), vmap(case.ref)(xs, ws, bs), "vmap over all")


@pytest.mark.parametrize("case", [c for c in CASES if not c.lead], ids=repr)
def test_per_sample_gradients(case):
    """vmap(grad): the Opacus / per-sample-gradient pattern, one sample per call."""
    x, w, b = case.inputs(8)

    def per_sample(f):
        def loss(w, b, xi):
            return _scalar(f)(xi.unsqueeze(0), w, b)
        return vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)

    if case.name.startswith(("bce", "ce")):
        pytest.skip("the losses' per-sample pattern batches targets too: test_loss_per_sample")
    _close(per_sample(case.ours), per_sample(case.ref), "vmap(grad)")


@pytest.mark.parametrize("kind", ["bce", "ce", "ce-soft"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_per_sample_gradients(kind, reduction):
    """vmap(grad) over (x_i, y_i) pairs of a fused loss, as DP-SGD computes them."""
    torch.manual_seed(9)
    C = 1 if kind == "bce" else 4
    x = torch.randn(6, 5, dtype=DT)
    w = torch.randn(C, 5, dtype=DT, requires_grad=False)
    b = torch.randn(C, dtype=DT)
    if kind == "bce":
        t = torch.rand(6, dtype=DT)
        ours = lambda w, b, xi, ti: MF.linear_binary_cross_entropy_with_logits(
            xi[None], w, b, ti[None], reduction=reduction)
        ref = lambda w, b, xi, ti: R.linear_binary_cross_entropy_with_logits(
            xi[None], w, b, ti[None], reduction=reduction)
    else:
        t = torch.randint(0, C, (6,)) if kind == "ce" else \
            torch.softmax(torch.randn(6, C, dtype=DT), -1)
        cw = torch.rand(C, dtype=DT) + 0.5
        ours = lambda w, b, xi, ti: MF.linear_cross_entropy(
            xi[None], w, b, ti[None], class_weight=cw, label_smoothing=0.05, reduction=reduction)
        ref = lambda w, b, xi, ti: R.linear_cross_entropy(
            xi[None], w, b, ti[None], class_weight=cw, label_smoothing=0.05, reduction=reduction)
    per = lambda f: vmap(grad(f, argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, b, x, t)
    _close(per(ours), per(ref), "per-sample loss gradients")


def test_functional_call_modules():
    torch.manual_seed(0)
    for mod, ref in ((ml.Linear(4, 3, activation="gelu").double(), None),
                     (ml.MLP(4, 6, 2, activation="tanh").double(), None)):
        params = {k: v.detach() for k, v in mod.named_parameters()}
        x = torch.randn(5, 4, dtype=DT)

        def loss(p, x):
            return functional_call(mod, p, (x,)).square().sum()

        g = grad(loss)(params, x)
        mod.zero_grad()
        loss(dict(mod.named_parameters()), x).backward()
        for k, p in mod.named_parameters():
            _close(g[k], p.grad, f"{type(mod).__name__}.{k}")


def test_vmap_layer_no_warning():
    layer = ml.Linear(4, 3, activation="silu")
    x = torch.randn(6, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = vmap(layer)(x)
    torch.testing.assert_close(y, layer(x))


@pytest.mark.parametrize("C", [3, 130])
def test_ce_paths_under_func(C, monkeypatch):
    """Both cross-entropy kernel paths (single pass, chunked) under grad and vmap."""
    torch.manual_seed(C)
    x = torch.randn(7, 5, dtype=DT)
    w = torch.randn(C, 5, dtype=DT) * 0.3
    t = torch.randint(0, C, (7,))
    f = lambda w: MF.linear_cross_entropy(x, w, None, t)
    r = lambda w: R.linear_cross_entropy(x, w, None, t)
    _close(grad(f)(w), grad(r)(w), "grad")
    _close(vmap(f)(torch.stack([w, 2 * w])), vmap(r)(torch.stack([w, 2 * w])), "vmap")
