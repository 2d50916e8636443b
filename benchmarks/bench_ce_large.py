"""Large-vocabulary linear + cross entropy (an LM head): functional.linear_cross_entropy
(chunked path: no N x C logits) against eager F.linear + F.cross_entropy, forward+backward
(gradients of x, weight and bias), time and peak extra memory.

    python benchmarks/bench_ce_large.py                    # CPU 4096x256, C 32000 fp32 (+ CUDA
                                                           # 8192x2048, C 32000 bf16 if a GPU)
    python benchmarks/bench_ce_large.py --threshold        # CPU: single-pass kernel vs chunked
                                                           # path at C 256..32000, D 256 (the
                                                           # measurement behind the path choice)
    python benchmarks/bench_ce_large.py --soft             # probability targets: the kernel
                                                           # ops _linear_ce_soft_fwd (mean, all
                                                           # gradients) against eager, CPU
                                                           # 65536x256, C 10/100/1000, fp32 and
                                                           # bf16 (--classes, --rows, --dtypes)

Peak extra memory: CUDA torch.cuda.max_memory_allocated() minus the memory allocated before
the call (inputs and the .grad buffers of a previous step); CPU the growth of the process's
peak RSS (VmHWM, reset through /proc/self/clear_refs before each measured call; "n/a" where the
kernel refuses that). Medians of interleaved calls (ours, eager, ours, ...).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402

ml = C.import_manual_layers()


def problem(N, D, Cn, device, dtype):
    torch.manual_seed(0)
    x = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(Cn, D, device=device, dtype=dtype) / D ** 0.5).requires_grad_()
    b = torch.zeros(Cn, device=device, dtype=dtype, requires_grad=True)
    t = torch.randint(0, Cn, (N,), device=device)
    return x, w, b, t


def step_ours(x, w, b, t):
    ml.functional.linear_cross_entropy(x, w, b, t).backward()


def step_eager(x, w, b, t):
    F.cross_entropy(F.linear(x, w, b), t).backward()


def soft_problem(N, D, Cn, device, dtype):
    x, w, b, _ = problem(N, D, Cn, device, dtype)
    q = torch.randn(N, Cn, device=device, dtype=torch.float32).mul(2).softmax(1).to(dtype)
    return x, w, b, q


def soft_step_ours(x, w, b, q):
    """Probability targets through the kernel op, forward and the gradients the public op's
    backward returns for grad_output 1 (in x's dtype). The op is not yet wired into
    linear_cross_entropy, whose autograd would add only the grad_output scaling."""
    loss, gw, gb, gx = torch.ops.manual_layers._linear_ce_soft_fwd(
        x.detach(), w.detach(), b.detach(), q, None, 0.0, 1, True, True, True)
    x.grad, w.grad, b.grad = gx, gw.to(w.dtype), gb.to(b.dtype)
    return loss


def soft_step_eager(x, w, b, q):
    F.cross_entropy(F.linear(x, w, b), q).backward()


def measure(fn, args, device, repeats):
    """(median ms, peak extra MiB) of fn(*args), gradients reset to None before each call."""
    times, peaks = [], []

    def zero():
        for p in args[:3]:
            p.grad = None

    def step():
        start = time.perf_counter()
        fn(*args)
        C.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    for _ in range(repeats):
        mib = C.peak_extra_mib(step, device, zero)
        peaks.append(float("nan") if mib is None else mib)
    return statistics.median(times), max(peaks)


def compare(N, D, Cn, device, dtype, repeats, impls, make=problem):
    args = make(N, D, Cn, device, dtype)
    for _, fn in impls:  # warm-up
        fn(*args)
    res = {name: ([], []) for name, _ in impls}
    for _ in range(repeats):  # interleaved
        for name, fn in impls:
            ms, mib = measure(fn, args, device, 1)
            res[name][0].append(ms)
            res[name][1].append(mib)
    return {k: (statistics.median(v[0]), max(v[1])) for k, v in res.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threshold", action="store_true",
                   help="CPU: single-pass kernel vs chunked path over C (D 256, N --rows)")
    p.add_argument("--soft", action="store_true",
                   help="CPU: probability targets, the kernel op against eager")
    p.add_argument("--classes", default=None,
                   help="the C values of --threshold (256,1024,4096,32000) or --soft "
                        "(10,100,1000)")
    p.add_argument("--rows", type=int, default=None,
                   help="N of --threshold (4096) or --soft (65536)")
    p.add_argument("--dtypes", default="fp32,bf16", help="the dtypes of --soft")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if args.soft:
        print("| N x D, C, dtype | ours ms | eager ms | speed-up | ours peak extra MiB "
              "| eager peak extra MiB |")
        print("|---|---|---|---|---|---|")
        for dn in args.dtypes.split(","):
            for Cn in (int(c) for c in (args.classes or "10,100,1000").split(",")):
                N = args.rows or 65536
                r = compare(N, 256, Cn, "cpu", C.DTYPES[dn], args.repeats,
                            [("ours", soft_step_ours), ("eager", soft_step_eager)],
                            make=soft_problem)
                (to, mo), (te, me) = r["ours"], r["eager"]
                print(f"| {N}x256, {Cn}, {dn} | {to:.1f} | {te:.1f} | {te / to:.2f}x "
                      f"| {mo:.0f} | {me:.0f} |", flush=True)
        return
    args.classes = args.classes or "256,1024,4096,32000"
    args.rows = args.rows or 4096
    if args.threshold:
        def with_path(path):
            def fn(*a):
                os.environ["MANUAL_LAYERS_CE_PATH"] = path
                try:
                    step_ours(*a)
                finally:
                    del os.environ["MANUAL_LAYERS_CE_PATH"]
            return fn
        print("| C | single-pass ms | chunked ms | eager ms | single MiB | chunked MiB | eager MiB |")
        print("|---|---|---|---|---|---|---|")
        for Cn in (int(c) for c in args.classes.split(",")):
            r = compare(args.rows, 256, Cn, "cpu", torch.float32, args.repeats,
                        [("single", with_path("single")), ("chunked", with_path("chunked")),
                         ("eager", step_eager)])
            print(f"| {Cn} | {r['single'][0]:.1f} | {r['chunked'][0]:.1f} | {r['eager'][0]:.1f} "
                  f"| {r['single'][1]:.0f} | {r['chunked'][1]:.0f} | {r['eager'][1]:.0f} |",
                  flush=True)
        return
    cases = [("cpu", 4096, 256, 32000, torch.float32)]
    if torch.cuda.is_available():
        cases.append(("cuda", 8192, 2048, 32000, torch.bfloat16))
    print("| device | N x D, C, dtype | ours ms | eager ms | speed-up | ours peak extra MiB "
          "| eager peak extra MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for dev, N, D, Cn, dt in cases:
        r = compare(N, D, Cn, dev, dt, args.repeats, [("ours", step_ours), ("eager", step_eager)])
        (to, mo), (te, me) = r["ours"], r["eager"]
        print(f"| {dev} | {N}x{D}, {Cn}, {C.dtype_name(dt)} | {to:.1f} | {te:.1f} | "
              f"{te / to:.2f}x | {mo:.0f} | {me:.0f} | {me / max(mo, 1e-9):.1f}x |", flush=True)


if __name__ == "__main__":
    main()
