"""The fused losses linear_bce and linear_ce (the ops behind the fused heads, the loss
modules and LogisticRegression.loss), against manual_layers.reference (plain PyTorch). The
LogisticRegression layer and its fit: tests/integration/test_logreg_layer.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manual_layers as ml
from manual_layers import reference as R
from conftest import DEVICES, TOL, assert_rel

MF = ml.functional
ops = torch.ops.manual_layers
REDUCTIONS = ["mean", "sum", "none"]


def _grads(fn, x, w, b, target, grad_scale, **kw):
    """loss and d(loss * grad_scale)/d(x, w, b); grad_scale is a scalar or, for
    reduction="none", a tensor of the loss's shape (a grad_output that is not all ones)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    loss = fn(x, w, b, target, **kw)
    params = [x, w] + ([b] if b is not None else [])
    gs = torch.autograd.grad(loss, params, grad_scale if torch.is_tensor(grad_scale) else
                             torch.full_like(loss, grad_scale))
    return [loss] + list(gs)


def _compare(ours_fn, ref_fn, x, w, b, target, reduction, tol, **kw):
    g = torch.randn(target.shape, dtype=x.dtype, device=x.device) if reduction == "none" else 2.5
    ours = _grads(ours_fn, x, w, b, target, g, reduction=reduction, **kw)
    d = lambda t: t.double() if torch.is_tensor(t) and t.is_floating_point() else t
    ref = _grads(ref_fn, d(x), d(w), d(b), d(target), d(g), reduction=reduction,
                 **{k: d(v) for k, v in kw.items()})
    # 16-bit: the bar is the dtype's tolerance or, if larger, 1.5x the error of the plain
    # PyTorch composition run in that dtype on the same inputs.
    low = x.dtype in (torch.float16, torch.bfloat16)
    same = _grads(ref_fn, x, w, b, target, g, reduction=reduction, **kw) if low else [None] * 4
    for name, a, e, t in zip(["loss", "grad_x", "grad_weight", "grad_bias"], ours, ref, same):
        assert a.dtype == x.dtype, name
        bar = max(tol, 1.5 * _rel_err(t, e)) if low else tol
        assert_rel(a, e, bar, f"{name} ({reduction}, {x.dtype})")


def _rel_err(a, e):
    a, e = a.detach().double(), e.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item() if e.numel() else 0.0


