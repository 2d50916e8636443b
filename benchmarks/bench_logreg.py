"""Logistic-regression loss + gradients: the fused manual_layers kernels against eager PyTorch,
torch.compile, and the memory-bandwidth floor.

    python benchmarks/bench_logreg.py            # defaults for the device (CUDA if present)
    python benchmarks/bench_logreg.py --quick    # small sizes, a smoke run
    python benchmarks/bench_logreg.py --device cpu --cases binary,multi_dx --n 262144 --d 128

Cases (each gets its own fresh random inputs; gradients are set to None between calls):
  binary      linear_binary_cross_entropy_with_logits(x, w, b, y) + backward (dW, db)
              vs F.binary_cross_entropy_with_logits(F.linear(x, w, b).squeeze(-1), y)
  binary_dx   the same with x.requires_grad (dX too)
  multi_dx    linear_cross_entropy(x, W, b, t), C classes, with dX
              vs F.cross_entropy(F.linear(x, W, b), t)
The floor is the time to stream the bytes the op must move: one read of X (plus one write of
dX in the _dx cases). CPU: measured directly (X.sum(); dst.copy_(X) for the _dx cases). CUDA:
bytes / the device-copy bandwidth (dst.copy_(X), read + write). Peak extra memory of one call
(common.peak_extra_mib): CUDA torch.cuda.max_memory_allocated() during the call minus the
memory allocated before it; CPU the growth of the peak RSS over the RSS before it (both include
the returned gradients). Results: benchmarks/results/logreg.{csv,md,png}.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402

ml = C.import_manual_layers()
MF = ml.functional

NAME = "logreg"


def case(name, kind, n, d, dtype, dx, classes=1, target=None):
    """target: ("eager", s): speed-up over eager >= s; ("floor", f): our time <= f x floor;
    or a list of such pairs, all of which must hold."""
    targets = [] if target is None else ([target] if isinstance(target, tuple) else list(target))
    return {"name": name, "kind": kind, "n": n, "d": d, "dtype": dtype, "dx": dx,
            "classes": classes, "target": targets}


def default_cases(device, quick):
    if device == "cuda":
        nb, db, nm, dm = (262144, 512, 262144, 512) if quick else (4194304, 512, 1048576, 512)
        nw = 8192 if quick else 65536  # wide rows: 1 GiB of fp32 X at D 4096 (full size)
        return [
            case("binary", "binary", nb, db, torch.float32, False, target=("floor", 1.1)),
            case("binary", "binary", nw, 4096, torch.float32, False, target=("floor", 1.15)),
            case("binary", "binary", nw // 2, 8192, torch.float32, False, target=("floor", 1.15)),
            case("binary", "binary", nb, db, torch.bfloat16, False, target=("floor", 1.1)),
            case("binary_dx", "binary", nb, db, torch.float32, True, target=("floor", 1.1)),
            case("multi_dx", "multi", nm, dm, torch.bfloat16, True, classes=10,
                 target=[("floor", 1.3), ("eager", 2.5)]),
            case("multi", "multi", nm, dm, torch.float32, False, classes=10,
                 target=("floor", 1.3)),
            case("multi_dx", "multi", nm, dm, torch.bfloat16, True, classes=128,
                 target=("eager", 2.0)),
            # the tensor-core kernel's C <= 64 instance (D <= 256) against the chunked path
            case("multi_dx", "multi", nm, 256, torch.bfloat16, True, classes=64),
        ]
    n, d = (65536, 256) if quick else (1048576, 256)
    return [
        # issue #9's CPU targets
        case("binary", "binary", n, d, torch.float32, False,
             target=[("eager", 1.9), ("floor", 1.1)]),
        case("binary_dx", "binary", n, d, torch.float32, True),
        case("multi_dx", "multi", n, d, torch.float32, True, classes=10, target=("eager", 2.0)),
    ]


def make_inputs(c, device):
    n, d, dt = c["n"], c["d"], c["dtype"]
    x = torch.randn(n, d, device=device, dtype=dt)
    if c["kind"] == "binary":
        w = (torch.randn(1, d, device=device, dtype=dt) / d ** 0.5).requires_grad_(True)
        b = torch.randn(1, device=device, dtype=dt).requires_grad_(True)
        y = (torch.rand(n, device=device) > 0.5).to(dt)
    else:
        w = (torch.randn(c["classes"], d, device=device, dtype=dt) / d ** 0.5).requires_grad_(True)
        b = torch.randn(c["classes"], device=device, dtype=dt).requires_grad_(True)
        y = torch.randint(0, c["classes"], (n,), device=device)
    if c["dx"]:
        x.requires_grad_(True)
    return x, w, b, y


def eager_binary(x, w, b, y):
    return F.binary_cross_entropy_with_logits(F.linear(x, w, b).squeeze(-1), y)


def eager_multi(x, w, b, y):
    return F.cross_entropy(F.linear(x, w, b), y)


# The cross-entropy paths timed side by side on CUDA, each forced through the environment the
# kernels read per call: "single" is the single-pass op (the tensor-core kernel where
# csrc/contracts/losses.h's ce_tc_shape_ok holds, else the CUDA-core kernel or the GEMM path),
# "single-no-tc" the same with the tensor-core kernel off, "chunked" the GEMM chunks, "cluster"
# the tensor-core kernel's sm_90a cluster instances (opt-in: 33 <= C <= 256; timed on sm_90
# GPUs only, see cluster_case).
CE_PATHS = {
    "single": {"MANUAL_LAYERS_CE_PATH": "single"},
    "cluster": {"MANUAL_LAYERS_CE_PATH": "single", "MANUAL_LAYERS_CE_CLUSTER": "1"},
    "single-no-tc": {"MANUAL_LAYERS_CE_PATH": "single", "MANUAL_LAYERS_CE_TC": "0"},
    "chunked": {"MANUAL_LAYERS_CE_PATH": "chunked"},
}


def cluster_case(c):
    """Whether the cluster instances can run this case here (csrc/contracts/losses.h,
    ce_tc_cluster_shape_ok; the kernel skips it elsewhere and the row would time another path)."""
    dmax = 512 if c["dtype"] in (torch.bfloat16, torch.float16) else 256
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and 32 < c["classes"] <= 256 and c["d"] % 8 == 0 and c["d"] <= dmax)


def forced_ce_path(fn, path):
    env = CE_PATHS[path]

    def call(*args):
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn(*args)
        finally:
            for k, v in old.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
    return call


def bench_case(c, device, repeats, warmup, use_compile):
    """Returns ({impl: timing or None}, notes, floor_ms, {impl: peak MiB}, loss diff)."""
    cuda = device == "cuda"
    x, w, b, y = make_inputs(c, device)
    binary = c["kind"] == "binary"
    eager_fn = eager_binary if binary else eager_multi
    ours_fn = MF.linear_binary_cross_entropy_with_logits if binary else MF.linear_cross_entropy
    leaves = [w, b] + ([x] if c["dx"] else [])

    def zero():
        for t in leaves:
            t.grad = None

    fns, notes = {}, {}
    impls = {"manual_layers": ours_fn, "eager": eager_fn}
    if cuda and not binary:
        # Both cross-entropy paths side by side (the default picks one by C, device and size:
        # csrc/policy/ce_path.cpp, ce_use_chunked), forced per call through MANUAL_LAYERS_CE_PATH.
        for path in CE_PATHS:
            if path != "cluster" or cluster_case(c):
                impls[f"manual_layers[{path}]"] = forced_ce_path(ours_fn, path)
    if use_compile:
        impls["compile"] = torch.compile(eager_fn, dynamic=False)
    for name, f in impls.items():
        def step(f=f):
            f(x, w, b, y).backward()
        why = C.try_run(lambda: (zero(), step()), device)
        if why is not None:
            notes[name] = why
            continue
        fns[name] = (step, zero)

    # The floor: stream the bytes that the op has to move.
    xd = x.detach()
    dst = torch.empty_like(xd) if (c["dx"] or cuda) else None
    if cuda:
        t_copy = C.time_many({"copy": (lambda: dst.copy_(xd), None)}, device,
                             repeats=max(10, repeats // 2), warmup=3)["copy"]["p50"]
        bw = 2 * xd.numel() * xd.element_size() / (t_copy * 1e-3)  # bytes/s, read + write
        moved = xd.numel() * xd.element_size() * (2 if c["dx"] else 1)
        floor_ms, floor_how = moved / bw * 1e3, f"bytes/copy bandwidth ({bw / 1e12:.2f} TB/s)"
    else:
        floor_step = (lambda: dst.copy_(xd)) if c["dx"] else (lambda: xd.sum())
        fns["floor"] = (floor_step, None)
        floor_ms, floor_how = None, "dst.copy_(X)" if c["dx"] else "X.sum()"

    res = C.time_many(fns, device, repeats=repeats, warmup=warmup)
    if floor_ms is None:
        floor_ms = res.pop("floor")["p50"]
    for name in impls:
        res.setdefault(name, None)

    # Loss agreement and peak extra memory (one call each).
    diff = None
    if "manual_layers" in fns:
        with torch.no_grad():
            diff = abs(float(ours_fn(x, w, b, y)) - float(eager_fn(x, w, b, y)))
    mem = {}
    for name, (step, setup) in fns.items():
        if name != "floor":
            mem[name] = C.peak_extra_mib(step, device, setup)
            setup()
    del x, w, b, y, dst, xd, fns, impls
    if use_compile:
        torch._dynamo.reset()
    return res, notes, floor_ms, floor_how, mem, diff


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_timing_args(p, cuda_repeats=50)
    p.add_argument("--cases", default=None, help="comma list of binary, binary_dx, multi, multi_dx "
                   "(default: all of the device's defaults)")
    p.add_argument("--dtype", default=None, help="override every case's dtype")
    p.add_argument("--n", type=int, default=None, help="override the number of rows of X")
    p.add_argument("--d", type=int, default=None, help="override the number of features")
    p.add_argument("--classes", type=int, default=None, help="override C of multi_dx")
    a = p.parse_args(argv)

    device = C.checked_device(a)
    cuda = device == "cuda"
    cases = default_cases(device, a.quick)
    if a.cases:
        want = [s.strip() for s in a.cases.split(",")]
        bad = [s for s in want if s not in ("binary", "binary_dx", "multi", "multi_dx")]
        if bad:
            raise SystemExit(f"--cases: unknown case(s) {bad}")
        cases = [c for c in cases if c["name"] in want]
    overridden = False
    for c in cases:
        for key, val in (("n", a.n), ("d", a.d), ("classes", a.classes if c["kind"] == "multi"
                                                   else None)):
            if val is not None:
                c[key], overridden = val, True
        if a.dtype:
            c["dtype"], overridden = C.parse_dtype(a.dtype), True
    if a.dtype:  # one case per (name, dtype)
        seen, uniq = set(), []
        for c in cases:
            if c["name"] not in seen:
                seen.add(c["name"])
                uniq.append(c)
        cases = uniq
    if overridden or a.quick:
        for c in cases:
            c["target"] = []  # the targets hold for the default sizes only
    repeats = a.repeats or ((20 if cuda else 5) if a.quick else (50 if cuda else 10))
    warmup = a.warmup if a.warmup is not None else (5 if cuda else 2)

    meta = C.metadata(device)
    print(f"bench_logreg: {meta['device_name']}, torch {meta['torch']}, manual_layers "
          f"{meta['manual_layers']}, {repeats} repeats (interleaved)")

    rows_csv, rows_txt, rows_md, targets, notes_all = [], [], [], [], []
    labels, medians, ratios, plot_targets = [], {}, {}, {}
    for c in cases:
        dt = C.dtype_name(c["dtype"])
        shape = f"{c['n']}x{c['d']}" + (f" C={c['classes']}" if c["kind"] == "multi" else "")
        label = f"{c['name']} {dt} {shape}"
        print(f"  {label} ...", flush=True)
        res, notes, floor_ms, floor_how, mem, diff = bench_case(c, device, repeats, warmup,
                                                                not a.no_compile)
        ours = res.get("manual_layers")
        rat = {}
        for base in ("eager", "compile"):
            t = res.get(base)
            rat[base] = t["p50"] / ours["p50"] if (t and ours) else None
        vs_floor = {k: (t["p50"] / floor_ms if t else None) for k, t in res.items()}
        for impl, t in res.items():
            extra = notes.get(impl, "")
            if mem.get(impl) is not None:
                extra = (extra + "; " if extra else "") + f"peak_extra_MiB={mem[impl]:.1f}"
            rows_csv.append(C.make_row(NAME, label, impl, dt, shape, "loss+grad", t, meta, extra))
        rows_csv.append(C.make_row(NAME, label, "floor", dt, shape, "loss+grad",
                                   {"p20": floor_ms, "p50": floor_ms, "p80": floor_ms, "n": 1},
                                   meta, floor_how))
        verdicts = []
        for kind, need in c["target"]:
            if kind == "eager":
                r = rat["eager"]
                ok = r is not None and r >= need
                verdicts.append(f"{C.verdict(ok)} >= {need:.2f}x vs eager")
                targets.append((label, f"{C.fmt_ratio(r)} vs eager (target >= {need:.2f}x)", ok))
            else:
                r = vs_floor.get("manual_layers")
                ok = r is not None and r <= need
                verdicts.append(f"{C.verdict(ok)} <= {need:.2f}x floor")
                targets.append((label, f"{C.fmt_ratio(r)} of floor (target <= {need:.2f}x)", ok))
        paths = [f"{p} {C.fmt_ms(res[f'manual_layers[{p}]']['p50'])} ms"
                 for p in CE_PATHS if res.get(f"manual_layers[{p}]")]
        if paths:
            notes_all.append(f"{label}: cross-entropy paths forced: " + ", ".join(paths))
        tl = "; ".join(verdicts) or "-"
        for impl, why in notes.items():
            notes_all.append(f"{label}: {impl} n/a ({why})")

        def cell(impl, md=False):
            t = res.get(impl)
            if not t:
                return "n/a"
            if md:
                return f"{C.fmt_ms(t['p50'])} [{C.fmt_ms(t['p20'])}-{C.fmt_ms(t['p80'])}]"
            return C.fmt_ms(t["p50"])
        tail = [C.fmt_ms(floor_ms), C.fmt_ratio(rat["eager"]), C.fmt_ratio(rat["compile"])
                if "compile" in res else "-",
                C.fmt_ratio(vs_floor.get("manual_layers")), C.fmt_ratio(vs_floor.get("eager"))]
        tail.append(" / ".join(C.fmt_mib(mem.get(k))
                               for k in ("manual_layers", "eager", "compile")))
        tail += [tl, "n/a" if diff is None else f"{diff:.1e}"]
        rows_txt.append([label, cell("manual_layers"), cell("eager"),
                         cell("compile") if "compile" in res else "-"] + tail)
        rows_md.append([label, cell("manual_layers", True), cell("eager", True),
                        cell("compile", True) if "compile" in res else "-"] + tail)
        pl = f"{c['name']} {dt}\n{shape}"
        labels.append(pl)
        medians[pl] = {k: (v["p50"] if v else None) for k, v in res.items()}
        medians[pl]["floor"] = floor_ms
        ratios[pl] = rat
        for kind, need in c["target"]:
            if kind == "eager":
                plot_targets[pl] = {"eager": need}

    header = ["case", "manual_layers ms", "eager ms", "compile ms", "floor ms", "vs eager",
              "vs compile", "ours/floor", "eager/floor"]
    header.append("peak extra MiB (ours / eager / compile)")
    header += ["target", "loss diff"]
    print()
    C.print_table(header, rows_txt)
    print()
    for label, txt, ok in targets:
        print(f"{C.verdict(ok)}  {label}: {txt}")
    for n in notes_all:
        print(f"note: {n}")

    md_notes = ["vs eager / vs compile = baseline median / manual_layers median (> 1: faster); "
                "ours/floor = manual_layers median / floor (1.0 is the bandwidth limit).",
                "floor: " + ("bytes moved (X read, + dX written in the _dx cases) / device-copy "
                             "bandwidth." if cuda else "X.sum() (one read of X); dst.copy_(X) "
                             "for the _dx cases (read X, write dX)."),
                "Implementations are timed interleaved, round-robin, in the same process; "
                "gradients are set to None before every call."]
    md_notes += [f"{C.verdict(ok)} {label}: {txt}" for label, txt, ok in targets]
    md_notes += notes_all
    csv_path = C.append_csv(NAME, rows_csv)
    md_path = C.write_markdown(NAME, "Fused logistic-regression loss + gradients vs torch",
                               meta, header, rows_md, md_notes)
    png_path = C.write_plot(NAME, "Logistic-regression loss + gradients: median time", meta,
                            labels, ["manual_layers", "eager", "compile", "floor"], medians,
                            ratios, plot_targets)
    print(f"\nwrote {csv_path}\n      {md_path}\n      {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
