"""Loads the compiled extension ``manual_layers._C`` and registers a fake (meta) kernel for
every op in ``torch.ops.manual_layers``, so that ``torch.compile`` and FakeTensor tracing see
each op's output shapes without running it."""

import importlib
import os

import torch

_REBUILD = ("rebuild it from the source checkout with: "
            "pip install --no-build-isolation -e .   (or: make install)")

try:
    _C = importlib.import_module("manual_layers._C")
except ImportError as e:  # missing, or compiled against another torch (undefined symbols)
    raise ImportError(
        f"manual_layers: the compiled extension manual_layers._C could not be loaded "
        f"({e}). It must be built against the installed torch {torch.__version__}; "
        f"{_REBUILD}") from e

BUILD_INFO = dict(_C.build_info())
if BUILD_INFO["torch_version"] != torch.__version__ and not os.environ.get(
        "MANUAL_LAYERS_SKIP_VERSION_CHECK"):
    raise ImportError(
        f"manual_layers._C was built against torch {BUILD_INFO['torch_version']} but torch "
        f"{torch.__version__} is installed; {_REBUILD}")

ops = torch.ops.manual_layers
_lib = "manual_layers::"

# Fake (meta) kernels: output shapes and dtypes of every op, for torch.compile, torch.export and
# the meta device (the _*_backward_graph ops are CompositeImplicitAutograd, in _derivatives.py,
# and need none). The contracts are in csrc/contracts/linear.h and csrc/contracts/losses.h; the argument checks of
# the public ops (csrc/checks.h) run in their autograd kernels before any fake kernel.

_SAVES_PRE = ("gelu", "gelu_tanh", "silu")


def _empty(t, dtype=None):
    return t.new_empty((0,), dtype=dtype)


