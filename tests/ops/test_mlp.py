"""manual_layers.MLP and functional.mlp against nn.Sequential(nn.Linear, act, nn.Linear)."""

import copy

import pytest
import torch
from torch import nn

import manual_layers as ml
from manual_layers.reference import ACTIVATION_MODULES
from conftest import DEVICES, TOL, assert_rel

MF = ml.functional
ops = torch.ops.manual_layers
ACTS = [None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]


def _seq(i, h, o, act, bias=True, device="cpu", dtype=torch.float32):
    a = ACTIVATION_MODULES[act]() if act else nn.Identity()
    return nn.Sequential(nn.Linear(i, h, bias=bias), a, nn.Linear(h, o, bias=bias)).to(
        device=device, dtype=dtype)


def _run(model, x, g):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = model(x)
    y.backward(g)
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return [y] + grads


def _check(ours, ref, x, tol, what):
    g = torch.randn(*x.shape[:-1], ref[2].out_features, device=x.device, dtype=x.dtype)
    a = _run(ours, x, g)
    low = x.dtype in (torch.float16, torch.bfloat16)
    if low:  # yardstick: fp64 reference; bar: dtype tolerance or 1.5x torch's own 16-bit error
        ref64 = copy.deepcopy(ref).double()
        e = _run(ref64, x.double(), g.double())
        same = _run(ref, x, g)
        for k, (ai, ei, si) in enumerate(zip(a, e, same)):
            err = ((si.double() - ei).norm() / ei.norm().clamp_min(1e-30)).item()
            assert_rel(ai, ei, max(tol, 1.5 * err), f"{what} [{k}]")
    else:
        e = _run(ref, x, g)
        for k, (ai, ei) in enumerate(zip(a, e)):
            assert ai.dtype == x.dtype
            assert_rel(ai, ei, tol, f"{what} [{k}]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_sequential(device, act, dtype):
    ref = _seq(33, 70, 17, act, device=device, dtype=dtype)
    ours = ml.MLP(33, 70, 17, activation=act, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(300, 33, device=device, dtype=dtype)
    _check(ours, ref, x, TOL[dtype], f"{act} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_tiles_many_rows(device):
    """More rows than one backward tile (8 MiB / (hidden * 4 B) = 2048 rows at hidden 1024)."""
    ref = _seq(16, 1024, 8, "gelu", device=device)
    ours = ml.MLP.from_sequential(ref)
    x = torch.randn(5000, 16, device=device)
    _check(ours, ref, x, TOL[torch.float32], "tiled")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_leading_dims_noncontiguous_nobias(device, bias):
    ref = _seq(12, 20, 5, "silu", bias=bias, device=device, dtype=torch.float64)
    ours = ml.MLP(12, 20, 5, activation="silu", bias=bias, device=device, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 24, device=device, dtype=torch.float64)[..., ::2]
    assert not x.is_contiguous()
    _check(ours, ref, x, TOL[torch.float64], "strided")
    x1 = torch.randn(12, device=device, dtype=torch.float64)  # 1-D input: one row
    _check(ours, ref, x1, TOL[torch.float64], "1-D")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    ref = _seq(6, 10, 4, "gelu", device=device)
    ours = ml.MLP.from_sequential(ref)
    x = torch.randn(0, 6, device=device)
    out = _run(ours, x, torch.randn(0, 4, device=device))
    assert out[0].shape == (0, 4) and out[1].shape == (0, 6)
    for p in ours.parameters():
        assert torch.all(p.grad == 0)


def test_partial_requires_grad():
    ref = _seq(8, 12, 3, "relu", dtype=torch.float64)
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w1, b1, w2, b2 = (p.detach() for p in ref.parameters())
    for needs in ([1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 1, 0, 0]):
        args = [t.detach().clone().requires_grad_(bool(n)) for t, n in zip((x, w1, b1, w2, b2),
                                                                            needs)]
        y = MF.mlp(*args, activation="relu")
        ref_args = [t.detach().clone().requires_grad_(bool(n)) for t, n in zip((x, w1, b1, w2, b2),
                                                                                needs)]
        y_ref = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(
            ref_args[0], ref_args[1], ref_args[2])), ref_args[3], ref_args[4])
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        for a, e in zip(args, ref_args):
            assert (a.grad is None) == (e.grad is None)
            if a.grad is not None:
                assert_rel(a.grad, e.grad, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["gelu", "relu", None])
def test_opcheck_private_op(device, act):
    """_mlp_bwd (the public op is opchecked on every sample, test_samples.py)."""
    x, w1, b1 = (torch.randn(11, 6, device=device), torch.randn(13, 6, device=device),
                 torch.randn(13, device=device))
    w2 = torch.randn(5, 13, device=device)
    a = act or "none"
    z = torch.nn.functional.linear(x, w1, b1)
    h = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, None: lambda t: t}[act](z)
    saved = z if act == "gelu" else (h if act == "relu" else torch.empty(0, device=device))
    g = torch.randn(11, 5, device=device)
    args = (g, x, w1, w2, h, saved, a)
    torch.library.opcheck(ops._mlp_bwd, args + (True, True, True, True, True))
    torch.library.opcheck(ops._mlp_bwd, args + (False, True, False, False, True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    ours = ml.MLP(16, 40, 8, activation="gelu", device=device)
    x = torch.randn(4, 9, 16, device=device)
    g = torch.randn(4, 9, 8, device=device)

    def step(x):
        return (ours(x) * g).sum()

    outs = []
    for fn in (torch.compile(step, fullgraph=True), step):
        xs = x.clone().requires_grad_()
        loss = fn(xs)
        outs.append([loss.detach()] + list(torch.autograd.grad(loss, (xs,) + tuple(
            ours.parameters()))))
    for a, e in zip(*outs):
        assert_rel(a, e, 1e-6, "compile vs eager")


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_bitwise(device):
    ours = ml.MLP(64, 300, 32, device=device)
    x = torch.randn(3000, 64, device=device)
    g = torch.randn(3000, 32, device=device)
    r1, r2 = _run(ours, x, g), _run(ours, x, g)
    for a, e in zip(r1, r2):
        assert torch.equal(a, e)


def test_state_dict_both_ways_and_init():
    seq = _seq(10, 30, 4, "gelu")
    m = ml.MLP(10, 30, 4)
    assert list(m.state_dict().keys()) == list(seq.state_dict().keys()) == \
        ["0.weight", "0.bias", "2.weight", "2.bias"]
    m.load_state_dict(seq.state_dict())
    x = torch.randn(5, 10)
    assert_rel(m(x), seq(x), 1e-6)
    seq2 = _seq(10, 30, 4, "gelu")
    seq2.load_state_dict(ml.MLP(10, 30, 4).state_dict())
    assert m.fc1 is m[0] and m.fc2 is m[2]
    assert (m.in_features, m.hidden_features, m.out_features) == (10, 30, 4)
    # nn.Linear's initialisation: same RNG draws give the same parameters
    torch.manual_seed(7)
    a = ml.MLP(10, 30, 4, activation="relu")
    torch.manual_seed(7)
    b = _seq(10, 30, 4, "relu")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert ml.MLP(3, 4, 5, bias=False)[0].bias is None


def test_convert_folds_mlp():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
            self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.0),
                                      nn.Linear(16, 2))

        def forward(self, x):
            return self.head(x + self.mlp(x))

    model = Block()
    x = torch.randn(6, 8)
    before = model(x)
    keys = list(model.state_dict().keys())
    ml.convert(model)
    assert isinstance(model.mlp, ml.MLP) and model.mlp.activation == "gelu"
    assert isinstance(model.head[0], ml.FusedLinear) and model.head[0].activation == "relu"
    assert list(model.state_dict().keys()) == keys
    assert_rel(model(x), before, 1e-5)
    top = _seq(8, 12, 3, "tanh")
    w, before = top[0].weight, top(x)
    conv = ml.convert(top)
    assert conv is top and isinstance(top, ml.MLP) and top.activation == "tanh"
    assert top[0].weight is w
    assert_rel(top(x), before, 1e-5)


