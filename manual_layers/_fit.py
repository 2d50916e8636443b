"""The fit engine shared by manual_layers.sklearn.LogisticRegression (the scikit-learn
estimator) and manual_layers.LogisticRegression.fit (the nn.Module).

It minimises scikit-learn's regularised logistic-regression objective
(sklearn/linear_model/_logistic.py and _linear_loss.py, LinearModelLoss; saga's for L1):

    f(W, b) = sum_i s_i * loss_i / S  +  ((1 - r) ||W||^2 / 2 + r ||W||_1) / (C * S)

with s_i = sample_weight_i * class_weight[y_i] (1 where not given), S = sum_i s_i (N when
unweighted), loss_i the binary log-loss (one coefficient row, classes_[1] the positive class)
or the multinomial cross-entropy (one row per class); the intercept is not penalised;
C=None (or inf) drops the second term; r = l1_ratio is 0 (L2) unless an L1 share is asked for.

solver="lbfgs": L-BFGS-B with the options scikit-learn passes (maxiter=max_iter, gtol=tol,
ftol=64 eps, maxls=50) over a float64 vector [W.ravel(), b], starting from zeros. On small dense
CPU X (a local fit) the whole loop is one call of the C++ op _logreg_fit (csrc/fit/: the algorithm
of manual_layers/_lbfgs.py, no Python between evaluations); otherwise scipy's
(scipy.optimize.minimize(method="L-BFGS-B")) below OWN_LBFGS_FROM parameters and from there
manual_layers/_lbfgs.py (the same algorithm, its vector work as BLAS passes over a packed
history). Every evaluation is ONE call of the fused loss+gradient kernel on X's device
(LinearObjective.evaluate, manual_layers/_fit_objective.py).
solver="owlqn" (an L1 share): OWL-QN (manual_layers/_solvers.py, or its C++ port in the same op
for small dense CPU X) on the same evaluation, which then holds the smooth part (the loss and
the L2 share); the L1 share is the solver's. solver="sgd"/"adam": mini-batch torch.optim
optimizers, max_iter epochs, L2 only.

Data parallelism (resolve_process_group, agree_across_ranks, _Comm), only when asked
(distributed=True or an explicit process_group; never because a default group exists): each rank
holds its shard of X, y (and sample weights). Agreed once, before the solver: every rank's
(validation error or None, n_features, local label set) in one all_gather_object (a clear
ValueError on every rank when any rank failed or the ranks disagree on n_features; the classes
are the sorted union), the starting point (broadcast from rank 0), and (N, S) in one SUM
all_reduce in LinearObjective.__init__. Then per function evaluation ONE SUM all_reduce of the
float64 vector (loss sum, gradient sums): (1 + K*(D+1)) * 8 bytes, never O(N). Every rank's
L-BFGS then sees bitwise the same values and takes the same steps, and every rank ends with the
model one process fits on the concatenated shards. The reductions run on X's device with NCCL
(CUDA tensors) and on the CPU with gloo. sgd/adam: the same number of steps on every rank, one
all-reduce per step of (loss sum, gradient sums, batch rows) (see _minibatch).
"""

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# data parallelism (process group, the ranks' agreement, the collectives): _fit_dist.py
from ._fit_dist import _Comm, agree_across_ranks, resolve_process_group  # noqa: F401
from . import _sparse
# the objective and its one-kernel evaluation: _fit_objective.py (named here too, as before)
from ._fit_objective import LinearObjective, _loss_and_grads  # noqa: F401


class _ConvergenceWarning(UserWarning):
    """The solver stopped before meeting its tolerance (used when scikit-learn is absent)."""