def _acc(dtype):
    """The kernels' accumulation dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- public ops -------------------------------------------------------------------------------
@torch.library.register_fake(_lib + "linear")
def _linear_fake(x, weight, bias=None, activation="none"):
    torch._check(x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1],
                 lambda: "manual_layers.linear: x (..., in_features) and weight "
                         "(out_features, in_features) expected")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _loss_public_fake(x, weight, reduction, dtype):
    torch._check(x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1],
                 lambda: "manual_layers: x (..., D) and weight (C, D) expected")
    return x.new_empty(tuple(x.shape[:-1]) if reduction == 0 else (), dtype=dtype or x.dtype)


@torch.library.register_fake(_lib + "linear_bce")
def _linear_bce_fake(x, weight, bias, target, pos_weight=None, sample_weight=None, reduction=1,
                     dtype=None):
    return _loss_public_fake(x, weight, reduction, dtype)


@torch.library.register_fake(_lib + "linear_ce")
def _linear_ce_fake(x, weight, bias, target, class_weight=None, ignore_index=-100,
                    label_smoothing=0.0, reduction=1, dtype=None):
    return _loss_public_fake(x, weight, reduction, dtype)


# ---- private kernel ops -----------------------------------------------------------------------
@torch.library.register_fake(_lib + "_linear_fwd")
def _linear_fwd_fake(x, weight, bias, activation, save_pre):
    out = x.new_empty((x.shape[0], weight.shape[0]))
    keep = save_pre and activation in _SAVES_PRE
    return out, (x.new_empty((x.shape[0], weight.shape[0])) if keep else _empty(x))


@torch.library.register_fake(_lib + "_linear_bwd")
def _linear_bwd_fake(grad_out, x, weight, saved, activation, need_x, need_weight, need_bias):
    return (x.new_empty(x.shape) if need_x else _empty(x),
            x.new_empty(weight.shape) if need_weight else _empty(x),
            x.new_empty((weight.shape[0],)) if need_bias else _empty(x))


def _loss_fwd_fake(x, weight, reduction, need_x, need_weight, need_bias):
    n, c = x.shape[0], weight.shape[0]
    acc = _acc(x.dtype)
    if reduction == 0:
        any_grad = need_x or need_weight or need_bias
        return (x.new_empty((n,), dtype=acc), _empty(x, acc), _empty(x, acc),
                x.new_empty((n, c), dtype=acc) if any_grad else _empty(x, acc))
    return (x.new_empty((), dtype=acc),
            x.new_empty(weight.shape, dtype=acc) if need_weight else _empty(x, acc),
            x.new_empty((c,), dtype=acc) if need_bias else _empty(x, acc),
            x.new_empty((n, c), dtype=acc) if need_x else _empty(x, acc))


@torch.library.register_fake(_lib + "_linear_bce_fwd")
def _linear_bce_fwd_fake(x, weight, bias, target, pos_weight, sample_weight, reduction,
                         need_x, need_weight, need_bias):
    return _loss_fwd_fake(x, weight, reduction, need_x, need_weight, need_bias)


@torch.library.register_fake(_lib + "_linear_ce_fwd")
def _linear_ce_fwd_fake(x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                        reduction, need_x, need_weight, need_bias):
    return _loss_fwd_fake(x, weight, reduction, need_x, need_weight, need_bias)


@torch.library.register_fake(_lib + "_sparse_linear_loss_fwd")
def _sparse_linear_loss_fwd_fake(crow_indices, col_indices, values, weight, bias, target,
                                 sample_weight, need_weight, need_bias):
    acc = _acc(values.dtype)
    torch._check(weight.dim() == 2, lambda: "manual_layers._sparse_linear_loss_fwd: weight (C, D)")
    return (values.new_empty((), dtype=acc),
            values.new_empty(weight.shape, dtype=acc) if need_weight else _empty(values, acc),
            values.new_empty((weight.shape[0],), dtype=acc) if need_bias else _empty(values, acc))


@torch.library.register_fake(_lib + "_logreg_fit")
def _logreg_fit_fake(x, target, sample_weight, class_weight, n_classes, fit_intercept,
                     weight_sum, l2_inv_c, l1_weight, x0, max_iter, tol):
    return x0.new_empty(x0.shape), x0.new_empty((4,))


@torch.library.register_fake(_lib + "_linear_loss_bwd")
def _linear_loss_bwd_fake(grad_loss, residual, x, weight, grad_weight, grad_bias, reduction,
                          need_x, need_weight, need_bias):
    n = residual.shape[0] if (need_x or reduction == 0) else 0
    return (weight.new_empty((n, weight.shape[1])) if need_x else _empty(weight),
            weight.new_empty(weight.shape) if need_weight else _empty(weight),
            weight.new_empty((weight.shape[0],)) if need_bias else _empty(weight))


def _ce_chunked_fwd_fake(x, weight, reduction, need_x, need_weight, need_bias):
    n, c = x.shape[0], weight.shape[0]
    acc = _acc(x.dtype)
    if reduction == 0:
        return (x.new_empty((n,), dtype=acc), _empty(x, acc), _empty(x, acc), _empty(x))
    return (x.new_empty((), dtype=acc),
            x.new_empty(weight.shape, dtype=acc) if need_weight else _empty(x, acc),
            x.new_empty((c,), dtype=acc) if need_bias else _empty(x, acc),
            x.new_empty(x.shape) if need_x else _empty(x))


def _ce_chunked_bwd_fake(x, weight, need_x, need_weight, need_bias):
    return (x.new_empty(x.shape) if need_x else _empty(x),
            x.new_empty(weight.shape) if need_weight else _empty(x),
            x.new_empty((weight.shape[0],)) if need_bias else _empty(x))


@torch.library.register_fake(_lib + "_linear_ce_chunked_fwd")
def _linear_ce_chunked_fwd_fake(x, weight, bias, target, class_weight, ignore_index,
                                label_smoothing, reduction, need_x, need_weight, need_bias):
    return _ce_chunked_fwd_fake(x, weight, reduction, need_x, need_weight, need_bias)


@torch.library.register_fake(_lib + "_linear_ce_chunked_bwd")
def _linear_ce_chunked_bwd_fake(grad_loss, x, weight, bias, target, class_weight, ignore_index,
                                label_smoothing, need_x, need_weight, need_bias):
    return _ce_chunked_bwd_fake(x, weight, need_x, need_weight, need_bias)


# Probability targets (N, C): the chunked ops' outputs.
@torch.library.register_fake(_lib + "_linear_ce_soft_fwd")
def _linear_ce_soft_fwd_fake(x, weight, bias, target, class_weight, label_smoothing, reduction,
                             need_x, need_weight, need_bias):
    return _ce_chunked_fwd_fake(x, weight, reduction, need_x, need_weight, need_bias)


@torch.library.register_fake(_lib + "_linear_ce_soft_bwd")
def _linear_ce_soft_bwd_fake(grad_loss, x, weight, bias, target, class_weight, label_smoothing,
                             need_x, need_weight, need_bias):
    return _ce_chunked_bwd_fake(x, weight, need_x, need_weight, need_bias)


@torch.library.register_fake(_lib + "mlp")
def _mlp_fake(x, w1, b1, w2, b2, activation="gelu"):
    torch._check(x.dim() >= 1 and w1.dim() == 2 and w2.dim() == 2 and x.shape[-1] == w1.shape[1]
                 and w2.shape[1] == w1.shape[0],
                 lambda: "manual_layers.mlp: x (..., K), w1 (H, K), w2 (O, H) expected")
    return x.new_empty((*x.shape[:-1], w2.shape[0]))


@torch.library.register_fake(_lib + "_mlp_bwd")
def _mlp_bwd_fake(grad_out, x, w1, w2, h, saved, activation, need_x, need_w1, need_b1, need_w2,
                  need_b2):
    return (x.new_empty(x.shape) if need_x else _empty(x),
            x.new_empty(w1.shape) if need_w1 else _empty(x),
            x.new_empty((w1.shape[0],)) if need_b1 else _empty(x),
            x.new_empty(w2.shape) if need_w2 else _empty(x),
            x.new_empty((w2.shape[0],)) if need_b2 else _empty(x))


from . import _derivatives  # noqa: E402,F401  (registers the _*_backward_graph ops' kernels)
