"""manual_layers.Linear / functional.linear against manual_layers.reference and nn.Linear +
activation: values, gradients, shapes, dtypes, errors, opcheck, torch.compile, determinism."""

import subprocess
import sys

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import manual_layers as ml
from manual_layers import reference as R
from conftest import DEVICES, TOL, assert_rel, native_fp16_gemm

ACTS = [None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]
ops = torch.ops.manual_layers


def _run(x, w, b, act, fn, grad):
    """Forward and all gradients of fn(x, w, b, act) for grad_output `grad`."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = fn(x, w, b, act)
    params = [x, w] + ([b] if b is not None else [])
    return [y] + list(torch.autograd.grad(y, params, grad))


def _rel_err(a, e):
    a, e = a.detach().double(), e.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item() if e.numel() else 0.0


def _check_against_reference(x, w, b, act, tol):
    """Ours in x's dtype against the reference in float64 on the same (rounded) inputs. In
    16-bit dtypes the bar is the dtype's tolerance or, if larger, 1.5x the error of torch's own
    layer in that dtype on the same inputs (we must be as accurate as what we replace)."""
    y = ml.functional.linear(x, w, b, act)
    g = torch.randn_like(y)
    ours = _run(x, w, b, act, ml.functional.linear, g)
    ref = _run(x.double(), w.double(), b.double() if b is not None else None, act, R.linear,
               g.double())
    low = x.dtype in (torch.float16, torch.bfloat16)
    torch_same_dtype = _run(x, w, b, act, R.linear, g) if low else [None] * 4
    for name, a, e, t in zip(["out", "grad_x", "grad_weight", "grad_bias"], ours, ref,
                             torch_same_dtype):
        assert a.dtype == x.dtype, name
        bar = max(tol, 1.5 * _rel_err(t, e)) if low else tol
        assert_rel(a, e, bar, f"{act} {x.dtype} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_f", [1, 3, 17, 1000])
@pytest.mark.parametrize("out_f", [1, 3, 17, 1000])
def test_feature_sizes(device, in_f, out_f):
    x = torch.randn(19, in_f, device=device)
    w = torch.randn(out_f, in_f, device=device) / in_f ** 0.5
    b = torch.randn(out_f, device=device)
    for act in ("gelu", "relu"):
        _check_against_reference(x, w, b, act, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS)
def test_matches_nn_linear_and_activation(device, act):
    torch_layer = nn.Linear(23, 11, device=device)
    mod = nn.Sequential(torch_layer, R.ACTIVATION_MODULES[act]()) if act else torch_layer
    ours = ml.Linear(23, 11, activation=act, device=device)
    ours.load_state_dict(torch_layer.state_dict())
    x = torch.randn(4, 6, 23, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_ref, y = mod(x), ours(x2)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    assert_rel(y, y_ref, 1e-5, "out")
    assert_rel(x2.grad, x.grad, 1e-5, "grad_x")
    assert_rel(ours.weight.grad, torch_layer.weight.grad, 1e-5, "grad_weight")
    assert_rel(ours.bias.grad, torch_layer.bias.grad, 1e-5, "grad_bias")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"])
def test_bias_gradient_column_tiles_and_row_chunks(device, dtype, act):
    """The CUDA backward sums the bias gradient in the activation-gradient kernel when a row of
    G is whole 16-byte vectors (out_features % (16 / itemsize) == 0): column tiles of 32 vectors
    (a partial last tile at 264 / 1000 features) and chunks of rows summed in order (a batch of
    2053 rows spans several chunks, 1 row one). Other out_features take cuBLASLt's BGRADB."""
    for n, out_f in ((2053, 264), (1, 64), (300, 1000), (37, 8), (129, 17)):
        x = torch.randn(n, 24, device=device, dtype=dtype)
        w = torch.randn(out_f, 24, device=device, dtype=dtype) / 5
        b = torch.randn(out_f, device=device, dtype=dtype)
        _check_against_reference(x, w, b, act, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "tanh"])
