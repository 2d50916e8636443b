"""The sm_90 CUTLASS kernels (csrc/cuda/experimental/linear_sm90.h) that MANUAL_LAYERS_CUTLASS=1 turns on
for bf16 / fp16 on an H100 / H200: Linear + GELU / SiLU with the activation in the GEMM's
epilogue, and the MLP backward's dgrad with the activation gradient and the first bias
gradient in its epilogue. On any machine: the build wiring, and the arguments the launch code
gives CUTLASS (strides and can_implement, checked on the host by tests/cuda_emu/sm90_args.cu).
On such a GPU: the kernels' outputs (on NaN-poisoned memory), gradients, fallbacks and
determinism against the float64 reference. The whole Linear and MLP suites also run with the switch on in
benchmarks/gpu_session.sh (stage tests_cutlass)."""

import copy
import glob
import importlib.util
import os
import shutil
import subprocess

import pytest
import torch

import manual_layers as ml
from manual_layers import reference as R
from manual_layers._ops import BUILD_INFO
from conftest import TOL, assert_rel

ops = torch.ops.manual_layers


def _sm90_gpu():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_sm90 = pytest.mark.skipif(
    not (_sm90_gpu() and BUILD_INFO.get("cutlass_sm90", False)),
    reason="needs an sm_90 GPU (H100 / H200) and a build with the CUTLASS sm_90 kernels")


def test_build_has_the_sm90_kernels_where_cutlass_is_installed():
    """setup.py's wiring: the sm_90 CUTLASS kernels and the cluster cross entropy are experimental
    (never run on a GPU) and built only with MANUAL_LAYERS_CUDA_EXPERIMENTAL=1; such a build for
    9.0 compiles it as 9.0a and includes the CUTLASS kernels where CUTLASS's headers are installed
    (make's venv installs nvidia-cutlass). Without the switch neither is built."""
    info = ml.utils.info()
    assert info["cuda_sm90_cutlass_kernels"] is BUILD_INFO["cutlass_sm90"]
    assert info["cuda_ce_cluster_kernels"] is BUILD_INFO["ce_cluster_sm90a"]
    if not BUILD_INFO["cuda_compiled"]:
        assert BUILD_INFO["cutlass_sm90"] is False and BUILD_INFO["ce_cluster_sm90a"] is False
        assert BUILD_INFO["cuda_why"]  # the build says why it left CUDA out
        pytest.skip("CPU-only build")
    archs = BUILD_INFO["cuda_archs"].split(";")
    if not BUILD_INFO["experimental_why"].startswith("ON"):
        assert "9.0a" not in archs
        assert BUILD_INFO["cutlass_sm90"] is False and BUILD_INFO["ce_cluster_sm90a"] is False
        return
    assert "9.0" not in archs, "a plain 9.0 entry should have been compiled as 9.0a"
    assert BUILD_INFO["ce_cluster_sm90a"] is ("9.0a" in archs)
    if importlib.util.find_spec("cutlass_library") is None:
        pytest.skip("nvidia-cutlass is not installed here")
    assert BUILD_INFO["cutlass_sm90"] is ("9.0a" in archs)


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cutlass_include():
    roots = [os.environ["CUTLASS_PATH"]] if os.environ.get("CUTLASS_PATH") else []
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        roots += [os.path.join(p, "source") for p in spec.submodule_search_locations]
    for r in roots:
        if os.path.isfile(os.path.join(r, "include", "cutlass", "cutlass.h")):
            return [os.path.join(r, "include"), os.path.join(r, "tools", "util", "include")]
    return None


