"""Every kernel path once, on small shapes, for a run under NVIDIA's compute-sanitizer
(benchmarks/gpu_session.sh, stage `sanitize`: memcheck, racecheck, synccheck). The shapes are
picked to reach each CUDA kernel and instance (the fused binary kernel's 1/2/4/8 chunks and its
scalar loads, the tensor-core and CUDA-core cross-entropy kernels, the chunked and GEMM paths'
row kernels, the losses' dX kernel, Linear's activation and column-sum kernels, the MLP), small
enough that a sanitizer's 10-100x slowdown keeps the whole run to a minute or two.

  python benchmarks/sanitize_calls.py [--device cuda|cpu] [--only SUBSTRING]

On the CPU it runs the same calls through the CPU kernels (a check of this script itself).
Prints one line per call; exits non-zero if a call raises or returns a non-finite value.
"""
import argparse
import math
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402

ml = C.import_manual_layers()
F = ml.functional


def leaf(t):
    return t.detach().requires_grad_()


def bce_call(dev, dt, n, d, reduction="mean", strided=False, **opts):
    g = torch.Generator().manual_seed(n * 31 + d)
    # strided: a view of wider rows, sliced on the device (.to() of a view with gaps would
    # hand the kernel a contiguous copy)
    full = torch.randn(n, d + (1 if strided else 0), generator=g, dtype=dt).to(dev)
    x = full[:, :d] if strided else leaf(full)
    w = leaf((torch.randn(1, d, generator=g) * 0.05).to(dev, dt))
    b = leaf(torch.zeros(1, dtype=dt, device=dev))
    y = (torch.rand(n, generator=g) > 0.5).to(dev, dt)
    kw = {}
    if opts.get("pos_weight"):
        kw["pos_weight"] = torch.tensor([2.0], dtype=dt, device=dev)
    if opts.get("sample_weight"):
        kw["sample_weight"] = (torch.rand(n, generator=g) + 0.5).to(dev, dt)

    def call():
        loss = F.linear_binary_cross_entropy_with_logits(x, w, b, y, reduction=reduction, **kw)
        loss = loss.sum() if reduction == "none" else loss
        loss.backward()
        return loss.detach()
    return call


def ce_call(dev, dt, n, d, c, path=None, tc="1", chunk_rows=None, reduction="mean", **opts):
    g = torch.Generator().manual_seed(n * 17 + d * 3 + c)
    x = leaf(torch.randn(n, d, generator=g, dtype=dt).to(dev))
    w = leaf((torch.randn(c, d, generator=g) * 0.05).to(dev, dt))
    b = leaf(torch.zeros(c, dtype=dt, device=dev))
    t = torch.randint(0, c, (n,), generator=g)
    if opts.get("ignore"):
        t[::7] = -100
    t = t.to(dev)
    kw = {"label_smoothing": 0.1} if opts.get("smooth") else {}
    if opts.get("class_weight"):
        kw["class_weight"] = (torch.rand(c, generator=g) + 0.5).to(dev, dt)
    variables = {"MANUAL_LAYERS_CE_TC": tc}
    if path:
        variables["MANUAL_LAYERS_CE_PATH"] = path
    if chunk_rows:
        variables["MANUAL_LAYERS_CE_CHUNK_ROWS"] = chunk_rows

    def call():
        with mock.patch.dict(os.environ, {k: str(v) for k, v in variables.items()}):
            loss = F.linear_cross_entropy(x, w, b, t, reduction=reduction, **kw)
            loss = loss.sum() if reduction == "none" else loss
            loss.backward()
        return loss.detach()
    return call


def linear_call(dev, dt, n, k, m, activation):
    g = torch.Generator().manual_seed(n + k + m)
    layer = ml.Linear(k, m, activation=activation, device=dev, dtype=dt)
    x = leaf(torch.randn(n, k, generator=g, dtype=dt).to(dev))
    go = torch.randn(n, m, generator=g, dtype=dt).to(dev)

    def call():
        out = layer(x)
        out.backward(go)
        return out.detach().float().sum()
    return call


