"""Shared helpers of the benchmark scripts: timing, run metadata and result files.

Every script appends its rows to benchmarks/results/<name>.csv (one row per measurement,
p20/p50/p80 in milliseconds, plus device, versions and date, so runs on different machines
and commits can be put side by side), and rewrites benchmarks/results/<name>.md (a Markdown
table of this run) and benchmarks/results/<name>.png (bar plot of this run's medians, with
the speed-up ratios of manual_layers over each baseline).
"""

import csv
import datetime
import math
import os
import platform
import statistics
import sys
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_manual_layers():
    """Import manual_layers, falling back to the source checkout (in-place build) when the
    package is not installed."""
    try:
        import manual_layers
    except ImportError:
        sys.path.insert(0, REPO_ROOT)
        import manual_layers
    return manual_layers


# ---- devices and dtypes ------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
          "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cutlass_sm90(device, dtype):
    """Whether MANUAL_LAYERS_CUTLASS=1 can change a 16-bit case on this device: the sm_90
    CUTLASS kernels (csrc/cuda/experimental/linear_sm90.h) are built in and the GPU is sm_90. Each
    benchmark adds the activations they cover."""
    import manual_layers as ml
    return (device == "cuda" and ml.utils.info().get("cuda_sm90_cutlass_kernels", False)
            and torch.cuda.get_device_capability() == (9, 0)
            and dtype in (torch.bfloat16, torch.float16))


def with_cutlass(f):
    """f run with MANUAL_LAYERS_CUTLASS=1 (read by the ops on every call), the variable then
    restored; None stays None."""
    if f is None:
        return None

    def g(*args, **kwargs):
        old = os.environ.get("MANUAL_LAYERS_CUTLASS")
        os.environ["MANUAL_LAYERS_CUTLASS"] = "1"
        try:
            return f(*args, **kwargs)
        finally:
            if old is None:
                del os.environ["MANUAL_LAYERS_CUTLASS"]
            else:
                os.environ["MANUAL_LAYERS_CUTLASS"] = old
    return g


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_timing_args(p, cuda_repeats):
    """The options both benchmark scripts share; returns nothing, adds to parser p."""
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed calls per implementation (default: 10 on CPU, {cuda_repeats} on "
                        "CUDA; 5 / 20 with --quick)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats")


def checked_device(args):
    """args.device, refusing cuda when no GPU is visible."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    return args.device


def parse_dtype(name):
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def metadata(device):
    """Where and with what a run was measured."""
    import manual_layers
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        try:  # the CPU model, when Linux tells it
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
                        break
        except OSError:
            pass
    return {
        "device": dev.type,
        "device_name": name,
        "torch": torch.__version__,
        "manual_layers": getattr(manual_layers, "__version__", "?"),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# ---- timing --------------------------------------------------------------------------------

def _percentiles(times_ms):
    ts = sorted(times_ms)
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=10, method="inclusive")  # deciles: q[1]=p20, q[4]=p50, q[7]=p80
    return q[1], statistics.median(ts), q[7]


def time_fn(fn, device="cpu", repeats=20, warmup=3, setup=None):
    """Time fn() (no arguments). setup(), if given, runs before every call, untimed (zeroing
    gradients, say). Returns a dict with p20, p50, p80 in milliseconds and the sample count.

    CPU: time.perf_counter around each call. CUDA: a pair of CUDA events around each call,
    one synchronize at the end (the setup runs on the same stream, outside the events)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times = []
    if torch.device(device).type == "cuda":
        events = []
        for _ in range(repeats):
            if setup is not None:
                setup()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(repeats):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    p20, p50, p80 = _percentiles(times)
    return {"p20": p20, "p50": p50, "p80": p80, "n": len(times)}


def fmt_ms(x):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_ratio(x):
    return "n/a" if x is None else f"{x:.2f}x"


def verdict(ok):
    return "PASS" if ok else "MISS"


# ---- results -------------------------------------------------------------------------------

CSV_FIELDS = ["benchmark", "case", "impl", "dtype", "shape", "mode", "p20_ms", "p50_ms",
              "p80_ms", "repeats", "extra", "device", "device_name", "torch", "manual_layers",
              "date"]