@pytest.mark.slow  # a minute or more of nvcc compiling CUTLASS's headers
def test_cutlass_argument_layouts(tmp_path):
    """tests/cuda_emu/sm90_args.cu, built with nvcc and run on the host: the strides the
    kernels' launch code gives CUTLASS put element (i, j) of x, w, out, pre (forward) and of
    w2, g, G, saved (the MLP's transposed dgrad) where the ops' row-major tensors hold it, the
    bias gradient runs along the hidden dimension, and CUTLASS's can_implement accepts the
    shapes the ops send (rejects rows that are not whole 16-byte vectors). Instantiates no
    kernel: no GPU needed, and an injected layout swap fails it."""
    nvcc, cutlass_inc = _nvcc(), _cutlass_include()
    if nvcc is None or cutlass_inc is None:
        pytest.skip("needs nvcc and CUTLASS's headers (pip install --no-deps nvidia-cutlass)")
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    tlib = os.path.join(os.path.dirname(torch.__file__), "lib")
    site = os.path.dirname(os.path.dirname(torch.__file__))
    wheel_inc = [d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                 if os.path.isfile(os.path.join(d, "cublasLt.h"))]
    exe = str(tmp_path / "sm90_args")
    cmd = [nvcc, "-std=c++20", "-O1", "--expt-relaxed-constexpr", "-DML_WITH_CUTLASS_SM90",
           "-DWITH_CUDA", "-gencode", "arch=compute_90a,code=sm_90a",
           os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_emu",
                        "sm90_args.cu"),
           "-o", exe, "-I" + tinc, "-I" + os.path.join(tinc, "torch", "csrc", "api", "include"),
           "-L" + tlib, "-Xlinker", "-rpath=" + tlib, "-lc10"]
    cmd += ["-I" + d for d in cutlass_inc + wheel_inc]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "build failed:\n" + r.stderr[-4000:]
    r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), r.stdout + r.stderr


