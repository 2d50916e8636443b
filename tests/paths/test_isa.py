"""Runtime ISA dispatch of the CPU kernels (csrc/cpu/runtime/dispatch.cpp): each compiled level, forced
with MANUAL_LAYERS_CPU_ISA in a fresh process, runs Linear and loss cases that must match
manual_layers.reference, agree across levels, and be bitwise repeatable; info() must report the
forced level; refused or unknown requests warn and fall back."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import manual_layers as ml
from manual_layers import reference as R
from conftest import TOL, assert_rel
from isa_levels import COMPILED, CPU_HAS, ROOT, RUNNABLE

ACTS = [None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]
# (dtype, activation) cases of the Linear layer; sizes with tails for every vector width.
LINEAR_CASES = ([(torch.float32, a) for a in ACTS]
                + [(torch.float64, "gelu"), (torch.float64, "silu"),
                   (torch.bfloat16, "gelu"), (torch.bfloat16, "relu"), (torch.float16, "silu")])

# The child process: loads the inputs, runs every case twice (bitwise repeatability), saves the
# outputs and prints what info() says.
CHILD = r"""
import json, sys, torch
import manual_layers as ml
from manual_layers import functional as MF
inputs = torch.load(sys.argv[1])
out = {}
for rep in range(2):
    res = {}
    for key, (x, w, b, act) in inputs["linear"].items():
        x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
        y = MF.linear(x, w, b, act)
        y.backward(inputs["grads"][key])
        res[key] = [y.detach(), x.grad, w.grad, b.grad]
    for key, (x, w, b, t, kw) in inputs["loss"].items():
        x, w, b = (u.clone().requires_grad_() for u in (x, w, b))
        fn = MF.linear_binary_cross_entropy_with_logits if w.shape[0] == 1 else MF.linear_cross_entropy
        loss = fn(x, w, b, t, **kw)
        loss.sum().backward() if loss.dim() else loss.backward()
        res[key] = [loss.detach(), x.grad, w.grad, b.grad]
    if rep == 0:
        out = res
    else:
        for k in res:
            for a, c in zip(out[k], res[k]):
                assert torch.equal(a, c), f"{k}: not bitwise repeatable"
