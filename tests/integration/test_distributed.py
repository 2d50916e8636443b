"""manual_layers under torch.distributed: DistributedDataParallel and FSDP2 (fully_shard).

Models built from manual_layers.Linear (fused activations), LogisticRegression (as a layer and
as a fused-loss head) and the fused losses must train under DDP and FSDP2 exactly as the same
models built from torch layers do. Each check trains k steps from the same start on the same
per-rank data and compares the parameters:
  (a) ours under DDP/FSDP2 against the torch-layer model under DDP/FSDP2;
  (b) ours on 2 ranks against ours in one process on the concatenated batch (gradient
      averaging semantics);
  (c) the parameters agree bitwise across ranks.

Each distributed run is 2 processes (one subprocess per rank, gloo on CPU; NCCL on CUDA where
two GPUs are visible) that run this file as a script (`--worker ddp|fsdp`), do every check of
their kind, and write the numbers to a JSON file per rank; the tests then assert on them. A hang
fails: the ranks run under a deadline and are killed when it passes.
"""

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest

# Every test here is marked distributed. The DDP run (one launch does every DDP check) stays in
# `make test` as the smoke test of multi-process training and fitting; the FSDP2 run is marked
# slow (`make test-all`).
pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
STEPS = 3
DEADLINE_S = 180  # whole run (2 ranks importing torch on a 2-core machine take ~10 s of it)


# ================================================================================================
# The ranks (run as `python tests/integration/test_distributed.py --worker ...`)
# ================================================================================================

def _models(torch, nn, F, ml, D, H, C, dtype):
    """Pairs (ours, torch's) of identical-start models; each model's forward(x, y) returns the
    mean loss, so that DDP/FSDP see the whole computation in forward."""

    class OursMLP(nn.Module):  # Linear+act layers, LogisticRegression as the output layer
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(ml.Linear(D, H, activation="gelu"),
                                     ml.Linear(H, H, activation="silu"),
                                     ml.Linear(H, H, activation="tanh"),
                                     ml.LogisticRegression(H, num_classes=C))

        def forward(self, x, y):
            return F.nll_loss(torch.log(self.net(x)), y)

    class TorchMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, H), nn.SiLU(),
                                     nn.Linear(H, H), nn.Tanh(), nn.Linear(H, C),
                                     nn.Softmax(dim=-1))

        def forward(self, x, y):
            return F.nll_loss(torch.log(self.net(x)), y)

    class OursCE(nn.Module):  # MLP body, fused linear + cross-entropy head
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(ml.Linear(D, H, activation="relu"),
                                      ml.Linear(H, H, activation="gelu_tanh"))
            self.head = nn.Linear(H, C)

        def forward(self, x, y):
            return ml.functional.linear_cross_entropy(self.body(x), self.head.weight,
                                                      self.head.bias, y)

    class TorchCE(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H),
                                      nn.GELU(approximate="tanh"))
            self.head = nn.Linear(H, C)

        def forward(self, x, y):
            return F.cross_entropy(self.head(self.body(x)), y)

    class OursCELoss(nn.Module):  # the LinearCrossEntropyLoss module (class-weight buffer)
        def __init__(self):
            super().__init__()
            self.body = ml.Linear(D, H, activation="sigmoid")
            self.head = ml.Linear(H, C)
            cw = torch.linspace(0.5, 1.5, C, dtype=dtype)
            self.loss_fn = ml.LinearCrossEntropyLoss(weight=cw, label_smoothing=0.1)

        def forward(self, x, y):
            return self.loss_fn(self.body(x), self.head.weight, self.head.bias, y)

    class TorchCELoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(D, H), nn.Sigmoid())
            self.head = nn.Linear(H, C)
            self.register_buffer("cw", torch.linspace(0.5, 1.5, C, dtype=dtype))

        def forward(self, x, y):
            return F.cross_entropy(self.head(self.body(x)), y, weight=self.cw,
                                   label_smoothing=0.1)

    class OursBCE(nn.Module):  # binary LogisticRegression head through its fused loss
        def __init__(self):
            super().__init__()
            self.body = ml.Linear(D, H, activation="relu")
            self.clf = ml.LogisticRegression(H)

        def forward(self, x, y):
            return self.clf.loss(self.body(x), (y % 2).to(x.dtype))

    class TorchBCE(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(D, H), nn.ReLU())
            self.clf = nn.Linear(H, 1)

        def forward(self, x, y):
            return F.binary_cross_entropy_with_logits(self.clf(self.body(x)).squeeze(-1),
                                                      (y % 2).to(x.dtype))

    pairs = {"mlp_logreg_layer": (OursMLP, TorchMLP), "fused_ce_head": (OursCE, TorchCE),
             "ce_loss_module": (OursCELoss, TorchCELoss), "bce_logreg_head": (OursBCE, TorchBCE)}
    out = {}
    for name, (Ours, Torch) in pairs.items():
        torch.manual_seed(0)
        ours = Ours().to(dtype)
        ref = Torch().to(dtype)
        with torch.no_grad():  # same start: ours' parameters into torch's, in order
            po, pt = list(ours.parameters()), list(ref.parameters())
            assert [p.shape for p in po] == [p.shape for p in pt], name
            for a, b in zip(po, pt):
                b.copy_(a)
        out[name] = (ours, ref)
    return out


