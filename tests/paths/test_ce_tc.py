"""The tensor-core cross-entropy kernel (csrc/cuda/losses/ce_tc.cu, path 1c: 16-bit x, and fp32
x as 3xTF32; mean/sum, C <= 64, D % 8 == 0) against manual_layers.reference, and the path choice
that sends those shapes to it; then its sm_90a cluster instances (33 <= C <= 256, opt-in with
MANUAL_LAYERS_CE_CLUSTER=1) the same way. The kernel tests need a GPU (sm_80+; the cluster
tests sm_90 and a build with sm_90a code) and skip elsewhere (tests/cuda_emu/test_cuda_emu.py runs
the kernel's code in a host emulation there); the path-choice tests run anywhere on fake CUDA
tensors."""

import pytest
import torch

import manual_layers as ml
from conftest import CUDA, TOL
from test_ce_large import _compare, _grads, _problem

MF = ml.functional
ops = torch.ops.manual_layers
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

needs_tc = pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability()[0] < 8,
    reason="no CUDA GPU of sm_80 or newer visible: the tensor-core kernel is not exercised")


def _kernels(fn):
    """Names of the CUDA kernels fn() launches."""
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


def _ran_tc(x, w, b, t, **kw):
    names = _kernels(lambda: MF.linear_cross_entropy(x, w, b, t, **kw))
    return any("ce_tc_kernel" in n for n in names)


@needs_tc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("N,D,C", [
    (1, 8, 2),        # one row, one k-step: three of the four k-splits have nothing
    (33, 24, 10),     # a partial tile, D not a multiple of 16 (zero pad columns)
    (300, 1000, 3),   # D > 512: 16 column tiles per warp
    (1000, 512, 10),  # the shape at small N
    (95, 512, 17),    # CP = 32
    (64, 40, 32),     # every padded class used
    (129, 1024, 16),  # the largest D, CP = 16
    (100, 256, 64),   # CP = 64, its largest D
    (77, 200, 33),    # CP = 64, one class past 32
])
def test_matches_reference(dtype, reduction, N, D, C):
    """fp32 at full fp32 tolerance (3xTF32), for its shapes: D up to 512 (C <= 16), 256
    (C <= 32) or 128 (C <= 64)."""
    dmax = 512 if C <= 16 else (256 if C <= 32 else 128)
    if dtype == torch.float32 and D > dmax:
        D = dmax
    x, w, b, t = _problem(N, D, C, "cuda", dtype)
    assert _ran_tc(x, w, b, t, reduction=reduction)
    _compare(x, w, b, t, reduction, TOL[dtype])


@needs_tc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setting", ["weights", "smoothing", "both", "ignore_other", "big_weights"])
def test_options(dtype, setting):
    """Class weights, label smoothing and ignore_index in the kernel's row phase; big_weights:
    class weights up to 3e4, where fp16's residual must be scaled before its split."""
    _check_options(dtype, setting, 77, 64, 12, _ran_tc)


def _check_options(dtype, setting, N, D, C, ran):
    """One setting of test_options on an N x D problem with C classes; ran(x, w, b, t, **kw)
    asserts which kernel runs."""
    x, w, b, t = _problem(N, D, C, "cuda", dtype)
    kw = {}
    if setting in ("weights", "both"):
        kw["class_weight"] = (torch.rand(C, device="cuda") + 0.1).to(dtype)
    if setting == "big_weights":
        kw["class_weight"] = (torch.rand(C, device="cuda") * 3e4 + 1).to(dtype)
    if setting in ("smoothing", "both"):
        kw["label_smoothing"] = 0.15
    if setting == "ignore_other":
        t[1] = t[3] = 7
        kw["ignore_index"] = 7
    assert ran(x, w, b, t, **kw)
    # (with weights of 3e4 a summed fp16 loss overflows, in torch as here: mean only)
    for reduction in ("mean",) if setting == "big_weights" else ("mean", "sum"):
        _compare(x, w, b, t, reduction, TOL[dtype], **kw)