torch.save(out, sys.argv[2])
print(json.dumps({"isa": ml.utils.cpu_kernels_isa(), "info": ml.utils.info()["cpu_kernels_isa"]}))
"""


def _inputs():
    g = torch.Generator().manual_seed(7)
    lin, grads = {}, {}
    for i, (dt, act) in enumerate(LINEAR_CASES):
        n, k, m = 67, 45, 33 + i  # odd sizes: vector tails at every width
        x = torch.randn(n, k, generator=g).to(dt)
        w = (torch.randn(m, k, generator=g) / k ** 0.5).to(dt)
        b = torch.randn(m, generator=g).to(dt)
        key = f"{dt}-{act}"
        lin[key] = (x, w, b, act)
        grads[key] = torch.randn(n, m, generator=g).to(dt)
    loss = {}
    for dt in (torch.float32, torch.float64):
        x = torch.randn(301, 37, generator=g).to(dt)
        w1, b1 = torch.randn(1, 37, generator=g).to(dt), torch.randn(1, generator=g).to(dt)
        y = torch.rand(301, generator=g).to(dt)
        loss[f"{dt}-bce-mean"] = (x, w1, b1, y, {"pos_weight": torch.tensor([1.5], dtype=dt)})
        loss[f"{dt}-bce-none"] = (x, w1, b1, y, {"reduction": "none"})
        # rows of 800 / 1600 bytes: the binary pass's 4-row and 16-row prefetching tiles
        # (csrc/cpu/kernels/loss_tiles.h, tile_shape); 37 columns take 16 (fp32) and 8 (fp64) rows.
        xw = torch.randn(301, 200, generator=g).to(dt)
        ww = (torch.randn(1, 200, generator=g) / 14).to(dt)
        loss[f"{dt}-bce-wide"] = (xw, ww, b1, y, {"sample_weight": torch.rand(301, generator=g).to(dt)})
        W, B = torch.randn(11, 37, generator=g).to(dt), torch.randn(11, generator=g).to(dt)
        t = torch.randint(0, 11, (301,), generator=g)
        loss[f"{dt}-ce-mean"] = (x, W, B, t, {"label_smoothing": 0.1,
                                              "class_weight": torch.rand(11, generator=g).to(dt)})
        loss[f"{dt}-ce-none"] = (x, W, B, t, {"reduction": "none", "ignore_index": 3})
        # the chunked path (CPU: from C 48 with mean, C 128 with none), whose row pass is a
        # per-ISA kernel too (csrc/cpu/kernels/ce_rows.cpp); 50 and 130 classes leave vector tails
        for C, kw in ((50, {"label_smoothing": 0.05}),
                      (130, {"reduction": "none", "ignore_index": 5})):
            Wc = (torch.randn(C, 37, generator=g) / 6).to(dt)
            Bc = torch.randn(C, generator=g).to(dt)
            tc = torch.randint(0, C, (301,), generator=g)
            loss[f"{dt}-ce-chunked-{C}"] = (x, Wc, Bc, tc, kw)
    return {"linear": lin, "grads": grads, "loss": loss}


def _run_child(tmp_path, env_extra, inputs_path, tag):
    env = dict(os.environ)
    env.pop("MANUAL_LAYERS_CPU_ISA", None)
    env.pop("ATEN_CPU_CAPABILITY", None)
    env.update(env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out_path = str(tmp_path / f"out-{tag}.pt")
    p = subprocess.run([sys.executable, "-c", CHILD, inputs_path, out_path], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    return info, torch.load(out_path), p.stderr


def _reference(inputs):
    ref = {}
    for key, (x, w, b, act) in inputs["linear"].items():
        # fp64 reference of the same (rounded) inputs
        x, w, b = (t.double().clone().requires_grad_() for t in (x, w, b))
        y = R.linear(x, w, b, act)
        y.backward(inputs["grads"][key].double())
        ref[key] = [y.detach(), x.grad, w.grad, b.grad]
    for key, (x, w, b, t, kw) in inputs["loss"].items():
        x, w, b = (u.double().clone().requires_grad_() for u in (x, w, b))
        kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
        fn = (R.linear_binary_cross_entropy_with_logits if w.shape[0] == 1
              else R.linear_cross_entropy)
        loss = fn(x, w, b, t.double() if t.is_floating_point() else t, **kw)
        loss.sum().backward() if loss.dim() else loss.backward()
        ref[key] = [loss.detach(), x.grad, w.grad, b.grad]
    return ref


def _dtype_of(key):
    return {"torch.float32": torch.float32, "torch.float64": torch.float64,
            "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}[key.split("-")[0]]


@pytest.fixture(scope="module")
def forced_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isa")
    inputs = _inputs()
    path = str(tmp / "inputs.pt")
    torch.save(inputs, path)
    runs = {isa: _run_child(tmp, {"MANUAL_LAYERS_CPU_ISA": isa.lower()}, path, isa)
            for isa in RUNNABLE}
    return inputs, _reference(inputs), runs


def test_compiled_levels():
    assert COMPILED[0] == "DEFAULT"
    if os.uname().machine in ("x86_64", "AMD64"):
        assert set(COMPILED) <= {"DEFAULT", "AVX2", "AVX512"}
        why = ml.utils.info()["cpu_kernels_why"] or ""  # what the build was asked (setup.py)
        if why.startswith("the levels this CPU runs"):  # the default (built on this machine)
            assert COMPILED == ["DEFAULT"] + [i for i in ("AVX2", "AVX512") if CPU_HAS[i]]
        else:
            want = why.removeprefix("MANUAL_LAYERS_CPU_ISAS=").split(",")
            assert COMPILED == ["DEFAULT"] + [i for i in ("AVX2", "AVX512") if i.lower() in want]
    else:
        assert COMPILED == ["DEFAULT"]
    assert ml.utils.info()["cpu_kernels_isa"] in COMPILED


@pytest.mark.parametrize("isa", RUNNABLE)
def test_forced_level_matches_reference(forced_runs, isa):
    inputs, ref, runs = forced_runs
    info, out, _ = runs[isa]
    assert info == {"isa": isa, "info": isa}
    for key, vals in out.items():
        tol = TOL[_dtype_of(key)]
        for what, a, e in zip(("out", "grad_x", "grad_w", "grad_b"), vals, ref[key]):
            assert_rel(a, e.to(a.dtype) if tol >= 1e-3 else e, tol, f"{isa} {key} {what}")


def test_levels_agree(forced_runs):
    _, _, runs = forced_runs
    base = runs["DEFAULT"][1]
    for isa in RUNNABLE[1:]:
        for key, vals in runs[isa][1].items():
            tol = TOL[_dtype_of(key)]
            for what, a, e in zip(("out", "grad_x", "grad_w", "grad_b"), vals, base[key]):
                assert_rel(a, e, tol, f"{isa} vs DEFAULT {key} {what}")


def _info_in_child(env_extra):
    env = dict(os.environ)
    env.pop("MANUAL_LAYERS_CPU_ISA", None)
    env.pop("ATEN_CPU_CAPABILITY", None)
    env.update(env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "manual_layers", "info"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = dict(line.split(None, 1) for line in p.stdout.splitlines() if line.strip())
    return rows, p.stderr


def test_aten_cpu_capability_pins_ours():
    rows, _ = _info_in_child({"ATEN_CPU_CAPABILITY": "default"})
    assert rows["cpu_kernels_isa"].strip() == "DEFAULT"
    assert rows["aten_cpu_capability"].strip() == "DEFAULT"
    if "AVX2" in RUNNABLE:
        rows, _ = _info_in_child({"ATEN_CPU_CAPABILITY": "avx2"})
        assert rows["cpu_kernels_isa"].strip() == "AVX2"
        # ours overrides ATen's
        rows, _ = _info_in_child({"ATEN_CPU_CAPABILITY": "avx2", "MANUAL_LAYERS_CPU_ISA": "default"})
        assert rows["cpu_kernels_isa"].strip() == "DEFAULT"


def test_unknown_level_warns_and_follows_aten():
    rows, err = _info_in_child({"MANUAL_LAYERS_CPU_ISA": "sse9"})
    assert "MANUAL_LAYERS_CPU_ISA='sse9' is not one of" in err
    assert rows["cpu_kernels_isa"].strip() in COMPILED


@pytest.mark.parametrize("isa", [i for i in ("AVX2", "AVX512") if i not in RUNNABLE])
def test_level_cpu_lacks_is_refused(isa):
    rows, err = _info_in_child({"MANUAL_LAYERS_CPU_ISA": isa.lower()})
    assert "refused" in err
    assert rows["cpu_kernels_isa"].strip() in RUNNABLE


def _build_objects():
    """The objects the in-place setup.py build linked: {"neutral", "DEFAULT", "AVX2", ...}."""
    so = ml._ops._C.__file__
    temps = [t for t in glob.glob(os.path.join(ROOT, "build", "temp.*"))
             if os.path.isdir(os.path.join(t, "cpu_DEFAULT"))]
    if os.path.dirname(os.path.abspath(so)) != os.path.join(ROOT, "manual_layers") or not temps:
        return None
    t = temps[0]
    objs = {"neutral": glob.glob(os.path.join(t, "csrc", "**", "*.o"), recursive=True)}
    for isa in COMPILED:
        objs[isa] = glob.glob(os.path.join(t, "cpu_" + isa, "**", "*.o"), recursive=True)
    if any(os.path.getmtime(o) > os.path.getmtime(so) for v in objs.values() for o in v):
        return None  # objects newer than the library: not what it was linked from
    return objs


def _defined_symbols(paths):
    p = subprocess.run(["nm", "--defined-only"] + paths, capture_output=True, text=True,
                       check=True)
    return {f[2] for f in (line.split() for line in p.stdout.splitlines())
            if len(f) == 3 and f[1] in "TW"}


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None,
                    reason="binutils (objdump, nm) not installed")
def test_linker_keeps_the_lowest_copy():
    """The ODR/COMDAT guard: an inline function from a shared header is emitted by every
    object that calls it out of line, and the linker keeps one copy. Every function that an
    ISA-neutral or DEFAULT object defines must be, in the linked library, a copy without
    256/512-bit instructions, and every one an AVX2 object defines a copy without 512-bit
    ones: the ISA-neutral code never runs a copy compiled for a higher level. (Functions that
    only the AVX2/AVX512 objects define are only called from those copies.)"""
    if "AVX2" not in COMPILED:
        pytest.skip("no x86 ISA copies in this build")
    objs = _build_objects()
    if objs is None:
        pytest.skip("needs the in-place setup.py build's objects (build/temp.*)")
    p = subprocess.run(["objdump", "-d", "--no-show-raw-insn", ml._ops._C.__file__],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    wide = {}  # function -> "ymm" / "zmm"
    func = None
    for line in p.stdout.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
        elif func is not None:
            if "%zmm" in line:
                wide[func] = "zmm"
            elif "%ymm" in line and wide.get(func) != "zmm":
                wide[func] = "ymm"
    low = _defined_symbols(objs["neutral"] + objs["DEFAULT"])
    bad = sorted(f for f in low if f in wide)
    mid = _defined_symbols(objs["AVX2"])
    bad += sorted(f for f in mid if wide.get(f) == "zmm")
    assert not bad, "the library kept a wider copy of:\n" + "\n".join(bad[:20])
    # and the ISA copies are really there
    if "AVX512" in COMPILED:
        assert any("AVX512" in f for f, w in wide.items() if w == "zmm")
    assert any("AVX2" in f for f, w in wide.items() if w == "ymm")