def _batch(torch, rank, step, n, D, C, dtype, device):
    """Rank `rank`'s batch at `step`: its own shard, seeded by rank and step (every rank can
    regenerate every other rank's batch for the single-process reference)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (n,), generator=g)
    return x.to(device), y.to(device)


def _full(torch, p):
    """A parameter as a plain tensor (DTensor under FSDP2: gathered)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _train(torch, model, params, rank, n, D, C, dtype, device, concat=False, no_sync=None,
           shard_mean=False):
    """STEPS steps of SGD with momentum; rank's own batch, or (concat) all ranks' batches
    concatenated in rank order; or (shard_mean) the mean over ranks of each rank's loss on its
    own batch, which is what DDP's gradient averaging computes. no_sync: a DDP model whose no_sync() makes each step two
    micro-batches (halves of the batch, loss halved) with the first one unsynchronised."""
    opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    for step in range(STEPS):
        if concat:
            xs, ys = zip(*(_batch(torch, r, step, n, D, C, dtype, device) for r in range(WORLD)))
            x, y = torch.cat(xs), torch.cat(ys)
        else:
            x, y = _batch(torch, rank, step, n, D, C, dtype, device)
        opt.zero_grad(set_to_none=True)
        if shard_mean:
            sum(model(*_batch(torch, r, step, n, D, C, dtype, device))
                for r in range(WORLD)).div(WORLD).backward()
        elif no_sync is not None:
            h = n // 2
            with no_sync.no_sync():
                (model(x[:h], y[:h]) * 0.5).backward()
            (model(x[h:], y[h:]) * 0.5).backward()
        else:
            model(x, y).backward()
        opt.step()


def _compare(torch, a_params, b_params):
    """Max relative error over parameters (max |a-b| / max |b| per tensor) and bitwise flag."""
    err, bitwise = 0.0, True
    for a, b in zip(a_params, b_params):
        a, b = _full(torch, a).double().cpu(), _full(torch, b).double().cpu()
        assert a.shape == b.shape
        bitwise &= bool(torch.equal(a, b))
        err = max(err, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return {"rel_err": err, "bitwise": bitwise}


def _same_across_ranks(torch, dist, params):
    """True when every rank holds bitwise the same parameters."""
    flat = torch.cat([_full(torch, p).reshape(-1).double().cpu() for p in params])
    got = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather_object(got, flat)  # object collective: works on gloo and nccl alike
    return all(torch.equal(got[0], g) for g in got)


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


def _fit_under_torchrun(torch, dist, ml, rank, device):
    """Under torchrun (a default process group exists) a fit is data-parallel only when asked.
    Each rank's fit(..., distributed=True) on its own shard gives one model, on every rank,
    fitted to the union of the shards (compared with scikit-learn's lbfgs on the concatenated
    data: the objective is strictly convex, so both reach its one minimum). A plain fit (the
    default distributed=False) is each rank's own model, and a fit on rank 0 alone (a linear
    probe inside a training script) returns without waiting for rank 1."""
    from sklearn.linear_model import LogisticRegression as SK

    def shard(r, n=200, D=6):
        g = torch.Generator().manual_seed(500 + r)
        x = torch.randn(n, D, generator=g, dtype=torch.float64)
        w = torch.linspace(-1, 1, D, dtype=torch.float64)
        y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w + 0.3)).long()
        return x, y

    x, y = shard(rank)
    clf = ml.LogisticRegression(6, dtype=torch.float64).to(device)
    clf.fit(x.to(device), y.to(device), tol=1e-9, max_iter=200, distributed=True)
    xs, ys = zip(*(shard(r) for r in range(WORLD)))
    sk = SK(C=1.0, tol=1e-12, max_iter=2000).fit(torch.cat(xs).numpy(), torch.cat(ys).numpy())
    ref = [torch.as_tensor(sk.coef_), torch.as_tensor(sk.intercept_)]
    out = {"vs_sklearn_on_all_shards": _compare(torch, list(clf.parameters()), ref),
           "ranks_agree": _same_across_ranks(torch, dist, list(clf.parameters()))}

    local = ml.LogisticRegression(6, dtype=torch.float64).to(device)
    local.fit(x.to(device), y.to(device), tol=1e-9, max_iter=200)  # default: local
    sk_own = SK(C=1.0, tol=1e-12, max_iter=2000).fit(x.numpy(), y.numpy())
    out["default_is_local"] = {
        "vs_sklearn_on_own_shard": _compare(torch, list(local.parameters()),
                                            [torch.as_tensor(sk_own.coef_),
                                             torch.as_tensor(sk_own.intercept_)]),
        "ranks_agree": _same_across_ranks(torch, dist, list(local.parameters()))}

    # rank 0 fits alone (estimator and layer) while rank 1 goes straight to the barrier below;
    # were the fit collective, rank 0 would wait for rank 1 forever (the run's deadline fails)
    t0 = time.monotonic()
    if rank == 0:
        from manual_layers.sklearn import LogisticRegression as Est
        Est(tol=1e-9).fit(x.numpy(), y.numpy())
        ml.LogisticRegression(6, dtype=torch.float64).fit(x, y)
    out["one_rank_fit_seconds"] = time.monotonic() - t0
    dist.barrier()
    return out