def test_activation_accuracy_over_its_whole_range(device, act):
    """fp32 activation and derivative, element by element, on pre-activations from -40 to 40 (the
    saturated tails included) and +-1e10 against float64: |error| <= bound * max(|exact|, 1)
    (torch's own fp32 functions: 1.1e-6 / 1.0e-6 for GELU, GELU-tanh, SiLU); on the CPU GELU-tanh
    and SiLU within 5e-7 (GELU-tanh computed as z sigmoid(2u), both derivatives with 1 - sigmoid
    without cancellation: measured 1.4e-7 / 1.7e-7 and 1.1e-7 / 1.9e-7); inf, -inf and NaN give
    what torch gives (GELU: NaN). tanh (on the CPU through one exp and a polynomial below 0.625,
    measured 1.5 ulp) is also held to 2.5e-7 of |exact| itself, down to the tiniest values."""
    z = torch.cat([torch.linspace(-40, 40, 80001),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e10, -1e10])]).to(device)
    one = torch.ones(1, 1, device=device)
    zz = z.reshape(-1, 1).requires_grad_()
    y = ml.functional.linear(zz, one, None, act)
    (g,) = torch.autograd.grad(y.sum(), zz)
    torch_act = {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
                 "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[act]
    zd = zz.detach().double().requires_grad_()
    if act == "gelu_tanh":  # float64 reference without 1 + tanh(u)'s cancellation
        u = (2 * 0.7978845608028654) * (zd + 0.044715 * zd ** 3)
        yd = zd * torch.sigmoid(u)
    else:
        yd = torch_act(zd)
    (gd,) = torch.autograd.grad(yd.sum(), zd)
    bound = 5e-7 if act != "gelu" and device == "cpu" else 2e-6
    for name, a, e in (("value", y.detach(), yd.detach()), ("derivative", g, gd)):
        a, e = a.double().flatten(), e.flatten()
        err = ((a - e).abs() / e.abs().clamp_min(1)).max().item()
        assert err <= bound, f"{act} {name}: error {err:.2e} > {bound:.0e}"
    if act == "tanh":  # relative to the value itself, from 1e-38 to 40, both signs
        zr = torch.logspace(-38, 1.6, 200001, dtype=torch.float64)
        zr = torch.cat([zr, -zr]).float().to(device).reshape(-1, 1)
        e = torch.tanh(zr.double()).flatten()
        a = ml.functional.linear(zr, one, None, act).double().flatten()
        err = ((a - e).abs() / e.abs()).max().item()
        assert err <= 2.5e-7, f"tanh value: relative error {err:.2e} > 2.5e-7"
    # torch's exact GELU of +-inf depends on its code path (a single element: inf; a vector:
    # NaN), so GELU is held to NaN -> NaN only
    special = torch.tensor([float("nan")] if act == "gelu" else
                           [float("inf"), -float("inf"), float("nan")], device=device)
    sz = special.reshape(-1, 1).requires_grad_()
    ys = ml.functional.linear(sz, one, None, act)
    (gs,) = torch.autograd.grad(ys.sum(), sz)
    st = special.reshape(-1, 1).clone().requires_grad_()
    yt = torch_act(st)
    (gt,) = torch.autograd.grad(yt.sum(), st)
    assert torch.equal(ys.isnan(), yt.isnan()) and torch.equal(ys.nan_to_num(), yt.nan_to_num())
    assert torch.equal(gs.isnan(), gt.isnan()) and torch.equal(gs.nan_to_num(), gt.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(13,), (2, 13), (3, 5, 13), (2, 3, 4, 13)])
def test_leading_dims(device, shape):
    layer = ml.Linear(13, 6, activation="silu", device=device)
    x = torch.randn(*shape, device=device)
    y = layer(x)
    assert y.shape == (*shape[:-1], 6)
    assert_rel(y, R.linear(x, layer.weight, layer.bias, "silu"), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["gelu", None])
