"""manual_layers.sklearn.LogisticRegressionCV: scikit-learn's LogisticRegressionCV (the C and
l1_ratio grid, cross-validated, with warm starts along the C path) whose fits are
manual_layers'.

The parameters, warnings, folds (sklearn.model_selection.check_cv: stratified K folds by
default), scoring and fitted attributes (C_, Cs_, l1_ratio_, l1_ratios_, scores_,
coefs_paths_, n_iter_, coef_, intercept_, classes_, in the legacy or the new shapes that
use_legacy_attributes selects) are those of the installed scikit-learn's (1.8+) class; each fit
is fit_logistic_regression (L-BFGS-B for L2, OWL-QN for an L1 share) on the fold's rows, moved to
`device` once per fold and reused along the path, each C starting from the previous C's solution.
"""

import inspect
import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.metrics import get_scorer, make_scorer
from sklearn.model_selection import check_cv
from sklearn.utils.extmath import safe_sparse_dot

from . import _fit_prep as P
from ._fit import FitResult, _blas_single_thread, _cpu_threads, fit_logistic_regression
from .logistic_regression import LogisticRegression as _LogisticRegressionModule
from .sklearn import LogisticRegression, _encode_labels, _resolve_device, _resolve_dtype, \
    _to_tensor, _work_dtype

__all__ = ["LogisticRegressionCV"]