def _distributed_fit(torch, dist, ml, rank, device):
    """Data-parallel fit (estimator and module): each rank fits its own shard; every rank must
    end with the model one process fits (distributed=False) on the concatenated shards."""
    import numpy as np
    from manual_layers.sklearn import LogisticRegression as Est

    def data(seed, n, D=5, K=2, labels=None):
        g = np.random.default_rng(seed)
        x = g.standard_normal((n, D))
        w = g.standard_normal((K, D))
        y = np.argmax(x @ w.T + g.gumbel(size=(n, K)), axis=1)
        return x, (y if labels is None else np.asarray(labels, dtype=object)[y])

    def rel(a, b):
        a, b = np.concatenate([np.ravel(v) for v in a]), np.concatenate([np.ravel(v) for v in b])
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    def agree(arrs):
        return _same_across_ranks(torch, dist, [torch.as_tensor(np.asarray(a, dtype=np.float64))
                                                for a in arrs])

    kw = dict(tol=1e-10, max_iter=500)
    out = {}

    def est_case(name, shards, **est_kw):
        """shards: per rank (X, y, sample_weight or None)."""
        x, y, sw = shards[rank]
        d = Est(distributed=True, **kw, **est_kw).fit(x, y, sample_weight=sw)
        X = np.concatenate([s[0] for s in shards])
        Y = np.concatenate([s[1] for s in shards])
        SW = None if shards[0][2] is None else np.concatenate([s[2] for s in shards])
        ref = Est(distributed=False, **kw, **est_kw).fit(X, Y, sample_weight=SW)
        out[name] = {"rel_err": rel([d.coef_, d.intercept_], [ref.coef_, ref.intercept_]),
                     "ranks_agree": agree([d.coef_, d.intercept_]),
                     "classes": [str(c) for c in d.classes_],
                     "classes_match": d.classes_.tolist() == ref.classes_.tolist(),
                     "n_iter": int(d.n_iter_[0])}

    # binary, shards of unequal size (150 and 60 rows)
    est_case("est_binary_unequal", [(*data(10, 150), None), (*data(11, 60), None)])
    # multinomial, string labels, rank 1 has no "c" rows, sample weights
    g = np.random.default_rng(3)
    x0, y0 = data(20, 120, K=3, labels=["a", "b", "c"])
    x1, y1 = data(21, 80, K=3, labels=["a", "b", "c"])
    keep = y1 != "c"
    est_case("est_multi_strings_missing_class",
             [(x0, y0, g.uniform(0.5, 2, 120)), (x1[keep], y1[keep], g.uniform(0.5, 2, keep.sum()))])
    # class_weight="balanced": the class counts are summed over the shards
    est_case("est_balanced", [(*data(30, 90, K=3), None), (*data(31, 40, K=3), None)],
             class_weight="balanced")
    # L1 and elastic-net (OWL-QN): the same steps on every rank, multinomial and binary
    est_case("est_l1_multi", [(*data(90, 110, K=3), None), (*data(91, 70, K=3), None)],
             solver="saga", l1_ratio=1.0, C=0.2)
    est_case("est_elasticnet_binary", [(*data(92, 90), None), (*data(93, 130), None)],
             solver="saga", l1_ratio=0.5, C=0.1)
    # rank 1 holds no rows at all
    x0, y0 = data(40, 100, K=3)
    est_case("est_rank_with_zero_rows", [(x0, y0, None), (np.zeros((0, 5)), y0[:0], None)])

    # the module: multinomial and binary, torch tensors, explicit process_group
    pg = dist.new_group([0, 1])
    for name, K in (("module_multi", 4), ("module_binary", 2)):
        shards = [data(50 + r + K, 70 + 50 * r, K=K) for r in range(WORLD)]
        x, y = shards[rank]
        m = ml.LogisticRegression(5, num_classes=K, dtype=torch.float64).to(device)
        # binary: an explicit process_group alone makes it data-parallel
        m.fit(torch.as_tensor(x).to(device), torch.as_tensor(y).to(device),
              process_group=pg if K == 2 else None, distributed=K != 2, **kw)
        ref = ml.LogisticRegression(5, num_classes=K, dtype=torch.float64).to(device)
        ref.fit(np.concatenate([s[0] for s in shards]), np.concatenate([s[1] for s in shards]),
                distributed=False, **kw)
        got = [m.weight.detach().cpu().numpy(), m.bias.detach().cpu().numpy()]
        out[name] = {"rel_err": rel(got, [ref.weight.detach().cpu().numpy(),
                                          ref.bias.detach().cpu().numpy()]),
                     "ranks_agree": agree(got), "classes_match": True}

    # the default (distributed=False): each rank fits its own shard (scikit-learn on it)
    from sklearn.linear_model import LogisticRegression as SK
    x, y = data(60 + rank, 100)
    d = Est(**kw).fit(x, y)
    sk = SK(tol=1e-12, max_iter=2000).fit(x, y)
    out["local_when_distributed_false"] = {
        "rel_err": rel([d.coef_, d.intercept_], [sk.coef_, sk.intercept_]),
        "ranks_agree": agree([d.coef_, d.intercept_]), "classes_match": True}

    # ranks disagree on in_features: a ValueError on every rank, no hang
    errors = {}
    try:
        x, y = data(70, 30, D=5 + rank)
        Est(distributed=True, **kw).fit(x, y)
        errors["estimator"] = "no error"
    except ValueError as e:
        errors["estimator"] = str(e)
    try:
        m = ml.LogisticRegression(5 + rank, dtype=torch.float64)
        x, y = data(71, 30, D=5 + rank)
        m.fit(x, y, distributed=True)
        errors["module"] = "no error"
    except ValueError as e:
        errors["module"] = str(e)
    try:  # one rank's X does not match its layer: reported on every rank
        m = ml.LogisticRegression(5, dtype=torch.float64)
        x, y = data(72, 30, D=5 + rank)
        m.fit(x, y, distributed=True)
        errors["module_bad_shape_one_rank"] = "no error"
    except ValueError as e:
        errors["module_bad_shape_one_rank"] = str(e)
    out["errors"] = errors

    # sgd / adam: the same steps on every rank (unequal shards, one of 0 rows for the module),
    # ending near the L-BFGS optimum of all the data
    shards = [data(80, 300, K=3), data(81, 130, K=3)]
    X = np.concatenate([s[0] for s in shards])
    Y = np.concatenate([s[1] for s in shards])
    opt_ = Est(distributed=False, **kw).fit(X, Y)
    for solver in ("sgd", "adam"):
        torch.manual_seed(rank)  # different shuffles per rank
        d = Est(solver=solver, max_iter=100 if solver == "sgd" else 200, tol=0,
                distributed=True).fit(*shards[rank])
        one = Est(solver=solver, max_iter=100 if solver == "sgd" else 200, tol=0,
                  distributed=False).fit(X, Y)  # one process, same epochs, all the rows
        out[f"est_{solver}"] = {
            "rel_err": rel([d.coef_, d.intercept_], [opt_.coef_, opt_.intercept_]),
            "one_process_rel_err": rel([one.coef_, one.intercept_], [opt_.coef_, opt_.intercept_]),
            "ranks_agree": agree([d.coef_, d.intercept_]), "n_iter": int(d.n_iter_[0])}
    # one batch per epoch (batch_size >= all rows): the steps are full-batch, so the
    # data-parallel run must equal one process on the concatenation (rank 1 has no rows)
    for solver in ("sgd", "adam"):
        ms = []
        for part in ("dist", "ref"):
            m = ml.LogisticRegression(5, num_classes=3, dtype=torch.float64)
            if part == "dist":
                xr, yr = (X, Y) if rank == 0 else (X[:0], Y[:0])
                m.fit(xr, yr, solver=solver, max_iter=20, tol=0, lr=0.05, batch_size=1000,
                      distributed=True)
            else:
                m.fit(X, Y, solver=solver, max_iter=20, tol=0, lr=0.05, batch_size=1000)
            ms.append([m.weight.detach().numpy(), m.bias.detach().numpy()])
        out[f"module_{solver}_empty_rank"] = {"rel_err": rel(ms[0], ms[1]),
                                              "ranks_agree": agree(ms[0])}
    return out