def test_empty_batch(device, act):
    layer = ml.Linear(8, 5, activation=act, device=device)
    x = torch.randn(0, 3, 8, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))


@pytest.mark.skipif(native_fp16_gemm(),
                    reason="this CPU has a native fp16 GEMM: ATen's is used as is")
def test_cpu_fp16_gemm_is_the_fp32_gemm_rounded_once():
    """CPU fp16 without a native fp16 GEMM: the layer's GEMMs run in fp32 on the widened
    operands (csrc/cpu/runtime/gemm.cpp), so the output equals fp32 F.linear rounded once, bitwise."""
    x = torch.randn(300, 40).half()
    w, b = (torch.randn(24, 40) / 5).half(), torch.randn(24).half()
    lin = ml.Linear(40, 24, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
        expected = nn.functional.linear(x.float(), w.float(), b.float()).half()
        assert torch.equal(lin(x), expected)
    # and backward: dX = G W, dW = G^T x in fp32, rounded once
    xg, g = x.clone().requires_grad_(), torch.randn(300, 24).half()
    lin(xg).backward(g)
    assert torch.equal(xg.grad, (g.float() @ w.float()).half())
    assert torch.equal(lin.weight.grad, (g.float().t() @ x.float()).half())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS + ["softmax"])
def test_opcheck_private_ops(device, act):
    """The private kernel ops (the public op is opchecked on every sample, test_samples.py)."""
    act = act or "none"
    xd, wd, bd = (torch.randn(9, 17, device=device), torch.randn(6, 17, device=device),
                  torch.randn(6, device=device))
    torch.library.opcheck(ops._linear_fwd, (xd, wd, bd, act, True))
    torch.library.opcheck(ops._linear_fwd, (xd, wd, None, act, False))
    out, pre = ops._linear_fwd(xd, wd, bd, act, True)
    saved = pre if act in ("gelu", "gelu_tanh", "silu") else (out if act != "none"
                                                             else xd.new_empty(0))
    g = torch.randn(9, 6, device=device)
    torch.library.opcheck(ops._linear_bwd, (g, xd, wd, saved, act, True, True, True))
    torch.library.opcheck(ops._linear_bwd, (g, xd, wd, saved, act, False, True, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["gelu", "relu", None])
def test_torch_compile_fullgraph(device, act):
    layer = ml.Linear(16, 8, activation=act, device=device)
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)

    def step(x):
        return layer(x) * 2 + 1

    g = torch.randn(2, 5, 8, device=device)
    compiled = torch.compile(step, fullgraph=True)
    y_c = compiled(x)
    y_c.backward(g)
    gx_c, gw_c, gb_c = x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()
    x.grad = layer.weight.grad = layer.bias.grad = None
    y_e = step(x)
    y_e.backward(g)
    assert_rel(y_c, y_e, 1e-6)
    for a, e in ((gx_c, x.grad), (gw_c, layer.weight.grad), (gb_c, layer.bias.grad)):
        assert_rel(a, e, 1e-6)


def test_state_dict_round_trip_with_nn_linear():
    ref = nn.Linear(12, 7)
    ours = ml.Linear(12, 7, activation="gelu")
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys()) == ["weight", "bias"]
    ours.load_state_dict(ref.state_dict())
    back = nn.Linear(12, 7)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, ref.weight) and torch.equal(back.bias, ref.bias)
    nb = ml.Linear(12, 7, bias=False)
    assert list(nb.state_dict().keys()) == ["weight"] and nb.bias is None


def test_initialisation_like_nn_linear():
    torch.manual_seed(7)
    ref = nn.Linear(31, 9)
    torch.manual_seed(7)
    ours = ml.Linear(31, 9)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    assert "activation='silu'" in repr(ml.Linear(3, 2, activation="silu"))
    assert "in_features=3, out_features=2, bias=True" in repr(ml.Linear(3, 2))


