"""python -m manual_layers demo : manual_layers side by side with PyTorch and scikit-learn.

1. A small MLP (64 -> 128 -> 128 -> 10, GELU) trained on scikit-learn's digits, once with
   manual_layers.Linear(..., activation="gelu") (Linear and GELU fused, hand-written forward
   and backward) and once with nn.Linear + nn.GELU, from the same initial weights, with the
   same optimizer, mini-batches and epochs.
2. Logistic regression, binary (breast cancer) and multiclass (digits):
   manual_layers.LogisticRegression(...).fit(X, y) against scikit-learn's LogisticRegression
   and the same model written in plain PyTorch, all three minimising the same objective
   (mean log-loss + ||W||^2 / (2 C N), C = 1) with L-BFGS.

Runs on the CPU in a few seconds.
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
    (_, _, a), (_, _, b) = results.values()
    print(f"  max |difference| of the final test logits: {(a - b).abs().max().item():.2e} "
          f"(same start, same batches; only rounding differs)")
    print()


# ---- 2. logistic regression ------------------------------------------------------------------

def torch_logreg(X, y, n_classes, C=1.0, max_iter=100, tol=1e-6):
    """Logistic regression in plain PyTorch: nn.Linear + BCEWithLogitsLoss / CrossEntropyLoss,
    the same L2 objective and the same L-BFGS settings as LogisticRegression.fit."""
    binary = n_classes == 2
    lin = nn.Linear(X.shape[1], 1 if binary else n_classes)
    loss_fn = nn.BCEWithLogitsLoss() if binary else nn.CrossEntropyLoss()
    target = y.float() if binary else y
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


def demo_logreg():
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression

    print("2. Logistic regression (L-BFGS, C = 1.0): manual_layers vs scikit-learn vs plain "
          "PyTorch")
    ok = True
    rows = []
    for dataset in ("breast_cancer", "digits"):
        X_tr, X_te, y_tr, y_te = load(dataset)
        k = len(np.unique(y_tr))
        tag = f"{dataset} ({'binary' if k == 2 else f'{k} classes'}, {X_tr.shape[1]} features)"

        # manual_layers: fused loss + gradient kernels under torch.optim.LBFGS, numpy in, numpy out
        torch.manual_seed(SEED)
        t0 = time.perf_counter()
        try:
            clf = ml.LogisticRegression(X_tr.shape[1], num_classes=k).fit(X_tr, y_tr, C=1.0)
            t_ml = time.perf_counter() - t0
            rows.append([tag, "manual_layers.LogisticRegression", f"{clf.score(X_te, y_te):.4f}",
                         f"{t_ml * 1e3:.1f} ms"])
        except (NotImplementedError, RuntimeError) as e:
            ok = False
            rows.append([tag, "manual_layers.LogisticRegression", "n/a", "n/a"])
            print(f"  manual_layers.LogisticRegression.fit failed on {dataset}: "
                  f"{str(e).splitlines()[0][:160]}")

        t0 = time.perf_counter()
        sk = SkLogisticRegression(C=1.0, max_iter=1000).fit(X_tr, y_tr)
        t_sk = time.perf_counter() - t0
        rows.append(["", "sklearn LogisticRegression", f"{sk.score(X_te, y_te):.4f}",
                     f"{t_sk * 1e3:.1f} ms"])

        Xt_tr, Xt_te = torch.from_numpy(X_tr), torch.from_numpy(X_te)
        torch.manual_seed(SEED)
        t0 = time.perf_counter()
        predict = torch_logreg(Xt_tr, torch.from_numpy(y_tr), k)
        t_pt = time.perf_counter() - t0
        acc = (predict(Xt_te).numpy() == y_te).mean()
        rows.append(["", "PyTorch nn.Linear + LBFGS", f"{acc:.4f}", f"{t_pt * 1e3:.1f} ms"])
    table(["dataset", "model", "test accuracy", "fit time"], rows, left=2)
    print()
    return ok


def main():
    info = ml.info()
    print(f"manual_layers {info['manual_layers']} (torch {info['torch']}, CPU kernels "
          f"{info['cpu_kernels_isa']}), {torch.get_num_threads()} CPU threads\n")
    demo_mlp()
    ok = demo_logreg()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
