"""The chunked linear + cross entropy with probability targets (soft labels), the kernel ops
_linear_ce_soft_fwd / _linear_ce_soft_bwd (csrc/generic/ce_soft.cpp), against the torch composition
F.cross_entropy(F.linear(x, W, b), q, weight=class_weight, label_smoothing=eps, reduction=r)
and its autograd gradients, computed in float64: values and gradients for every reduction and
option, odd shapes, empty batches, chunk boundaries inside small batches, non-contiguous and
mixed-dtype inputs, the errors, opcheck, bitwise determinism over thread counts, and the ATen
row pass that CUDA runs (exercised here on CPU tensors through MANUAL_LAYERS_CE_SOFT_ROWS=aten).

mean/sum gradients come from the forward op (for grad_output 1), reduction none's from the
backward op with a random grad_loss, as the op contract says (csrc/generic/ce_chunked.cpp)."""

import pytest
import torch
import torch.nn.functional as F

import manual_layers  # noqa: F401  (loads the ops)
from conftest import TOL, assert_rel

ops = torch.ops.manual_layers
RED = {"none": 0, "mean": 1, "sum": 2}
LOW = (torch.bfloat16, torch.float16)


@pytest.fixture
def chunk_rows(monkeypatch):
    """Set the chunk size in rows (MANUAL_LAYERS_CE_CHUNK_ROWS, read by the kernel per call)."""
    def set_rows(r):
        monkeypatch.setenv("MANUAL_LAYERS_CE_CHUNK_ROWS", str(r))
    return set_rows


@pytest.fixture(params=["kernel", "aten"])
def row_pass(request, monkeypatch):
    """Both row passes on CPU tensors: the per-ISA kernel, and the ATen composition that CUDA
    tensors take (MANUAL_LAYERS_CE_SOFT_ROWS=aten, read per call)."""
    if request.param == "aten":
        monkeypatch.setenv("MANUAL_LAYERS_CE_SOFT_ROWS", "aten")
    else:
        monkeypatch.delenv("MANUAL_LAYERS_CE_SOFT_ROWS", raising=False)
    return request.param


def make_target(N, C, kind, dtype):
    if kind == "probs":
        return torch.randn(N, C, dtype=torch.float64).mul(2).softmax(1).to(dtype)
    return (torch.randn(N, C, dtype=torch.float64) * 1.5).to(dtype)  # any real values


def problem(N, D, C, dtype, kind="probs", bias=True, weights=False, tdtype=None):
    x = torch.randn(N, D, dtype=dtype)
    w = (torch.randn(C, D, dtype=torch.float64) * 2 / max(D, 1) ** 0.5).to(dtype)
    b = torch.randn(C, dtype=dtype) if bias else None
    q = make_target(N, C, kind, tdtype or dtype)
    cw = (torch.rand(C, dtype=torch.float64) + 0.2).to(dtype) if weights else None
    return x, w, b, q, cw


def torch_ref(x, w, b, q, cw, eps, reduction, g):
    """The torch composition in float64 and its autograd gradients (x, w, b) for grad_output g
    (a scalar for mean/sum, (N,) for none)."""
    d = lambda t: None if t is None else t.detach().double()
    xs, ws = d(x).requires_grad_(), d(w).requires_grad_()
    bs = d(b).requires_grad_() if b is not None else None
    loss = F.cross_entropy(F.linear(xs, ws, bs), d(q), weight=d(cw), label_smoothing=eps,
                           reduction=reduction)
    params = [xs, ws] + ([bs] if bs is not None else [])
    if x.shape[0] == 0:
        return [loss.detach()] + [p.detach() * 0 for p in params]
    grads = torch.autograd.grad(loss, params,
                                torch.as_tensor(g, dtype=torch.float64).expand_as(loss))
    return [loss.detach()] + list(grads)