DIST_FIT_CASES = ["est_binary_unequal", "est_multi_strings_missing_class", "est_balanced",
                  "est_l1_multi", "est_elasticnet_binary",
                  "est_rank_with_zero_rows", "module_multi", "module_binary",
                  "local_when_distributed_false"]


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

def _free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a rank prints when the rendezvous port _free_port() chose was taken by another process
# between the probe and rank 0's TCPStore binding it (the probe cannot hold the port): the one
# failure a second attempt with a fresh port may fix.
_PORT_TAKEN = ("Address already in use", "EADDRINUSE", "failed to listen on any local network")


def _launch(kind, device_type, out_dir):
    """Runs the 2 ranks; returns each rank's results. Fails (with the ranks' output) on a
    non-zero exit or when the deadline passes (the ranks are killed: a hang fails). A run that
    failed because its rendezvous port was taken is run once more on another port (seen: rank 0
    fails with EADDRINUSE, rank 1 waits at the rendezvous until it is stopped)."""
    for attempt in range(2):
        results, text = _launch_once(kind, device_type, Path(out_dir) / f"attempt{attempt}")
        if results is not None:
            return results
        if attempt == 0 and any(m in text for m in _PORT_TAKEN):
            continue
        pytest.fail(text)


def _launch_once(kind, device_type, out_dir):
    """One run of the ranks: (results, "") or (None, the failure and the ranks' output)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WORLD_SIZE=str(WORLD), RESULT_DIR=str(out_dir),
               INIT_METHOD=f"tcp://127.0.0.1:{_free_port()}", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get(
                   "PYTHONPATH")] if p]))
    procs, logs = [], []
    for r in range(WORLD):
        log = open(out_dir / f"rank{r}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
             "--device", device_type], env=dict(env, RANK=str(r)), cwd=str(ROOT),
            stdout=log, stderr=subprocess.STDOUT))
    # Wait for every rank; once one has failed the others cannot finish (they wait for it in
    # a collective or at the rendezvous), so they are stopped then instead of at the deadline.
    t0 = time.monotonic()
    timed_out = False
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        if time.monotonic() - t0 > DEADLINE_S:
            timed_out = True
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = []
    for r, log in enumerate(logs):
        log.seek(0)
        text.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    if timed_out:
        return None, (f"{kind} run on {device_type} did not finish within {DEADLINE_S} s "
                      f"(hang?)\n" + "\n".join(text))
    if any(p.returncode != 0 for p in procs):
        return None, f"{kind} run on {device_type} failed\n" + "\n".join(text)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)], ""


def _check(results, key):
    """The results of one check on every rank; fails with the rank's traceback on error."""
    out = []
    for r, res in enumerate(results):
        v = res.get(key)
        assert v is not None, f"rank {r}: no result for {key}"
        if isinstance(v, dict) and "error" in v:
            pytest.fail(f"rank {r}: {key} raised\n{v['error']}")
        out.append(v)
    return out