@needs_tc
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_tiles_per_block_deterministic(dtype, monkeypatch):
    """Enough rows that every block runs several tiles through its cp.async ring (and a last
    partial tile): bitwise the same twice, and close to the result with the kernel off."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    N, D, C = sms * 32 * 5 + 17, 512, 10
    x, w, b, t = _problem(N, D, C, "cuda", dtype)
    _check_repeat_and_other_path(x, w, b, t, _ran_tc, "MANUAL_LAYERS_CE_TC", monkeypatch)
    _compare(x, w, b, t, "mean", TOL[dtype])


def _check_repeat_and_other_path(x, w, b, t, ran, switch, monkeypatch):
    """ran(x, w, b, t) holds; the loss and gradients are bitwise the same twice; with the
    environment variable `switch` set to 0 that kernel no longer runs, and the other path's
    results are close (1e-2 relative)."""
    assert ran(x, w, b, t)
    first = _grads(MF.linear_cross_entropy, x, w, b, t, 1.0)
    second = _grads(MF.linear_cross_entropy, x, w, b, t, 1.0)
    for a, e in zip(first, second):
        assert torch.equal(a, e)
    monkeypatch.setenv(switch, "0")
    assert not ran(x, w, b, t)
    other = _grads(MF.linear_cross_entropy, x, w, b, t, 1.0)
    for name, a, e in zip(["loss", "grad_x", "grad_weight", "grad_bias"], first, other):
        err = ((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item()
        assert err < 1e-2, (name, err)


@needs_tc
def test_unaligned_x():
    """x starting 2 bytes past a 16-byte boundary (cp.async copies 16-byte pieces): copied
    once to an aligned buffer, same values."""
    N, D, C = 50, 64, 10
    buf = torch.randn(N * D + 1, device="cuda", dtype=torch.bfloat16)
    x = buf[1:].view(N, D)
    assert x.data_ptr() % 16 != 0
    _, w, b, t = _problem(N, D, C, "cuda", torch.bfloat16)
    assert _ran_tc(x, w, b, t)
    _compare(x, w, b, t, "mean", TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype,D,C,tc_env,single", [
    (torch.bfloat16, 512, 10, None, True),    # the tensor-core kernel's shape: single pass
    (torch.float16, 1024, 16, None, True),
    (torch.bfloat16, 512, 32, None, True),
    (torch.bfloat16, 256, 64, None, True),    # CP = 64
    (torch.float16, 264, 33, None, False),    # C > 32 with D > 256: chunked
    (torch.bfloat16, 256, 65, None, False),   # C > 64: chunked
    (torch.float32, 128, 64, None, True),
    (torch.float32, 256, 40, None, False),    # fp32 C > 32 past D 128: chunked
    (torch.bfloat16, 1024, 17, None, False),  # C > 16 with D > 512: chunked
    (torch.bfloat16, 516, 10, None, False),   # D % 8 != 0: chunked
    (torch.float32, 512, 10, None, True),     # fp32 as 3xTF32
    (torch.float32, 1024, 10, None, False),   # fp32 past its D: chunked
    (torch.float64, 512, 10, None, False),    # fp64: chunked
    (torch.bfloat16, 512, 10, "0", False),    # MANUAL_LAYERS_CE_TC=0: chunked
])
def test_cuda_path_choice(dtype, D, C, tc_env, single, monkeypatch):
    """On fake CUDA tensors (only the dispatch runs, no GPU needed), x of 64 MiB, mean: shapes
    the tensor-core kernel covers stay on the single-pass op at every size; the rest take the
    chunked path from 32 MiB (csrc/policy/ce_path.cpp, ce_use_chunked)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from test_ce_large import _ce_ops_run
    monkeypatch.delenv("MANUAL_LAYERS_CE_PATH", raising=False)
    if tc_env is None:
        monkeypatch.delenv("MANUAL_LAYERS_CE_TC", raising=False)
    else:
        monkeypatch.setenv("MANUAL_LAYERS_CE_TC", tc_env)
    rows = (64 << 20) // (D * dtype.itemsize)
    mode = FakeTensorMode()
    xc = mode.from_tensor(torch.empty(rows, D, dtype=dtype))
    tc = mode.from_tensor(torch.empty(rows, dtype=torch.long))
    with mode:
        x, t = xc.to("cuda").requires_grad_(), tc.to("cuda")
        w = torch.empty(C, D, dtype=dtype, device="cuda", requires_grad=True)
        names = _ce_ops_run(lambda: ops.linear_ce(x, w, None, t, None, -100, 0.0, 1))
    want = "manual_layers::_linear_ce_fwd" if single else "manual_layers::_linear_ce_chunked_fwd"
    assert names == {want}


# ---------------------------------------------------------------------------------------------
# The cluster instances (sm_90a, opt-in: MANUAL_LAYERS_CE_CLUSTER=1): 33 <= C <= 256, D % 8 == 0
# up to 512 (fp32 256), ceil(C / 32) blocks per cluster, X multicast to all of them.
# ---------------------------------------------------------------------------------------------

def _cluster_built():
    return "9.0a" in (ml.utils.info().get("cuda_archs") or "")


