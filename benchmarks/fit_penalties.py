"""Rows of benchmarks/bench_fit.py for L1 / elastic-net (OWL-QN against scikit-learn's saga) and
for LogisticRegressionCV (ours against scikit-learn's), side by side in one run on the same
arrays, scikit-learn on one BLAS thread.

L1 / elastic-net: both at the same settings (C, l1_ratio, tol, max_iter), timed interleaved;
saga's tol is a relative change of the weights per epoch, ours the largest pseudo-gradient
component (L-BFGS-B's test), so each row also reports how far each fit's objective is above the
best one found (a tight OWL-QN fit, tol=1e-12): a faster fit that stops further from the optimum
is not a win, and the "tight" rows compare the two at tol=1e-10, where both reach the optimum.

LogisticRegressionCV: 5 stratified folds x 10 Cs (np.logspace(-4, 4, 10)), l1_ratios=(0,),
accuracy, refit, the same tol and max_iter; ratio of the median fit times and the chosen C.
"""

import time
import warnings

import numpy as np

import common


def _objective(coef, intercept, X, y_idx, C, l1_ratio, binary):
    """scikit-learn saga's objective divided by N: mean log-loss + ((1 - r) ||W||^2 / 2 +
    r ||W||_1) / (C N)."""
    z = X @ coef.T + intercept
    if binary:
        z = z[:, 0]
        loss = np.logaddexp(0, z) - y_idx * z
    else:
        zmax = z.max(1, keepdims=True)
        lse = np.log(np.exp(z - zmax).sum(1)) + zmax[:, 0]
        loss = lse - z[np.arange(len(y_idx)), y_idx]
    pen = ((1 - l1_ratio) * 0.5 * np.sum(coef ** 2) + l1_ratio * np.abs(coef).sum()) / C
    return float((loss.sum() + pen) / len(y_idx))


def l1_datasets(quick):
    from sklearn import datasets as skd
    from sklearn.preprocessing import StandardScaler
    out = []
    X, y = skd.load_breast_cancer(return_X_y=True)
    out.append(("breast_cancer", StandardScaler().fit_transform(X), y))
    X, y = skd.load_digits(return_X_y=True)
    out.append(("digits", StandardScaler().fit_transform(X), y))
    rng = np.random.default_rng(1)
    for name, N, D, K in (("synthetic binary", 50_000, 100, 2),
                          ("synthetic 10 classes", 20_000, 50, 10)):
        if quick:
            N //= 10
        X = rng.normal(size=(N, D))
        W = rng.normal(size=(K, D)) * (rng.random((K, D)) < 0.2) * 2 / np.sqrt(D * 0.2)
        y = (X @ W.T + rng.gumbel(size=(N, K))).argmax(1)
        out.append((name, X, y))
    return out