@pytest.fixture(scope="module")
def ddp_cpu(tmp_path_factory):
    return _launch("ddp", "cpu", tmp_path_factory.mktemp("ddp_cpu"))


def _fsdp2_cpu_skip_reason():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    except ImportError as e:
        return f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}"
    return None


@pytest.fixture(scope="module")
def fsdp_cpu(tmp_path_factory):
    reason = _fsdp2_cpu_skip_reason()
    if reason:
        pytest.skip(reason)
    return _launch("fsdp", "cpu", tmp_path_factory.mktemp("fsdp_cpu"))


MODELS = ["mlp_logreg_layer", "fused_ce_head", "ce_loss_module", "bce_logreg_head"]
DTYPES = ["float64", "float32"]
TOL = {"float64": 1e-10, "float32": 2e-5}  # parameters after STEPS steps


def _assert_training(results, model, dtype, ref_key):
    for r, v in enumerate(_check(results, f"{model}/{dtype}")):
        tol = TOL[dtype]
        for what in (ref_key, "vs_single_process"):
            assert v[what]["rel_err"] <= tol, \
                f"rank {r} {model} {dtype} {what}: rel err {v[what]['rel_err']:.3g} > {tol:g}"
        assert v["ranks_agree"], f"{model} {dtype}: parameters differ across ranks"
    return results


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
def test_ddp_cpu_matches_torch_and_single_process(ddp_cpu, model, dtype):
    _assert_training(ddp_cpu, model, dtype, "vs_torch_ddp")
    for v in _check(ddp_cpu, f"{model}/{dtype}"):
        assert v["torch_ranks_agree"]


