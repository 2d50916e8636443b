"""python -m manual_layers demo : manual_layers side by side with PyTorch and scikit-learn.

1. A small MLP (64 -> 128 -> 128 -> 10, GELU) trained on scikit-learn's digits, once with
   manual_layers.Linear(..., activation="gelu") (Linear and GELU fused, hand-written forward
   and backward) and once with nn.Linear + nn.GELU, from the same initial weights, with the
   same optimizer, mini-batches and epochs.
2. Logistic regression, binary (breast cancer) and multiclass (digits):
   manual_layers.sklearn.LogisticRegression (the scikit-learn estimator) and the
   manual_layers.LogisticRegression layer's fit against scikit-learn's LogisticRegression and
   the same model written in plain PyTorch (torch.optim.LBFGS), all minimising the same
   objective (mean log-loss + ||W||^2 / (2 C N), C = 1) with L-BFGS.

What the times mean: wall-clock seconds on this machine's CPU (the thread count is printed
first), measured with time.perf_counter. MLP "train time": one run of all epochs (forward,
backward, optimizer steps and batching; no evaluation). Logistic regression "fit time": the
median of 3 calls of fit(X_train, y_train) after one untimed warm-up call, each call
including input checks and label encoding; prediction and scoring are not timed. On a shared
or busy machine the times vary: compare the rows of one run, not runs.

Runs on the CPU in well under a minute.
"""

import time

import numpy as np
import torch
from torch import nn

import manual_layers as ml

SEED = 0
EPOCHS = 30
BATCH = 64
LR = 1e-3


# ---- data ------------------------------------------------------------------------------------

def load(name):
    """A scikit-learn toy dataset, split 80/20 (fixed seed, stratified) and standardised with
    the training split's statistics. Returns float32 / int64 numpy arrays."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, random_state=SEED, stratify=y)
    scaler = StandardScaler().fit(X_tr)
    return (scaler.transform(X_tr).astype(np.float32), scaler.transform(X_te).astype(np.float32),
            y_tr.astype(np.int64), y_te.astype(np.int64))


def table(header, rows, left=1):
    """Print rows under header; the first `left` columns left-aligned, the others right."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w if i < left else "{:>%d}" % w for i, w in enumerate(widths))
    print("  " + fmt.format(*header))
    print("  " + "-" * (sum(widths) + 2 * (len(widths) - 1)))
    for r in rows:
        print("  " + fmt.format(*r))


# ---- 1. the MLP ------------------------------------------------------------------------------

