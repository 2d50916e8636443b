"""The fit preparation shared by manual_layers.sklearn.LogisticRegression (the estimator) and
manual_layers.LogisticRegression.fit (the layer): one vocabulary (scikit-learn's) and one set of
rules for both.

  - resolve_penalty: penalty / C / l1_ratio as scikit-learn 1.8+ resolves them (penalty is
    deprecated in favour of l1_ratio and C=inf), with its warnings and errors;
  - resolve_solver: scikit-learn's solver names mapped onto the engine's (lbfgs, owlqn, sgd,
    adam), or a clear refusal;
  - prepare_labels: the process group (data-parallel only when asked), this rank's checks, the
    classes agreed across ranks and the encoded labels;
  - class_weights: None, "balanced", a dict {label: weight} or (the layer's) a per-class array,
    as scikit-learn's compute_class_weight (balanced counts summed over ranks when
    data-parallel);
  - check_real / check_int: parameter checks that name the argument.

No scikit-learn import here: the layer works without scikit-learn installed.
"""

import math
import numbers
import warnings

import numpy as np
import torch

from . import _fit

__all__ = ["InvalidParameterError", "check_real", "check_int", "resolve_penalty",
           "resolve_solver", "prepare_labels", "class_weights", "SOLVER_NAMES"]


class InvalidParameterError(ValueError, TypeError):
    """A parameter of the wrong type or value (both a ValueError and a TypeError, as
    scikit-learn's InvalidParameterError, so either `except` catches it)."""


def check_real(value, name, fn, *, low=None, high=None, low_open=False, allow_inf=False,
               none_ok=False):
    """value as a float, checked: a real number (not bool, not a string), finite unless
    allow_inf, within [low, high] (low excluded when low_open)."""
    if value is None and none_ok:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok:
        v = float(value)
        ok = not math.isnan(v) and (allow_inf or math.isfinite(v))
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v <= high
    if not ok:
        lo = "" if low is None else (f" > {low}" if low_open else f" >= {low}")
        hi = "" if high is None else f" <= {high}"
        rng = f"{lo}{' and' if lo and hi else ''}{hi}"
        raise InvalidParameterError(f"{fn}: {name} must be a number{rng}"
                                    f"{' (or None)' if none_ok else ''}, got {value!r}")
    return v


