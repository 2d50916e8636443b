"""manual_layers.MLP against nn.Sequential(nn.Linear, act, nn.Linear) in eager mode and under
torch.compile: forward+backward (gradients of x and of all parameters from a random
grad_output), medians of calls interleaved in one process, and one call's peak extra memory
(common.peak_extra_mib: CUDA max_memory_allocated, CPU peak-RSS growth).

    python benchmarks/bench_mlp.py                          # CPU 8192x512->2048->512 fp32
                                                            # (+ CUDA 8192x1024->4096->1024 bf16)
    python benchmarks/bench_mlp.py --shapes 4096x256x1024x256 --activation relu --no-compile

Target (issue #7): >= 1.15x eager on CUDA bf16 at 8192x1024->4096->1024, GELU. On an sm_90 GPU
the MLP is also timed with MANUAL_LAYERS_CUTLASS=1 (csrc/cuda/experimental/linear_sm90.h), interleaved.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import common as C  # noqa: E402

ml = C.import_manual_layers()
from manual_layers.reference import ACTIVATION_MODULES  # noqa: E402

CPU_CASES = [("cpu", (8192, 512, 2048, 512), torch.float32)]
CUDA_CASES = [("cuda", (8192, 1024, 4096, 1024), torch.bfloat16)]


def cutlass_applies(dev, dt, act):
    """Whether MANUAL_LAYERS_CUTLASS=1 changes this case (the activations the MLP's fused
    dgrad covers)."""
    return C.cutlass_sm90(dev, dt) and act in ("gelu", "gelu_tanh", "silu", "relu")


def parse_shape(s):
    n, i, h, o = (int(v) for v in s.replace("->", "x").split("x"))
    return n, i, h, o


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--activation", default="gelu")
    p.add_argument("--shapes", default=None, help="NxIxHxO[,...] (CPU fp32)")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    act = args.activation
    cases = ([("cpu", parse_shape(s), torch.float32) for s in args.shapes.split(",")]
             if args.shapes else list(CPU_CASES))
    if torch.cuda.is_available() and not args.shapes:
        cases += CUDA_CASES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, activation {act}")
    print("| device | shape | dtype | ours ms | eager ms | compile ms | vs eager | vs compile "
          "| peak extra MiB (ours / eager / compile) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dev, (N, I, H, O), dt in cases:
        torch.manual_seed(0)
        seq = nn.Sequential(nn.Linear(I, H), ACTIVATION_MODULES[act](), nn.Linear(H, O)).to(
            device=dev, dtype=dt)
        ours = ml.MLP.from_sequential(seq)
        x = torch.randn(N, I, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn(N, O, device=dev, dtype=dt)
        impls = {"ours": ours, "eager": seq}
        if not args.no_compile:
            impls["compile"] = torch.compile(seq)
        if cutlass_applies(dev, dt, act):  # the same MLP with MANUAL_LAYERS_CUTLASS=1
            impls["ours+cutlass"] = ours

        def plain_step(m):
            x.grad = None
            for q in seq.parameters():  # MLP.from_sequential shares these Parameters
                q.grad = None
            m(x).backward(g)

        cutlass_step = C.with_cutlass(plain_step)

        def step(m, cutlass=False):
            (cutlass_step if cutlass else plain_step)(m)

        for k, m in impls.items():
            for _ in range(args.warmup):
                step(m, k == "ours+cutlass")
        times = {k: [] for k in impls}
        for _ in range(args.repeats):
            for k, m in impls.items():
                C.synchronize(dev)
                t0 = time.perf_counter()
                step(m, k == "ours+cutlass")
                C.synchronize(dev)
                times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        if "ours+cutlass" in med:
            print(f"  {dev} {N}x{I}->{H}->{O}: with MANUAL_LAYERS_CUTLASS=1 "
                  f"{med['ours+cutlass']:.3f} ms, {med['eager'] / med['ours+cutlass']:.2f}x eager, "
                  f"{med['ours'] / med['ours+cutlass']:.2f}x the default path", flush=True)
        comp = med.get("compile", float("nan"))
        mem = " / ".join(C.fmt_mib(C.peak_extra_mib(lambda m=impls[k]: step(m), dev))
                         if k in impls else "n/a" for k in ("ours", "eager", "compile"))
        print(f"| {dev} | {N}x{I}->{H}->{O} | {C.dtype_name(dt)} | {med['ours']:.1f} | "
              f"{med['eager']:.1f} | {comp:.1f} | {med['eager'] / med['ours']:.2f}x | "
              f"{comp / med['ours']:.2f}x | {mem} |", flush=True)


if __name__ == "__main__":
    main()
