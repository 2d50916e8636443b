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


def _empty(x):
    return x.new_empty((0,))


@torch.library.register_fake(_lib + "linear_fwd")
def _linear_fwd_fake(x, weight, bias, activation, save_pre):
    out = x.new_empty((x.shape[0], weight.shape[0]))
    keep = save_pre and activation in ("gelu", "gelu_tanh", "silu")
    return out, (x.new_empty((x.shape[0], weight.shape[0])) if keep else _empty(x))


@torch.library.register_fake(_lib + "linear_bwd")
def _linear_bwd_fake(grad_out, x, weight, saved, activation, need_x, need_weight, need_bias):
    return (x.new_empty(x.shape) if need_x else _empty(x),
            x.new_empty(weight.shape) if need_weight else _empty(x),
            x.new_empty((weight.shape[0],)) if need_bias else _empty(x))


def _loss_fake(x, weight, reduction, need_x, need_weight, need_bias):
    n, c = x.shape[0], weight.shape[0]
    if reduction == 0:
        any_grad = need_x or need_weight or need_bias
        return (x.new_empty((n,)), _empty(x), _empty(x), _empty(x),
                x.new_empty((n, c)) if any_grad else _empty(x))
    return (x.new_empty(()),
            x.new_empty(x.shape) if need_x else _empty(x),
            x.new_empty(weight.shape) if need_weight else _empty(x),
            x.new_empty((c,)) if need_bias else _empty(x),
            _empty(x))


@torch.library.register_fake(_lib + "linear_bce_fwd")
def _linear_bce_fwd_fake(x, weight, bias, target, pos_weight, sample_weight, reduction,
                         need_x, need_weight, need_bias):
    return _loss_fake(x, weight, reduction, need_x, need_weight, need_bias)


@torch.library.register_fake(_lib + "linear_ce_fwd")
def _linear_ce_fwd_fake(x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                        reduction, need_x, need_weight, need_bias):
    return _loss_fake(x, weight, reduction, need_x, need_weight, need_bias)


@torch.library.register_fake(_lib + "linear_loss_bwd")
def _linear_loss_bwd_fake(grad_loss, residual, x, weight, need_x, need_weight, need_bias):
    return (x.new_empty(x.shape) if need_x else _empty(x),
            x.new_empty(weight.shape) if need_weight else _empty(x),
            x.new_empty((weight.shape[0],)) if need_bias else _empty(x))