def _convergence_warning_class():
    """scikit-learn's ConvergenceWarning (the class its users filter on), imported only when
    needed: importing scikit-learn costs a second, too much for `import manual_layers`."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        return ConvergenceWarning
    except ImportError:  # pragma: no cover
        return _ConvergenceWarning


def __getattr__(name):
    if name == "ConvergenceWarning":
        return _convergence_warning_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

SOLVERS = ("lbfgs", "owlqn", "sgd", "adam")

__all__ = ["fit_logistic_regression", "LinearObjective", "FitResult", "ConvergenceWarning",
           "SOLVERS", "resolve_process_group", "agree_across_ranks"]


@dataclass
class FitResult:
    coef: torch.Tensor       # (1, D) binary or (K, D), on X's device, X's dtype
    intercept: torch.Tensor  # (1,) or (K,); zeros when fit_intercept=False
    n_iter: int              # L-BFGS iterations, or epochs for sgd/adam
    converged: bool | None   # None: not checked (sgd/adam with tol=None or 0)
    message: str = ""


def _progress(total, desc, verbose):
    """A progress bar (tqdm when installed, else plain lines), or None when not verbose."""
    if not verbose:
        return None
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:  # plain-text progress when tqdm is absent
        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k

            def set_postfix(self, **kw):
                print(f"{desc} {self.n}/{total} " + " ".join(f"{k}={v}" for k, v in kw.items()))

            def close(self):
                pass
        return _Plain()


# Below this much work per evaluation (rows x features x coefficient rows) a CPU fit runs on one
# thread: a kernel call then takes microseconds, and waking the OpenMP/MKL pool costs more than it
# saves; on a busy machine (more runnable threads than cores) every parallel region can wait a
# whole scheduler slice for a descheduled worker, longer than a small fit's whole work.
SINGLE_THREAD_WORK = 1 << 22


class _cpu_threads:
    """Context manager: torch.set_num_threads(n) inside, restored after (CPU fits only; it is
    process-wide, so concurrent torch work in other Python threads sees it too)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.n is not None and self.n != self.old:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.old:
            torch.set_num_threads(self.old)


_BLAS_CONTROLLER = []


def _blas_single_thread():
    """L-BFGS-B's own vector work is tiny; keep numpy/scipy's OpenBLAS pool from spinning on the
    cores the kernels use (threadpoolctl, when installed: scikit-learn brings it). The library
    scan (about 5 ms) runs once per process."""
    import contextlib
    if not _BLAS_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS_CONTROLLER.append(ThreadpoolController())
        except Exception:  # noqa: BLE001 - optional
            _BLAS_CONTROLLER.append(None)
    ctl = _BLAS_CONTROLLER[0]
    if ctl is None:
        return contextlib.nullcontext()
    try:
        return ctl.limit(limits=1, user_api="blas")
    except Exception:  # noqa: BLE001
        return contextlib.nullcontext()


# A stored entry of a sparse X costs the kernel about 30 dense multiply-adds (a gather and a
# scatter through the (D, 2 K) table against a streamed FMA: 2.9 ns per entry against 0.1 ns on
# the 2-core EPYC), so sparse work is counted in those units. Before this weight, a binary fit of
# 976,000 entries ran on one thread: 2.8 ms per evaluation, against 1.6 ms on two.
SPARSE_ENTRY_WORK = 32


def _work(X, K):
    """An evaluation's work in dense multiply-adds: rows x features x coefficient rows; a sparse
    X's is its stored entries (and rows), not N x D."""
    if isinstance(X, _sparse.CSR):
        return SPARSE_ENTRY_WORK * (X.nnz + X.shape[0]) * K
    return X.shape[0] * X.shape[1] * K


def _threads_for(X, K):
    if X.device.type != "cpu":
        return None
    return 1 if _work(X, K) < SINGLE_THREAD_WORK else None


# Where the C++ loop does not apply (_cpp_fit_applies: sparse X, CUDA, data-parallel, ...):
# from this many parameters the L2 fit runs manual_layers/_lbfgs.py (L-BFGS-B's algorithm, its
# vector work two BLAS passes per iteration); below it scipy's compiled L-BFGS-B, whose
# per-iteration cost is then smaller than our Python's. Same coefficients to 1e-14 on the small
# sets. Measured whole estimator fits on the 2-core EPYC (one BLAS thread, 21 interleaved runs,
# medians, scipy then ours): breast_cancer (31 parameters) 7.43 / 7.96 ms, digits (650) 23.8 /
# 24.6 ms; sparse 20,000 x 10,000 binary (10,001) 257 / 219 ms, 20 classes (200,020)
# 6.4-7.8 / 2.3 s (scipy's 13 ms per iteration were more than the sparse kernel's 10 ms).
OWN_LBFGS_FROM = 2048