def test_errors():
    x = torch.randn(4, 6)
    w1, w2 = torch.randn(10, 6), torch.randn(3, 9)
    with pytest.raises(ValueError, match="w2 expects 9 hidden features"):
        MF.mlp(x, w1, None, w2, None)
    with pytest.raises(ValueError, match="unknown activation"):
        MF.mlp(x, w1, None, torch.randn(3, 10), None, activation="swish")
    with pytest.raises(TypeError, match="same dtype"):
        MF.mlp(x, w1, None, torch.randn(3, 10, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="b2 must have shape"):
        MF.mlp(x, w1, None, torch.randn(3, 10), torch.randn(4))
    with pytest.raises(ValueError, match="unknown activation"):
        ml.MLP(2, 3, 4, activation="softmax")


def test_inference_mode_and_no_grad():
    ref = _seq(9, 21, 4, "gelu_tanh")
    ours = ml.MLP.from_sequential(ref)
    x = torch.randn(2, 6, 9)
    with torch.inference_mode():
        assert_rel(ours(x), ref(x), 1e-5, "inference_mode")
    with torch.no_grad():
        assert_rel(ours(x), ref(x), 1e-5, "no_grad")


def test_autocast_cpu_bf16():
    ref = _seq(16, 32, 8, "gelu")
    ours = ml.MLP.from_sequential(ref)
    x = torch.randn(50, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
        y_ref = ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_rel(y, y_ref, 2e-2, "autocast")
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert ours[0].weight.grad.dtype == torch.float32
