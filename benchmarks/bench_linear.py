"""Linear(+activation): manual_layers.Linear(i, o, activation=a) against nn.Linear + the
activation module in eager mode and under torch.compile, forward and forward+backward.

    python benchmarks/bench_linear.py                 # defaults for the device (CUDA if present)
    python benchmarks/bench_linear.py --quick         # small shapes, a smoke run
    python benchmarks/bench_linear.py --device cpu --activation gelu,relu --shapes 4096x512x512

Shapes are N x in_features -> out_features, written "65536x256->256" or "65536x256x256".
On an sm_90 GPU, GELU and SiLU cases in 16 bits also time the layer with MANUAL_LAYERS_CUTLASS=1
(the CUTLASS kernels of csrc/cuda/experimental/linear_sm90.h), interleaved with the rest: one line per case
and rows "manual_layers+cutlass" in the CSV.
Modes: fwd is timed under torch.no_grad() (inference); fwd+bwd computes the gradients of x,
weight and bias from a random grad_output; bwd times that backward alone (the forward runs,
untimed, before each call). Each case also reports one call's peak extra memory
(common.peak_extra_mib). Results: benchmarks/results/linear.{csv,md,png}.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import common as C  # noqa: E402

ml = C.import_manual_layers()
from manual_layers.reference import ACTIVATION_MODULES  # noqa: E402

NAME = "linear"
CPU_SHAPES = [(65536, 256, 256), (8192, 1024, 1024)]
CUDA_SHAPES = [(65536, 256, 256), (16384, 1024, 4096), (8192, 4096, 4096)]
QUICK_SHAPES = [(4096, 128, 128), (1024, 256, 512)]
ADDMM_SHAPE = (16384, 1024, 4096)  # CUDA, bf16, forward, gelu_tanh vs torch._addmm_activation

# Required speed-up of manual_layers over the baseline (baseline time / our time), from
# the project's performance table (issues #6, #7, #9). Key: (device, dtype, activation, shape, mode, baseline).
TARGETS = {
    ("cpu", torch.float32, "gelu", (65536, 256, 256), "fwd+bwd", "eager"): 1.2,
    ("cpu", torch.float32, "gelu", (8192, 1024, 1024), "fwd+bwd", "eager"): 1.05,
    ("cuda", torch.bfloat16, "gelu", (65536, 256, 256), "fwd+bwd", "eager"): 1 / 0.5,
    ("cuda", torch.bfloat16, "gelu", (16384, 1024, 4096), "fwd+bwd", "eager"): 1 / 0.97,
    ("cuda", torch.bfloat16, "gelu", (8192, 4096, 4096), "fwd+bwd", "eager"): 1 / 1.0,
    ("cuda", torch.bfloat16, "gelu_tanh", (65536, 256, 256), "fwd+bwd", "eager"): 1 / 0.4,
    ("cuda", torch.bfloat16, "gelu_tanh", (16384, 1024, 4096), "fwd+bwd", "eager"): 1 / 0.85,
    ("cuda", torch.bfloat16, "gelu_tanh", (8192, 4096, 4096), "fwd+bwd", "eager"): 1 / 0.95,
    ("cuda", torch.bfloat16, "gelu_tanh", ADDMM_SHAPE, "fwd", "addmm_act"): 1 / 1.05,
}


def parse_shape(s):
    s = s.strip().lower().replace("->", "x").replace("×", "x")
    try:
        n, k, m = (int(v) for v in s.split("x"))
    except ValueError:
        raise SystemExit(f"bad shape {s!r}: expected NxK->M, e.g. 65536x256->256")
    return n, k, m


def shape_str(shape):
    n, k, m = shape
    return f"{n}x{k}->{m}"


def torch_layer(ours, activation):
    """nn.Linear + the activation module, holding copies of `ours`' parameters."""
    lin = nn.Linear(ours.in_features, ours.out_features, device=ours.weight.device,
                    dtype=ours.weight.dtype)
    lin.load_state_dict(ours.state_dict())  # same keys: manual_layers.Linear is an nn.Linear
    act = ACTIVATION_MODULES[activation]() if activation else nn.Identity()
    return nn.Sequential(lin, act)