def ours(x, w, b, q, cw, eps, reduction, g):
    """Loss and (gx, gw, gb) from the ops: mean/sum from the forward op (grad_output 1, times g),
    none from the backward op with grad_loss g."""
    red = RED[reduction]
    loss, gw, gb, gx = ops._linear_ce_soft_fwd(x, w, b, q, cw, eps, red, True, True, b is not None)
    if reduction == "none":
        assert gw.numel() == gb.numel() == gx.numel() == 0
        gx, gw, gb = ops._linear_ce_soft_bwd(g, x, w, b, q, cw, eps, True, True, b is not None)
    else:
        gx, gw, gb = gx.double() * g, gw.double() * g, gb.double() * g
    return [loss, gx, gw] + ([gb] if b is not None else [])


def low_precision_bar(x, w, b, q, cw, eps, reduction, g, ref, tol):
    """16-bit: the larger of tol and 1.5x the error of torch's own composition run in x's dtype
    (its 16-bit log_softmax), each output against the float64 reference."""
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    bs = b.clone().requires_grad_() if b is not None else None
    loss = F.cross_entropy(F.linear(xs, ws, bs), q.to(x.dtype), weight=cw,
                           label_smoothing=eps, reduction=reduction)
    params = [xs, ws] + ([bs] if bs is not None else [])
    gs = torch.autograd.grad(loss, params, torch.as_tensor(g, dtype=x.dtype).expand_as(loss))
    bars = []
    for a, e in zip([loss] + list(gs), ref):
        a, e = a.detach().double(), e.double()
        err = ((a - e).norm() / e.norm().clamp_min(1e-30)).item() if e.numel() else 0.0
        bars.append(max(tol, 1.5 * err))
    return bars


def check(x, w, b, q, cw, eps, reduction, tol=None):
    N = x.shape[0]
    g = torch.randn(N, dtype=x.dtype) if reduction == "none" else 1.7
    got = ours(x, w, b, q, cw, eps, reduction, g)
    ref = torch_ref(x, w, b, q, cw, eps, reduction, g)
    tol = tol or TOL[x.dtype]
    bars = (low_precision_bar(x, w, b, q, cw, eps, reduction, g, ref, tol) if x.dtype in LOW
            else [tol] * len(ref))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert got[0].dtype == acc
    if reduction == "none":
        for t in got[1:]:
            assert t.dtype == x.dtype
    else:
        assert got[0].dim() == 0
    if reduction != "none" and N:
        # A sum of per-row losses of both signs (real-valued targets) can cancel to far below
        # its terms: its error is measured on the scale of the terms, sum (or mean) |loss_i|.
        rows = torch_ref(x, w, b, q, cw, eps, "none", torch.ones(N))[0].abs()
        scale = max(ref[0].abs().item(),
                    (rows.mean() if reduction == "mean" else rows.sum()).item(), 1e-30)
        err = abs(got[0].item() - ref[0].item()) / scale
        assert err <= bars[0], f"loss ({reduction}, {x.dtype}): relative error {err:.3g}"
        got, ref, bars = got[1:], ref[1:], bars[1:]
        names = ["grad_x", "grad_weight", "grad_bias"]
    else:
        names = ["loss", "grad_x", "grad_weight", "grad_bias"]
    for name, a, e, bar in zip(names, got, ref, bars):
        assert_rel(a, e, bar, f"{name} ({reduction}, {x.dtype})")


# ---- values and gradients ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["probs", "reals"])
def test_matches_torch(dtype, reduction, weights, eps, bias, kind, row_pass, chunk_rows):
    chunk_rows(6)  # 23 rows: chunks of 6, 6, 6, 5
    x, w, b, q, cw = problem(23, 19, 37, dtype, kind, bias, weights)
    check(x, w, b, q, cw, eps, reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 3, 17, 1000])
@pytest.mark.parametrize("C", [1, 2, 7, 130])
@pytest.mark.parametrize("D", [1, 5, 64])
def test_odd_shapes(dtype, N, C, D):
    """Default chunk size; C = 1 (log_softmax 0: loss and gradients 0), vector tails (C 7, 130)."""
    x, w, b, q, cw = problem(N, D, C, dtype, "probs", True, True)
    for reduction in ("mean", "sum", "none"):
        check(x, w, b, q, cw, 0.1, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [130, 1000])
