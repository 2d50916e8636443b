"""The earlier home of the nn.Modules, kept for one release as an alias: the layers are now in
manual_layers.layers, the fused losses in manual_layers.losses and the logistic-regression layer
in manual_layers.logistic_regression.

It stays importable because models saved whole with torch.save (pickles name each class by
module, e.g. manual_layers.modules.Linear) and user code import from it; the names below are
the same class objects, so such pickles load as instances of the current classes. Use the
public paths (manual_layers.Linear, ...) in new code."""

from . import _fit
from ._layer_fit import LayerFitMixin, _not_fitted_error_class  # noqa: F401
from .layers import (MLP, FusedLinear, Linear, _activation_arg, _activation_name,  # noqa: F401
                     _mlp_activation, _no_script, _sharing, convert)
from .logistic_regression import LogisticRegression  # noqa: F401
from .losses import LinearBCEWithLogitsLoss, LinearCrossEntropyLoss  # noqa: F401

__all__ = ["Linear", "FusedLinear", "MLP", "convert", "LogisticRegression",
           "LinearBCEWithLogitsLoss", "LinearCrossEntropyLoss"]

_progress = _fit._progress  # the progress bar of the fit engine, under its earlier name here