def ensure_results_dir():
    os.makedirs(RESULTS_DIR, exist_ok=True)
    return RESULTS_DIR


def make_row(benchmark, case, impl, dtype, shape, mode, timing, meta, extra=""):
    """One CSV row. timing: time_fn's dict, or None when the implementation is unavailable."""
    t = timing or {}
    row = {"benchmark": benchmark, "case": case, "impl": impl, "dtype": dtype, "shape": shape,
           "mode": mode,
           "p20_ms": f"{t['p20']:.4f}" if t else "n/a",
           "p50_ms": f"{t['p50']:.4f}" if t else "n/a",
           "p80_ms": f"{t['p80']:.4f}" if t else "n/a",
           "repeats": t.get("n", 0), "extra": extra}
    row.update({k: meta[k] for k in ("device", "device_name", "torch", "manual_layers", "date")})
    return row


def append_csv(name, rows):
    """Append rows (dicts with CSV_FIELDS keys) to results/<name>.csv; header on creation."""
    path = os.path.join(ensure_results_dir(), f"{name}.csv")
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(header, rows):
    """A plain-text table for the terminal."""
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(header)]
    widths = [max(len(c) for c in col) for col in cols]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))


def write_markdown(name, title, meta, header, rows, notes=()):
    path = os.path.join(ensure_results_dir(), f"{name}.md")
    with open(path, "w") as f:
        f.write(f"# {title}\n\n")
        f.write(f"{meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
                f"manual_layers {meta['manual_layers']}, {meta['date']}\n\n")
        f.write("Times in ms (median, with p20-p80 in brackets); ratio = baseline time / "
                "manual_layers time (> 1: manual_layers is faster).\n\n")
        f.write(markdown_table(header, rows) + "\n")
        if notes:
            f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return path


