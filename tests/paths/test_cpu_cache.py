"""The reuse cache of large CPU outputs (csrc/cpu/runtime/alloc.cpp): a reused buffer holds the previous
output's bytes, so every kernel that takes one must write it whole; the cap holds; the tensors
behave as ordinary CPU tensors; MANUAL_LAYERS_CPU_CACHE_MB turns it off."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import manual_layers as ml
from manual_layers import reference as R
from conftest import TOL, assert_rel

MF = ml.functional
MIB = 1 << 20

# The in-process tests need the cache on (MANUAL_LAYERS_CPU_CACHE_MB=0 in the environment turns
# it off; the cap tests below set it themselves, in subprocesses).
needs_cache = pytest.mark.skipif(ml.utils.cpu_cache_info()["cap_bytes"] < 64 * MIB,
                                 reason="CPU output cache off or below 64 MiB in this environment")


def _stats():
    return ml.utils.cpu_cache_info()


def _poison_and_free(*tensors):
    """NaN into outputs that came from the cache, then free them: the next outputs of the same
    sizes take these buffers, and any element a kernel leaves unwritten stays NaN."""
    for t in tensors:
        with torch.no_grad():
            t.fill_(float("nan"))


@needs_cache
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
# bf16: the same kernels in another element type, at 8 MiB outputs, where CPUs without native
# bf16 GEMMs take seconds per case: in `make test-all`
@pytest.mark.parametrize("dtype", [torch.float32,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_linear_outputs_reuse_poisoned_buffers(activation, dtype):
    """Linear forward and backward with outputs of >= 8 MiB (out, pre, dX), twice: the second
    pass reuses the first one's NaN-filled buffers and must still equal the reference."""
    torch.manual_seed(0)
    n = (8 * MIB) // (256 * dtype.itemsize) + 3          # out and dX just over 8 MiB
    x = torch.randn(n, 256, dtype=dtype, requires_grad=True)
    lin = ml.Linear(256, 256, activation=activation, dtype=dtype)
    g = torch.randn(n, 256, dtype=dtype)

    def run():
        x.grad = None
        y = lin(x)
        (dx,) = torch.autograd.grad(y, x, g)
        return y, dx

    ml.utils.empty_cpu_cache()
    y1, dx1 = run()
    ref_y, ref_dx = y1.detach().clone(), dx1.clone()
    before = _stats()
    _poison_and_free(y1, dx1)
    del y1, dx1
    y2, dx2 = run()
    after = _stats()
    # dX always; out too with an activation (without one, out is ATen addmm's)
    assert after["reuses"] >= before["reuses"] + (1 if activation is None else 2), after
    assert torch.equal(y2.detach(), ref_y)      # bitwise: same kernels, same inputs
    assert torch.equal(dx2, ref_dx)
    want_y = R.linear(x.detach().double(), lin.weight.detach().double(),
                      lin.bias.detach().double(), activation)
    assert_rel(y2, want_y, TOL[dtype], "out")


@needs_cache
@pytest.mark.parametrize("kind", ["bce", "ce"])
def test_loss_dx_reuses_poisoned_buffer(kind):
    """The losses' dX (here 8 MiB, fp32) from a reused, NaN-filled buffer."""
    torch.manual_seed(1)
    n, d = (8 * MIB) // (128 * 4), 128
    x = torch.randn(n, d, requires_grad=True)
    if kind == "bce":
        w, b = torch.randn(1, d) / 12, torch.randn(1)
        t = (torch.rand(n) > 0.5).float()
        f = MF.linear_binary_cross_entropy_with_logits
    else:
        w, b = torch.randn(7, d) / 12, torch.randn(7)
        t = torch.randint(0, 7, (n,))
        f = MF.linear_cross_entropy
    ml.utils.empty_cpu_cache()
    (dx1,) = torch.autograd.grad(f(x, w, b, t), x)
    ref = dx1.clone()
    reuses = _stats()["reuses"]
    _poison_and_free(dx1)
    del dx1
    (dx2,) = torch.autograd.grad(f(x, w, b, t), x)
    assert _stats()["reuses"] > reuses
    assert torch.equal(dx2, ref)
    xd = x.detach().double().requires_grad_()
    if kind == "bce":
        want = R.linear_binary_cross_entropy_with_logits(xd, w.double(), b.double(), t.double())
    else:
        want = R.linear_cross_entropy(xd, w.double(), b.double(), t)
    (want_dx,) = torch.autograd.grad(want, xd)
    assert_rel(dx2, want_dx, TOL[torch.float32], "dX")


@needs_cache
def test_cached_tensors_are_ordinary():
    """Resizable (resize_ keeps the data), shareable, picklable; empty_cpu_cache frees the idle
    memory and leaves outputs in use alone."""
    torch.manual_seed(2)
    lin = ml.Linear(256, 256, activation="relu")
    x = torch.randn(8192 + 1, 256)
    with torch.no_grad():
        y = lin(x)
    ref = y.clone()
    assert y.untyped_storage().resizable()
    y.resize_(2 * y.shape[0], 256)
    assert torch.equal(y[: ref.shape[0]], ref)
    y.resize_(ref.shape)
    ml.utils.empty_cpu_cache()
    assert _stats()["idle_bytes"] == 0
    assert torch.equal(y, ref)
    z = y.clone().share_memory_()
    assert z.is_shared() and torch.equal(z, ref)
    del y
    assert _stats()["idle_bytes"] > 0
    ml.utils.empty_cpu_cache()
    assert _stats()["idle_bytes"] == 0


_CAP_SCRIPT = textwrap.dedent("""
    import torch, manual_layers as ml
    lin = ml.Linear(256, 256, activation="relu")
    outs = []
    with torch.no_grad():
        for n in (8192, 9000, 10000, 11000, 12000):   # 8-12 MiB outputs, 5 different sizes
            outs.append(lin(torch.randn(n, 256)))
        x = torch.randn(9000, 256)
        ref = torch.relu(torch.nn.functional.linear(x, lin.weight, lin.bias))
        del outs
        y = lin(x)
    s = ml.utils.cpu_cache_info()
    print(s["idle_bytes"], s["cap_bytes"], s["reuses"], s["new_buffers"],
          float((y - ref).abs().max()))
""")


def _run_cap(value):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["MANUAL_LAYERS_CPU_CACHE_MB"] = value
    return subprocess.run([sys.executable, "-c", _CAP_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)


def test_cap_bounds_idle_memory():
    """MANUAL_LAYERS_CPU_CACHE_MB=24: five freed outputs of 8-12 MiB leave at most 24 MiB idle."""
    r = _run_cap("24")
    assert r.returncode == 0, r.stderr
    idle, cap, reuses, new, err = r.stdout.split()
    assert int(cap) == 24 * MIB and int(idle) <= int(cap)
    assert int(new) >= 5 and float(err) < 1e-4


def test_cap_zero_turns_reuse_off():
    r = _run_cap("0")
    assert r.returncode == 0, r.stderr
    idle, cap, reuses, new, err = r.stdout.split()
    assert (int(idle), int(cap), int(reuses), int(new)) == (0, 0, 0, 0)
    assert float(err) < 1e-4


def test_cap_rejects_a_bad_value():
    r = _run_cap("lots")
    assert r.returncode != 0
    assert "MANUAL_LAYERS_CPU_CACHE_MB" in r.stderr and "ValueError" in r.stderr