# Values and gradients of both losses with every option, every reduction and dtype, leading dims
# and strided x, against the reference: the samples of tests/samples.py (test_samples.py).
# ---- binary -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
# CUDA: D 17 .. 4096 the fused kernel's 1- to 4-chunk instances, 5001 / 8192 its fp32 8-chunk one
# (scalar and vector loads), 8193 the GEMM path.
@pytest.mark.parametrize("D", [1, 3, 17, 4096, 5001, 8192, 8193])
@pytest.mark.parametrize("N", [0, 1, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_bce_shapes(device, D, N, bias):
    x = torch.randn(N, D, device=device)
    w = torch.randn(1, D, device=device) / D ** 0.5
    b = torch.randn(1, device=device) if bias else None
    y = torch.randint(0, 2, (N,), device=device).float()
    for reduction in REDUCTIONS:
        if N == 0 and reduction == "mean":
            loss = MF.linear_binary_cross_entropy_with_logits(x, w, b, y)
            assert torch.isnan(loss)  # as torch: the mean of nothing
            continue
        _compare(MF.linear_binary_cross_entropy_with_logits,
                 R.linear_binary_cross_entropy_with_logits, x, w, b, y, reduction, 1e-5)


# ---- multinomial ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [2, 3, 1000])
@pytest.mark.parametrize("D", [1, 3, 4096])
def test_ce_shapes(device, C, D):
    N = 300
    x = torch.randn(N, D, device=device)
    w = torch.randn(C, D, device=device) / D ** 0.5
    b = torch.randn(C, device=device)
    t = torch.randint(0, C, (N,), device=device)
    for reduction in REDUCTIONS:
        _compare(MF.linear_cross_entropy, R.linear_cross_entropy, x, w, b, t, reduction, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [15, 16, 17, 3 * 2048 + 21])
@pytest.mark.parametrize("D,dtype,strided", [(16, torch.float32, False), (16, torch.float32, True),
                                             (17, torch.float32, False), (16, torch.bfloat16, False),
                                             (5, torch.float64, True), (17, torch.float16, True),
                                             (40, torch.bfloat16, True),
                                             # on AMD, binary tiles of 8 and 4 rows (csrc/cpu/
                                             # logreg.cpp, tile_shape), and 16 with prefetch
                                             (100, torch.float32, False),
                                             (130, torch.bfloat16, True),
                                             (200, torch.float32, True),
                                             (300, torch.float32, False)])
def test_tile_and_block_boundaries(device, N, D, dtype, strided):
    """The CPU pass works on tiles of 16 rows (binary, rows of up to 1 KiB: 16, 8 or 4) inside
    fixed blocks of rows, reading whole tiles in place and copying the rest: partial tiles,
    several blocks, rows with a stride, converted rows, and ignored rows inside a partial tile
    must all give the reference."""
    base = torch.randn(N, D + 3 if strided else D, device=device, dtype=dtype)
    x = base[:, :D]
    w = torch.randn(1, D, device=device, dtype=dtype) / 3
    b = torch.randn(1, device=device, dtype=dtype)
    y = torch.rand(N, device=device, dtype=dtype)
    tol = max(TOL[dtype], 1e-5)
    for reduction in REDUCTIONS:
        _compare(MF.linear_binary_cross_entropy_with_logits,
                 R.linear_binary_cross_entropy_with_logits, x, w, b, y, reduction, tol)
    C = 7
    W = torch.randn(C, D, device=device, dtype=dtype) / 3
    bc = torch.randn(C, device=device, dtype=dtype)
    t = torch.randint(0, C, (N,), device=device)
    t[N - 3::2] = -100  # ignored rows in the last (partial) tile
    t[::5] = -100
    for reduction in REDUCTIONS:
        _compare(MF.linear_cross_entropy, R.linear_cross_entropy, x, W, bc, t, reduction, tol,
                 label_smoothing=0.1, class_weight=torch.rand(C, device=device, dtype=dtype) + .5)


BINARY_TILES = ["4,noprefetch", "8,noprefetch", "16,noprefetch", "4", "8", "16"]


@pytest.mark.parametrize("N,D,dtype,strided", [(16 * 3 + 5, 17, torch.float32, False),
                                               (2 * 2048 + 7, 130, torch.bfloat16, True),
                                               (2 * 2048 + 9, 100, torch.float32, True),
                                               (37, 300, torch.float16, False),
                                               (2 * 2048 + 3, 64, torch.float64, False)])
def test_binary_tile_shapes_give_the_same_bits(monkeypatch, N, D, dtype, strided):
    """CPU: the binary pass's tile (csrc/cpu/kernels/loss_tiles.h, tile_shape: 16, 8 or 4 rows, with or
    without the software prefetch; which one runs depends on the CPU's vendor and the row
    length) changes no bit, and every tile shape gives the reference. Each shape is forced
    through MANUAL_LAYERS_CPU_BINARY_TILE, so every instantiation runs on any CPU."""
    base = torch.randn(N, D + 3 if strided else D, dtype=dtype)
    x = base[:, :D]
    w = (torch.randn(1, D) / 3).to(dtype)
    b = torch.randn(1).to(dtype)
    y = torch.rand(N).to(dtype)
    sw = torch.rand(N).to(dtype)
    fn = MF.linear_binary_cross_entropy_with_logits
    # fp32: grad_bias is one sum of ~4k residuals of both signs, relative to itself
    tol = max(TOL[dtype], 3e-5)
    for reduction in REDUCTIONS:
        g = torch.randn(N, dtype=dtype) if reduction == "none" else torch.tensor(1.5, dtype=dtype)
        results = {}
        for tile in ["auto"] + BINARY_TILES:
            monkeypatch.setenv("MANUAL_LAYERS_CPU_BINARY_TILE", tile)
            results[tile] = _grads(fn, x, w, b, y, g, reduction=reduction, sample_weight=sw)
            if tile == "auto":
                _compare(fn, R.linear_binary_cross_entropy_with_logits, x, w, b, y, reduction,
                         tol, sample_weight=sw)
        for tile in BINARY_TILES:
            for name, a, e in zip(["loss", "grad_x", "grad_weight", "grad_bias"],
                                  results[tile], results["auto"]):
                assert torch.equal(a, e), f"tile {tile}: {name} ({reduction})"


@pytest.mark.parametrize("D,dtype,cls", [(28, torch.float64, "16"), (256, torch.float32, "4")])
def test_binary_tile_calibration_decides_and_changes_no_bit(monkeypatch, D, dtype, cls):
    """CPU: with MANUAL_LAYERS_CPU_BINARY_TILE=auto the binary pass times its two candidate tiles
    on calls of at least 8 MiB of X (csrc/cpu/runtime/tile_calibration.h: one untimed call,
    then three timed calls of each) and keeps the faster; every call, timed or not, gives the
    bits of every forced tile and of the vendor rule."""
    from manual_layers import _C
    monkeypatch.setenv("MANUAL_LAYERS_CPU_BINARY_TILE", "auto")
    _C.cpu_tile_calibration_reset()
    N = (8 << 20) // (D * dtype.itemsize) + 16  # just over 8 MiB of X
    x = torch.randn(N, D, dtype=dtype)
    w = (torch.randn(1, D) / 3).to(dtype)
    b = torch.randn(1).to(dtype)
    y = torch.rand(N).to(dtype)
    op = torch.ops.manual_layers._linear_bce_fwd
    calls = [op(x, w, b, y, None, None, 1, False, True, True) for _ in range(8)]
    state = dict(part.split(": ", 1) for part in _C.cpu_tile_calibration().split("; "))
    assert state[cls].startswith(("short (short 3 timed", "long (short 3 timed")), state
    assert "long 3 timed" in state[cls], state
    assert all(s.startswith("undecided") for k, s in state.items() if k != cls), state
    expected = calls[0]
    for tile in ["vendor"] + BINARY_TILES:
        monkeypatch.setenv("MANUAL_LAYERS_CPU_BINARY_TILE", tile)
        calls.append(op(x, w, b, y, None, None, 1, False, True, True))
    for got in calls[1:]:
        for a, e in zip(got, expected):
            assert torch.equal(a, e)
    # small calls never start the calibration
    _C.cpu_tile_calibration_reset()
    monkeypatch.setenv("MANUAL_LAYERS_CPU_BINARY_TILE", "auto")
    for _ in range(8):
        op(x[:1000], w, b, y[:1000], None, None, 1, False, True, True)
    assert _C.cpu_tile_calibration().count("undecided (short 0 timed, long 0 timed)") == 3


def test_binary_tile_setting_is_checked(monkeypatch):
    monkeypatch.setenv("MANUAL_LAYERS_CPU_BINARY_TILE", "32")
    x, w, b, y = torch.randn(4, 3), torch.randn(1, 3), torch.randn(1), torch.rand(4)
    with pytest.raises(ValueError, match="MANUAL_LAYERS_CPU_BINARY_TILE"):
        MF.linear_binary_cross_entropy_with_logits(x, w, b, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D", [(16 * 3 + 5, 17), (2 * 2048 + 7, 130), (64, 300)])
@pytest.mark.parametrize("strided", [False, True])
def test_16bit_rows_match_the_float32_pass_bitwise(dtype, N, D, strided):
    """CPU: 16-bit rows are widened exactly (read in place by the binary pass, converted into a
    tile buffer otherwise) and then take the float32 pass's arithmetic in the same order, so the
    16-bit results are the float32 results of the widened inputs, rounded once. On AMD CPUs,
    D = 130 and 300 also pair different tile sizes (16-bit rows in tiles of 8 and 4 rows, the
    float32 rows in 4 and 16; test_binary_tile_shapes_give_the_same_bits forces every one)."""
    base = torch.randn(N, D + 5 if strided else D, dtype=dtype)
    x = base[:, :D]
    w = (torch.randn(1, D) / 3).to(dtype)
    b = torch.randn(1).to(dtype)
    y = torch.rand(N).to(dtype)
    W = (torch.randn(7, D) / 3).to(dtype)
    bc = torch.randn(7).to(dtype)
    t = torch.randint(0, 7, (N,))
    cases = [(MF.linear_binary_cross_entropy_with_logits, (w, b, y)),
             (MF.linear_cross_entropy, (W, bc, t))]
    for fn, (wt, bt, tt) in cases:
        for reduction in REDUCTIONS:
            g = torch.randn(N) if reduction == "none" else torch.tensor(2.5)
            f32 = lambda v: v.float() if v.is_floating_point() else v
            low = _grads(fn, x, wt, bt, tt, g.to(dtype), reduction=reduction)
            wide = _grads(fn, f32(x), f32(wt), f32(bt), f32(tt), g, reduction=reduction)
            # reduction="none": only the per-row losses (its backward is three ATen GEMMs in
            # x's dtype, csrc/generic/loss_bwd.cpp).
            names = ["loss"] if reduction == "none" else ["loss", "grad_x", "grad_weight",
                                                          "grad_bias"]
            for name, a, e in zip(names, low, wide):
                assert torch.equal(a, e.to(dtype)), f"{fn.__name__} {name} ({reduction})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [0, 1])
def test_ce_tiny_batches(device, N):
    x = torch.randn(N, 5, device=device)
    w, b = torch.randn(4, 5, device=device), torch.randn(4, device=device)
    t = torch.randint(0, 4, (N,), device=device)
    for reduction in ("sum", "none") if N == 0 else REDUCTIONS:
        _compare(MF.linear_cross_entropy, R.linear_cross_entropy, x, w, b, t, reduction, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits_are_stable(device):
    x = torch.randn(64, 8, device=device)
    w = torch.randn(1, 8, device=device) * 1e4
    y = torch.randint(0, 2, (64,), device=device).float()
    xr = x.clone().requires_grad_()
    loss = MF.linear_binary_cross_entropy_with_logits(xr, w, None, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xr.grad).all()
    assert_rel(loss, R.linear_binary_cross_entropy_with_logits(x, w, None, y), 1e-5)
    W = torch.randn(5, 8, device=device) * 1e4
    t = torch.randint(0, 5, (64,), device=device)
    xr.grad = None
    loss = MF.linear_cross_entropy(xr, W, None, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xr.grad).all()
    assert_rel(loss, R.linear_cross_entropy(x, W, None, t), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_per_row_loss_and_grad_across_logit_range(device, dtype):
    """Per-row losses and gradients over logits from -120 to 120 (both labels, pos_weight)
    against torch in float64. y = 1: loss = pw softplus(-z), no cancellation, so a few ulp
    RELATIVE down to the smallest normal number (fails if log1p(exp(-|z|)) were log(1 + e));
    y = 0: z + softplus(-z) cancels for z < 0, so a few ulp of max(|z|, 1), as eager."""
    z = torch.linspace(-120, 120, 4001, dtype=torch.float64)
    x = z.to(dtype).unsqueeze(1).to(device)
    w = torch.ones(1, 1, dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    for y_val in (0.0, 1.0):
        y = torch.full((len(z),), y_val, dtype=dtype, device=device)
        for pw in (None, torch.tensor([2.5], dtype=dtype, device=device)):
            xr = x.clone().requires_grad_()
            rows = MF.linear_binary_cross_entropy_with_logits(xr, w, None, y, pos_weight=pw,
                                                              reduction="none")
            rows.sum().backward()
            zc = x.double().cpu()[:, 0]
            ref = F.binary_cross_entropy_with_logits(
                zc, y.double().cpu(), reduction="none",
                pos_weight=None if pw is None else pw.double().cpu())
            # (below the dtype's smallest normal number the loss may flush to 0, as eager's)
            tiny = torch.finfo(dtype).tiny
            scale = ref.abs().clamp_min(tiny) if y_val == 1.0 else zc.abs().clamp_min(1.0)
            err = (rows.double().cpu() - ref).abs() / scale
            assert err.max().item() <= 8 * eps, (y_val, pw, err.max().item() / eps)
            # d loss / d x (w = 1) against torch's float64 autograd
            zr = zc.clone().requires_grad_()
            F.binary_cross_entropy_with_logits(
                zr, y.double().cpu(), reduction="sum",
                pos_weight=None if pw is None else pw.double().cpu()).backward()
            gerr = (xr.grad.double().cpu()[:, 0] - zr.grad).abs()
            assert gerr.max().item() <= 8 * eps * max(1.0, 2.5), (y_val, pw, gerr.max().item())


# ---- autograd machinery -----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_private_ops(device, reduction):
    """The private kernel ops (the public ops are opchecked on every sample, test_samples.py)."""
    xd = torch.randn(33, 7, device=device)
    w1d, b1d = torch.randn(1, 7, device=device), torch.randn(1, device=device)
    y = torch.rand(33, device=device)
    Wd, bd = torch.randn(5, 7, device=device), torch.randn(5, device=device)
    t = torch.randint(0, 5, (33,), device=device)
    torch.library.opcheck(ops._linear_bce_fwd, (xd, w1d, b1d, y, None, None, reduction,
                                                True, True, True))
    torch.library.opcheck(ops._linear_ce_fwd, (xd, Wd, bd, t, torch.rand(5, device=device), 2,
                                               0.2, reduction, True, False, True))
    _, gw, gb, res = ops._linear_ce_fwd(xd, Wd, bd, t, None, -100, 0.0, reduction, True, True,
                                        True)
    g = torch.randn(33 if reduction == 0 else (), device=device)
    torch.library.opcheck(ops._linear_loss_bwd, (g, res, xd, Wd, gw, gb, reduction, True, True,
                                                 True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(device, reduction):
    x = torch.randn(50, 12, device=device, requires_grad=True)
    W = torch.randn(4, 12, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    t = torch.randint(0, 4, (50,), device=device)

    def step(x, W, b):
        loss = MF.linear_cross_entropy(x, W, b, t, label_smoothing=0.1, reduction=reduction)
        return (loss * 3).sum()

    outs = []
    for fn in (torch.compile(step, fullgraph=True), step):
        loss = fn(x, W, b)
        outs.append([loss.detach()] + list(torch.autograd.grad(loss, (x, W, b))))
    for a, e in zip(*outs):
        assert_rel(a, e, 1e-6)

    w1 = torch.randn(1, 12, device=device, requires_grad=True)
    y = torch.rand(50, device=device)

    def step_bce(x, w):
        return MF.linear_binary_cross_entropy_with_logits(x, w, None, y, reduction=reduction).sum()

    outs = []
    for fn in (torch.compile(step_bce, fullgraph=True), step_bce):
        loss = fn(x, w1)
        outs.append([loss.detach()] + list(torch.autograd.grad(loss, (x, w1))))
    for a, e in zip(*outs):
        assert_rel(a, e, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_bitwise(device):
    x = torch.randn(20000, 40, device=device)
    W, b = torch.randn(7, 40, device=device), torch.randn(7, device=device)
    t = torch.randint(0, 7, (20000,), device=device)
    w1, y = W[:1].clone(), torch.rand(20000, device=device)

    def run():
        outs = []
        for fn, w, tgt in ((MF.linear_cross_entropy, W, t),
                           (MF.linear_binary_cross_entropy_with_logits, w1, y)):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            br = b[:w.shape[0]].clone().requires_grad_()
            loss = fn(xr, wr, br, tgt)
            loss.backward()
            outs += [loss, xr.grad, wr.grad, br.grad]
        return outs

    for a, e in zip(run(), run()):
        assert torch.equal(a, e)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_repeated_backward_on_retained_graph(reduction):
    x = torch.randn(10, 3, requires_grad=True)
    w = torch.randn(1, 3, requires_grad=True)
    y = torch.rand(10)
    loss = MF.linear_binary_cross_entropy_with_logits(x, w, None, y, reduction=reduction)
    loss.backward(retain_graph=True)
    (loss * 3).backward()  # grad_output 1 then 3: the grads accumulate to 4x
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    (4 * R.linear_binary_cross_entropy_with_logits(xr, wr, None, y, reduction=reduction)).backward()
    assert_rel(x.grad, xr.grad, 1e-5)
    assert_rel(w.grad, wr.grad, 1e-5)


def test_loss_modules_match_functional():
    x = torch.randn(30, 6)
    W, b, t = torch.randn(4, 6), torch.randn(4), torch.randint(0, 4, (30,))
    cw = torch.rand(4)
    mod = ml.LinearCrossEntropyLoss(weight=cw, ignore_index=2, label_smoothing=0.05)
    assert_rel(mod(x, W, b, t), F.cross_entropy(F.linear(x, W, b), t, weight=cw, ignore_index=2,
                                                label_smoothing=0.05), 1e-5)
    w1, b1, y = torch.randn(1, 6), torch.randn(1), torch.rand(30)
    pw = torch.tensor([3.0])
    bce = ml.LinearBCEWithLogitsLoss(pos_weight=pw, reduction="sum")
    assert_rel(bce(x, w1, b1, y), nn.BCEWithLogitsLoss(pos_weight=pw, reduction="sum")(
        F.linear(x, w1, b1).squeeze(-1), y), 1e-5)


# ---- bad input --------------------------------------------------------------------------------
def test_errors():
    x, w1, W = torch.randn(8, 5), torch.randn(1, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"target must have shape \(8,\).*got \(7,\)"):
        MF.linear_binary_cross_entropy_with_logits(x, w1, None, torch.rand(7))
    with pytest.raises(ValueError, match=r"target must have shape \(8,\).*got \(8, 1\)"):
        MF.linear_cross_entropy(x, W, None, torch.zeros(8, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"probability targets must have shape \(8,\) \+ \(3,\)"):
        MF.linear_cross_entropy(x, W, None, torch.rand(8))
    with pytest.raises(TypeError, match=r"target must hold integer class indices or floating"):
        MF.linear_cross_entropy(x, W, None, torch.zeros(8, dtype=torch.bool))
    with pytest.raises((IndexError, RuntimeError), match=r"[Tt]arget 5 is out of bounds"):
        MF.linear_cross_entropy(x, W, None, torch.tensor([0, 1, 2, 5, 0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"pos_weight must be finite"):
        MF.linear_binary_cross_entropy_with_logits(x, w1, None, torch.rand(8),
                                                   pos_weight=torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match=r"pos_weight must have one element"):
        MF.linear_binary_cross_entropy_with_logits(x, w1, None, torch.rand(8),
                                                   pos_weight=torch.ones(3))
    with pytest.raises(TypeError, match=r"x and weight must have the same dtype"):
        MF.linear_cross_entropy(x, W.double(), None, torch.zeros(8, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"target is on meta but x is on cpu"):
        MF.linear_cross_entropy(x, W, None, torch.zeros(8, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"x has 4 features .*in_features=5"):
        ml.LogisticRegression(5).loss(torch.randn(8, 4), torch.rand(8))
    with pytest.raises(ValueError, match=r"class_weight must have shape \(3,\)"):
        MF.linear_cross_entropy(x, W, None, torch.zeros(8, dtype=torch.long),
                                class_weight=torch.ones(4))
    with pytest.raises(ValueError, match=r"reduction must be 'none', 'mean' or 'sum'"):
        MF.linear_cross_entropy(x, W, None, torch.zeros(8, dtype=torch.long), reduction="avg")


@pytest.mark.parametrize("device", DEVICES)
def test_ce_zero_mean_denominator(device):
    """Every non-ignored row's target class has weight 0, so the mean divides by zero: the loss
    is NaN as in torch. The gradients are zeros (CPU and CUDA alike), where torch's are NaN; the
    same zeros torch itself gives when every row is ignored. A documented deviation."""
    x = torch.randn(6, 4, device=device, requires_grad=True)
    W = torch.randn(3, 4, device=device, requires_grad=True)
    t = torch.tensor([0, 0, 1, 1, 0, -100], device=device)
    cw = torch.tensor([0.0, 0.0, 2.0], device=device)
    loss = MF.linear_cross_entropy(x, W, None, t, class_weight=cw, label_smoothing=0.1)
    ref = R.linear_cross_entropy(x, W, None, t, class_weight=cw, label_smoothing=0.1)
    assert torch.isnan(loss) and torch.isnan(ref)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(W.grad, torch.zeros_like(W))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_bias_gradient_of_reduction_none_is_accurate(device):
    """Issue #10: BCE bf16, D = 8193, reduction="none" (the GEMM path on CUDA): the bias
    gradient within 2x torch's own bf16 error (the residual is kept in fp32 until the sum)."""
    torch.manual_seed(7)
    N, D = 3000, 8193
    x = torch.randn(N, D, device=device, dtype=torch.bfloat16)
    w = (torch.randn(1, D, device=device) / D ** 0.5).bfloat16()
    b = torch.randn(1, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, 2, (N,), device=device).bfloat16()
    g = torch.randn(N, device=device, dtype=torch.bfloat16)
    ours = _grads(MF.linear_binary_cross_entropy_with_logits, x, w, b, y, g, reduction="none")
    same = _grads(R.linear_binary_cross_entropy_with_logits, x, w, b, y, g, reduction="none")
    exact = _grads(R.linear_binary_cross_entropy_with_logits, x.double(), w.double(), b.double(),
                   y.double(), g.double(), reduction="none")
    assert _rel_err(ours[3], exact[3]) <= max(2 * _rel_err(same[3], exact[3]), 1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_private_loss_ops_check_the_same_on_every_device(device):
    """The private loss kernels share one set of argument checks (csrc/checks.h): the same
    RuntimeError and message on the CPU and on CUDA."""
    x = torch.randn(6, 4, device=device)
    W, b = torch.randn(3, 4, device=device), torch.randn(3, device=device)
    w1, b1 = torch.randn(1, 4, device=device), torch.randn(1, device=device)
    t = torch.randint(0, 3, (6,), device=device)
    y = torch.rand(6, device=device)

    def ce(class_weight=None, label_smoothing=0.0, target=t):
        return ops._linear_ce_fwd(x, W, b, target, class_weight, -100, label_smoothing, 1,
                                  True, True, True)

    def bce(target=y, sample_weight=None):
        return ops._linear_bce_fwd(x, w1, b1, target, None, sample_weight, 1, True, True, True)

    for ls in (1.5, -0.5):
        with pytest.raises(RuntimeError, match=r"manual_layers._linear_ce_fwd: label_smoothing "
                                               rf"must be between 0.0 and 1.0, got {ls}"):
            ce(label_smoothing=ls)
    for cw in (torch.rand(1, 3, device=device), torch.rand(4, device=device)):
        with pytest.raises(RuntimeError, match=r"_linear_ce_fwd: class_weight must have shape "
                                               r"\(3,\)"):
            ce(class_weight=cw)
    with pytest.raises(RuntimeError, match=r"_linear_bce_fwd: target must be a floating tensor "
                                           r"of probabilities"):
        bce(target=torch.randint(0, 2, (6,), device=device))
    with pytest.raises(RuntimeError, match=r"_linear_bce_fwd: target must have shape \(6,\)"):
        bce(target=y[:, None])
    with pytest.raises(RuntimeError, match=r"_linear_bce_fwd: sample_weight must have shape "
                                           r"\(6,\)"):
        bce(sample_weight=torch.rand(6, 1, device=device))
    if device != "cpu":
        with pytest.raises(RuntimeError, match=r"class_weight is on cpu but x is on cuda"):
            ce(class_weight=torch.rand(3))