def l1_rows(quick, repeats):
    """(header, rows, csv extras) of the L1 / elastic-net comparison."""
    from sklearn.linear_model import LogisticRegression as SkLR
    from threadpoolctl import threadpool_limits
    from manual_layers.sklearn import LogisticRegression as MlLR

    header = ["case", "penalty", "tol", "saga ms", "ours ms", "ratio (saga/ours)",
              "target", "saga obj gap", "ours obj gap", "zeros saga/ours", "epochs/iters"]
    rows, timings = [], []
    for name, X, y in l1_datasets(quick):
        classes, y_idx = np.unique(y, return_inverse=True)
        binary = len(classes) == 2
        for l1_ratio, C in ((1.0, 0.1), (0.5, 0.1)):
            ref = MlLR(C=C, l1_ratio=l1_ratio, solver="saga", tol=1e-12, max_iter=100000).fit(X, y)
            f_best = _objective(ref.coef_, ref.intercept_, X, y_idx, C, l1_ratio, binary)
            for tol in (1e-4, 1e-10):
                if tol == 1e-10 and (quick is False and X.shape[0] > 20_000):
                    continue  # saga to 1e-10 on the large set takes minutes
                kw = dict(C=C, l1_ratio=l1_ratio, solver="saga", tol=tol, max_iter=100000)
                sk, ours = SkLR(**kw), MlLR(**kw)

                def fit_sk():
                    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        sk.fit(X, y)
                reps = repeats if tol == 1e-4 else max(1, repeats // 2)
                res = common.time_many({"saga": (fit_sk, None),
                                        "ours": (lambda: ours.fit(X, y), None)},
                                       repeats=reps, warmup=1)
                t_sk, t_ours = res["saga"]["p50"], res["ours"]["p50"]
                gaps = [(_objective(m.coef_, m.intercept_, X, y_idx, C, l1_ratio, binary) -
                         f_best) / abs(f_best) for m in (sk, ours)]
                ratio = t_sk / t_ours
                pen = "l1" if l1_ratio == 1 else f"elasticnet {l1_ratio}"
                rows.append([f"{name} {X.shape[0]}x{X.shape[1]}" + ("" if binary else
                                                                    f"x{len(classes)}"),
                             pen, f"{tol:g}", common.fmt_ms(t_sk), common.fmt_ms(t_ours),
                             f"{ratio:.1f}x", f">= 10x {common.verdict(ratio >= 10)}",
                             f"{gaps[0]:.1e}", f"{gaps[1]:.1e}",
                             f"{int((sk.coef_ == 0).sum())}/{int((ours.coef_ == 0).sum())}",
                             f"{int(sk.n_iter_[0])}/{int(ours.n_iter_[0])}"])
                timings.append((f"{name} {pen} tol={tol:g}", res, ratio))
                print(f"l1: {name} {pen} tol={tol:g}: saga {t_sk:.1f} ms, ours {t_ours:.1f} ms, "
                      f"{ratio:.1f}x, gaps {gaps[0]:.1e} / {gaps[1]:.1e}", flush=True)
    return header, rows, timings


def cv_datasets(quick):
    from sklearn import datasets as skd
    from sklearn.preprocessing import StandardScaler
    out = []
    for name in ("breast_cancer", "digits"):
        X, y = getattr(skd, f"load_{name}")(return_X_y=True)
        out.append((name, StandardScaler().fit_transform(X), y))
    rng = np.random.default_rng(2)
    N, D = (5_000, 30) if quick else (50_000, 30)
    X = rng.normal(size=(N, D))
    y = (X @ rng.normal(size=D) / np.sqrt(D) * 2 + rng.logistic(size=N) > 0).astype(int)
    out.append(("synthetic binary", X, y))
    return out


def cv_rows(quick, repeats):
    from sklearn.linear_model import LogisticRegressionCV as SkCV
    from threadpoolctl import threadpool_limits
    from manual_layers.sklearn import LogisticRegressionCV as MlCV

    header = ["case", "sklearn CV ms", "ours ms", "ratio (sklearn/ours)", "target",
              "C_ sk/ours", "max |score diff|"]
    rows, timings = [], []
    kw = dict(Cs=10, cv=5, l1_ratios=(0.0,), scoring="accuracy", use_legacy_attributes=False,
              tol=1e-4, max_iter=1000)
    for name, X, y in cv_datasets(quick):
        sk, ours = SkCV(**kw), MlCV(**kw)

        def fit_sk():
            with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sk.fit(X, y)

        def fit_ours():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours.fit(X, y)
        res = common.time_many({"sklearn": (fit_sk, None), "ours": (fit_ours, None)},
                               repeats=max(1, repeats // 2), warmup=1)
        t_sk, t_ours = res["sklearn"]["p50"], res["ours"]["p50"]
        ratio = t_sk / t_ours
        rows.append([f"{name} {X.shape[0]}x{X.shape[1]}", common.fmt_ms(t_sk),
                     common.fmt_ms(t_ours), f"{ratio:.2f}x", f">= 3x {common.verdict(ratio >= 3)}",
                     f"{sk.C_:.3g}/{ours.C_:.3g}",
                     f"{float(np.abs(sk.scores_ - ours.scores_).max()):.1e}"])
        timings.append((name, res, ratio))
        print(f"cv: {name}: sklearn {t_sk:.0f} ms, ours {t_ours:.0f} ms, {ratio:.2f}x", flush=True)
    return header, rows, timings


def run(sections, quick, repeats, meta):
    """Print and write the tables of the chosen sections ("l1", "cv"); returns csv rows."""
    csv_rows = []
    t0 = time.perf_counter()
    for sec, fn, title, baseline in (
            ("l1", l1_rows, "L1 / elastic-net fit: manual_layers (OWL-QN) vs scikit-learn saga",
             "sklearn_saga"),
            ("cv", cv_rows, "LogisticRegressionCV fit (5 folds x 10 Cs): manual_layers vs "
             "scikit-learn", "sklearn_cv")):
        if sec not in sections:
            continue
        header, rows, timings = fn(quick, repeats)
        print()
        common.print_table(header, rows)
        notes = ["scikit-learn on one BLAS thread (threadpool_limits); ours with torch's "
                 "threads; the same numpy arrays, timed interleaved, median of the fits.",
                 "obj gap: (objective - best objective found) / best, the best a tight OWL-QN "
                 "fit (tol=1e-12); saga's tol tests the weights' relative change per epoch, "
                 "ours the largest pseudo-gradient component."] if sec == "l1" else [
                 "Both: Cs=10, cv=5 (stratified), l1_ratios=(0,), scoring='accuracy', tol=1e-4, "
                 "max_iter=1000, refit=True; scikit-learn on one BLAS thread."]
        path = common.write_markdown(f"bench_fit_{sec}", title, meta, header, rows, notes)
        print(f"wrote {path}")
        for case, res, ratio in timings:
            for impl in res:
                csv_rows.append(common.make_row(f"fit_{sec}", case, impl if impl != "ours" else
                                                "manual_layers", "float64", "", "fit", res[impl],
                                                meta, extra=f"ratio={ratio:.3f};baseline="
                                                f"{baseline}"))
    print(f"penalty/CV sections took {time.perf_counter() - t0:.0f} s")
    return csv_rows