def test_large_rows_16bit_and_fp32(dtype, C, row_pass, chunk_rows):
    """A batch of 1000 rows over a few chunks, with every option."""
    chunk_rows(300)
    x, w, b, q, cw = problem(1000, 64, C, dtype, "probs", True, True)
    for reduction in ("mean", "sum", "none"):
        check(x, w, b, q, cw, 0.1, reduction)


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 100])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunk_boundaries(rows, reduction, row_pass, chunk_rows):
    """Chunks of 1 row up to more rows than N, in float64 (tight)."""
    chunk_rows(rows)
    x, w, b, q, cw = problem(17, 5, 7, torch.float64, "reals", True, True)
    check(x, w, b, q, cw, 0.1, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction, row_pass):
    x, w, b, q, cw = problem(0, 5, 7, torch.float32, "probs", True, True)
    loss, gw, gb, gx = ops._linear_ce_soft_fwd(x, w, b, q, cw, 0.1, RED[reduction], True, True,
                                               True)
    ref = F.cross_entropy(F.linear(x, w, b), q, weight=cw, label_smoothing=0.1,
                          reduction=reduction)
    assert loss.shape == ref.shape
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref)
    elif reduction == "sum":
        assert loss.item() == 0 and ref.item() == 0
        assert torch.all(gw == 0) and torch.all(gb == 0) and gx.shape == (0, 5)
    if reduction != "none":
        assert gw.shape == (7, 5) and torch.all(gw == 0) and torch.all(gb == 0)
        assert gx.shape == (0, 5)
    gx, gw, gb = ops._linear_ce_soft_bwd(torch.zeros(0), x, w, b, q, cw, 0.1, True, True, True)
    assert gx.shape == (0, 5) and torch.all(gw == 0) and torch.all(gb == 0)


def test_need_flags():
    """Only the gradients asked for are computed; the others are empty (0,) tensors of the
    contract's dtype."""
    x, w, b, q, cw = problem(9, 5, 7, torch.bfloat16, "probs", True, False)
    full = ops._linear_ce_soft_fwd(x, w, b, q, cw, 0.0, 1, True, True, True)
    for flags in [(False, False, False), (True, False, False), (False, True, False),
                  (False, False, True)]:
        loss, gw, gb, gx = ops._linear_ce_soft_fwd(x, w, b, q, cw, 0.0, 1, *flags)
        assert torch.equal(loss, full[0])
        for t, want, f, dt in ((gx, full[3], flags[0], torch.bfloat16),
                               (gw, full[1], flags[1], torch.float32),
                               (gb, full[2], flags[2], torch.float32)):
            assert t.dtype == dt
            assert torch.equal(t, want) if f else t.shape == (0,)
        g = torch.randn(9)
        bw = ops._linear_ce_soft_bwd(g, x, w, b, q, cw, 0.0, *flags)
        for t, f in zip(bw, flags):
            assert t.dtype == torch.bfloat16 and (t.numel() > 0) == f


def test_non_contiguous_and_mixed_dtypes(row_pass, chunk_rows):
    """Strided x and target, and target dtypes other than x's: float64 targets with float32 x,
    float32 targets with bf16 x (read in acc_t), bf16 targets with bf16 x."""
    chunk_rows(4)
    N, D, C = 11, 6, 9
    xb = torch.randn(D, 2 * N, dtype=torch.float32)
    x = xb.t()[::2]  # (N, D), strided rows and columns
    qb = make_target(N, 2 * C, "probs", torch.float64)
    q = qb[:, ::2]  # (N, C), every other column
    w = torch.randn(C, D) / D ** 0.5
    b = torch.randn(C)
    cw = torch.rand(C) + 0.2
    assert not x.is_contiguous() and not q.is_contiguous()
    for reduction in ("mean", "sum", "none"):
        check(x, w, b, q, cw, 0.1, reduction)
    xb16, wb16, bb16 = x.bfloat16(), w.bfloat16(), b.bfloat16()
    for tdt in (torch.float32, torch.bfloat16, torch.float16):
        for reduction in ("mean", "none"):
            check(xb16, wb16, bb16, q.to(tdt), cw.bfloat16(), 0.1, reduction)