needs_cluster = pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability() != (9, 0) or not _cluster_built(),
    reason="no sm_90 GPU, or a build without sm_90a code: the cluster kernels are not exercised")


def _ran_cluster(x, w, b, t, **kw):
    names = _kernels(lambda: MF.linear_cross_entropy(x, w, b, t, **kw))
    return any("ce_tc_kernel" in n and "true>" in n for n in names)


CLUSTER_SHAPES = [
    (1, 8, 33),        # one row; 2 blocks, the second with one class
    (33, 264, 33),     # D past the one-block kernel's 256
    (77, 40, 65),      # 3 blocks
    (300, 64, 100),    # 4 blocks, the last with 4 classes
    (1000, 512, 128),  # the C = 128, D = 512
    (129, 512, 255),   # 8 blocks, the largest D
    (100, 512, 256),   # the largest C
]


@needs_cluster
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("N,D,C", CLUSTER_SHAPES)
def test_cluster_matches_reference(dtype, reduction, N, D, C, monkeypatch):
    """fp32 (3xTF32) at fp32 tolerance, its D capped at 256."""
    monkeypatch.setenv("MANUAL_LAYERS_CE_CLUSTER", "1")
    if dtype == torch.float32:
        D = min(D, 256)
    x, w, b, t = _problem(N, D, C, "cuda", dtype)
    assert _ran_cluster(x, w, b, t, reduction=reduction)
    _compare(x, w, b, t, reduction, TOL[dtype])


@needs_cluster
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setting", ["weights", "smoothing", "both", "ignore_other", "big_weights"])
def test_cluster_options(dtype, setting, monkeypatch):
    """Class weights, label smoothing (the per-block sums combined across the cluster) and
    ignore_index; big_weights: fp16's residual scaled before its split."""
    monkeypatch.setenv("MANUAL_LAYERS_CE_CLUSTER", "1")
    _check_options(dtype, setting, 300, 128, 150, _ran_cluster)


@needs_cluster
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cluster_many_tiles_deterministic(dtype, monkeypatch):
    """Several tiles per cluster through the bulk-copy ring (and a partial last tile): bitwise
    the same twice, and close to the chunked GEMM path."""
    monkeypatch.setenv("MANUAL_LAYERS_CE_CLUSTER", "1")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    C, D = 128, 512 if dtype != torch.float32 else 256
    N = sms * 32 * 3 + 17
    x, w, b, t = _problem(N, D, C, "cuda", dtype)
    _check_repeat_and_other_path(x, w, b, t, _ran_cluster, "MANUAL_LAYERS_CE_CLUSTER",
                                 monkeypatch)


@needs_cluster
def test_cluster_off_by_default(monkeypatch):
    monkeypatch.delenv("MANUAL_LAYERS_CE_CLUSTER", raising=False)
    x, w, b, t = _problem(500, 512, 128, "cuda", torch.bfloat16)
    assert not _ran_cluster(x, w, b, t)


@pytest.mark.parametrize("dtype,D,C", [
    (torch.bfloat16, 512, 128),   # the shape
    (torch.float16, 264, 33),     # 2 blocks
    (torch.float32, 256, 256),    # fp32's largest
])
def test_cluster_path_choice(dtype, D, C, monkeypatch):
    """MANUAL_LAYERS_CE_CLUSTER=1 keeps these shapes on the single-pass op only where the
    cluster instances run (an sm_90 GPU and sm_90a code in the build); elsewhere, as here
    without a GPU (fake CUDA tensors), the chunked path as before, without touching a device."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from test_ce_large import _ce_ops_run
    monkeypatch.delenv("MANUAL_LAYERS_CE_PATH", raising=False)
    monkeypatch.delenv("MANUAL_LAYERS_CE_TC", raising=False)
    monkeypatch.setenv("MANUAL_LAYERS_CE_CLUSTER", "1")
    rows = (64 << 20) // (D * dtype.itemsize)
    mode = FakeTensorMode()
    xc = mode.from_tensor(torch.empty(rows, D, dtype=dtype))
    tc = mode.from_tensor(torch.empty(rows, dtype=torch.long))
    with mode:
        x, t = xc.to("cuda").requires_grad_(), tc.to("cuda")
        w = torch.empty(C, D, dtype=dtype, device="cuda", requires_grad=True)
        names = _ce_ops_run(lambda: ops.linear_ce(x, w, None, t, None, -100, 0.0, 1))
    single = CUDA and torch.cuda.get_device_capability() == (9, 0) and _cluster_built()
    want = "manual_layers::_linear_ce_fwd" if single else "manual_layers::_linear_ce_chunked_fwd"
    assert names == {want}