class LogisticRegressionCV(LogisticRegression):
    """Logistic regression with C (and l1_ratio) chosen by cross-validation, as scikit-learn's
    LogisticRegressionCV (same parameters, defaults, warnings, folds, scores and attributes),
    each fit by manual_layers' fused kernels on `device` in `dtype`. The parameters are
    scikit-learn's (see its documentation), plus `device` and `dtype`.

    Parameters
    ----------
    Cs : int or list of floats, default=10 (np.logspace(-4, 4, Cs) for an int)
    l1_ratios : array-like of floats in [0, 1], default="warn" (None with a FutureWarning)
    fit_intercept : bool, default=True
    cv : int, splitter or iterable, default=None (5 stratified folds, check_cv)
    penalty : deprecated as in scikit-learn 1.8+ ("l1", "l2", "elasticnet"; FutureWarning)
    scoring : str, callable or None, default="warn" (accuracy, with scikit-learn's FutureWarning)
    solver : as LogisticRegression's ("lbfgs"; "saga"/"owlqn" for an L1 share), default="lbfgs"
    tol, max_iter, class_weight, verbose : as LogisticRegression's
    n_jobs : None or int, default=None: n_jobs > 1 (or -1: every core) runs up to n_jobs folds
        at once in threads, each fit on one torch thread (CPU); 1 runs the folds one after
        another, each fit on torch's threads. None chooses: on dense CPU data small enough
        that each fit runs on one thread anyway (manual_layers/_fit.py SINGLE_THREAD_WORK) and
        an L2-only grid (whose fits run in C++, releasing the GIL), the folds share torch's
        threads, as n_jobs=torch.get_num_threads() would; otherwise one after another. The
        results do not depend on it (the folds are independent and each fit deterministic).
    refit : bool, default=True
    random_state : no effect (the solvers are deterministic)
    use_legacy_attributes : bool, default="warn" (True with scikit-learn's FutureWarning)
    device, dtype : as LogisticRegression's (default CPU; dtype None: float32 X in float32,
        any other X in float64)

    Attributes: ``classes_``, ``coef_``, ``intercept_``, ``Cs_``, ``l1_ratios_``, ``C_``,
    ``l1_ratio_``, ``scores_``, ``coefs_paths_``, ``n_iter_`` (shapes as scikit-learn's for
    use_legacy_attributes), ``module_``, and ``n_features_in_`` / ``feature_names_in_``.
    """

    def __init__(self, *, Cs=10, l1_ratios="warn", fit_intercept=True, cv=None,
                 penalty="deprecated", scoring="warn", solver="lbfgs", tol=1e-4, max_iter=100,
                 class_weight=None, n_jobs=None, verbose=0, refit=True, random_state=None,
                 use_legacy_attributes="warn", device=None, dtype=None):
        self.Cs = Cs
        self.l1_ratios = l1_ratios
        self.fit_intercept = fit_intercept
        self.cv = cv
        self.penalty = penalty
        self.scoring = scoring
        self.solver = solver
        self.tol = tol
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.refit = refit
        self.random_state = random_state
        self.use_legacy_attributes = use_legacy_attributes
        self.device = device
        self.dtype = dtype

    # ---- the parameters, as scikit-learn's LogisticRegressionCV.fit resolves them ----------------
    def _resolve(self, fn):
        l1_ratios = self.l1_ratios
        if isinstance(l1_ratios, str):
            if l1_ratios != "warn":
                raise P.InvalidParameterError(f"{fn}: l1_ratios must be an array-like of numbers "
                                              f"in [0, 1] or None, got {l1_ratios!r}")
            l1_ratios = None
            warnings.warn("The default value for l1_ratios will change from None to (0.0,) in "
                          "version 1.10. From version 1.10 onwards, only array-like with values "
                          "in [0, 1] will be allowed, None will be forbidden. To avoid this "
                          "warning, explicitly set a value, e.g. l1_ratios=(0,).",
                          FutureWarning, stacklevel=3)
        if self.penalty == "deprecated":
            if self.l1_ratios is None:
                warnings.warn("'l1_ratios=None' was deprecated in version 1.8 and will trigger "
                              "an error in 1.10. Use an array-like with valuesin [0, 1] "
                              "instead.", FutureWarning, stacklevel=3)
            if l1_ratios is None or np.all(np.asarray(l1_ratios) == 0):
                penalty = "l2"
            elif np.all(np.asarray(l1_ratios) == 1):
                penalty = "l1"
            else:
                penalty = "elasticnet"
        elif self.penalty in ("l1", "l2", "elasticnet"):
            penalty = self.penalty
            warnings.warn("'penalty' was deprecated in version 1.8 and will be removed in 1.10. "
                          "To avoid this warning, leave 'penalty' set to its default value and "
                          "use 'l1_ratios' and 'Cs' instead. Use l1_ratios=(0,) instead of "
                          "penalty='l2', l1_ratios=(1,) instead of penalty='l1', l1_ratios set "
                          "to floats between 0 and 1 instead of penalty='elasticnet', and "
                          "Cs=(np.inf,) instead of penalty=None.", FutureWarning, stacklevel=3)
        else:
            raise P.InvalidParameterError(f"{fn}: penalty must be 'l1', 'l2' or 'elasticnet' "
                                          f"(deprecated: use l1_ratios), got {self.penalty!r}")
        scoring = self.scoring
        if isinstance(scoring, str) and scoring == "warn":
            warnings.warn("The default value of the parameter 'scoring' will change from None, "
                          "i.e. accuracy, to 'neg_log_loss' in version 1.11. To silence this "
                          "warning, explicitly set the scoring parameter: "
                          "scoring='neg_log_loss' for the new, scoring='accuracy' or "
                          "scoring=None for the old default.", FutureWarning, stacklevel=3)
            scoring = None
        legacy = self.use_legacy_attributes
        if isinstance(legacy, str) and legacy == "warn":
            warnings.warn(f"The fitted attributes of {type(self).__name__} will be simplified "
                          f"in scikit-learn 1.10 to remove redundancy. Set"
                          f"`use_legacy_attributes=False` to enable the new behavior now, or set "
                          f"it to `True` to silence this warning during the transition period "
                          f"while keeping the deprecated behavior for the time being. The "
                          f"default value of use_legacy_attributes will change from True to "
                          f"False in scikit-learn 1.10. See the docstring of "
                          f"{type(self).__name__} for more details.", FutureWarning,
                          stacklevel=3)
            legacy = True
        elif not isinstance(legacy, (bool, np.bool_)):
            raise P.InvalidParameterError(f"{fn}: use_legacy_attributes must be True or False, "
                                          f"got {legacy!r}")
        solver = P.resolve_solver(self.solver, penalty, fn)
        if penalty == "elasticnet":
            if l1_ratios is None or len(l1_ratios) == 0 or any(
                    not isinstance(r, numbers.Number) or r < 0 or r > 1 for r in l1_ratios):
                raise ValueError(f"{fn}: l1_ratios must be an array-like of numbers between 0 "
                                 f"and 1; got (l1_ratios={l1_ratios!r})")
            l1_ratios_ = list(l1_ratios)
        else:
            if l1_ratios is not None and self.penalty != "deprecated":
                warnings.warn(f"l1_ratios parameter is only used when penalty is 'elasticnet'. "
                              f"Got (penalty={penalty})", UserWarning, stacklevel=3)
            l1_ratios_ = [None] if l1_ratios is None else list(l1_ratios)
        Cs = self.Cs
        if isinstance(Cs, numbers.Integral) and not isinstance(Cs, bool):
            P.check_int(Cs, "Cs", fn, low=1)
            Cs = np.logspace(-4, 4, int(Cs))
        else:
            try:
                Cs = np.asarray(Cs, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise P.InvalidParameterError(f"{fn}: Cs must be an int >= 1 or a list of "
                                              f"positive floats, got {self.Cs!r}") from None
            for C in Cs:
                P.check_real(C, "each of Cs", fn, low=0, low_open=True, allow_inf=True)
        P.check_int(self.max_iter, "max_iter", fn)
        P.check_real(self.tol, "tol", fn, low=0)
        if not isinstance(self.fit_intercept, (bool, np.bool_)):
            raise P.InvalidParameterError(f"{fn}: fit_intercept must be True or False, got "
                                          f"{self.fit_intercept!r}")
        if not isinstance(self.refit, (bool, np.bool_)):
            raise P.InvalidParameterError(f"{fn}: refit must be True or False, got "
                                          f"{self.refit!r}")
        if self.n_jobs is not None:
            P.check_int(self.n_jobs, "n_jobs", fn, low=-(2 ** 31))
        cw = self.class_weight
        if not (cw is None or (isinstance(cw, str) and cw == "balanced") or
                isinstance(cw, dict)):
            raise P.InvalidParameterError(f"{fn}: class_weight must be None, 'balanced' or a "
                                          f"dict {{label: weight}}, got {cw!r}")
        return (l1_ratios, l1_ratios_, penalty, scoring, legacy, solver, Cs,
                _resolve_device(self.device, fn), _resolve_dtype(self.dtype))

    # ---- fit ---------------------------------------------------------------------------------
    def fit(self, X, y, sample_weight=None, **params):
        """Fit the grid on the folds, then (refit=True) the best (C, l1_ratio) on all of X.
        params: passed to the splitter's split (e.g. groups). Returns self."""
        fn = "LogisticRegressionCV.fit"
        (l1_ratios, l1_ratios_, penalty, scoring, legacy, solver, Cs, device,
         dtype) = self._resolve(fn)
        X, y, sample_weight = self._check_local(X, y, sample_weight, min_samples=1)
        dtype = _work_dtype(dtype, X)
        classes, y_idx = _encode_labels(y)
        self.classes_ = classes
        n_classes, n_features = len(classes), X.shape[1]
        if n_classes < 2:
            raise ValueError(f"{fn}: This solver needs samples of at least 2 classes in the "
                             f"data, but the data contains only one class: {classes[0]}.")
        is_binary = n_classes == 2
        splitter_params = {k: v for k, v in params.items()}
        score_params = {} if sample_weight is None else {"sample_weight": sample_weight}
        folds = list(check_cv(self.cv, y, classifier=True).split(X, y, **splitter_params))

        cw = self.class_weight
        if isinstance(cw, dict) and not set(cw) <= set(classes.tolist()):
            raise ValueError(f"{fn}: The given class_weight dict must have the class labels as "
                             f"keys; classes={classes} but key={cw.keys()}")
        cw_vec = P.class_weights(cw, classes, y_idx, sample_weight, None, fn)  # on all of y
        cwt = None if cw_vec is None else torch.as_tensor(cw_vec, dtype=dtype, device=device)

        def one_fit(Xt, yt, swt, C, r, init):
            Cf = None if C == math.inf else float(C)
            # an explicit (deprecated) penalty wins over l1_ratios, as in scikit-learn
            share = {"l1": 1.0, "l2": 0.0}.get(penalty, r or 0.0)
            return fit_logistic_regression(
                Xt, yt, n_classes, sample_weight=swt, class_weight=cwt, C=Cf,
                l1_ratio=share if Cf is not None else 0.0,
                fit_intercept=bool(self.fit_intercept), solver=solver,
                max_iter=int(self.max_iter),
                tol=float(self.tol), coef_init=None if init is None else init[0],
                intercept_init=None if init is None else init[1], verbose=self.verbose,
                caller=fn)

        scorer = self._scorer(scoring, classes, is_binary)
        nC, nR = len(Cs), len(l1_ratios_)
        rows = 1 if is_binary else n_classes
        n_dof = n_features + int(bool(self.fit_intercept))
        paths = np.zeros((len(folds), nR, nC, rows, n_dof))
        scores = np.zeros((len(folds), nR, nC))
        n_iter = np.zeros((len(folds), nR, nC), dtype=np.int32)
        def fold_paths(f):
            """Fold f's paths (every l1_ratio, every C with warm starts), written in place."""
            train, test = folds[f]
            Xt = _to_tensor(np.ascontiguousarray(X[train]) if isinstance(X, np.ndarray)
                            else X[train], device, dtype)
            yt = torch.as_tensor(y_idx[train], dtype=torch.long).to(device)
            swt = None if sample_weight is None else torch.as_tensor(
                sample_weight[train]).to(device=device, dtype=dtype)
            sw_test = None if sample_weight is None else sample_weight[test]
            X_test, y_test, y_test_idx = X[test], y[test], y_idx[test]
            for j, r in enumerate(l1_ratios_):
                init = None
                for i, C in enumerate(Cs):  # warm start: each C from the previous solution
                    res = one_fit(Xt, yt, swt, C, r, init)
                    coef = res.coef.cpu().double().numpy()
                    icpt = res.intercept.cpu().double().numpy()
                    init = (coef, icpt)
                    paths[f, j, i, :, :n_features] = coef
                    if self.fit_intercept:
                        paths[f, j, i, :, -1] = icpt
                    n_iter[f, j, i] = res.n_iter
                    scores[f, j, i] = scorer(coef, icpt, X_test, y_test, y_test_idx, sw_test)

        workers = self._workers(len(folds), device, X, n_classes, l1_ratios_, penalty,
                                sample_weight is not None)
        if workers <= 1:
            for f in range(len(folds)):
                fold_paths(f)
        else:
            # n_jobs > 1: folds in threads, each fit on one torch thread (the kernels release the
            # GIL; the folds are independent, so the results do not depend on the schedule)
            # (torch's and OpenBLAS's thread counts are process-wide: they are set once here,
            # so that the fits' own set-and-restore inside the threads changes nothing)
            from concurrent.futures import ThreadPoolExecutor
            with _cpu_threads(1), _blas_single_thread(), ThreadPoolExecutor(workers) as pool:
                list(pool.map(fold_paths, range(len(folds))))
        self._set_attributes(paths, scores, n_iter, Cs, l1_ratios, l1_ratios_, penalty,
                             legacy, classes, n_features, len(folds))

        if self.refit:
            s = scores.sum(axis=0)  # (nR, nC)
            j, i = np.unravel_index(np.argmax(s.T), (nC, nR))[::-1]
            C_best, r_best = Cs[i], l1_ratios_[j]
            w0 = paths[:, j, i].mean(axis=0)  # (rows, n_dof): the folds' mean as the start
            init = (w0[:, :n_features], w0[:, -1] if self.fit_intercept else None)
            Xt = _to_tensor(X, device, dtype)
            yt = torch.as_tensor(y_idx, dtype=torch.long).to(device)
            swt = None if sample_weight is None else torch.as_tensor(sample_weight).to(
                device=device, dtype=dtype)
            res = one_fit(Xt, yt, swt, C_best, r_best, init)
            coef, icpt = res.coef.cpu().double().numpy(), res.intercept.cpu().double().numpy()
        else:
            best = [np.unravel_index(np.argmax(scores[f].T.reshape(-1)), (nC, nR))
                    for f in range(len(folds))]
            w = np.mean([paths[f, jr, ic] for f, (ic, jr) in enumerate(best)], axis=0)
            coef = w[:, :n_features]
            icpt = w[:, -1].copy() if self.fit_intercept else np.zeros(rows)
            C_best = float(np.mean([Cs[ic] for ic, _ in best]))
            r_best = (float(np.mean([l1_ratios_[jr] for _, jr in best]))
                      if penalty == "elasticnet" else 0.0)
            res = FitResult(torch.as_tensor(coef, dtype=dtype), torch.as_tensor(icpt,
                                                                                 dtype=dtype),
                            0, None)
            res.fit_time = 0.0
        self._set_best(C_best, r_best, legacy, is_binary, n_classes, penalty, l1_ratios)
        module = _LogisticRegressionModule(n_features, num_classes=n_classes,
                                           bias=bool(self.fit_intercept), device=device,
                                           dtype=dtype)
        self.module_ = module._load_fit(res, classes)
        self.coef_ = coef.astype(X.dtype, copy=False)
        self.intercept_ = (icpt if self.fit_intercept else np.zeros(rows)).astype(X.dtype,
                                                                                 copy=False)
        return self

    def _workers(self, n_folds, device, X, n_classes, l1_ratios_, penalty, weighted):
        """Threads for the folds: n_jobs as joblib counts it (-1: every core), at most one per
        fold; CPU fits only (a GPU runs one fold's kernels at a time anyway). None: torch's
        thread count where every fit would run on one thread and in C++ (see the class
        docstring), else 1. Measured on the 2-core EPYC, 5 folds x 10 Cs, n_jobs 1 against 2:
        digits 334 -> 209 ms, 50,000 x 30 binary 324 -> 177 ms."""
        if device.type != "cpu":
            return 1
        if self.n_jobs is None:
            from . import _fit
            # the fits' L1 share is one_fit's: 1 for "l1", 0 for "l2", else the l1_ratio
            l2_only = penalty == "l2" or (penalty != "l1" and not any(l1_ratios_))
            K = 1 if n_classes == 2 else n_classes
            N, D = X.shape
            small = N * D * K < _fit.SINGLE_THREAD_WORK
            in_cpp = _fit._cpp_fit_takes(N, D, K, isinstance(X, np.ndarray), K > 1 and weighted)
            if not (l2_only and small and in_cpp):
                return 1
            return max(1, min(torch.get_num_threads(), n_folds))
        from joblib import effective_n_jobs
        return max(1, min(effective_n_jobs(self.n_jobs), n_folds))

    def score(self, X, y, sample_weight=None, **score_params):
        """The `scoring` score of the fitted model on (X, y), as scikit-learn's
        LogisticRegressionCV.score (accuracy for scoring=None or "warn")."""
        scoring = self.scoring
        if scoring is None or (isinstance(scoring, str) and scoring == "warn"):
            scoring = "accuracy"
        if sample_weight is not None:
            score_params["sample_weight"] = sample_weight
        return get_scorer(scoring)(self, X, y, **score_params)

    def _scorer(self, scoring, classes, is_binary):
        """score(coef, intercept, X_test, y_test, y_test_idx, sw_test) of one path point, as
        scikit-learn's _log_reg_scoring_path scores it. Accuracy (None, "accuracy") and
        "neg_log_loss" are computed here from the decision values, as accuracy_score and
        log_loss compute them (probabilities clipped to [eps, 1 - eps]): scikit-learn's scorer
        validates its inputs on every call, which costs more than a small fold's fit."""
        if scoring is None or (isinstance(scoring, str) and scoring == "accuracy"):
            def accuracy(coef, icpt, Xte, yte, yte_idx, swte):
                z = safe_sparse_dot(Xte, coef.T, dense_output=True) + icpt
                pred = (z[:, 0] > 0).astype(np.intp) if is_binary else z.argmax(1)
                return float(np.average(pred == yte_idx, weights=swte))
            return accuracy
        if isinstance(scoring, str) and scoring == "neg_log_loss":
            def neg_log_loss(coef, icpt, Xte, yte, yte_idx, swte):
                z = safe_sparse_dot(Xte, coef.T, dense_output=True) + icpt
                if is_binary:  # scikit-learn's _predict_proba_lr: expit, then [1 - p, p]
                    p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
                    p = np.where(yte_idx == 1, p1, 1.0 - p1)
                else:
                    z = z - z.max(axis=1, keepdims=True)
                    e = np.exp(z)
                    p = e[np.arange(len(yte_idx)), yte_idx] / e.sum(axis=1)
                eps = np.finfo(p.dtype).eps
                return float(np.average(np.log(np.clip(p, eps, 1 - eps)), weights=swte))
            return neg_log_loss
        from sklearn.linear_model import LogisticRegression as _SkShell
        from sklearn.utils.validation import _check_method_params
        scorer = get_scorer(scoring)
        sig = (inspect.signature(scorer._score_func).parameters
               if hasattr(scorer, "_score_func") else [])
        if "labels" in sig:  # y_test may lack classes: pass them all, as scikit-learn does
            pos = {"pos_label": classes[-1]} if is_binary and "pos_label" in sig else {}
            scorer = make_scorer(scorer._score_func, greater_is_better=scorer._sign == 1,
                                 response_method=scorer._response_method, labels=classes,
                                 **pos, **getattr(scorer, "_kwargs", {}))
        def score(coef, icpt, Xte, yte, yte_idx, swte):
            # scikit-learn's estimator, given the path's coefficients: a fresh one per call, as
            # folds may be scored at once in threads (n_jobs): one shared shell let a thread
            # score with another's coefficients
            shell = _SkShell()
            shell.classes_ = classes
            shell.coef_ = coef
            shell.intercept_ = icpt if self.fit_intercept else 0.0
            kw = {} if swte is None else {"sample_weight": swte}
            kw = _check_method_params(Xte, params=kw)
            return float(scorer(shell, Xte, yte, **kw))
        return score

    def _set_attributes(self, paths, scores, n_iter, Cs, l1_ratios, l1_ratios_, penalty, legacy,
                        classes, n_features, n_folds):
        """scores_, coefs_paths_, n_iter_, Cs_, l1_ratios_ in scikit-learn's shapes."""
        rows = paths.shape[3]
        keys = classes[1:] if rows == 1 else classes
        self.Cs_ = np.asarray(Cs)
        self.l1_ratios_ = np.asarray(l1_ratios_)
        # legacy: per class (n_folds, n_cs, n_l1_ratios, n_dof), scores repeated per class
        cp = np.moveaxis(paths, 3, 0).swapaxes(2, 3)  # (rows, folds, nC, nR, dof)
        sc = scores.swapaxes(1, 2)  # (folds, nC, nR)
        self.scores_ = {k: sc.copy() for k in keys}
        self.coefs_paths_ = dict(zip(keys, cp))
        self.n_iter_ = n_iter.swapaxes(1, 2)[None, ...]
        if l1_ratios is None:  # no elastic-net grid: no l1_ratios axis
            self.coefs_paths_ = {k: v[:, :, 0, :] for k, v in self.coefs_paths_.items()}
            self.scores_ = {k: v[:, :, 0] for k, v in self.scores_.items()}
            self.n_iter_ = self.n_iter_[:, :, :, 0]
        if not legacy:
            self.coefs_paths_ = paths  # (n_folds, n_l1_ratios, n_cs, n_classes or 1, n_dof)
            self.scores_ = scores  # (n_folds, n_l1_ratios, n_cs)
            self.n_iter_ = n_iter  # (n_folds, n_l1_ratios, n_cs)

    def _set_best(self, C_best, r_best, legacy, is_binary, n_classes, penalty, l1_ratios):
        reps = 1 if is_binary else n_classes
        if legacy:
            self.C_ = np.tile(np.asarray([C_best]), reps)
            self.l1_ratio_ = np.tile(np.asarray([r_best], dtype=object if r_best is None
                                                else None), reps)
        else:
            self.C_ = float(C_best)
            if l1_ratios is None:
                self.l1_ratio_ = 1.0 if self.penalty == "l1" else 0.0
            else:
                self.l1_ratio_ = float(r_best)
