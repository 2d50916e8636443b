"""Host overhead: the wall time of one training call on shapes too small for the kernels to
matter, where Python, autograd and dispatch dominate. Ours against eager PyTorch doing the
same work, interleaved in one process.

    python benchmarks/bench_overhead.py                  # CPU, and CUDA when a GPU is visible
    python benchmarks/bench_overhead.py --device cpu --repeats 30

Cases (forward + backward, gradients of x, weight and bias):
  Linear+GELU 8x32->32 and 64x256->256: ml.functional.linear(x, W, b, "gelu") against
      F.gelu(F.linear(x, W, b));
  fused CE 8x32, C=10: ml.functional.linear_cross_entropy(x, W, b, y) against
      F.cross_entropy(F.linear(x, W, b), y).
Each sample is the wall time of `--inner` back-to-back calls (then one device synchronize),
divided by --inner; the table gives medians of --repeats samples and eager / ours (target
>= 1.25, i.e. ours <= 0.8x eager's time: issue #6). Results: benchmarks/results/overhead.{csv,md}.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402

ml = C.import_manual_layers()
MF = ml.functional
NAME = "overhead"
TARGET = 1.25  # eager / ours wall time (ours <= 0.8x eager)


def cases(device):
    def lin(n, k, m):
        x = torch.randn(n, k, device=device, requires_grad=True)
        W = (torch.randn(m, k, device=device) / k ** 0.5).requires_grad_()
        b = torch.randn(m, device=device, requires_grad=True)
        g = torch.randn(n, m, device=device)
        ours = lambda: torch.autograd.grad(MF.linear(x, W, b, "gelu"), (x, W, b), g)
        eager = lambda: torch.autograd.grad(F.gelu(F.linear(x, W, b)), (x, W, b), g)
        return ours, eager

    def ce(n, k, c):
        x = torch.randn(n, k, device=device, requires_grad=True)
        W = (torch.randn(c, k, device=device) / k ** 0.5).requires_grad_()
        b = torch.randn(c, device=device, requires_grad=True)
        y = torch.randint(0, c, (n,), device=device)
        ours = lambda: torch.autograd.grad(MF.linear_cross_entropy(x, W, b, y), (x, W, b))
        eager = lambda: torch.autograd.grad(F.cross_entropy(F.linear(x, W, b), y), (x, W, b))
        return ours, eager

    return [("Linear+GELU fwd+bwd 8x32->32", lin(8, 32, 32)),
            ("Linear+GELU fwd+bwd 64x256->256", lin(64, 256, 256)),
            ("fused CE fwd+bwd 8x32, C=10", ce(8, 32, 10))]


def sample(fn, inner, device):
    C.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    C.synchronize(device)
    return (time.perf_counter() - t0) * 1e6 / inner  # microseconds per call


def run(device, repeats, inner):
    meta = C.metadata(device)
    rows, table = [], []
    for case, (ours, eager) in cases(device):
        for _ in range(3):
            sample(ours, inner, device)
            sample(eager, inner, device)
        ts = {"ours": [], "eager": []}
        for _ in range(repeats):  # interleaved A/B
            ts["ours"].append(sample(ours, inner, device))
            ts["eager"].append(sample(eager, inner, device))
        med = {k: sorted(v)[len(v) // 2] for k, v in ts.items()}
        ratio = med["eager"] / med["ours"]
        table.append([case, device, f"{med['ours']:.1f} us", f"{med['eager']:.1f} us",
                      f"{ratio:.2f}", C.verdict(ratio >= TARGET)])
        for impl in ("ours", "eager"):
            p20, p50, p80 = C._percentiles([t / 1e3 for t in ts[impl]])
            rows.append(C.make_row(NAME, case, impl, "float32", "", "fwd+bwd",
                                   {"p20": p20, "p50": p50, "p80": p80, "n": repeats}, meta))
    return rows, table, meta


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=200)
    args = p.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    header = ["case", "device", "ours", "eager", "eager/ours", f">= {TARGET}"]
    all_rows, all_table, meta = [], [], None
    for d in devices:
        rows, table, meta = run(d, args.repeats, args.inner)
        all_rows += rows
        all_table += table
    C.print_table(header, all_table)
    C.append_csv(NAME, all_rows)
    C.write_markdown(NAME, "Host overhead: wall time per fwd+bwd call", meta, header, all_table,
                     notes=[f"median of {args.repeats} samples of {args.inner} calls each"])


if __name__ == "__main__":
    main()