@pytest.mark.parametrize("option", ["gradient_as_bucket_view", "static_graph",
                                    "find_unused_parameters", "no_sync_accumulation"])
def test_ddp_cpu_options(ddp_cpu, option):
    for r, v in enumerate(_check(ddp_cpu, "ddp_options")):
        assert v[option]["ranks_agree"], option
        # the DDP options change nothing numerically; no_sync halves the batch (two half-batch
        # GEMMs), which rounds differently
        tol = 1e-12 if option == "no_sync_accumulation" else 0.0
        assert v[option]["rel_err"] <= tol, f"rank {r} {option}: {v[option]}"


def test_logreg_fit_under_torchrun_is_data_parallel_only_when_asked(ddp_cpu):
    for r, v in enumerate(_check(ddp_cpu, "fit_under_torchrun")):
        assert v["ranks_agree"], f"rank {r}: fit gives different models on different ranks"
        err = v["vs_sklearn_on_all_shards"]["rel_err"]
        assert err <= 1e-4, f"rank {r}: fit is {err:.3g} away from the fit on all shards"
        d = v["default_is_local"]
        assert not d["ranks_agree"], f"rank {r}: the default fit synchronised the ranks"
        assert d["vs_sklearn_on_own_shard"]["rel_err"] <= 1e-4, (r, d)
        # rank 0's lone fit returned (the run finished); it did not wait for rank 1
        assert v["one_rank_fit_seconds"] < 60, (r, v["one_rank_fit_seconds"])


@pytest.mark.parametrize("case", DIST_FIT_CASES)
def test_distributed_fit_equals_fit_on_concatenation(ddp_cpu, case):
    """Estimator and module on 2 ranks (unequal shards, string labels, a shard missing a
    class, a shard with no rows, balanced class weights, an explicit process_group) end where
    one process ends on the concatenated shards, bitwise the same on both ranks;
    distributed=False fits the local shard (scikit-learn on it)."""
    for r, res in enumerate(_check(ddp_cpu, "distributed_fit")):
        v = res[case]
        if case == "local_when_distributed_false":  # each rank's own shard: its own model
            assert not v["ranks_agree"], f"rank {r}: distributed=False still synchronised"
        else:
            assert v["ranks_agree"], f"rank {r} {case}: models differ across ranks"
        assert v["classes_match"], (r, case, v)
        tol = 1e-5 if case == "local_when_distributed_false" else 1e-6
        assert v["rel_err"] <= tol, f"rank {r} {case}: rel err {v['rel_err']:.3g}"
    if case == "est_multi_strings_missing_class":
        assert res[case]["classes"] == ["a", "b", "c"]


def test_distributed_fit_errors_on_every_rank(ddp_cpu):
    for r, res in enumerate(_check(ddp_cpu, "distributed_fit")):
        e = res["errors"]
        for k in ("estimator", "module"):
            assert "disagree on the number of features" in e[k], (r, k, e[k])
            assert "rank 0: 5, rank 1: 6" in e[k], (r, k, e[k])
        assert "rank 1: ValueError" in e["module_bad_shape_one_rank"] and \
            "must have shape (N, 5)" in e["module_bad_shape_one_rank"], (r, e)