def test_negative_label_smoothing_is_none():
    """torch applies label smoothing only when it is positive (a negative value is no
    smoothing, not an error); the ops do the same."""
    x, w, b, q, cw = problem(7, 5, 4, torch.float64, "probs", True, True)
    for reduction in ("mean", "none"):
        a = ops._linear_ce_soft_fwd(x, w, b, q, cw, -0.3, RED[reduction], True, True, True)
        e = ops._linear_ce_soft_fwd(x, w, b, q, cw, 0.0, RED[reduction], True, True, True)
        for s, t in zip(a, e):
            assert torch.equal(s, t)
        check(x, w, b, q, cw, -0.3, reduction)


def test_kernel_and_aten_row_pass_agree(monkeypatch, chunk_rows):
    """The two row passes compute the same thing: fp32 to 1e-6 on every output."""
    chunk_rows(64)
    x, w, b, q, cw = problem(200, 32, 130, torch.float32, "reals", True, True)
    g = torch.randn(200)
    outs = []
    for mode in (None, "aten"):
        if mode:
            monkeypatch.setenv("MANUAL_LAYERS_CE_SOFT_ROWS", mode)
        outs.append(list(ops._linear_ce_soft_fwd(x, w, b, q, cw, 0.1, 1, True, True, True))
                    + list(ops._linear_ce_soft_fwd(x, w, b, q, cw, 0.1, 0, True, True, True)[:1])
                    + list(ops._linear_ce_soft_bwd(g, x, w, b, q, cw, 0.1, True, True, True)))
    for a, e in zip(*outs):
        assert_rel(a, e, 1e-6, "kernel vs aten")


# ---- errors ------------------------------------------------------------------------------------
def test_errors():
    x, w, b, q, cw = problem(5, 4, 3, torch.float32)
    fwd = ops._linear_ce_soft_fwd
    with pytest.raises(RuntimeError,
                       match=r"target of class probabilities must have shape \(5, 3\)"):
        fwd(x, w, b, q[:, :2], cw, 0.0, 1, True, True, True)
    with pytest.raises(RuntimeError, match=r"target of class probabilities must have shape"):
        fwd(x, w, b, q[:, 0], cw, 0.0, 1, True, True, True)
    with pytest.raises(RuntimeError, match="target of class probabilities must be floating"):
        fwd(x, w, b, q.long(), cw, 0.0, 1, True, True, True)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0.0 and 1.0, got 1.5"):
        fwd(x, w, b, q, cw, 1.5, 1, True, True, True)
    with pytest.raises(RuntimeError, match=r"class_weight must have shape \(3,\)"):
        fwd(x, w, b, q, torch.ones(4), 0.0, 1, True, True, True)
    with pytest.raises(RuntimeError, match="x has 4 features but weight has in_features 3"):
        fwd(x, w[:, :3], b, q, cw, 0.0, 1, True, True, True)
    with pytest.raises(ValueError, match="reduction code must be 0"):
        fwd(x, w, b, q, cw, 0.0, 3, True, True, True)
    with pytest.raises(RuntimeError, match="grad_loss must have 5 elements"):
        ops._linear_ce_soft_bwd(torch.ones(4), x, w, b, q, cw, 0.0, True, True, True)