def mlp_call(dev, dt, n, i, h, o, activation):
    g = torch.Generator().manual_seed(n + i + h + o)
    mlp = ml.MLP(i, h, o, activation=activation, device=dev, dtype=dt)
    x = leaf(torch.randn(n, i, generator=g, dtype=dt).to(dev))

    def call():
        out = mlp(x)
        out.float().square().sum().backward()
        return out.detach().float().sum()
    return call


def calls(dev):
    bf, h, f = torch.bfloat16, torch.float16, torch.float32
    return {
        # fused binary kernel: chunks 1 / 2 / 4 / 8 (fp32 D > 4096), 16-bit row-ahead loads,
        # scalar loads (D not a multiple of the vector, strided rows), every weight option
        "bce_fused_f16_1chunk": bce_call(dev, h, 300, 256, pos_weight=True),
        "bce_fused_bf16_2chunks": bce_call(dev, bf, 300, 512, sample_weight=True),
        "bce_fused_f32_4chunks": bce_call(dev, f, 100, 3000, reduction="sum"),
        "bce_fused_f32_8chunks": bce_call(dev, f, 40, 5001, pos_weight=True, sample_weight=True),
        "bce_fused_bf16_scalar": bce_call(dev, bf, 129, 100, strided=True),
        "bce_fused_f64": bce_call(dev, torch.float64, 77, 40),
        "bce_gemm_none": bce_call(dev, f, 300, 64, reduction="none", pos_weight=True),
        # cross entropy: tensor-core kernel (bf16 CP 16 / 32, fp32 3xTF32), CUDA-core kernel,
        # chunked path (ce_rows_kernel with the dX GEMMs), GEMM path (reduction none), dX kernel
        "ce_tc_bf16_c10": ce_call(dev, bf, 1000, 512, 10, path="single", ignore=True),
        "ce_tc_f16_c17": ce_call(dev, h, 200, 256, 17, path="single", smooth=True,
                                 class_weight=True),
        "ce_tc_f32_c10": ce_call(dev, f, 300, 256, 10, path="single", class_weight=True),
        "ce_cudacore_bf16_c10": ce_call(dev, bf, 300, 512, 10, path="single", tc="0",
                                        ignore=True),
        "ce_cudacore_f64_c16": ce_call(dev, torch.float64, 100, 300, 16, path="single",
                                       smooth=True),
        "ce_chunked_bf16_c1000": ce_call(dev, bf, 300, 256, 1000, path="chunked",
                                         chunk_rows=64, smooth=True),
        "ce_chunked_f32_c10": ce_call(dev, f, 300, 64, 10, path="chunked", chunk_rows=5),
        "ce_gemm_none_f32_c40": ce_call(dev, f, 200, 64, 40, reduction="none", ignore=True),
        # Linear: cuBLASLt epilogues and the own activation / column-sum kernels
        "linear_bf16_gelu": linear_call(dev, bf, 300, 128, 520, "gelu"),
        "linear_f16_gelu_tanh": linear_call(dev, h, 64, 64, 256, "gelu_tanh"),
        "linear_f32_silu": linear_call(dev, f, 37, 24, 45, "silu"),
        "linear_f32_relu": linear_call(dev, f, 100, 64, 64, "relu"),
        "linear_f64_tanh": linear_call(dev, torch.float64, 30, 6, 6, "tanh"),
        "mlp_bf16_gelu": mlp_call(dev, bf, 128, 64, 256, 64, "gelu"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default="", help="run the calls whose name contains this")
    args = ap.parse_args()
    torch.manual_seed(0)
    bad = 0
    for name, call in calls(args.device).items():
        if args.only not in name:
            continue
        try:
            value = float(call())
            if args.device == "cuda":
                torch.cuda.synchronize()
            ok = math.isfinite(value)
            print(f"{'ok ' if ok else 'BAD'} {name} {value:.6g}", flush=True)
        except Exception as e:  # report and go on: one failing path should not hide the others
            ok = False
            print(f"BAD {name} raised {type(e).__name__}: {e}", flush=True)
        bad += not ok
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