def cutlass_applies(device, dtype, activation):
    """Whether MANUAL_LAYERS_CUTLASS=1 changes this case's forward (GELU or SiLU)."""
    return C.cutlass_sm90(device, dtype) and activation in ("gelu", "silu")


def bench_case(shape, activation, mode, dtype, device, repeats, warmup, use_compile):
    """Time one (shape, activation, mode) for ours, eager and compile. Returns
    ({impl: timing or None}, {impl: note}, max |ours - eager| of the output,
    {impl: peak extra MiB of one call or None})."""
    n, k, m = shape
    ours = ml.Linear(k, m, activation=activation, device=device, dtype=dtype)
    eager = torch_layer(ours, activation)
    x = torch.randn(n, k, device=device, dtype=dtype)
    g = torch.randn(n, m, device=device, dtype=dtype)
    impls = {"manual_layers": ours, "eager": eager}
    notes = {}
    if use_compile:
        impls["compile"] = torch.compile(torch_layer(ours, activation), dynamic=False)

    with torch.no_grad():
        err = (ours(x).float() - eager(x).float()).abs().max().item()

    fns = {}
    for name, mod in impls.items():
        params = list(mod.parameters())
        if mode == "fwd":
            def step(mod=mod):
                with torch.no_grad():
                    mod(x)
            setup = None
        elif mode == "fwd+bwd":
            xg = x.detach().clone().requires_grad_(True)

            def step(mod=mod, xg=xg):
                mod(xg).backward(g)

            def setup(params=params, xg=xg):
                xg.grad = None
                for p in params:
                    p.grad = None
        else:  # bwd: the forward runs in setup (untimed); the step is the backward alone
            xg = x.detach().clone().requires_grad_(True)
            held = []

            def step(held=held):
                held.pop().backward(g)

            def setup(mod=mod, params=params, xg=xg, held=held):
                xg.grad = None
                for p in params:
                    p.grad = None
                held.clear()
                held.append(mod(xg))
        if name == "compile":  # compile now; a failure (no triton, no compiler) means n/a
            why = C.try_run(lambda: (setup and setup(), step()), device)
            if why is not None:
                notes[name] = why
                continue
        fns[name] = (step, setup)
    if "manual_layers" in fns and cutlass_applies(device, dtype, activation):
        # The same layer with MANUAL_LAYERS_CUTLASS=1 (csrc/cuda/experimental/linear_sm90.h), interleaved.
        fns["manual_layers+cutlass"] = tuple(C.with_cutlass(f) for f in fns["manual_layers"])
    if device == "cuda" and mode == "fwd" and activation == "gelu_tanh" and shape == ADDMM_SHAPE:
        w, b = ours.weight.detach(), ours.bias.detach()

        def addmm_step():
            torch._addmm_activation(b, x, w.t(), use_gelu=True)  # cuBLASLt GELU(tanh) epilogue
        why = C.try_run(addmm_step, device)
        if why is None:
            fns["addmm_act"] = (addmm_step, None)
        else:
            notes["addmm_act"] = why
    res = C.time_many(fns, device, repeats=repeats, warmup=warmup)
    for name in list(impls) + ["manual_layers+cutlass", "addmm_act"]:
        if name in fns or name in notes:
            res.setdefault(name, None)
    mem = {name: C.peak_extra_mib(step, device, setup) for name, (step, setup) in fns.items()}
    del impls, fns, x, g
    if use_compile:
        torch._dynamo.reset()
    return res, notes, err, mem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_timing_args(p, cuda_repeats=100)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | float64 "
                   "(default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--activation", default=None,
                   help="comma list of none,relu,gelu,gelu_tanh,silu,sigmoid,tanh "
                        "(default: gelu on CPU, gelu,gelu_tanh on CUDA)")
    p.add_argument("--shapes", default=None, help="comma list of NxK->M")
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd",
                   help="comma list of fwd, bwd, fwd+bwd")
    a = p.parse_args(argv)

    device = C.checked_device(a)
    cuda = device == "cuda"
    dtype = C.parse_dtype(a.dtype) if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    acts = (a.activation.split(",") if a.activation else
            (["gelu", "gelu_tanh"] if cuda else ["gelu"]))
    acts = [None if s.strip().lower() == "none" else s.strip() for s in acts]
    for s in acts:
        ml.functional._check_activation(s, "bench_linear --activation")
    if a.shapes:
        shapes = [parse_shape(s) for s in a.shapes.split(",")]
    else:
        shapes = QUICK_SHAPES if a.quick else (CUDA_SHAPES if cuda else CPU_SHAPES)
    modes = [s.strip() for s in a.modes.split(",")]
    for s in modes:
        if s not in ("fwd", "bwd", "fwd+bwd"):
            raise SystemExit(f"--modes: unknown mode {s!r}")
    repeats = a.repeats or ((20 if cuda else 5) if a.quick else (100 if cuda else 10))
    warmup = a.warmup if a.warmup is not None else (10 if cuda else 2)

    meta = C.metadata(device)
    print(f"bench_linear: {meta['device_name']}, torch {meta['torch']}, manual_layers "
          f"{meta['manual_layers']}, {C.dtype_name(dtype)}, {repeats} repeats (interleaved)")

    cases = [(act, shape, mode) for act in acts for shape in shapes for mode in modes]
    if cuda and not a.shapes and not a.quick and "fwd" in modes and "gelu_tanh" in acts \
            and ADDMM_SHAPE not in shapes:
        cases.append(("gelu_tanh", ADDMM_SHAPE, "fwd"))

    rows_csv, rows_md, rows_txt, targets = [], [], [], []
    labels, medians, ratios, plot_targets = [], {}, {}, {}
    for act, shape, mode in cases:
        label = f"{act or 'none'} {shape_str(shape)} {mode}"
        print(f"  {label} ...", flush=True)
        res, notes, err, mem = bench_case(shape, act, mode, dtype, device, repeats, warmup,
                                          not a.no_compile)
        ours = res["manual_layers"]
        rat = {}
        for base in ("eager", "compile", "addmm_act"):
            if base in res:
                t = res[base]
                rat[base] = t["p50"] / ours["p50"] if t else None
        for impl, t in res.items():
            extra = notes.get(impl, "")
            if mem.get(impl) is not None:
                extra = (extra + "; " if extra else "") + f"peak_extra_MiB={mem[impl]:.1f}"
            rows_csv.append(C.make_row(NAME, label, impl, C.dtype_name(dtype), shape_str(shape),
                                       mode, t, meta, extra=extra))
        cut = res.get("manual_layers+cutlass")
        if cut:
            print(f"    with MANUAL_LAYERS_CUTLASS=1: {C.fmt_ms(cut['p50'])} ms, "
                  f"{C.fmt_ratio(res['eager']['p50'] / cut['p50'] if res.get('eager') else None)}"
                  f" vs eager, {C.fmt_ratio(ours['p50'] / cut['p50'])} vs the default path",
                  flush=True)
        tl = []
        for base, r in rat.items():
            need = TARGETS.get((device, dtype, act, shape, mode, base))
            if need is not None:
                ok = r is not None and r >= need
                tl.append(f"{C.verdict(ok)} >= {need:.2f}x vs {base}")
                targets.append((label, base, need, r, ok))
        def cell(impl):
            t = res.get(impl, "absent")
            if t == "absent":
                return "-"
            return C.fmt_ms(t["p50"]) if t else "n/a"

        def cell_md(impl):
            t = res.get(impl, "absent")
            if t == "absent":
                return "-"
            return (f"{C.fmt_ms(t['p50'])} [{C.fmt_ms(t['p20'])}-{C.fmt_ms(t['p80'])}]"
                    if t else "n/a")
        extra_base = "addmm_act" in res
        r_c = rat.get("compile")
        row_common = [C.fmt_ratio(rat.get("eager")),
                      C.fmt_ratio(r_c) if "compile" in rat else "-",
                      C.fmt_ratio(rat.get("addmm_act")) if extra_base else "-",
                      " / ".join(C.fmt_mib(mem.get(k))
                                 for k in ("manual_layers", "eager", "compile")),
                      "; ".join(tl) or "-", f"{err:.1e}"]
        rows_txt.append([label, cell("manual_layers"), cell("eager"), cell("compile"),
                         cell("addmm_act")] + row_common)
        rows_md.append([label, cell_md("manual_layers"), cell_md("eager"), cell_md("compile"),
                        cell_md("addmm_act")] + row_common)
        plot_label = f"{act or 'none'}\n{shape_str(shape)}\n{mode}"
        labels.append(plot_label)
        medians[plot_label] = {k: (v["p50"] if v else None) for k, v in res.items()}
        ratios[plot_label] = rat
        plot_targets[plot_label] = {b: TARGETS[(device, dtype, act, shape, mode, b)] for b in rat
                                    if (device, dtype, act, shape, mode, b) in TARGETS}

    header = ["case", "manual_layers ms", "eager ms", "compile ms", "addmm_act ms",
              "vs eager", "vs compile", "vs addmm_act", "peak extra MiB (ours / eager / compile)",
              "target", "max abs diff"]
    if not any("addmm_act" in m for m in medians.values()):  # CUDA-only baseline: drop columns
        keep = [i for i, h in enumerate(header) if "addmm_act" not in h]
        header = [header[i] for i in keep]
        rows_txt = [[r[i] for i in keep] for r in rows_txt]
        rows_md = [[r[i] for i in keep] for r in rows_md]
    print()
    C.print_table(header, rows_txt)
    print()
    for label, base, need, r, ok in targets:
        print(f"{C.verdict(ok)}  {label}: {C.fmt_ratio(r)} vs {base} (target >= {need:.2f}x)")
    for impl in ("compile", "addmm_act"):
        n_a = [r for r in rows_csv if r["impl"] == impl and r["p50_ms"] == "n/a"]
        if n_a:
            print(f"note: {impl} n/a: {n_a[0]['extra']}")

    notes = ["ratio = baseline median / manual_layers median; targets from the issues (#6, #7, #9).",
             "eager = nn.Linear + activation module; compile = the same under torch.compile; "
             "addmm_act = torch._addmm_activation(bias, x, w.t(), use_gelu=True) "
             "(cuBLASLt GELU-tanh epilogue, CUDA only).",
             "fwd is timed under torch.no_grad(); fwd+bwd computes dX, dW and db; bwd is the "
             "backward alone (the forward runs untimed before each call).",
             "peak extra MiB: one call's peak memory over what was allocated before it (CUDA: "
             "max_memory_allocated; CPU: peak RSS growth), outputs and gradients included.",
             "Implementations are timed interleaved, round-robin, in the same process."]
    notes += [f"{C.verdict(ok)} {label}: {C.fmt_ratio(r)} vs {base} (target >= {need:.2f}x)"
              for label, base, need, r, ok in targets]
    csv_path = C.append_csv(NAME, rows_csv)
    md_path = C.write_markdown(NAME, f"manual_layers.Linear vs torch ({C.dtype_name(dtype)})",
                               meta, header, rows_md, notes)
    impls = ["manual_layers", "eager", "compile"] + (
        ["addmm_act"] if any("addmm_act" in m for m in medians.values()) else [])
    png_path = C.write_plot(NAME, f"Linear(+activation), {C.dtype_name(dtype)}: median time",
                            meta, labels, impls, medians, ratios, plot_targets)
    print(f"\nwrote {csv_path}\n      {md_path}\n      {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
