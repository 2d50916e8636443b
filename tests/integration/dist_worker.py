"""One rank of the distributed runs of tests/integration/test_distributed.py, run as a script:

    python tests/integration/dist_worker.py --worker ddp|fsdp [--device cpu|cuda]

with RANK, WORLD_SIZE, INIT_METHOD and RESULT_DIR in the environment (test_distributed.py's
launcher sets them). It does every check of its kind (the DDP and FSDP2 training checks here,
the data-parallel fits in dist_fit.py) and writes the numbers to RESULT_DIR/rank<r>.json; the
tests assert on them."""

import argparse
import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

from dist_fit import _distributed_fit, _fit_under_torchrun
from dist_models import STEPS, WORLD, _batch, _compare, _models, _same_across_ranks, _train


def _record(results, name, fn):
    try:
        results[name] = fn()
    except Exception:  # symmetric on both ranks (same code, same shapes): no hang follows
        results[name] = {"error": traceback.format_exc()}


def _worker(kind, device_type):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    import manual_layers as ml

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    device = torch.device(device_type, rank if device_type == "cuda" else 0) \
        if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group(backend, init_method=os.environ["INIT_METHOD"], rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    results = {"torch": torch.__version__, "backend": backend}
    D, H, C, n = 13, 17, 5, 12  # odd sizes: FSDP2 pads uneven dim-0 shards
    try:
        for dtype in (torch.float64, torch.float32):
            dn = str(dtype).replace("torch.", "")
            for name, (ours, ref) in _models(torch, nn, F, ml, D, H, C, dtype).items():
                key = f"{name}/{dn}"
                ours, ref = ours.to(device), ref.to(device)
                single = _models(torch, nn, F, ml, D, H, C, dtype)[name][0].to(device)
                # A class-weighted mean divides by the batch's weight sum, so the mean of the
                # per-rank means (what DDP/FSDP average, for torch's layers too) is not the mean
                # over the concatenated batch: that model's reference averages per-rank losses.
                weighted = name == "ce_loss_module"
                _train(torch, single, list(single.parameters()), rank, n, D, C, dtype, device,
                       concat=not weighted, shard_mean=weighted)
                if kind == "ddp":
                    _record(results, key, lambda: _ddp_checks(
                        torch, dist, nn, ours, ref, single, rank, n, D, C, dtype, device))
                else:
                    _record(results, key, lambda: _fsdp_checks(
                        torch, dist, ours, ref, single, rank, n, D, C, dtype, device))
        if kind == "ddp":
            _record(results, "ddp_options", lambda: _ddp_options(
                torch, dist, nn, F, ml, rank, n, D, H, C, device))
            _record(results, "fit_under_torchrun", lambda: _fit_under_torchrun(
                torch, dist, ml, rank, device))
            _record(results, "distributed_fit", lambda: _distributed_fit(
                torch, dist, ml, rank, device))
        else:
            _record(results, "fsdp_inputs_are_plain_tensors", lambda: _fsdp_inputs(
                torch, nn, F, ml, rank, n, D, H, C, device))
            _record(results, "fsdp_loss_method", lambda: _fsdp_loss_method(
                torch, dist, nn, F, ml, rank, n, D, H, C, device))
            _record(results, "fsdp_mixed_precision", lambda: _fsdp_mixed_precision(
                torch, dist, nn, F, ml, rank, n, D, H, C, device))
            _record(results, "fsdp_state_dict", lambda: _fsdp_state_dict(
                torch, dist, nn, F, ml, rank, n, D, H, C, device))
    finally:
        Path(os.environ["RESULT_DIR"], f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
        dist.destroy_process_group()


def _ddp_checks(torch, dist, nn, ours, ref, single, rank, n, D, C, dtype, device):
    from torch.nn.parallel import DistributedDataParallel as DDP
    dev_ids = [device.index] if device.type == "cuda" else None
    d_ours, d_ref = DDP(ours, device_ids=dev_ids), DDP(ref, device_ids=dev_ids)
    _train(torch, d_ours, list(d_ours.parameters()), rank, n, D, C, dtype, device)
    _train(torch, d_ref, list(d_ref.parameters()), rank, n, D, C, dtype, device)
    po = list(ours.parameters())
    return {"vs_torch_ddp": _compare(torch, po, ref.parameters()),
            "vs_single_process": _compare(torch, po, single.parameters()),
            "ranks_agree": _same_across_ranks(torch, dist, po),
            "torch_ranks_agree": _same_across_ranks(torch, dist, list(ref.parameters()))}


def _ddp_options(torch, dist, nn, F, ml, rank, n, D, H, C, device):
    """DDP's gradient_as_bucket_view, static_graph, find_unused_parameters and no_sync (gradient
    accumulation) with the fused CE head, whose backward hands its precomputed gradients to
    AccumulateGrad: each variant must end where the plain DDP run ends."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    dev_ids = [device.index] if device.type == "cuda" else None
    dtype = torch.float64

    def run(no_sync=False, **kw):
        ours = _models(torch, nn, F, ml, D, H, C, dtype)["fused_ce_head"][0].to(device)
        d = DDP(ours, device_ids=dev_ids, **kw)
        _train(torch, d, list(d.parameters()), rank, n, D, C, dtype, device,
               no_sync=d if no_sync else None)
        return list(ours.parameters())

    base = run()
    out = {}
    for name, kw in {"gradient_as_bucket_view": dict(gradient_as_bucket_view=True),
                     "static_graph": dict(static_graph=True),
                     "find_unused_parameters": dict(find_unused_parameters=True),
                     "no_sync_accumulation": dict(no_sync=True)}.items():
        p = run(**kw)
        out[name] = _compare(torch, p, base)
        out[name]["ranks_agree"] = _same_across_ranks(torch, dist, p)
    return out



def _shard(ours_or_ref, fully_shard, **kw):
    """fully_shard every Linear-like leaf that runs its own forward, then the root. A fused-loss
    head (its weight used by the root's forward, not its own) stays in the root's group, which
    the root's forward all-gathers."""
    import manual_layers as ml
    from torch import nn
    root = ours_or_ref
    for name, m in list(root.named_modules()):
        if name.startswith("head") or name.startswith("clf") or m is root:
            continue
        if isinstance(m, (nn.Linear, ml.LogisticRegression)):
            fully_shard(m, **kw)
    fully_shard(root, **kw)
    return root


def _fsdp_checks(torch, dist, ours, ref, single, rank, n, D, C, dtype, device):
    from torch.distributed.fsdp import fully_shard
    _shard(ours, fully_shard)
    _shard(ref, fully_shard)
    types = {type(p).__name__ for p in ours.parameters()}
    _train(torch, ours, list(ours.parameters()), rank, n, D, C, dtype, device)
    _train(torch, ref, list(ref.parameters()), rank, n, D, C, dtype, device)
    po = list(ours.parameters())
    return {"param_types": sorted(types),
            "grad_types": sorted({type(p.grad).__name__ for p in po if p.grad is not None}),
            "vs_torch_fsdp": _compare(torch, po, ref.parameters()),
            "vs_single_process": _compare(torch, po, single.parameters()),
            "ranks_agree": _same_across_ranks(torch, dist, po)}


def _fsdp_inputs(torch, nn, F, ml, rank, n, D, H, C, device):
    """What our public ops receive under FSDP2: the unsharded parameters (plain
    tensors, all-gathered by the pre-forward hook), not DTensors; gradients come back as
    DTensor shards (reduce-scattered)."""
    from torch.distributed.fsdp import fully_shard
    import manual_layers.functional as MFmod
    seen = []
    # The public ops (torch.ops.manual_layers.*) as functional.py binds them, wrapped in spies
    # that record what they receive.
    bound = {"_LINEAR": "linear", "_MLP": "mlp", "_LINEAR_BCE": "linear_bce",
             "_LINEAR_CE": "linear_ce"}
    real = {k: getattr(MFmod, k) for k in bound}

    def spy(name, op):
        def call(x, weight, bias, *rest):
            seen.append([name, type(x).__name__, type(weight).__name__,
                         type(bias).__name__, list(weight.shape)])
            return op(x, weight, bias, *rest)
        return call
    for k, name in bound.items():
        setattr(MFmod, k, spy(name, real[k]))
    try:
        for name in ("mlp_logreg_layer", "fused_ce_head", "bce_logreg_head"):
            m = _models(torch, nn, F, ml, D, H, C, torch.float64)[name][0].to(device)
            _shard(m, fully_shard)
            x, y = _batch(torch, rank, 0, n, D, C, torch.float64, device)
            m(x, y).backward()
            grads = sorted({type(p.grad).__name__ for p in m.parameters()})
            seen.append(["grads", *grads])
    finally:
        for k, op in real.items():
            setattr(MFmod, k, op)
    return {"seen": seen}


def _fsdp_loss_method(torch, dist, nn, F, ml, rank, n, D, H, C, device):
    """LogisticRegression.loss is a method, not forward: under fully_shard its parameters are
    still sharded DTensors when it is called directly (as torch's F.linear would see them), and
    register_fsdp_forward_method makes FSDP2 all-gather around it."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    x, y = _batch(torch, rank, 0, n, D, C, torch.float64, device)
    out = {}
    torch.manual_seed(0)
    clf = ml.LogisticRegression(D, num_classes=C, dtype=torch.float64).to(device)
    ref = nn.Linear(D, C, dtype=torch.float64).to(device)
    with torch.no_grad():
        ref.weight.copy_(clf.weight)
        ref.bias.copy_(clf.bias)
    single = [p.detach().clone() for p in clf.parameters()]
    fully_shard(clf)
    fully_shard(ref)
    for what, f in (("ours_unregistered", lambda: clf.loss(x, y)),
                    ("torch_F_linear_unregistered",
                     lambda: F.cross_entropy(F.linear(x, ref.weight, ref.bias), y))):
        try:
            f()
            out[what] = "no error"
        except Exception as e:
            out[what] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    register_fsdp_forward_method(clf, "loss")
    opt = torch.optim.SGD(clf.parameters(), lr=0.5)
    for step in range(STEPS):
        xb, yb = _batch(torch, rank, step, n, D, C, torch.float64, device)
        opt.zero_grad()
        clf.loss(xb, yb).backward()
        opt.step()
    # single-process reference: plain PyTorch on the concatenated batches
    w, b = (p.requires_grad_() for p in single)
    opt = torch.optim.SGD([w, b], lr=0.5)
    for step in range(STEPS):
        xs, ys = zip(*(_batch(torch, r, step, n, D, C, torch.float64, device)
                       for r in range(WORLD)))
        opt.zero_grad()
        F.cross_entropy(F.linear(torch.cat(xs), w, b), torch.cat(ys)).backward()
        opt.step()
    out["registered_vs_single_process"] = _compare(torch, list(clf.parameters()), [w, b])
    return out


def _fsdp_mixed_precision(torch, dist, nn, F, ml, rank, n, D, H, C, device):
    """FSDP2 MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32): our kernels get
    bf16 parameters and inputs, as torch's layers do; both end within bf16 tolerance."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    ours, ref = _models(torch, nn, F, ml, D, H, C, torch.float32)["fused_ce_head"]
    ours, ref = ours.to(device), ref.to(device)
    _shard(ours, fully_shard, mp_policy=mp)
    _shard(ref, fully_shard, mp_policy=mp)
    _train(torch, ours, list(ours.parameters()), rank, n, D, C, torch.float32, device)
    _train(torch, ref, list(ref.parameters()), rank, n, D, C, torch.float32, device)
    return {"vs_torch_fsdp": _compare(torch, list(ours.parameters()), list(ref.parameters())),
            "ranks_agree": _same_across_ranks(torch, dist, list(ours.parameters()))}


def _fsdp_state_dict(torch, dist, nn, F, ml, rank, n, D, H, C, device):
    """The full state dict of an FSDP2-trained model (torch.distributed.checkpoint's
    get_model_state_dict) has the plain model's keys, nothing else, and loaded into a plain
    (unwrapped) model gives the loss the sharded model gives."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    dtype = torch.float64
    out = {}
    for name in ("mlp_logreg_layer", "ce_loss_module", "bce_logreg_head"):
        ours = _models(torch, nn, F, ml, D, H, C, dtype)[name][0].to(device)
        plain = _models(torch, nn, F, ml, D, H, C, dtype)[name][0].to(device)
        keys = sorted(plain.state_dict())
        _shard(ours, fully_shard)
        _train(torch, ours, list(ours.parameters()), rank, n, D, C, dtype, device)
        sd = get_model_state_dict(ours, options=StateDictOptions(full_state_dict=True))
        plain.load_state_dict(sd)
        x, y = _batch(torch, rank, 99, n, D, C, dtype, device)
        with torch.no_grad():
            a, b = ours(x, y), plain(x, y)
        out[name] = {"keys_match": sorted(sd) == keys, "plain_tensors": all(
            type(v) is torch.Tensor for v in sd.values()),
            "loss_rel_err": ((a - b).abs() / b.abs()).item()}
    return out


# ================================================================================================
# The launcher and the tests
# ================================================================================================


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["ddp", "fsdp"], required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()
    _worker(a.worker, a.device)