# How csrc/fit/lbfgs.h's LbfgsStatus codes read (L-BFGS, OWL-QN: the Python loops' messages),
# and whether each is a convergence; None: written below with a value.
_CPP_STATUS = {0: (("the gradient is below tol", "the pseudo-gradient is below tol"), True),
               1: (("the relative reduction of the objective is below ftol",) * 2, True),
               2: (("the gradient is below tol at the starting point",
                    "the pseudo-gradient is below tol at the starting point"), True),
               3: ((None, None), False),  # max_iter
               4: (("the line search found no acceptable step in 50 evaluations",) * 2, False),
               5: ((None, None), False),  # not finite
               6: ((None, "no descent direction (the pseudo-gradient is zero)"), True),
               7: ((None, "the line search found no decrease in 50 steps (the objective is flat "
                          "to rounding)"), False)}


# Whether small local dense CPU fits (L2: L-BFGS, an L1 share: OWL-QN) run as one call of the
# C++ op _logreg_fit (below); False sends them through the Python loops (scipy's L-BFGS-B or
# manual_layers/_lbfgs.py; manual_layers/_solvers.py), which take the same steps up to rounding
# (tests/integration/test_lbfgs.py and test_sklearn_l1.py compare them).
CPP_FIT = True
# ... and only below this much work per evaluation (rows x features x coefficient rows): a few
# milliseconds per evaluation, where the Python around each (0.1-0.3 ms) was a large share (on
# breast_cancer, 455 x 30, five times the kernel). Above it that share is a few percent, and the
# Python loop keeps a long fit interruptible (Ctrl-C) between evaluations, which one C++ call
# is not.
CPP_FIT_MAX_WORK = 1 << 24


def _cpp_fit_takes(N, D, K, dense_cpu, weighted_multinomial):
    """Whether a fit of N x D data with K coefficient rows goes to the C++ loop, as far as its
    shape and data say: dense CPU data with rows, below CPP_FIT_MAX_WORK, and not several
    classes with per-sample weights (the kernels take binary sample weights and class weights
    alone). _cpp_fit_applies adds what the objective says; LogisticRegressionCV asks it before
    any objective exists (whether its folds can run in threads)."""
    return (CPP_FIT and dense_cpu and N > 0 and N * D * K < CPP_FIT_MAX_WORK
            and not weighted_multinomial)


def _cpp_fit_applies(obj, verbose):
    """Whether the whole L-BFGS or OWL-QN fit can run as one call of the C++ op _logreg_fit
    (csrc/fit/logreg_fit.cpp): _cpp_fit_takes for its data, a local (not data-parallel) fit in
    float32 or float64, and no progress bar. The rest runs the Python loops."""
    X = obj.X
    dense_cpu = isinstance(X, torch.Tensor) and X.device.type == "cpu"
    weighted_multinomial = not obj.binary and obj.s is not None and obj.cw_only is None
    return (_cpp_fit_takes(X.shape[0], X.shape[1], obj.K, dense_cpu, weighted_multinomial)
            and obj.comm is None and not verbose and X.dtype in (torch.float32, torch.float64))


def _cpp_fit(obj, x0, max_iter, tol):
    """The fit as one call of _logreg_fit: the algorithm of manual_layers/_lbfgs.py (L2) or of
    manual_layers/_solvers.py's owlqn (an L1 share, obj.l1_ratio > 0), and the objective of
    LinearObjective.evaluate (plus its l1_weights), with no Python between evaluations."""
    s = obj.s if obj.binary else None
    cw = None if obj.binary else obj.cw_only
    l1 = obj.l1_weight
    p, info = torch.ops.manual_layers._logreg_fit(
        obj.X.detach(), obj.target, s, cw, 2 if obj.binary else obj.K, obj.fit_intercept, obj.S,
        obj.l2_inv_C, l1, torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float64)),
        int(max_iter), float(tol))
    n_iter, status, n_evals = (int(v) for v in info[:3].tolist())
    obj.n_evals += n_evals
    msgs, converged = _CPP_STATUS[status]
    msg = msgs[1 if l1 > 0 else 0]
    if status == 3:
        msg = f"max_iter={max_iter} iterations reached"
    elif status == 5:
        msg = f"the objective is {float(info[3])}, or its gradient is not finite"
    return p.numpy(), n_iter, converged, msg


