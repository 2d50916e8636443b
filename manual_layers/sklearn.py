"""manual_layers.sklearn.LogisticRegression: a scikit-learn estimator whose fit runs the fused
loss+gradient kernels of manual_layers on the CPU or a CUDA GPU.

    from manual_layers.sklearn import LogisticRegression
    clf = LogisticRegression(C=1.0).fit(X, y)          # like sklearn.linear_model's
    clf = LogisticRegression(device="cuda").fit(X, y)  # the same fit on a GPU

It minimises the same objective as sklearn.linear_model.LogisticRegression (mean of the
sample-weighted log-losses + ((1 - l1_ratio) ||W||^2 / 2 + l1_ratio ||W||_1) / (C sum(sample
weights)), binary: one coefficient row, multiclass: multinomial with one row per class). L2: with
the optimizer of scikit-learn's lbfgs (L-BFGS-B's algorithm and options: on small dense CPU data
the whole loop in C++, csrc/fit/; otherwise scipy's own below 2,048 parameters and
manual_layers/_lbfgs.py's from there), so coef_, intercept_ and predict_proba agree with
scikit-learn's to rounding when both converge. L1 / elastic-net:
OWL-QN (manual_layers/_solvers.py; its port in csrc/fit/ on small dense CPU data) on saga's
objective. See manual_layers/_fit.py for the engine
and manual_layers/_fit_prep.py for the parameter rules shared with the layer's fit.
LogisticRegressionCV (manual_layers/_sklearn_cv.py) is scikit-learn's, with these fits.
"""

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted

from . import _fit_prep as P
from . import _sparse
from ._fit import ConvergenceWarning, fit_logistic_regression  # noqa: F401
from .logistic_regression import LogisticRegression as _LogisticRegressionModule

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(est, *args, **kw):
        return est._validate_data(*args, **kw)

__all__ = ["LogisticRegression", "LogisticRegressionCV", "ConvergenceWarning"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _to_tensor(a, device, dtype):
    """numpy -> tensor on device, sharing memory where it can (CPU, same dtype). Read-only
    arrays (memmaps) are shared too: the kernels only read X. A scipy CSR matrix becomes a
    manual_layers._sparse.CSR over its own arrays (never densified)."""
    if _sparse.is_sparse(a):
        return _sparse.to_csr(a, device, dtype)
    if not a.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
            t = torch.as_tensor(a)
    else:
        t = torch.as_tensor(a)
    return t.to(device=device, dtype=dtype)


def _encode_labels(y):
    """(classes, y_idx) as np.unique(y, return_inverse=True) gives them. Integer labels over a
    range no wider than a few times the number of samples are counted instead of sorted: one
    O(n) pass (200,000 labels: ~0.5 ms against ~5 ms for the sort)."""
    y = np.asarray(y)
    if y.ndim == 1 and y.size and y.dtype.kind in "iu":
        lo, hi = int(y.min()), int(y.max())
        span = hi - lo + 1
        if span <= max(1024, 4 * y.size) and hi <= np.iinfo(np.intp).max:
            off = y.astype(np.intp) - lo  # in intp: y - lo could overflow a narrow dtype
            present = np.bincount(off, minlength=span) > 0
            classes = (np.flatnonzero(present) + lo).astype(y.dtype)
            lut = np.cumsum(present, dtype=np.intp) - 1
            return classes, lut[off]
    return np.unique(y, return_inverse=True)


def _host(a):
    """A torch tensor as scikit-learn's validation can read it: detached (a tensor that
    requires grad is data here, not a graph node) and on the host; anything else unchanged."""
    return a.detach().cpu() if isinstance(a, torch.Tensor) else a


def _resolve_device(device, fn):
    """torch.device of the `device` parameter: a CPU or CUDA device (where the kernels run)."""
    try:
        d = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{fn}: device must be None, 'cpu', 'cuda' or a torch.device, got "
                         f"{device!r} ({e})") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: device must be a CPU or CUDA device (the fit's kernels run "
                         f"there and the fitted arrays are copied back), got {device!r}")
    return d


def _work_dtype(dtype, X):
    """The dtype the kernels compute in: the `dtype` parameter's, or (None) X's as scikit-learn's
    lbfgs does: float32 X (dense or sparse, after validation) in float32, anything else float64."""
    if dtype is not None:
        return dtype
    return torch.float32 if X.dtype == np.float32 else torch.float64


def _resolve_dtype(dtype):
    if dtype is None:
        return None  # X's own: float32 stays float32 (as scikit-learn's lbfgs), else float64
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float64):
        return dtype
    name = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", str(dtype))
    if name in _DTYPES:
        return _DTYPES[name]
    raise ValueError(f"LogisticRegression: dtype must be None, 'float32', 'float64' or the "
                     f"torch/numpy dtype, got {dtype!r}")