def check_int(value, name, fn, *, low=0, none_ok=False):
    if value is None and none_ok:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or \
            value < low:
        raise InvalidParameterError(f"{fn}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


# ---- penalty ------------------------------------------------------------------------------------
PENALTIES = ("deprecated", "l1", "l2", "elasticnet", None)


def resolve_penalty(penalty, C, l1_ratio, fn, stacklevel=3):
    """(C, l1_share) for the engine from scikit-learn's (penalty, C, l1_ratio), with the
    warnings and errors of scikit-learn 1.8+ LogisticRegression.fit: penalty="deprecated" (the
    default) derives the penalty from l1_ratio (0: l2, 1: l1, else elastic-net) and C (inf: none);
    an explicit penalty still works with a FutureWarning. C: float or None (no penalty), l1_share
    in [0, 1] (the L1 part of ((1 - r) ||W||^2 / 2 + r ||W||_1) / C), and the resolved penalty
    name. stacklevel: the warnings' (pointing at the user's call)."""
    if not any(penalty is p or penalty == p for p in PENALTIES if p is not None) and \
            penalty is not None:
        raise InvalidParameterError(f"{fn}: penalty must be 'l1', 'l2', 'elasticnet' or None "
                                    f"(deprecated since scikit-learn 1.8: use l1_ratio and C), "
                                    f"got {penalty!r}")
    C = check_real(C, "C", fn, low=0, low_open=True, allow_inf=True)
    l1_ratio = check_real(l1_ratio, "l1_ratio", fn, low=0, high=1, none_ok=True)
    if penalty == "deprecated":
        if l1_ratio == 0 or l1_ratio is None:
            pen = "l2"
            if l1_ratio is None:
                warnings.warn("'l1_ratio=None' was deprecated in version 1.8 and will trigger an "
                              "error in 1.10. Use 0<=l1_ratio<=1 instead.", FutureWarning,
                              stacklevel=stacklevel)
        elif l1_ratio == 1:
            pen = "l1"
        else:
            pen = "elasticnet"
        if C == math.inf:
            pen = None
    else:
        pen = penalty
        warnings.warn("'penalty' was deprecated in version 1.8 and will be removed in 1.10. To "
                      "avoid this warning, leave 'penalty' set to its default value and use "
                      "'l1_ratio' or 'C' instead. Use l1_ratio=0 instead of penalty='l2', "
                      "l1_ratio=1 instead of penalty='l1', l1_ratio set to a float between 0 and "
                      "1 instead of penalty='elasticnet', and C=np.inf instead of penalty=None.",
                      FutureWarning, stacklevel=stacklevel)
    if pen != "elasticnet" and l1_ratio is not None and 0 < l1_ratio < 1:
        warnings.warn(f"l1_ratio parameter is only used when penalty is 'elasticnet'. Got "
                      f"(penalty={pen})", UserWarning, stacklevel=stacklevel)
    if (penalty == "l2" and l1_ratio != 0) or (penalty == "l1" and l1_ratio != 1):
        warnings.warn(f"Inconsistent values: penalty={penalty} with l1_ratio={l1_ratio}. "
                      f"penalty is deprecated. Please use l1_ratio only.", UserWarning,
                      stacklevel=stacklevel)
    if pen == "elasticnet" and l1_ratio is None:
        raise ValueError(f"{fn}: l1_ratio must be specified when penalty is elasticnet.")
    if penalty is None:
        if C != 1.0:
            warnings.warn("Setting penalty=None will ignore the C and l1_ratio parameters",
                          UserWarning, stacklevel=stacklevel)
        return None, 0.0, pen
    if C == math.inf:
        return None, 0.0, pen
    share = {"l1": 1.0, "l2": 0.0, None: 0.0}.get(pen, l1_ratio)
    return C, share, pen


# ---- solver -------------------------------------------------------------------------------------
# scikit-learn's names for smooth (L2 / no) penalties minimise the same objective as L-BFGS-B, so
# they run it; "saga" (scikit-learn's solver for L1 and elastic-net) and "owlqn" run OWL-QN.
SOLVER_NAMES = ("lbfgs", "owlqn", "saga", "newton-cg", "newton-cholesky", "sag", "sgd", "adam")
_SMOOTH_ONLY = ("lbfgs", "newton-cg", "newton-cholesky", "sag", "sgd", "adam")


def resolve_solver(solver, pen, fn):
    """The engine's solver ("lbfgs", "owlqn", "sgd", "adam") for a scikit-learn solver name and
    the resolved penalty, with scikit-learn's errors for unsupported pairs."""
    if solver == "liblinear":
        raise ValueError(f"{fn}: solver='liblinear' is not supported: liblinear penalises the "
                         f"intercept (through intercept_scaling), a different objective; use "
                         f"solver='saga' or 'owlqn' (OWL-QN on scikit-learn saga's objective) "
                         f"for an L1 penalty, 'lbfgs' for L2")
    if not isinstance(solver, str) or solver not in SOLVER_NAMES:
        raise InvalidParameterError(f"{fn}: solver must be one of "
                                    f"{', '.join(map(repr, SOLVER_NAMES))}, got {solver!r}")
    if solver in _SMOOTH_ONLY and pen not in ("l2", None):
        raise ValueError(f"{fn}: Solver {solver} supports only 'l2' or None penalties, got {pen} "
                         f"penalty. Use solver='saga' (or its name here, 'owlqn': orthant-wise "
                         f"L-BFGS) for l1 and elasticnet.")
    if solver in ("saga", "owlqn"):
        return "owlqn"
    if solver in ("sgd", "adam"):
        return solver
    return "lbfgs"


# ---- labels and the process group ---------------------------------------------------------------
def prepare_labels(fn, distributed, process_group, check_local, encode):
    """The process group, this rank's checked data and the encoded labels.

    check_local(need_rows) -> (data, n_features, local_classes): this rank's checks (ValueError /
    TypeError on bad input), its data in whatever form the caller uses, and its label set
    (numpy). encode(data, classes_or_None) -> (classes, y_idx): the labels as indices into
    classes (None: the local fit's own labels).

    Local fit (group None): check_local(True), encode(data, None). Data-parallel: every rank's
    check outcome, n_features and label set are agreed in one collective (agree_across_ranks:
    a ValueError on every rank when any rank failed), then encode(data, agreed_classes).
    Raises ValueError when fewer than 2 classes remain. Returns (group, data, classes, y_idx)."""
    group = _fit.resolve_process_group(distributed, process_group, fn)
    if group is None:
        data, _, _ = check_local(True)
        classes, y_idx = encode(data, None)
    else:
        err, data, n_features, local = None, None, None, None
        try:
            data, n_features, local = check_local(False)
        except (ValueError, TypeError) as e:
            err = e
        agreed = _fit.agree_across_ranks(group, fn, err, n_features, local)
        if len(agreed) < 2:
            raise ValueError(f"{fn}: y must contain at least 2 classes, but it contains only "
                             f"one class: {agreed[0] if len(agreed) else None!r}")
        classes, y_idx = encode(data, agreed)
    if len(classes) < 2:
        raise ValueError(f"{fn}: y must contain at least 2 classes, but it contains only one "
                         f"class: {classes[0]!r}")
    return group, data, classes, y_idx


# ---- class weights ------------------------------------------------------------------------------
def class_weights(class_weight, classes, y_idx, sample_weight, group, fn, device=None):
    """Per-class weights (float64 numpy (K,)) or None, as scikit-learn's compute_class_weight:

    "balanced": S / (K * S_k), S_k the (sample-weighted) count of class k, summed over ranks when
    data-parallel (a class with no rows anywhere gets weight 1: no row uses it); a dict
    {label: weight}: 1 for labels it lacks, and ValueError "The classes, [...], are not in
    class_weight" when some of its keys are not labels of y while some labels lack a weight (its
    other unknown keys are ignored, as scikit-learn does); a per-class sequence / array / tensor
    of K weights (the layer's form, indexed as classes)."""
    if class_weight is None:
        return None
    K = len(classes)
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise InvalidParameterError(f"{fn}: class_weight must be None, 'balanced', a dict "
                                        f"{{label: weight}} or one weight per class, got "
                                        f"{class_weight!r}")
        idx = np.asarray(y_idx.cpu() if isinstance(y_idx, torch.Tensor) else y_idx)
        sw = None if sample_weight is None else np.asarray(
            sample_weight.detach().cpu() if isinstance(sample_weight, torch.Tensor)
            else sample_weight, dtype=np.float64)
        idx = idx.astype(np.intp, copy=False)
        counts = np.stack([np.bincount(idx, minlength=K)[:K].astype(np.float64),
                           np.bincount(idx, weights=sw, minlength=K)[:K].astype(np.float64)])
        if group is not None:  # the class counts over all shards
            import torch.distributed as dist
            t = torch.as_tensor(counts)
            if "nccl" in str(dist.get_backend(group)).lower():
                t = t.to(device if device is not None and device.type == "cuda" else "cuda")
            dist.all_reduce(t, group=group)
            counts = t.cpu().numpy()
        w = np.ones(K)
        present = counts[0] > 0  # classes with rows (as scikit-learn's LabelEncoder sees y)
        with np.errstate(divide="ignore"):
            w[present] = counts[1].sum() / (int(present.sum()) * counts[1][present])
        return w
    if isinstance(class_weight, dict):
        w = np.ones(K)
        unweighted = []
        for i, c in enumerate(np.asarray(classes).tolist()):
            if c in class_weight:
                w[i] = check_real(class_weight[c], f"class_weight[{c!r}]", fn)
            else:
                unweighted.append(c)
        if unweighted and K - len(unweighted) != len(class_weight):
            raise ValueError(f"{fn}: The classes, {unweighted}, are not in class_weight (its "
                             f"keys {list(class_weight)[:10]} must be labels of y)")
        return w
    try:
        w = class_weight.detach().cpu().double().numpy() if isinstance(
            class_weight, torch.Tensor) else np.asarray(class_weight, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{fn}: class_weight must be None, 'balanced', a dict "
                                    f"{{label: weight}} or one number per class, got "
                                    f"{class_weight!r}") from None
    if w.shape != (K,):
        raise ValueError(f"{fn}: class_weight must have shape ({K},), one weight per class "
                         f"index, got {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"{fn}: class_weight contains NaN or infinity")
    return w