@pytest.mark.parametrize("case", ["est_sgd", "est_adam", "module_sgd_empty_rank",
                                  "module_adam_empty_rank"])
def test_distributed_minibatch_fit(ddp_cpu, case):
    """sgd/adam: every rank takes the same steps (one all-reduce per step), so the ranks end
    bitwise equal, near the L-BFGS optimum on all the data."""
    for r, res in enumerate(_check(ddp_cpu, "distributed_fit")):
        v = res[case]
        assert v["ranks_agree"], f"rank {r} {case}: models differ across ranks"
        # sgd/adam with 256-row batches: as near the L-BFGS optimum as one process gets with
        # the same number of epochs on all the rows
        tol = 1e-10 if case.startswith("module") else max(0.1, 1.5 * v["one_process_rel_err"])
        assert v["rel_err"] <= tol, f"rank {r} {case}: {v}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
def test_fsdp2_cpu_matches_torch_and_single_process(fsdp_cpu, model, dtype):
    _assert_training(fsdp_cpu, model, dtype, "vs_torch_fsdp")
    for v in _check(fsdp_cpu, f"{model}/{dtype}"):
        assert v["param_types"] == ["DTensor"] and v["grad_types"] == ["DTensor"], v


@pytest.mark.slow
def test_fsdp2_kernels_get_plain_tensors(fsdp_cpu):
    """FSDP2 all-gathers before forward: our Functions see plain tensors of the full shape
    (the head's weight (5, 17) whole, though each rank holds a (3, 17) or (2, 17) shard)."""
    for v in _check(fsdp_cpu, "fsdp_inputs_are_plain_tensors"):
        calls = [s for s in v["seen"] if s[0] != "grads"]
        assert {c[0] for c in calls} == {"linear", "linear_ce", "linear_bce"}
        for c in calls:
            # x a Tensor; weight and bias the unsharded nn.Parameters FSDP2 swaps in for the
            # forward (plain tensors of the full shape), never the DTensor shards
            assert c[1] == "Tensor" and c[2] == "Parameter" and \
                c[3] in ("Parameter", "NoneType"), c
        assert {c[4][0] for c in calls if c[0] == "linear_ce"} == {5}
        assert all(s[1:] == ["DTensor"] for s in v["seen"] if s[0] == "grads"), v["seen"]


@pytest.mark.slow
def test_fsdp2_loss_method_needs_registration(fsdp_cpu):
    """Calling LogisticRegression.loss (not forward) on a fully_shard-ed layer sees the sharded
    DTensors and fails exactly as torch's F.linear on them does; with
    register_fsdp_forward_method(clf, "loss") it trains as one process on the whole batch."""
    for v in _check(fsdp_cpu, "fsdp_loss_method"):
        assert "mixed torch.Tensor and DTensor" in v["ours_unregistered"], v
        assert "mixed torch.Tensor and DTensor" in v["torch_F_linear_unregistered"], v
        assert v["registered_vs_single_process"]["rel_err"] <= 1e-10, v


@pytest.mark.slow
def test_fsdp2_mixed_precision_bf16(fsdp_cpu):
    for v in _check(fsdp_cpu, "fsdp_mixed_precision"):
        assert v["ranks_agree"]
        assert v["vs_torch_fsdp"]["rel_err"] <= 2e-2, v


@pytest.mark.slow
def test_fsdp2_full_state_dict_loads_into_plain_model(fsdp_cpu):
    for v in _check(fsdp_cpu, "fsdp_state_dict"):
        for name, c in v.items():
            assert c["keys_match"] and c["plain_tensors"], (name, c)
            assert c["loss_rel_err"] <= 1e-12, (name, c)


def _two_gpus():
    import torch
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2 and \
        torch.distributed.is_nccl_available()


@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs and NCCL")
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_nccl_cuda(tmp_path, kind):
    """The same checks on 2 GPUs over NCCL (TF32 off), float64 and float32."""
    results = _launch(kind, "cuda", tmp_path)
    for model in MODELS:
        for dtype in DTYPES:
            _assert_training(results, model, dtype,
                             "vs_torch_ddp" if kind == "ddp" else "vs_torch_fsdp")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["ddp", "fsdp"], required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()
    _worker(a.worker, a.device)