class LogisticRegression(ClassifierMixin, BaseEstimator):
    """Logistic regression (binary or multinomial; L2, L1, elastic-net or no penalty) fitted
    with the fused manual_layers kernels; a scikit-learn estimator (clone, pickle, Pipeline,
    GridSearchCV) with scikit-learn 1.8+'s parameters, warnings and errors.

    Parameters
    ----------
    penalty : "l1", "l2", "elasticnet" or None, default="deprecated"
        Deprecated, as in scikit-learn 1.8+ (a FutureWarning when set): use l1_ratio (0: l2,
        1: l1, between: elastic-net) and C=np.inf (no penalty).
    C : float > 0 or np.inf, default=1.0
        Inverse regularisation strength, as scikit-learn's: the penalty is
        ((1 - l1_ratio) ||W||^2 / 2 + l1_ratio ||W||_1) / (C sum(sample weights)) added to the
        weighted mean log-loss; the intercept is not penalised. np.inf: no penalty.
    l1_ratio : float in [0, 1], default=0.0
        The elastic-net mix; > 0 needs solver="saga" (or "owlqn"), as in scikit-learn.
    fit_intercept : bool, default=True
    class_weight : None, "balanced" or dict {label: weight}, default=None
        Multiplies the sample weights, as in scikit-learn ("balanced" uses
        n_samples / (n_classes * weighted class counts)).
    max_iter : int >= 0, default=100
        Iterations (lbfgs, owlqn) or epochs (sgd, adam).
    tol : float >= 0, default=1e-4
        L-BFGS: stop when the largest gradient component is <= tol (scipy's gtol, as
        scikit-learn). OWL-QN: the same test on the pseudo-gradient. sgd/adam: stop when the
        epoch loss changes by <= tol (relative).
    solver : str, default="lbfgs"
        "lbfgs": L-BFGS-B, the optimizer scikit-learn uses (small dense CPU X: its algorithm in
        C++, csrc/fit/; otherwise scipy's below 2,048 parameters and from there
        manual_layers/_lbfgs.py, the same iterates with BLAS vector work; on large X up to
        100 correction pairs instead of 10: the same optimum in fewer iterations,
        docs/guide/estimator.md), each
        evaluation one fused kernel call on `device` (L2 or no penalty). "saga" or "owlqn": OWL-QN (orthant-wise
        L-BFGS, manual_layers/_solvers.py) on the same fused evaluation: any l1_ratio, the
        optimum of scikit-learn saga's objective with exact zeros in coef_ (an L2-only
        objective is smooth and runs L-BFGS-B). "newton-cg", "newton-cholesky", "sag":
        scikit-learn's other L2 solvers, which minimise the same objective: L-BFGS-B runs.
        "liblinear" is refused (it penalises the intercept: another objective). "sgd"
        (momentum 0.9, lr 0.1) and "adam" (lr 0.01): mini-batches of 256 rows, L2 only.
    device : None, "cpu", "cuda", "cuda:1", torch.device, default=None (CPU)
        Where X is copied to and the kernels run; fitted arrays are numpy on the host and the
        fitted layer `module_` lives there.
    dtype : None, "float32" or "float64", default=None
        The precision the kernels compute in. None: X's, as scikit-learn's lbfgs does: float32
        X is fitted in float32 (coef_ float32; the kernels accumulate in float32, the per-row
        losses are summed in float64, and L-BFGS keeps its state in float64), any
        other X in float64, which gives scikit-learn's float64 results to rounding. float32
        halves memory traffic (faster on large X) and agrees to about 1e-4 with L-BFGS at
        default tol.
    verbose : int, default=0
        > 0 shows a progress bar (tqdm when installed).
    warm_start : bool, default=False
        Start from the previous fit's coef_/intercept_ (when the shapes agree).
    distributed : bool, default=False
        Data-parallel fit over torch.distributed, only when asked: True (the default process
        group, which must be initialised) or a process_group passed to fit. Then each rank's
        fit(X, y, sample_weight) takes its X, y as this rank's shard (any sizes, also none; a
        shard may miss classes) and every rank ends with the model fitted to the concatenation
        of all shards (the same on every rank). Every rank of the group must call fit. The
        classes (union of the ranks' labels) and n_features are agreed once (a ValueError on
        every rank when they disagree or any rank's data fails its checks), N and the weight
        total once, then each function evaluation all-reduces one float64 vector of
        1 + n_coef_rows * (n_features + 1) values. False with no process_group: a local fit,
        also under torchrun (a fit on one rank never waits on the others). sgd/adam: every rank
        takes the same number of steps per epoch (the largest ceil(shard rows / 256)), each on
        1/steps of its shuffled shard, with one all-reduce (SUM) per step.
    n_jobs : None, default=None
        No effect, as in scikit-learn 1.8+ (a FutureWarning when set).
    random_state : default=None
        No effect: every solver here is deterministic (accepted for scikit-learn code).

    Attributes
    ----------
    classes_ : ndarray (n_classes,)
    coef_ : ndarray (1, n_features) for two classes, (n_classes, n_features) otherwise
    intercept_ : ndarray (1,) or (n_classes,)
    n_features_in_ : int;  feature_names_in_ : ndarray of str (when X has string column names)
    n_iter_ : ndarray (1,) of int32 - iterations (lbfgs, owlqn) or epochs (sgd/adam) run
    module_ : manual_layers.LogisticRegression - the fitted nn.Module (on `device`, `dtype`)
    """

    def __init__(self, penalty="deprecated", *, C=1.0, l1_ratio=0.0, fit_intercept=True,
                 class_weight=None, max_iter=100, tol=1e-4, solver="lbfgs", device=None,
                 dtype=None, verbose=0, warm_start=False, distributed=False, n_jobs=None,
                 random_state=None):
        self.penalty = penalty
        self.C = C
        self.l1_ratio = l1_ratio
        self.fit_intercept = fit_intercept
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver
        self.device = device
        self.dtype = dtype
        self.verbose = verbose
        self.warm_start = warm_start
        self.distributed = distributed
        self.n_jobs = n_jobs
        self.random_state = random_state

    # ---- checks --------------------------------------------------------------------------
    def _check_params(self, fn="LogisticRegression"):
        """(device, dtype, C or None, l1 share, engine solver), every parameter checked with
        scikit-learn's rules (manual_layers/_fit_prep.py) and errors naming it."""
        C, l1, pen = P.resolve_penalty(self.penalty, self.C, self.l1_ratio, fn, stacklevel=4)
        solver = P.resolve_solver(self.solver, pen, fn)
        P.check_int(self.max_iter, "max_iter", fn)
        P.check_real(self.tol, "tol", fn, low=0)
        if not isinstance(self.fit_intercept, (bool, np.bool_)):
            raise P.InvalidParameterError(f"{fn}: fit_intercept must be True or False, got "
                                          f"{self.fit_intercept!r}")
        cw = self.class_weight
        if not (cw is None or (isinstance(cw, str) and cw == "balanced") or
                isinstance(cw, dict)):
            raise P.InvalidParameterError(f"{fn}: class_weight must be None, 'balanced' or a "
                                          f"dict {{label: weight}}, got {cw!r}")
        if self.n_jobs is not None:
            warnings.warn(f"'n_jobs' has no effect since 1.8 and will be removed in 1.10. You "
                          f"provided 'n_jobs={self.n_jobs}', please leave it unspecified.",
                          FutureWarning, stacklevel=4)
        return _resolve_device(self.device, fn), _resolve_dtype(self.dtype), C, l1, solver

    # ---- fit -----------------------------------------------------------------------------
    def fit(self, X, y, sample_weight=None, process_group=None):
        """Fit on X (n_samples, n_features) - numpy, pandas, lists, anything scikit-learn's
        check_array takes, scipy.sparse matrices and torch sparse tensors (never densified:
        CSR read in place, CSC and other formats converted to CSR once) - and labels y
        (n_samples,) of any sortable type; sample_weight
        (n_samples,) or None. process_group: the torch.distributed group of a data-parallel fit
        (see `distributed`); X, y, sample_weight are then this rank's shard. Returns self."""
        fn = "LogisticRegression.fit"
        device, dtype, C, l1, solver = self._check_params(fn)

        def check_local(need_rows):
            Xc, yc, sw = self._check_local(X, y, sample_weight, min_samples=int(need_rows))
            return (Xc, yc, sw), Xc.shape[1], _encode_labels(yc)[0]

        def encode(data, agreed):
            yc = data[1]
            if agreed is None:
                return _encode_labels(yc)
            return agreed, (np.searchsorted(agreed, yc) if len(yc) else
                            np.zeros(0, dtype=np.intp))

        group, (X, y, sample_weight), classes, y_idx = P.prepare_labels(
            fn, self.distributed, process_group, check_local, encode)
        cw = P.class_weights(self.class_weight, classes, y_idx, sample_weight, group, fn,
                             device=device)
        K = len(classes)
        rows = 1 if K == 2 else K
        coef_init = intercept_init = None
        if self.warm_start and getattr(self, "coef_", None) is not None and \
                self.coef_.shape == (rows, X.shape[1]):
            coef_init = self.coef_
            intercept_init = self.intercept_ if self.fit_intercept else None

        dtype = _work_dtype(dtype, X)
        Xt = _to_tensor(X, device, dtype)
        yt = torch.as_tensor(y_idx.reshape(-1), dtype=torch.long).to(device)
        swt = None if sample_weight is None else \
            torch.as_tensor(sample_weight).to(device=device, dtype=dtype)
        cwt = None if cw is None else torch.as_tensor(cw).to(device=device, dtype=dtype)
        res = fit_logistic_regression(
            Xt, yt, K, sample_weight=swt, class_weight=cwt, C=C, l1_ratio=l1,
            fit_intercept=bool(self.fit_intercept), solver=solver,
            max_iter=int(self.max_iter), tol=float(self.tol), coef_init=coef_init,
            intercept_init=intercept_init, verbose=self.verbose, caller=fn, process_group=group)

        module = _LogisticRegressionModule(X.shape[1], num_classes=K,
                                           bias=bool(self.fit_intercept), device=device,
                                           dtype=dtype)
        self.module_ = module._load_fit(res, classes)
        self.classes_ = classes
        self.coef_ = res.coef.cpu().numpy().astype(X.dtype, copy=False)
        self.intercept_ = res.intercept.cpu().numpy().astype(X.dtype, copy=False)
        self.n_iter_ = np.array([res.n_iter], dtype=np.int32)
        return self

    def _check_local(self, X, y, sample_weight, min_samples):
        X, y, sample_weight = (_host(a) for a in (X, y, sample_weight))
        if isinstance(X, torch.Tensor) and _sparse.is_sparse(X):
            X = _sparse.torch_to_scipy(X)
        X, y = _validate_data(self, X, y, accept_sparse="csr", dtype=[np.float64, np.float32],
                              order="C", reset=True, ensure_min_samples=min_samples)
        # A 1-D integer y is always a valid "binary" or "multiclass" target: scikit-learn's
        # type_of_target (a sort of y) only has something to reject for other dtypes.
        if len(y) and not (y.ndim == 1 and y.dtype.kind in "iu"):
            check_classification_targets(y)
        if sample_weight is not None:
            try:
                sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
            except (TypeError, ValueError) as e:
                if "sample_weight" in str(e):
                    raise
                raise ValueError(f"LogisticRegression.fit: sample_weight must be numbers, one "
                                 f"per row of X ({X.shape[0]}), got {type(sample_weight).__name__}"
                                 f" ({e})") from None
            if not np.isfinite(sample_weight).all():
                raise ValueError("LogisticRegression.fit: sample_weight contains NaN or infinity")
        return X, y, sample_weight

    # ---- predict -------------------------------------------------------------------------
    def _tensor(self, X):
        check_is_fitted(self)
        X = _host(X)
        if isinstance(X, torch.Tensor) and _sparse.is_sparse(X):
            X = _sparse.torch_to_scipy(X)
        X = _validate_data(self, X, accept_sparse="csr", dtype=[np.float64, np.float32],
                           order="C", reset=False)
        p = self.module_.weight
        return _to_tensor(X, p.device, p.dtype)

    def decision_function(self, X):
        """Scores (n_samples,) for two classes (> 0 means classes_[1]), else
        (n_samples, n_classes)."""
        X = self._tensor(X)
        with torch.no_grad():
            z = self.module_.logits(X)
        z = z.cpu().numpy()
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_proba(self, X):
        """Probabilities (n_samples, n_classes), columns in the order of classes_."""
        X = self._tensor(X)
        with torch.no_grad():
            p = self.module_.predict_proba(X)
        return p.cpu().numpy()

    def predict_log_proba(self, X):
        """log of predict_proba, computed stably from the scores (log-sigmoid /
        log-softmax)."""
        X = self._tensor(X)
        with torch.no_grad():
            z = self.module_.logits(X)
            if z.shape[1] == 1:
                lp = torch.cat([torch.nn.functional.logsigmoid(-z),
                                torch.nn.functional.logsigmoid(z)], dim=1)
            else:
                lp = torch.log_softmax(z, dim=1)
        return lp.cpu().numpy()

    def predict(self, X):
        """Predicted labels (values of classes_)."""
        z = self.decision_function(X)
        idx = (z > 0).astype(np.intp) if z.ndim == 1 else z.argmax(axis=1)
        return self.classes_[idx]

    # score: ClassifierMixin.score (accuracy, sample_weight; a y of the wrong length raises).

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = True
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"allow_nan": False}


from ._sklearn_cv import LogisticRegressionCV  # noqa: E402  (it subclasses the estimator above)
