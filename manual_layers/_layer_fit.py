"""The estimator side of manual_layers.LogisticRegression (the layer): fit, predict, score.

fit speaks the scikit-learn estimator's vocabulary (solver=, max_iter=, C=, penalty=, l1_ratio=,
class_weight="balanced" / {label: weight} / one weight per class, sample_weight, tol,
warm_start, verbose) through the preparation shared with manual_layers.sklearn.LogisticRegression
(manual_layers/_fit_prep.py: penalty and solver rules, process group, per-rank checks, label
agreement, class weights). The old keywords optimizer= and epochs= still work for one release,
with a FutureWarning naming the new one: they were the layer's documented API, and a warning
that says what to write keeps existing training scripts running while they move.
"""

import math
import warnings

import numpy as np
import torch

from . import _fit, _sparse
from . import _fit_prep as P

__all__ = ["LayerFitMixin"]


class _NotFittedError(ValueError, AttributeError):
    """predict/score called on a LogisticRegression layer that has no classes_ (used when
    scikit-learn is absent)."""


def _not_fitted_error_class():
    """scikit-learn's NotFittedError when installed (so `except NotFittedError` works for both),
    imported only when raised: importing scikit-learn costs a second at `import manual_layers`."""
    try:
        from sklearn.exceptions import NotFittedError
        return NotFittedError
    except ImportError:  # pragma: no cover
        return _NotFittedError


def _finite_or_raise(t, name, fn):
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: {name} contains NaN or infinity; remove or impute those "
                         f"values first")


def _is_text(a):
    return a.dtype.kind in "USO"


