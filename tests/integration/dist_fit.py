"""The data-parallel logistic-regression fits one rank of tests/integration/test_distributed.py
checks (dist_worker.py calls them): fit(..., distributed=True) under torchrun, the estimator and
the module on unequal shards, the errors every rank raises, sgd/adam on the ranks."""

import time

from dist_models import WORLD, _compare, _same_across_ranks


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