def _kernels(fn):
    """The CUDA kernel names fn launches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


def _fwd(x, w, b, act, save_pre):
    return ops._linear_fwd(x, w, b, act, save_pre)


# (rows, in_features, out_features): one row; odd row counts; K not a multiple of the 64-wide
# K tile; out_features not a multiple of the 256-wide N tile; several tiles and clusters.
SHAPES = [(1, 8, 8), (37, 24, 264), (300, 1000, 1000), (2053, 64, 520), (4099, 512, 1024)]


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_writes_every_output_and_pre_activation(monkeypatch, dtype, act, bias, shape):
    monkeypatch.setenv("MANUAL_LAYERS_CUTLASS", "1")
    n, k, m = shape
    x = torch.randn(n, k, device="cuda", dtype=dtype)
    w = (torch.randn(m, k, device="cuda", dtype=dtype) / k ** 0.5).to(dtype)
    b = torch.randn(m, device="cuda", dtype=dtype) if bias else None
    for save_pre in (True, False):
        names = _kernels(lambda: _fwd(x, w, b, act, save_pre))
        assert any("cutlass" in s for s in names), names
        out, pre = _fwd(x, w, b, act, save_pre)  # outputs on NaN-poisoned memory (conftest)
        z = x.double() @ w.double().t() + (b.double() if bias else 0)
        ref = R.linear(x.double(), w.double(), b.double() if bias else None, act)
        assert_rel(out, ref, TOL[dtype], f"{act} {dtype} out")
        if save_pre:
            # pre is z rounded once to the dtype: within half an ulp of 16 bits plus the fp32
            # accumulation error.
            assert_rel(pre, z, 4e-3, f"{act} {dtype} pre")
            # out = act(z) in fp32 before rounding, so act(pre) agrees to the dtype's rounding.
            assert_rel(out, R.ACTIVATIONS[act](pre.double()), TOL[dtype],
                       f"{act} {dtype} out vs act(pre)")
        else:
            assert pre.numel() == 0


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_gradients_and_nn_module_match_the_reference(monkeypatch, dtype, act):
    monkeypatch.setenv("MANUAL_LAYERS_CUTLASS", "1")
    layer = ml.Linear(1024, 520, activation=act, device="cuda", dtype=dtype)
    x = torch.randn(3, 700, 1024, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    xd = x.detach().double().requires_grad_()
    wd = layer.weight.detach().double().requires_grad_()
    bd = layer.bias.detach().double().requires_grad_()
    yd = R.linear(xd, wd, bd, act)
    yd.backward(g.double())
    for name, a, e in (("out", y, yd), ("grad_x", x.grad, xd.grad),
                       ("grad_weight", layer.weight.grad, wd.grad),
                       ("grad_bias", layer.bias.grad, bd.grad)):
        assert_rel(a, e, TOL[dtype], f"{act} {dtype} {name}")


@needs_sm90
@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_same_result_as_the_two_pass_path_and_deterministic(monkeypatch, act):
    """The CUTLASS path and the default (cuBLASLt GEMM + activation kernel) agree to bf16
    rounding, and the CUTLASS path repeats bit for bit."""
    x = torch.randn(2000, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1536, 768, device="cuda", dtype=torch.bfloat16) / 28
    b = torch.randn(1536, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("MANUAL_LAYERS_CUTLASS", "0")
    out0, pre0 = _fwd(x, w, b, act, True)
    monkeypatch.setenv("MANUAL_LAYERS_CUTLASS", "1")
    out1, pre1 = _fwd(x, w, b, act, True)
    out2, pre2 = _fwd(x, w, b, act, True)
    assert torch.equal(out1, out2) and torch.equal(pre1, pre2)
    assert_rel(pre1, pre0, 4e-3, "pre")
    assert_rel(out1, out0, 1e-2, "out")


@needs_sm90
def test_unaligned_or_odd_problems_take_the_other_path(monkeypatch):
    """K or out_features not a multiple of 8, or x not 16-byte aligned: no CUTLASS launch, and
    the result is still right (the cuBLASLt path)."""
    monkeypatch.setenv("MANUAL_LAYERS_CUTLASS", "1")
    dt = torch.bfloat16
    base = torch.randn(64 * 33 + 1, device="cuda", dtype=dt)
    cases = [
        (torch.randn(50, 20, device="cuda", dtype=dt), 64),   # K % 8 != 0
        (torch.randn(50, 64, device="cuda", dtype=dt), 17),   # out_features % 8 != 0
        (base[1:].view(33, 64), 64),                           # x 2 bytes past alignment
    ]
    for x, m in cases:
        w = torch.randn(m, x.shape[1], device="cuda", dtype=dt) / 8
        b = torch.randn(m, device="cuda", dtype=dt)
        names = _kernels(lambda: _fwd(x, w, b, "gelu", True))
        assert not any("cutlass" in s for s in names), names
        out, pre = _fwd(x, w, b, "gelu", True)
        assert_rel(out, R.linear(x.double(), w.double(), b.double(), "gelu"), TOL[dt], "out")


@needs_sm90
def test_switch_off_means_no_cutlass_kernel(monkeypatch):
    monkeypatch.delenv("MANUAL_LAYERS_CUTLASS", raising=False)
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    names = _kernels(lambda: _fwd(x, w, None, "gelu", True))
    assert not any("cutlass" in s for s in names), names


# (rows, in, hidden, out): one row; hidden / out not multiples of the tiles; several tiles.
MLP_SHAPES = [(1, 16, 8, 8), (37, 24, 264, 16), (2053, 64, 520, 72), (4099, 256, 1024, 512)]


def _mlp_grads(model, x, g):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = model(x)
    y.backward(g)
    return [y, x.grad] + [p.grad for p in model.parameters()]


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu"])
@pytest.mark.parametrize("shape", MLP_SHAPES)
def test_mlp_backward_dgrad_epilogue(monkeypatch, dtype, act, shape):
    """The MLP backward with the activation and first bias gradients in the dH GEMM's
    epilogue: every gradient against float64, with and without biases, the kernel launched."""
    monkeypatch.setenv("MANUAL_LAYERS_CUTLASS", "1")
    n, i, h, o = shape
    for bias in (True, False):
        ours = ml.MLP(i, h, o, activation=act, bias=bias, device="cuda", dtype=dtype)
        ref = copy.deepcopy(ours).double()
        x = torch.randn(n, i, device="cuda", dtype=dtype)
        g = torch.randn(n, o, device="cuda", dtype=dtype)
        names = _kernels(lambda: _mlp_grads(ours, x, g))
        assert sum("cutlass" in s for s in names) >= (1 if act in ("relu", "gelu_tanh") else 2), \
            names
        a = _mlp_grads(ours, x, g)
        e = _mlp_grads(ref, x.double(), g.double())
        for k, (ai, ei) in enumerate(zip(a, e)):
            assert ai.dtype == dtype
            assert_rel(ai, ei, TOL[dtype], f"{act} {dtype} bias={bias} [{k}]")


@needs_sm90
def test_mlp_backward_dgrad_epilogue_is_deterministic_and_matches_the_composed_path(
        monkeypatch):
    ours = ml.MLP(512, 2048, 512, activation="gelu", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("MANUAL_LAYERS_CUTLASS", "1")
    a1 = [t.clone() for t in _mlp_grads(ours, x, g)]
    a2 = _mlp_grads(ours, x, g)
    for t1, t2 in zip(a1, a2):
        assert torch.equal(t1, t2)
    monkeypatch.setenv("MANUAL_LAYERS_CUTLASS", "0")
    b = _mlp_grads(ours, x, g)
    for k, (t1, t0) in enumerate(zip(a1, b)):
        assert_rel(t1, t0, 1e-2, f"[{k}]")