class LayerFitMixin:
    """fit / predict / score of the LogisticRegression layer (needs weight, bias, num_classes,
    in_features, binary, classes_, logits and forward)."""

    def _as_tensor(self, X, fn=None, dtype=None, finite=False):
        """X as a tensor on the layer's device (in the layer's dtype unless given), detached
        (fit and predict never build an autograd graph), checked: 2-D (N, in_features) when fn
        is given (fit/predict), any (..., in_features) else; finite when asked (fit, predict,
        score: scikit-learn's predict raises on NaN as its fit does). Sparse X (scipy.sparse,
        torch sparse tensors) becomes a manual_layers._sparse.CSR over its own arrays, never
        densified (CSC and other formats converted to CSR once; its values checked finite)."""
        name = fn or "LogisticRegression"
        if _sparse.is_sparse(X):
            X = _sparse.to_csr(X, self.weight.device, dtype or self.weight.dtype, name)
            if X.shape[1] != self.in_features:
                raise ValueError(f"{name}: X must have shape (N, {self.in_features}), got "
                                 f"{X.shape}")
            return X
        if not isinstance(X, torch.Tensor):
            if hasattr(X, "to_numpy"):  # pandas DataFrame / Series
                X = X.to_numpy()
            X = np.asarray(X)
            if X.dtype.kind not in "biuf":
                raise TypeError(f"{name}: X must be numeric, got dtype {X.dtype}")
            X = torch.as_tensor(X)
        elif X.is_complex() or X.dtype == torch.bool:
            raise TypeError(f"{name}: X must be a real floating or integer tensor, got "
                            f"{X.dtype}")
        X = X.detach().to(device=self.weight.device, dtype=dtype or self.weight.dtype)
        if fn is not None:
            if X.dim() != 2 or X.shape[1] != self.in_features:
                raise ValueError(f"{fn}: X must have shape (N, {self.in_features}), got "
                                 f"{tuple(X.shape)}")
        if finite:
            _finite_or_raise(X, "X", name)
        return X

    def _check_fitted(self, fn):
        if self.classes_ is None:
            raise _not_fitted_error_class()(
                f"{fn}: this LogisticRegression has not been fitted, so it has no classes_ to "
                f"predict; call fit(X, y) first (or load a fitted state_dict). For the "
                f"probabilities of the current weights use predict_proba(X) or forward(x); to "
                f"predict class indices from weights you trained yourself, set "
                f"layer.classes_ = numpy.arange({self.num_classes})")

    @torch.no_grad()
    def predict_proba(self, X):
        """(N, num_classes) probabilities from the current weights (fitted or not); two
        columns [P(0), P(1)] for binary. Raises ValueError on NaN or infinite X."""
        p = self(self._as_tensor(X, finite=True))
        if self.binary:
            p = torch.cat([1 - p, p], dim=-1)
        return p.cpu().numpy() if not isinstance(X, (torch.Tensor, _sparse.CSR)) else p

    @torch.no_grad()
    def predict(self, X):
        """Predicted labels, values of classes_ (set by fit, or by loading a fitted
        state_dict): a tensor for tensor input and numeric labels, else a numpy array.
        Raises NotFittedError when classes_ is None, ValueError on NaN or infinite X."""
        fn = "LogisticRegression.predict"
        self._check_fitted(fn)
        z = self.logits(self._as_tensor(X, fn, finite=True))
        idx = (z[..., 0] > 0).long() if self.binary else z.argmax(dim=-1)
        if self.classes_.dtype.kind not in "biuf":  # strings / objects: numpy does it
            return self.classes_[idx.cpu().numpy()]
        idx = torch.as_tensor(self.classes_, device=idx.device)[idx]
        return idx.cpu().numpy() if not isinstance(X, (torch.Tensor, _sparse.CSR)) else idx

    @torch.no_grad()
    def score(self, X, y):
        """Mean accuracy of predict(X) against y (same length; labels of classes_' kind: text
        labels against numeric classes_ or the reverse raise, as scikit-learn's "Mix of label
        input types")."""
        fn = "LogisticRegression.score"
        as_np = lambda a: a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(
            a.to_numpy() if hasattr(a, "to_numpy") else a)
        y = as_np(y)
        self._check_fitted(fn)
        if _is_text(y) != _is_text(self.classes_):
            kinds = {True: "string", False: "number"}
            raise ValueError(f"{fn}: Mix of label input types (string and number): y holds "
                             f"{kinds[_is_text(y)]}s ({y.dtype}) but the classes_ fitted are "
                             f"{kinds[_is_text(self.classes_)]}s ({self.classes_.dtype})")
        pred = as_np(self.predict(X))
        if y.shape != pred.shape:
            raise ValueError(f"{fn}: y must have shape {pred.shape} (one label per row of X), "
                             f"got {y.shape}")
        return float(np.mean(pred == y))

    def _encode(self, y, n_rows, fn, classes=None):
        """Map labels to class indices 0..K-1, keeping the labels in classes_ (as scikit-learn
        does); checks K against num_classes. Integer labels in 0..num_classes-1 with some
        classes absent are taken as the indices (at least two present). classes: the label set
        agreed across ranks (data-parallel fit), else y's own."""
        agreed = classes
        if isinstance(y, torch.Tensor):
            if y.is_floating_point() and not bool(torch.isfinite(y).all()):
                raise ValueError(f"{fn}: y contains NaN or infinity")
            if agreed is None:
                classes, idx = torch.unique(y, return_inverse=True)
                classes = classes.cpu().numpy()
            else:
                idx = torch.searchsorted(torch.as_tensor(agreed).to(y.device, y.dtype),
                                         y.contiguous())
            labels = y
        else:
            labels = np.asarray(y.to_numpy() if hasattr(y, "to_numpy") else y)
            if labels.dtype.kind == "f" and not np.isfinite(labels).all():
                raise ValueError(f"{fn}: y contains NaN or infinity")
            if agreed is None:
                classes, idx = np.unique(labels, return_inverse=True)
            else:
                idx = np.searchsorted(agreed, labels) if labels.size else \
                    np.zeros(labels.shape, dtype=np.intp)
            idx = torch.as_tensor(idx.reshape(labels.shape))
        if labels.shape != (n_rows,):
            raise ValueError(f"{fn}: y must have shape ({n_rows},) (one label per row of X), "
                             f"got {tuple(labels.shape)}")
        if len(classes) < 2:
            raise ValueError(f"{fn}: y must contain at least 2 classes, but it contains only "
                             f"one class: {classes[0]!r}")
        if len(classes) > self.num_classes:
            raise ValueError(f"{fn}: y has {len(classes)} classes but "
                             f"num_classes={self.num_classes}")
        if len(classes) < self.num_classes:
            if classes.dtype.kind not in "iu" or classes.min() < 0 or \
                    classes.max() >= self.num_classes:
                raise ValueError(f"{fn}: y has {len(classes)} distinct labels but "
                                 f"num_classes={self.num_classes}")
            classes = np.arange(self.num_classes)
            idx = torch.as_tensor(labels).long()
        return classes, idx.to(self.weight.device)

    def fit(self, X, y, *, sample_weight=None, C=1.0, penalty="deprecated", l1_ratio=0.0,
            solver="lbfgs", max_iter=100, tol=1e-4, class_weight=None, warm_start=False,
            verbose=0, lr=None, batch_size=None, distributed=False, process_group=None,
            optimizer=None, epochs=None):
        """Fit on X (N, in_features) and labels y (N,): tensors (on any device; moved to the
        layer's, detached), numpy arrays or pandas objects. Starts from zero weights (as
        scikit-learn) unless warm_start=True (then from the current weights). Returns self.

        The words and rules of manual_layers.sklearn.LogisticRegression (scikit-learn's):
        C (inverse strength; math.inf: no penalty), l1_ratio (0: L2, 1: L1, between:
        elastic-net; > 0 needs solver="saga" or "owlqn"), penalty (deprecated as in
        scikit-learn 1.8+), solver ("lbfgs": L-BFGS-B, full batch, in float64 whatever
        the layer's dtype; "saga"/"owlqn": OWL-QN, float64; "newton-cg", "newton-cholesky",
        "sag": L-BFGS-B on the same objective; "sgd"/"adam": mini-batches of batch_size
        (default 256) in the layer's dtype, lr), max_iter (iterations, or epochs for sgd/adam),
        tol (largest (pseudo-)gradient component, or the epoch loss's relative change for
        sgd/adam), sample_weight (N,), class_weight (None, "balanced", {label: weight}, or one
        weight per class index). ConvergenceWarning when the solver stops at max_iter.
        Deprecated, for one release (FutureWarning): optimizer= (now solver=), epochs= (now
        max_iter=), C=None (now C=math.inf).

        distributed (default False) and process_group: the fit is data-parallel over
        torch.distributed only when asked, with distributed=True (the default group) or a
        process_group; then X, y, sample_weight are this rank's shard (any size, also 0 rows;
        classes may be missing from a shard), every rank of the group must call fit, and every
        rank ends with the weights one process fits on all shards concatenated. Otherwise the
        fit is local, also under torchrun."""
        fn = "LogisticRegression.fit"
        if optimizer is not None:
            warnings.warn(f"{fn}: optimizer= is deprecated and will be removed in the next "
                          f"release; use solver={optimizer!r} (the scikit-learn estimator's "
                          f"word)", FutureWarning, stacklevel=2)
            if solver != "lbfgs" and solver != optimizer:
                raise ValueError(f"{fn}: got solver={solver!r} and the deprecated "
                                 f"optimizer={optimizer!r}; pass solver= only")
            solver = optimizer
        if epochs is not None:
            warnings.warn(f"{fn}: epochs= is deprecated and will be removed in the next "
                          f"release; use max_iter={epochs!r} (epochs for sgd/adam, as the "
                          f"scikit-learn estimator counts them)", FutureWarning, stacklevel=2)
            epochs = P.check_int(epochs, "epochs", fn, low=1)
            if solver in ("sgd", "adam"):
                max_iter = epochs
        if C is None:
            warnings.warn(f"{fn}: C=None is deprecated and will be removed in the next release; "
                          f"use C=math.inf for no penalty (scikit-learn's spelling)",
                          FutureWarning, stacklevel=2)
            C = math.inf
        C, l1, pen = P.resolve_penalty(penalty, C, l1_ratio, fn)
        engine = P.resolve_solver(solver, pen, fn)
        max_iter = P.check_int(max_iter, "max_iter", fn)
        tol = P.check_real(tol, "tol", fn, low=0)
        batch_size = P.check_int(batch_size, "batch_size", fn, low=1, none_ok=True)
        lr = P.check_real(lr, "lr", fn, low=0, low_open=True, none_ok=True)
        if not isinstance(warm_start, (bool, np.bool_)):
            raise P.InvalidParameterError(f"{fn}: warm_start must be True or False, got "
                                          f"{warm_start!r}")
        work = torch.float64 if engine in ("lbfgs", "owlqn") else self.weight.dtype

        def check_local(need_rows):
            Xc, sw = self._fit_inputs(X, sample_weight, work, fn, need_rows)
            local = None if need_rows else self._local_labels(y, Xc.shape[0], fn)
            return (Xc, sw), Xc.shape[1], local

        def encode(data, agreed):
            return self._encode(y, data[0].shape[0], fn, classes=agreed)

        group, (X, sw), classes, idx = P.prepare_labels(fn, distributed, process_group,
                                                        check_local, encode)
        cw = P.class_weights(class_weight, classes, idx, sw, group, fn, device=X.device)
        init = {}
        if warm_start:
            init = {"coef_init": self.weight.detach(),
                    "intercept_init": self.bias.detach() if self.bias is not None else None}
        res = _fit.fit_logistic_regression(
            X, idx, self.num_classes, sample_weight=sw,
            class_weight=None if cw is None else torch.as_tensor(cw).to(X.device, work),
            C=C, l1_ratio=l1, fit_intercept=self.bias is not None, solver=engine,
            max_iter=max_iter, tol=tol, lr=lr, batch_size=256 if batch_size is None else
            batch_size, verbose=verbose, caller=fn, process_group=group, **init)
        return self._load_fit(res, classes)

    def _load_fit(self, res, classes):
        """Take a fit engine result (manual_layers._fit.FitResult) and its labels: parameters
        (cast to the layer's dtype), classes_, n_iter_, fit_time_; eval mode. Returns self."""
        with torch.no_grad():
            self.weight.copy_(res.coef)
            if self.bias is not None:
                self.bias.copy_(res.intercept)
        self.classes_ = classes
        self.n_iter_ = res.n_iter
        self.fit_time_ = res.fit_time
        self.eval()
        return self

    def _local_labels(self, y, n_rows, fn):
        """This rank's label set (numpy), y's shape and values checked."""
        if isinstance(y, torch.Tensor):
            if y.shape != (n_rows,):
                raise ValueError(f"{fn}: y must have shape ({n_rows},) (one label per row of X), "
                                 f"got {tuple(y.shape)}")
            if y.is_floating_point() and not bool(torch.isfinite(y).all()):
                raise ValueError(f"{fn}: y contains NaN or infinity")
            return torch.unique(y).cpu().numpy()
        labels = np.asarray(y.to_numpy() if hasattr(y, "to_numpy") else y)
        if labels.shape != (n_rows,):
            raise ValueError(f"{fn}: y must have shape ({n_rows},) (one label per row of X), got "
                             f"{tuple(labels.shape)}")
        if labels.dtype.kind == "f" and not np.isfinite(labels).all():
            raise ValueError(f"{fn}: y contains NaN or infinity")
        return np.unique(labels)

    def _fit_inputs(self, X, sample_weight, work, fn, need_rows):
        """X and sample_weight as checked tensors on the layer's device, in `work` dtype."""
        X = self._as_tensor(X, fn, dtype=work, finite=True)
        if need_rows and X.shape[0] == 0:
            raise ValueError(f"{fn}: X is empty (0 rows); fit needs at least one sample of each "
                             f"of two classes")
        sw = None
        if sample_weight is not None:
            if isinstance(sample_weight, torch.Tensor):
                if sample_weight.is_complex() or sample_weight.dtype == torch.bool:
                    raise TypeError(f"{fn}: sample_weight must be real numbers, got "
                                    f"{sample_weight.dtype}")
                sw = sample_weight.detach()
            else:
                try:
                    sw = torch.as_tensor(np.asarray(
                        sample_weight.to_numpy() if hasattr(sample_weight, "to_numpy")
                        else sample_weight, dtype=np.float64))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{fn}: sample_weight must be numbers, one per row of X "
                                     f"({X.shape[0]}), got {type(sample_weight).__name__} "
                                     f"({e})") from None
            sw = sw.to(X.device, work)
            if sw.shape != (X.shape[0],):
                raise ValueError(f"{fn}: sample_weight must have shape ({X.shape[0]},), got "
                                 f"{tuple(sw.shape)}")
            _finite_or_raise(sw, "sample_weight", fn)
        return X, sw