class MLP(nn.Module):
    """64 -> 128 -> 128 -> 10 with GELU. fused=True: manual_layers.Linear with the activation
    inside the layer; fused=False: nn.Linear followed by nn.GELU(). The parameter names (and so
    the state_dict keys) are the same in both, so one model's weights load into the other."""

    def __init__(self, fused, d_in=64, d_hidden=128, n_classes=10):
        super().__init__()
        if fused:
            self.fc1 = ml.Linear(d_in, d_hidden, activation="gelu")
            self.fc2 = ml.Linear(d_hidden, d_hidden, activation="gelu")
            self.fc3 = ml.Linear(d_hidden, n_classes)
            self.act = nn.Identity()  # the GELU already ran inside fc1 and fc2
        else:
            self.fc1 = nn.Linear(d_in, d_hidden)
            self.fc2 = nn.Linear(d_hidden, d_hidden)
            self.fc3 = nn.Linear(d_hidden, n_classes)
            self.act = nn.GELU()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def train_mlp(model, X, y, desc):
    """Adam, mini-batches of BATCH, EPOCHS epochs; the batch order comes from a generator with
    a fixed seed, so both models see the same batches. Returns the training time in seconds."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    n = X.shape[0]
    model.train()
    t0 = time.perf_counter()
    with tqdm(range(EPOCHS), desc=desc, unit="epoch", leave=False) as bar:
        for _ in bar:
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(0, n, BATCH):
                idx = perm[i:i + BATCH]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(X[idx]), y[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{total / n:.4f}")
    elapsed = time.perf_counter() - t0
    model.eval()
    return elapsed


def demo_mlp():
    print(f"1. MLP 64 -> 128 -> 128 -> 10 (GELU) on digits: Adam lr={LR}, {EPOCHS} epochs, "
          f"batch {BATCH}")
    X_tr, X_te, y_tr, y_te = (torch.from_numpy(a) for a in load("digits"))

    torch.manual_seed(SEED)
    ours = MLP(fused=True)
    ref = MLP(fused=False)
    ref.load_state_dict(ours.state_dict())  # identical initial weights, same keys

    results = {}
    for name, model in (("manual_layers.Linear(gelu)", ours), ("nn.Linear + nn.GELU", ref)):
        seconds = train_mlp(model, X_tr, y_tr, name)
        with torch.no_grad():
            logits = model(X_te)
        acc = (logits.argmax(1) == y_te).double().mean().item()
        results[name] = (acc, seconds, logits)
    table(["model", "test accuracy", "train time"],
          [[k, f"{acc:.4f}", f"{s:.2f} s"] for k, (acc, s, _) in results.items()])
    print(f"  train time: one run of {EPOCHS} epochs (forward, backward, Adam steps, batching), "
          f"float32, this CPU; not a benchmark (see benchmarks/bench_linear.py)")
    (_, _, a), (_, _, b) = results.values()
    print(f"  max |difference| of the final test logits: {(a - b).abs().max().item():.2e} "
          f"(same start, same batches; only rounding differs)")
    print()


# ---- 2. logistic regression ------------------------------------------------------------------

def torch_logreg(X, y, n_classes, C=1.0, max_iter=100, tol=1e-6):
    """Logistic regression in plain PyTorch: nn.Linear + BCEWithLogitsLoss / CrossEntropyLoss,
    the same L2 objective and the same L-BFGS settings as LogisticRegression.fit."""
    binary = n_classes == 2
    lin = nn.Linear(X.shape[1], 1 if binary else n_classes, dtype=X.dtype)
    loss_fn = nn.BCEWithLogitsLoss() if binary else nn.CrossEntropyLoss()
    target = y.to(X.dtype) if binary else y
    l2 = 1.0 / (2.0 * C * X.shape[0])
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=tol * 1e-3, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = lin(X)
        loss = loss_fn(z.squeeze(-1) if binary else z, target) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(Xq):
        with torch.no_grad():
            z = lin(Xq)
            return (z[:, 0] > 0).long() if binary else z.argmax(1)
    return predict


def _median_fit_seconds(fit, repeats=3):
    """Median wall time of fit() over `repeats` calls, after one untimed warm-up call."""
    fit()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fit()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def demo_logreg():
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression

    from manual_layers.sklearn import LogisticRegression as MlEstimator

    print("2. Logistic regression (L-BFGS, C = 1.0): manual_layers vs scikit-learn vs plain "
          "PyTorch")
    ok = True
    rows = []
    for dataset in ("breast_cancer", "digits"):
        X_tr, X_te, y_tr, y_te = load(dataset)
        X_tr, X_te = X_tr.astype(np.float64), X_te.astype(np.float64)
        k = len(np.unique(y_tr))
        tag = f"{dataset} ({'binary' if k == 2 else f'{k} classes'}, {X_tr.shape[1]} features)"

        est = MlEstimator(C=1.0, max_iter=1000)
        layer = ml.LogisticRegression(X_tr.shape[1], num_classes=k)
        try:
            t = _median_fit_seconds(lambda: est.fit(X_tr, y_tr))
            rows.append([tag, "manual_layers.sklearn.LogisticRegression",
                         f"{est.score(X_te, y_te):.4f}", f"{t * 1e3:.1f} ms"])
            t = _median_fit_seconds(lambda: layer.fit(X_tr, y_tr, C=1.0, max_iter=1000))
            rows.append(["", "manual_layers.LogisticRegression (layer)",
                         f"{layer.score(X_te, y_te):.4f}", f"{t * 1e3:.1f} ms"])
        except (NotImplementedError, RuntimeError) as e:
            ok = False
            rows.append([tag, "manual_layers", "n/a", "n/a"])
            print(f"  manual_layers fit failed on {dataset}: {str(e).splitlines()[0][:160]}")

        sk = SkLogisticRegression(C=1.0, max_iter=1000)
        t = _median_fit_seconds(lambda: sk.fit(X_tr, y_tr))
        rows.append(["", "sklearn LogisticRegression", f"{sk.score(X_te, y_te):.4f}",
                     f"{t * 1e3:.1f} ms"])

        Xt_tr, Xt_te = torch.from_numpy(X_tr), torch.from_numpy(X_te)
        yt_tr = torch.from_numpy(y_tr)
        fitted = {}
        t = _median_fit_seconds(lambda: fitted.update(predict=torch_logreg(Xt_tr, yt_tr, k)))
        acc = (fitted["predict"](Xt_te).numpy() == y_te).mean()
        rows.append(["", "PyTorch nn.Linear + LBFGS", f"{acc:.4f}", f"{t * 1e3:.1f} ms"])
    table(["dataset", "model", "test accuracy", "fit time"], rows, left=2)
    print("  fit time: median of 3 fits after a warm-up fit, float64, this CPU; includes input "
          "checks, excludes prediction.")
    print()
    return ok


def main():
    info = ml.utils.info()
    import platform
    print(f"manual_layers {info['manual_layers']} (torch {info['torch']}, CPU kernels "
          f"{info['cpu_kernels_isa']}) on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads; all times below are wall-clock on this CPU\n")
    demo_mlp()
    ok = demo_logreg()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