# L-BFGS's memory, the number of correction pairs (s, y) it keeps: scikit-learn's 10 (so the
# iterates are its iterates) on small fits; on large ones (at least CPP_FIT_MAX_WORK work per
# evaluation) as many as fit in half of X's own size, up to LBFGS_PAIRS_MAX: m with 2 m P
# float64 <= X's bytes / 2 (so the optimizer's memory stays below X's, whose values are read in
# place). More pairs approximate the Hessian better and save iterations on ill-conditioned
# problems; their vector work (two reads of the 2 m x P history per iteration) stays below an
# evaluation's, which reads all of X and does more with each value. scikit-learn-intelex's
# lbfgs keeps 50. Measured on the 2-core Zen 4 EPYC, 2026-12-08 (iterations, fit time):
#   issue 28's wide anchor, 100,000 x 2,000 float32 binary: 10 pairs 230, 7.7-9.2 s; 50: 110,
#     3.5-4.5 s; 100: 86, 3.6 s (bench_fit's copy with redundant features: 50: 249, 100: 177)
#   sparse 200,000 x 100,000 binary (10 M entries, P = 100,001; this rule: 37 pairs): 10: 137,
#     2.61 s; 30: 89, 1.77 s; 50: 88; 75 and 100: 71, 1.5 s (each at a lower objective than 10)
#   300,000 x 64, 10 classes: 58 -> 55; 100,000 x 64, 10 classes: 62 -> 48; 1 M x 28: 18 -> 16
# The sparse 20-class set (P = 2,000,020) keeps 10: 50 pairs (1.6 GB) saved a third of the
# iterations but not of the time.
LBFGS_PAIRS = 10
LBFGS_PAIRS_MAX = 100