def test_from_linear_shares_parameters():
    ref = nn.Linear(5, 4)
    ours = ml.Linear.from_linear(ref, activation="tanh")
    assert ours.weight is ref.weight and ours.bias is ref.bias
    x = torch.randn(3, 5)
    assert_rel(ours(x), torch.tanh(ref(x)), 1e-6)


def test_convert_keeps_outputs_and_folds_activations():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 20), nn.GELU(), nn.Linear(20, 20), nn.GELU(approximate="tanh"),
        nn.Sequential(nn.Linear(20, 20), nn.ReLU()), nn.Dropout(0.0), nn.Linear(20, 3))
    x = torch.randn(8, 10)
    before = model(x)
    keys = list(model.state_dict().keys())
    ml.convert(model)
    assert isinstance(model[0], ml.FusedLinear) and model[0].activation == "gelu"
    assert not isinstance(model[0], nn.Linear)  # its output is not linear: see ml.Linear
    assert isinstance(model[1], nn.Identity)
    assert model[2].activation == "gelu_tanh"
    assert model[4][0].activation == "relu"
    assert type(model[6]) is ml.Linear and model[6].activation is None
    assert list(model.state_dict().keys()) == keys
    assert_rel(model(x), before, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_bitwise(device):
    layer = ml.Linear(64, 48, activation="gelu", device=device)
    x = torch.randn(3000, 64, device=device)
    g = torch.randn(3000, 48, device=device)

    def run():
        xx = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xx)
        y.backward(g)
        return y, xx.grad, layer.weight.grad.clone(), layer.bias.grad.clone()

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_autocast_cpu_matches_nn_linear():
    ref = nn.Linear(16, 8)
    ours = ml.Linear(16, 8)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), ours(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_rel(y.float(), y_ref.float(), 2e-2)
    y.float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32


# ---- bad input --------------------------------------------------------------------------------
def test_error_wrong_in_features():
    with pytest.raises(ValueError, match=r"x has 5 features .*in_features=4"):
        ml.Linear(4, 2)(torch.randn(3, 5))


def test_error_weight_and_bias_shapes():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"weight must be 2-D .*got shape \(4,\)"):
        ml.functional.linear(x, torch.randn(4))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\).*got \(3,\)"):
        ml.functional.linear(x, torch.randn(2, 4), torch.randn(3))


def test_error_dtype_and_device_mismatch():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match=r"x and weight must have the same dtype.*float64"):
        ml.functional.linear(x, torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"x and weight must be on the same device.*meta"):
        ml.functional.linear(x, torch.randn(2, 4, device="meta"))


def test_error_unknown_activation_and_integer_input():
    with pytest.raises(ValueError, match=r"unknown activation 'swish'"):
        ml.Linear(4, 2, activation="swish")
    with pytest.raises(ValueError, match=r"unknown activation 'GELU'"):
        ml.functional.linear(torch.randn(3, 4), torch.randn(2, 4), activation="GELU")
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        ml.Linear(4, 2)(torch.ones(3, 4, dtype=torch.long))


def test_op_level_checks():
    """The checks live in the ops (C++), so calling torch.ops directly gets them too."""
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ops.linear(torch.randn(2, 3), torch.randn(4, 3), None, "swish")
    with pytest.raises(ValueError, match=r"x has 3 features .*in_features=5"):
        ops.linear(torch.randn(2, 3), torch.randn(4, 5), None, "none")
    with pytest.raises(RuntimeError, match="x has 3 features but weight has in_features 5"):
        ops._linear_fwd(torch.randn(2, 3), torch.randn(4, 5), None, "none", False)


# ---- build and import -------------------------------------------------------------------------
def test_info_command():
    out = subprocess.run([sys.executable, "-m", "manual_layers", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "cuda_kernels_compiled" in out and torch.__version__ in out


def test_missing_extension_gives_rebuild_instructions():
    code = ("import sys; sys.modules['manual_layers._C'] = None\n"
            "try:\n    import manual_layers\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "ERR" in out and "pip install --no-build-isolation -e ." in out
