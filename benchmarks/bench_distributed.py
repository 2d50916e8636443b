"""Data-parallel LogisticRegression fit (L-BFGS, float64) on 1 and on P CPU processes (gloo on
127.0.0.1, spawned here on a free port): the same data, rank r holding the r-th contiguous
block of rows.

    python benchmarks/bench_distributed.py                      # 200,000 x 100, binary, P=2
    python benchmarks/bench_distributed.py --rows 50000 --classes 4 --procs 2 4

Reports per run: processes, function evaluations, L-BFGS iterations, total fit time, time per
evaluation, bytes all-reduced per evaluation (by each rank) and the largest coefficient
difference to the 1-process fit. Each process uses --threads threads (default 1), so P
processes use P cores: on a machine with fewer free cores than P they are not faster.
"""

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _data(rows, features, classes, seed=0):
    import numpy as np
    g = np.random.default_rng(seed)
    x = g.standard_normal((rows, features))
    w = g.standard_normal((classes, features)) / np.sqrt(features)
    y = np.argmax(x @ w.T + g.gumbel(size=(rows, classes)), axis=1)
    return x, y


def _worker(a):
    import numpy as np
    import torch
    import torch.distributed as dist
    from manual_layers.utils import fit_logistic_regression

    torch.set_num_threads(a.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=os.environ["INIT_METHOD"], rank=rank,
                                world_size=world)
        group = dist.group.WORLD
    x, y = _data(a.rows, a.features, a.classes)
    lo, hi = rank * a.rows // world, (rank + 1) * a.rows // world
    X = torch.from_numpy(np.ascontiguousarray(x[lo:hi]))
    Y = torch.from_numpy(y[lo:hi])
    if group is not None:
        dist.barrier()
    res = fit_logistic_regression(X, Y, a.classes, C=1.0, max_iter=a.max_iter, tol=a.tol,
                                  process_group=group, warn=False)
    out = {"procs": world, "n_evals": res.n_evals, "n_iter": res.n_iter,
           "fit_s": res.fit_time, "bytes_per_eval": res.bytes_per_eval,
           "coef": res.coef.numpy().ravel().tolist() + res.intercept.numpy().tolist()}
    if rank == 0:
        Path(a.out).write_text(json.dumps(out))
    if group is not None:
        dist.destroy_process_group()


def _free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(a, procs, out):
    env = dict(os.environ, WORLD_SIZE=str(procs), OMP_NUM_THREADS=str(a.threads),
               INIT_METHOD=f"tcp://127.0.0.1:{_free_port()}",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get(
                   "PYTHONPATH")] if p]))
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out),
            "--rows", str(a.rows), "--features", str(a.features), "--classes", str(a.classes),
            "--max-iter", str(a.max_iter), "--tol", str(a.tol), "--threads", str(a.threads)]
    ps = [subprocess.Popen(args, env=dict(env, RANK=str(r))) for r in range(procs)]
    try:
        for p in ps:
            if p.wait(timeout=a.timeout) != 0:
                raise SystemExit(f"a rank of the {procs}-process run failed")
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
    return json.loads(Path(out).read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--features", type=int, default=100)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--procs", type=int, nargs="+", default=[2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return _worker(a)
    import numpy as np
    print(f"data: {a.rows} x {a.features} float64, {a.classes} classes; {a.threads} torch "
          f"thread(s) per process; L-BFGS max_iter={a.max_iter} tol={a.tol}")
    print(f"{'procs':>5} {'evals':>6} {'iters':>6} {'fit s':>8} {'ms/eval':>8} "
          f"{'B/eval':>7} {'max |coef - 1-proc coef|':>25}")
    base = None
    with tempfile.TemporaryDirectory() as d:
        for procs in [1] + [p for p in a.procs if p != 1]:
            r = _run(a, procs, Path(d, f"p{procs}.json"))
            coef = np.asarray(r["coef"])
            base = coef if base is None else base
            diff = float(np.abs(coef - base).max())
            print(f"{procs:>5} {r['n_evals']:>6} {r['n_iter']:>6} {r['fit_s']:>8.3f} "
                  f"{1000 * r['fit_s'] / r['n_evals']:>8.2f} {r['bytes_per_eval']:>7} "
                  f"{diff:>25.3g}")


if __name__ == "__main__":
    main()