def _lbfgs_pairs(obj):
    """How many correction pairs the L2 fit's L-BFGS keeps (LBFGS_PAIRS to LBFGS_PAIRS_MAX),
    the same on every rank of a data-parallel fit (rank 0's choice)."""
    X = obj.X
    x_bytes = (X.nnz * (X.values.element_size() + X.col.element_size())
               if isinstance(X, _sparse.CSR) else X.shape[0] * X.shape[1] * X.element_size())
    m = LBFGS_PAIRS
    if _work(X, obj.K) >= CPP_FIT_MAX_WORK:
        m = min(LBFGS_PAIRS_MAX, max(LBFGS_PAIRS, x_bytes // (32 * obj.n_params)))
    if obj.comm is not None:
        m = int(obj.comm.broadcast_np(np.array([m], dtype=np.float64))[0])
    return m


def _lbfgs(obj, x0, max_iter, tol, verbose):
    if _cpp_fit_applies(obj, verbose):
        return _cpp_fit(obj, x0, max_iter, tol)
    m = _lbfgs_pairs(obj)
    bar = _progress(max_iter, "LogisticRegression.fit (lbfgs)", verbose)
    if obj.n_params >= OWN_LBFGS_FROM:
        from ._lbfgs import lbfgs

        def cb(x, f):
            bar.update(1)
            bar.set_postfix(loss=f"{f:.6g}")

        grad = np.empty(obj.n_params)  # lbfgs uses each gradient before the next evaluation

        def fun(p):
            return obj.evaluate(p, out=grad)

        try:
            return lbfgs(fun, x0, max_iter=max_iter, tol=tol, m=m,
                         callback=cb if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    from scipy.optimize import minimize
    last = {}

    def fun(p):
        f, g = obj.evaluate(p)
        last["f"] = f
        return f, g

    def callback(xk):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last.get('f', float('nan')):.6g}")

    try:
        res = minimize(fun, x0, method="L-BFGS-B", jac=True,
                       callback=callback if bar is not None else None,
                       options={"maxiter": max_iter, "maxcor": m, "maxls": 50, "gtol": tol,
                                "ftol": 64 * np.finfo(float).eps})
    finally:
        if bar is not None:
            bar.close()
    msg = res.message.decode() if isinstance(res.message, bytes) else str(res.message)
    return res.x, min(int(res.nit), max_iter), res.status == 0, msg


def _minibatch(obj, x0, solver, max_iter, tol, lr, batch_size, verbose):
    X, target, s = obj.X, obj.target, obj.s
    N = X.shape[0]
    comm = obj.comm
    W, b = obj.split(x0)
    W = W.clone()  # gradients come from the fused forward (_loss_and_grads), not autograd
    params = [W]
    if b is not None:
        b = b.clone()
        params.append(b)
    if lr is None:
        lr = 0.1 if solver == "sgd" else 0.01
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if solver == "sgd"
           else torch.optim.Adam(params, lr=lr))
    bs = max(1, min(batch_size, N))
    if comm is None:
        steps = math.ceil(N / bs)
    else:
        # Data-parallel: the same number of steps on every rank (agreed once: the largest
        # ceil(n_rank / batch_size)); rank r splits its shuffled rows into `steps` near-equal
        # batches (each <= batch_size rows, sizes proportional to its shard), so every row is
        # used once per epoch and the global batch of a step is the union of the ranks' batches.
        t = torch.tensor([float(math.ceil(N / bs)) if N else 0.0], dtype=torch.float64,
                         device=comm.device)
        comm.dist.all_reduce(t, op=comm.dist.ReduceOp.MAX, group=comm.group)
        steps = max(1, int(t.item()))
    N_all = obj.N
    bar = _progress(max_iter * steps, f"LogisticRegression.fit ({solver})", verbose)
    prev, converged, n_iter, msg = None, (None if not tol else False), 0, ""
    try:
        for epoch in range(max_iter):
            perm = torch.randperm(N, device=X.device)
            total = torch.zeros((), dtype=torch.float64, device=X.device)
            for i in range(steps):
                if comm is None:
                    idx = perm[i * bs:(i + 1) * bs]
                else:
                    idx = perm[i * N // steps:(i + 1) * N // steps]
                sb = s[idx] if s is not None else None
                if idx.numel():
                    loss, gw, gb = _loss_and_grads(X[idx], W.detach(), None if b is None else
                                                   b.detach(), target[idx], obj.binary, sb,
                                                   obj.cw_only)
                    gs = [gw] + ([gb] if b is not None else [])
                else:  # a data-parallel rank whose shard has fewer batches than steps
                    loss = torch.zeros((), dtype=X.dtype, device=X.device)
                    gs = [torch.zeros_like(p) for p in params]
                if comm is None:
                    nb = idx.numel()
                    scale = (N / nb) / obj.S
                    f = loss.double() * scale
                    gs = [g * scale for g in gs]
                else:
                    # one all-reduce (SUM) per step: (loss sum, gradient sums, batch rows)
                    packed = torch.cat([loss.reshape(1).double()] +
                                       [g.reshape(-1).double() for g in gs] +
                                       [torch.full((1,), float(idx.numel()),
                                                   dtype=torch.float64, device=X.device)])
                    packed = comm.all_reduce(packed).to(X.device)
                    nb = int(packed[-1].item())
                    scale = (N_all / max(nb, 1)) / obj.S
                    f = packed[0] * scale
                    sizes = [p.numel() for p in params]
                    gs = list((packed[1:1 + sum(sizes)] * scale).split(sizes))
                with torch.no_grad():
                    for p, g in zip(params, gs):
                        p.grad = g.reshape(p.shape).to(p.dtype)
                    if obj.inv_C:
                        f = f + (0.5 * obj.inv_C / obj.S) * W.detach().double().pow(2).sum()
                        W.grad += (obj.inv_C / obj.S) * W.detach()
                opt.step()
                total += f.detach().double() * (nb / N_all)
                if bar is not None:
                    bar.update(1)
            cur = float(total)  # one sync per epoch
            n_iter = epoch + 1
            if not math.isfinite(cur):
                raise FloatingPointError(
                    f"LogisticRegression.fit (solver={solver!r}): the loss became {cur} in "
                    f"epoch {n_iter}; the step size lr={lr} is too large for this data (scale "
                    f"the features, e.g. StandardScaler, or lower lr)")
            if bar is not None:
                bar.set_postfix(loss=f"{cur:.6g}")
            if tol and prev is not None and abs(prev - cur) <= tol * max(1.0, abs(cur)):
                converged, msg = True, "epoch loss changed by less than tol"
                break
            prev = cur
    finally:
        if bar is not None:
            bar.close()
    if converged is False:
        msg = f"epoch loss still changed by more than tol={tol} after max_iter={max_iter}"
    with torch.no_grad():
        out = torch.cat([W.reshape(-1)] + ([b] if b is not None else []))
    return out.to("cpu", torch.float64).numpy(), n_iter, converged, msg


def fit_logistic_regression(X, y, n_classes, *, sample_weight=None, class_weight=None, C=1.0,
                            fit_intercept=True, solver="lbfgs", max_iter=100, tol=1e-4,
                            coef_init=None, intercept_init=None, lr=None, batch_size=256,
                            verbose=0, warn=True, caller="LogisticRegression.fit",
                            process_group=None, l1_ratio=0.0):
    """Fit (multinomial or binary) logistic regression, scikit-learn's objective (L2, L1 or
    elastic-net penalty).

    Parameters
    ----------
    X : Tensor of shape (N, D), or a manual_layers._sparse.CSR
        Floating tensor on the device that computes: the fused kernels run in X's dtype (the
        estimator passes X's dtype, float32 or float64; the module float64 for lbfgs). A CSR
        (sparse X) is never densified: every solver's evaluations go through the sparse op.
    y : Tensor of shape (N,)
        Integer class indices 0..n_classes-1 on X's device, already encoded (for binary, 1 is
        the positive class).
    n_classes : int
        At least 2; binary (2) fits one coefficient row, otherwise one row per class.
    sample_weight : Tensor of shape (N,) or None
        On X's device.
    class_weight : Tensor of shape (n_classes,) or None
        Multiplies the sample weights, as scikit-learn does.
    C : float or None
        Inverse regularisation strength (> 0); None or inf for no penalty.
    fit_intercept : bool
        Fit the intercept (not penalised).
    solver : {"lbfgs", "owlqn", "sgd", "adam"}
        "lbfgs": L-BFGS-B's algorithm (the C++ op _logreg_fit on small dense CPU X; else
        scipy's, or manual_layers/_lbfgs.py from OWN_LBFGS_FROM parameters), max_iter
        iterations, gtol=tol. "owlqn": OWL-QN
        (manual_layers/_solvers.py) for an L1 share, max_iter iterations, stops when the
        largest absolute pseudo-gradient is at most tol; with no L1 share the objective is
        smooth and L-BFGS-B runs. "sgd" / "adam": mini-batches of batch_size, max_iter epochs,
        learning rate lr; stops early when the epoch loss changes by at most tol relative,
        never when tol is None or 0.
    max_iter, tol, lr, batch_size : as the solver above says
    coef_init, intercept_init : tensors or arrays of the result's shapes, or None
        The starting point; zeros when None.
    verbose : int
        Print the solver's progress.
    warn : bool
        Emit a ConvergenceWarning when the solver stops at max_iter without converging.
    caller : str
        The name that error messages begin with.
    process_group : None or a torch.distributed group
        None for a local fit. A group (e.g. from resolve_process_group): X, y and
        sample_weight are this rank's shard, y already encoded with the classes agreed across
        ranks (agree_across_ranks); N and the weight sum are summed over ranks once, and each
        evaluation (lbfgs) or step (sgd, adam) all-reduces the loss and gradient sums.
    l1_ratio : float in [0, 1]
        The elastic-net mix: the penalty is ((1 - l1_ratio) ||W||^2 / 2 + l1_ratio ||W||_1) / C,
        scikit-learn saga's. An L1 share needs solver="owlqn".

    Returns
    -------
    FitResult
        (coef, intercept, n_iter, converged, message); the multinomial intercepts are centred
        (they are defined up to a common shift).
    """
    if solver not in SOLVERS:
        raise ValueError(f"{caller}: solver must be one of {', '.join(map(repr, SOLVERS))}, got "
                         f"{solver!r}")
    has_l1 = bool(l1_ratio) and C is not None and C != math.inf
    if has_l1 and solver != "owlqn":
        raise ValueError(f"{caller}: an L1 penalty (l1_ratio={l1_ratio}) needs solver='owlqn' "
                         f"(orthant-wise L-BFGS); solver={solver!r} handles L2 or no penalty "
                         f"only")
    if solver == "owlqn" and not has_l1:
        solver = "lbfgs"  # a smooth objective: OWL-QN would be L-BFGS with a weaker line search
    comm = None if process_group is None else _Comm(process_group, X.device)
    binary = n_classes == 2
    K, D = (1 if binary else n_classes), X.shape[1]
    s, cw_only = None, None
    if class_weight is not None:
        cw_rows = class_weight.to(X.dtype)[y]
        if sample_weight is None and not binary:
            s, cw_only = cw_rows, class_weight.to(X.dtype)
        else:
            s = cw_rows
    if sample_weight is not None:
        sw = sample_weight.to(X.dtype)
        s = sw if s is None else s * sw
        cw_only = None
    target = y.to(X.dtype) if binary else y.long()
    obj = LinearObjective(X, target, n_classes, s=s, class_weight_only=cw_only, C=C,
                          fit_intercept=fit_intercept, comm=comm,
                          l1_ratio=l1_ratio if has_l1 else 0.0)
    if not obj.S > 0:
        raise ValueError(f"{caller}: the sample weights (sample_weight times class_weight) must "
                         f"have a positive sum, got {obj.S}")

    x0 = np.zeros(obj.n_params)
    if coef_init is not None:
        x0[:K * D] = np.asarray(torch.as_tensor(coef_init).detach().cpu().double()).reshape(-1)
    if intercept_init is not None and fit_intercept:
        x0[K * D:] = np.asarray(torch.as_tensor(intercept_init).detach().cpu().double())
    if comm is not None:  # every rank starts from rank 0's point (warm starts may differ)
        x0 = comm.broadcast_np(x0)

    t0 = time.perf_counter()
    with _cpu_threads(_threads_for(X, K)), _blas_single_thread():
        if solver == "lbfgs":
            p, n_iter, converged, msg = _lbfgs(obj, x0, max_iter, tol, verbose)
        elif solver == "owlqn" and _cpp_fit_applies(obj, verbose):
            p, n_iter, converged, msg = _cpp_fit(obj, x0, max_iter, tol)
        elif solver == "owlqn":
            from ._solvers import run_owlqn
            p, n_iter, converged, msg = run_owlqn(obj, x0, max_iter, tol,
                                                  _progress(max_iter, f"{caller} (owlqn)",
                                                            verbose))
        else:
            p, n_iter, converged, msg = _minibatch(obj, x0, solver, max_iter, tol, lr,
                                                   batch_size, verbose)
    coef = torch.as_tensor(p[:K * D].reshape(K, D), dtype=X.dtype, device=X.device)
    if fit_intercept:
        icpt = p[K * D:].copy()
        if not binary:
            icpt -= icpt.mean()
        intercept = torch.as_tensor(icpt, dtype=X.dtype, device=X.device)
    else:
        intercept = torch.zeros(K, dtype=X.dtype, device=X.device)
    if warn and converged is False:
        warnings.warn(f"{caller}: solver={solver!r} did not converge in max_iter={max_iter} "
                      f"iterations ({msg}); increase max_iter or scale the data (e.g. "
                      f"StandardScaler)", _convergence_warning_class(), stacklevel=3)
    res = FitResult(coef, intercept, n_iter, converged, msg)
    res.fit_time = time.perf_counter() - t0
    res.n_evals = obj.n_evals
    res.world_size = 1 if comm is None else comm.world
    res.comm_bytes = 0 if comm is None else comm.bytes  # all-reduced, from this rank
    res.n_samples_total = obj.N
    # the per-evaluation all-reduce: (1 + K*(D+1)) float64 values (K*D without intercept)
    res.bytes_per_eval = 0 if comm is None else (1 + obj.n_params) * 8
    return res