def write_plot(name, title, meta, cases, impls, medians, ratios=None, targets=None):
    """A grouped bar plot of the medians of this run (log scale), one group per case, one bar
    per implementation, and, below it, the speed-up of manual_layers over each baseline.

    cases: labels; impls: implementation names; medians[case][impl]: ms or None;
    ratios[case][baseline]: speed-up (baseline / ours) or None;
    targets[case][baseline]: the required speed-up, drawn as a black tick over its bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cases)
    has_ratios = bool(ratios) and any(v is not None for r in ratios.values() for v in r.values())
    nrows = 2 if has_ratios else 1
    width = max(8.0, 1.6 + 1.25 * n * max(1, len(impls)) * 0.55)
    fig, axes = plt.subplots(nrows, 1, figsize=(width, 4.2 * nrows + 0.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    ax = axes[0][0]
    bw = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, c in enumerate(cases):
            v = medians.get(c, {}).get(impl)
            if v is not None:
                xs.append(i - 0.4 + bw * (j + 0.5))
                ys.append(v)
        bars = ax.bar(xs, ys, bw, label=impl, color=colors[j % len(colors)])
        for b, y in zip(bars, ys):
            ax.annotate(fmt_ms(y), (b.get_x() + b.get_width() / 2, y), ha="center",
                        va="bottom", fontsize=7, rotation=0, xytext=(0, 1),
                        textcoords="offset points")
        for i, c in enumerate(cases):  # mark unavailable baselines
            if medians.get(c, {}).get(impl) is None and c in medians:
                ax.annotate("n/a", (i - 0.4 + bw * (j + 0.5), 0), ha="center", va="bottom",
                            fontsize=7, xycoords=("data", "axes fraction"))
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_xticks(range(n))
    ax.set_xticklabels(cases, fontsize=8)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{title}\n{meta['device_name']} - torch {meta['torch']} - "
                 f"manual_layers {meta['manual_layers']} - {meta['date'][:10]}", fontsize=9)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.margins(y=0.15)

    if has_ratios:
        ax = axes[1][0]
        baselines = []  # in first-seen order (eager before compile, say)
        for r in ratios.values():
            baselines += [b for b in r if b not in baselines]
        bw = 0.8 / max(1, len(baselines))
        drew_target = False
        for j, base in enumerate(baselines):
            xs, ys = [], []
            for i, c in enumerate(cases):
                v = ratios.get(c, {}).get(base)
                if v is not None:
                    xs.append(i - 0.4 + bw * (j + 0.5))
                    ys.append(v)
            bars = ax.bar(xs, ys, bw, label=f"speed-up vs {base}",
                          color=colors[(j + len(impls)) % len(colors)])
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.2f}x", (b.get_x() + b.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
            for i, c in enumerate(cases):
                if base in ratios.get(c, {}) and ratios[c][base] is None:
                    ax.annotate("n/a", (i - 0.4 + bw * (j + 0.5), 0), ha="center", va="bottom",
                                fontsize=7, xycoords=("data", "axes fraction"))
                need = (targets or {}).get(c, {}).get(base)
                if need is not None:
                    x0 = i - 0.4 + bw * j
                    ax.hlines(need, x0, x0 + bw, colors="black", lw=2,
                              label="target" if not drew_target else None)
                    drew_target = True
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylabel("speed-up of manual_layers (x)")
        ax.set_xticks(range(n))
        ax.set_xticklabels(cases, fontsize=8)
        ax.legend(fontsize=8, loc="best")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    fig.tight_layout()
    path = os.path.join(ensure_results_dir(), f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def time_many(fns, device="cpu", repeats=20, warmup=3):
    """Time several implementations of the same work, interleaved round-robin (call 1 of each,
    then call 2 of each, ...) so that a noisy machine's slow spells hit all of them alike.

    fns: {name: (fn, setup or None)}. Returns {name: time_fn-style dict}."""
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fn, setup = fns[k]
            if setup is not None:
                setup()
            fn()
    synchronize(device)
    cuda = torch.device(device).type == "cuda"
    samples = {k: [] for k in names}
    for _ in range(repeats):
        for k in names:
            fn, setup = fns[k]
            if setup is not None:
                setup()
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                samples[k].append((s, e))
            else:
                t0 = time.perf_counter()
                fn()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        samples = {k: [s.elapsed_time(e) for s, e in v] for k, v in samples.items()}
    out = {}
    for k, ts in samples.items():
        p20, p50, p80 = _percentiles(ts)
        out[k] = {"p20": p20, "p50": p50, "p80": p80, "n": len(ts)}
    return out


# ---- memory --------------------------------------------------------------------------------

def _proc_status_mib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Resets the process's peak RSS (VmHWM) to its current RSS; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    """Returns the C heap's free memory to the OS (glibc malloc_trim), so that memory freed by
    earlier calls and reused by the next one is faulted in again and shows in its RSS."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mib(step, device, setup=None):
    """Peak extra memory of one step() call in MiB, after setup() (untimed, unmeasured: zeroing
    gradients, or a forward pass for a backward-only step). CUDA: torch.cuda.max_memory_allocated()
    during the call minus memory_allocated() before it. CPU: the growth of the process's peak
    RSS (VmHWM reset through /proc/self/clear_refs before the call) over its RSS before it,
    after the free heap memory and the idle buffers of manual_layers' CPU output cache are handed
    back to the OS (so reused memory counts too); None
    where Linux does not offer that. Both count the outputs the call returns or keeps
    (gradients in .grad) and the temporaries it frees again; the CPU figure counts pages
    written, not allocated-but-untouched memory."""
    if setup is not None:
        setup()
    synchronize(device)
    if torch.device(device).type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    _malloc_trim()
    import_manual_layers().utils.empty_cpu_cache()  # our idle output buffers: a cold call's figure
    base = _proc_status_mib("VmRSS")
    if base is None or not _reset_peak_rss():
        return None
    step()
    peak = _proc_status_mib("VmHWM")
    return None if peak is None else max(0.0, peak - base)


def fmt_mib(x):
    return "n/a" if x is None else f"{x:.0f}"


def try_run(step, device):
    """Run step() once (e.g. to trigger torch.compile); returns None on success, else a short
    reason string (the baseline is then reported as n/a instead of crashing the script)."""
    try:
        step()
        synchronize(device)
        return None
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:140]
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001
            pass
        return msg