# ---- op registration, determinism ---------------------------------------------------------------
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(reduction, row_pass, chunk_rows):
    chunk_rows(3)
    x, w, b, q, cw = problem(7, 5, 11, torch.float32, "probs", True, True)
    torch.library.opcheck(ops._linear_ce_soft_fwd, (x, w, b, q, cw, 0.1, reduction, True, True,
                                                    True))
    torch.library.opcheck(ops._linear_ce_soft_fwd, (x, w, None, q.double(), None, 0.0, reduction,
                                                    False, True, False))
    g = torch.randn(7)
    torch.library.opcheck(ops._linear_ce_soft_bwd, (g, x, w, b, q, cw, 0.1, True, True, True))
    torch.library.opcheck(ops._linear_ce_soft_bwd, (g, x.bfloat16(), w.bfloat16(), None,
                                                    q.bfloat16(), None, 0.0, True, False, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_bitwise_over_threads(dtype, row_pass, chunk_rows):
    """The same bits with 1 and 2 threads, and from run to run: the row pass's bias gradient
    is summed per fixed block of rows (kernel) or by ATen's fixed-shape sums (aten)."""
    chunk_rows(128)
    x, w, b, q, cw = problem(500, 64, 130, dtype, "probs", True, True)
    g = torch.randn(500)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            runs.append(list(ops._linear_ce_soft_fwd(x, w, b, q, cw, 0.1, 1, True, True, True))
                        + list(ops._linear_ce_soft_fwd(x, w, b, q, cw, 0.1, 0, False, False,
                                                       False)[:1])
                        + list(ops._linear_ce_soft_bwd(g, x, w, b, q, cw, 0.1, True, True, True)))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for a, e in zip(run, runs[0]):
            assert torch.equal(a, e)


# ---- every compiled CPU level ------------------------------------------------------------------
ISA_CHILD = r"""
import sys, torch
import manual_layers as ml
ops = torch.ops.manual_layers
inputs = torch.load(sys.argv[1])
out = {"isa": ml.utils.cpu_kernels_isa()}
for key, (x, w, b, q, cw, g) in inputs.items():
    fwd = ops._linear_ce_soft_fwd(x, w, b, q, cw, 0.1, 1, True, True, True)
    none = ops._linear_ce_soft_fwd(x, w, b, q, cw, 0.1, 0, False, False, False)[0]
    bwd = ops._linear_ce_soft_bwd(g, x, w, b, q, cw, 0.1, True, True, True)
    out[key] = list(fwd) + [none] + list(bwd)
torch.save(out, sys.argv[2])
"""


def test_every_cpu_level(tmp_path):
    """The row pass is compiled per ISA (csrc/cpu/kernels/ce_rows.cpp): each level this CPU runs, forced
    with MANUAL_LAYERS_CPU_ISA in a fresh process, matches the torch composition (C = 130 and 7:
    vector tails at every width; 16-bit targets widened per row)."""
    import os
    import subprocess
    import sys
    from isa_levels import RUNNABLE, ROOT
    inputs = {}
    for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for C in (7, 130):
            x, w, b, q, cw = problem(45, 21, C, dt, "reals", True, True)
            inputs[f"{dt}-{C}"] = (x, w, b, q, cw, torch.randn(45, dtype=dt))
    path = str(tmp_path / "in.pt")
    torch.save(inputs, path)
    results = {}
    for isa in RUNNABLE:
        env = {k: v for k, v in os.environ.items()
               if k not in ("ATEN_CPU_CAPABILITY", "MANUAL_LAYERS_CE_SOFT_ROWS")}
        env["MANUAL_LAYERS_CPU_ISA"] = isa.lower()
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        out = str(tmp_path / f"{isa}.pt")
        p = subprocess.run([sys.executable, "-c", ISA_CHILD, path, out], env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        results[isa] = torch.load(out)
        assert results[isa]["isa"] == isa
    for key, (x, w, b, q, cw, g) in inputs.items():
        mean = torch_ref(x, w, b, q, cw, 0.1, "mean", 1.0)
        none = torch_ref(x, w, b, q, cw, 0.1, "none", g)
        tol = 2e-2 if x.dtype in LOW else TOL[x.dtype]
        for isa, res in results.items():
            loss, gw, gb, gx, rows, bx, bw, bb = res[key]
            for name, a, e in (("loss", loss, mean[0]), ("gx", gx, mean[1]),
                               ("gw", gw, mean[2]), ("gb", gb, mean[3]), ("rows", rows, none[0]),
                               ("bwd gx", bx, none[1]), ("bwd gw", bw, none[2]),
                               ("bwd gb", bb, none[3])):
                assert_rel(a, e, tol, f"{isa} {key} {name}")
