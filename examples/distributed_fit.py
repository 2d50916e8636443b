"""Data-parallel LogisticRegression fit over torch.distributed.

    torchrun --nproc-per-node 2 examples/distributed_fit.py            # 2 processes, gloo
    torchrun --nproc-per-node 2 examples/distributed_fit.py --classes 5 --rows 50000

Each rank generates its own shard (seeded by its rank; shards of different sizes) and calls
manual_layers.sklearn.LogisticRegression(distributed=True).fit on it: data-parallel over the
default process group initialised here (a fit is data-parallel only when asked: the default,
distributed=False, fits the local rows alone even under torchrun). The classes, n_features,
N and the weight total are agreed once, then every L-BFGS function evaluation all-reduces one
float64 vector of (1 + C*(D+1)) values, and every rank ends with the same model, the one a single
process fits on all shards concatenated. Rank 0 prints the fit time, the iterations, the
accuracy over all shards and the largest difference to a single-process fit on the gathered
data. Backend: NCCL with one GPU per rank when CUDA GPUs are visible (and the CUDA kernels were
built), else gloo on the CPU.
"""

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from manual_layers.sklearn import LogisticRegression


def make_shard(rank, rows, features, classes, seed=0):
    """Rank `rank`'s shard: rows + 37 * rank rows (shards of unequal size) from one fixed
    linear model plus Gumbel noise, so the union of the shards is one data set."""
    w = np.random.default_rng(seed).standard_normal((classes, features)) / np.sqrt(features)
    g = np.random.default_rng(seed + 1000 + rank)
    n = rows + 37 * rank
    x = g.standard_normal((n, features))
    y = np.argmax(x @ w.T + g.gumbel(size=(n, classes)), axis=1)
    return x, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000, help="rows per rank (rank r: + 37 r)")
    ap.add_argument("--features", type=int, default=50)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--tol", type=float, default=1e-8)
    a = ap.parse_args()

    use_cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        x, y = make_shard(rank, a.rows, a.features, a.classes)
        clf = LogisticRegression(C=a.C, tol=a.tol, max_iter=1000, device=device,
                                 distributed=True)
        dist.barrier()
        t0 = time.perf_counter()
        clf.fit(x, y)  # distributed=True: data-parallel over the default group
        fit_s = time.perf_counter() - t0

        # accuracy over all shards: (correct, rows) summed over ranks
        counts = torch.tensor([float((clf.predict(x) == y).sum()), float(len(y))],
                              dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        # the single-process fit on the gathered data (rank 0), for comparison
        shards = [None] * world
        dist.all_gather_object(shards, (x, y))
        if rank == 0:
            X = np.concatenate([s[0] for s in shards])
            Y = np.concatenate([s[1] for s in shards])
            t1 = time.perf_counter()
            ref = LogisticRegression(C=a.C, tol=a.tol, max_iter=1000,
                                     device=device).fit(X, Y)  # local: rank 0 alone
            ref_s = time.perf_counter() - t1
            diff = max(np.abs(clf.coef_ - ref.coef_).max(),
                       np.abs(clf.intercept_ - ref.intercept_).max())
            K = clf.coef_.shape[0]
            per_eval = (1 + K * (a.features + 1)) * 8
            print(f"backend={dist.get_backend()} ranks={world} rows={len(Y)} "
                  f"features={a.features} classes={len(clf.classes_)}")
            print(f"data-parallel fit: {fit_s:.3f} s, {int(clf.n_iter_[0])} iterations, "
                  f"all-reduce {per_eval} B per function evaluation")
            print(f"accuracy over all shards: {counts[0].item() / counts[1].item():.4f}")
            print(f"single-process fit on the gathered data: {ref_s:.3f} s, "
                  f"{int(ref.n_iter_[0])} iterations; max |coef/intercept difference| = "
                  f"{diff:.3g}")
        # every rank holds the same model
        coef = torch.as_tensor(np.concatenate([clf.coef_.ravel(), clf.intercept_]))
        got = [None] * world
        dist.all_gather_object(got, coef)
        assert all(torch.equal(got[0], g) for g in got), "ranks ended with different models"
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
