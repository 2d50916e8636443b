"""manual_layers: fused Linear(+activation) and logistic-regression layers whose forward and
backward passes are hand-written C++ (CPU) and CUDA kernels.

    import manual_layers as ml
    layer = ml.Linear(256, 256, activation="gelu")      # nn.Linear + nn.GELU(), fused
    clf = ml.LogisticRegression(30).fit(X, y)            # the layer, fitted like scikit-learn
    from manual_layers.sklearn import LogisticRegression  # a scikit-learn estimator, CPU or CUDA
    ml.utils.info()                                      # what this installation was built with

__all__ is the public API: the layers, the fused losses, convert, and the public submodules
(autograd, functional, reference, sklearn, utils).
"""

__version__ = "0.1.0"

from . import _ops  # noqa: F401,E402  (loads the extension and registers the ops)
from . import autograd, functional, reference, utils  # noqa: E402
from .layers import MLP, FusedLinear, Linear, convert  # noqa: E402
from .logistic_regression import LogisticRegression  # noqa: E402
from .losses import LinearBCEWithLogitsLoss, LinearCrossEntropyLoss  # noqa: E402

__all__ = ["Linear", "FusedLinear", "MLP", "LogisticRegression", "LinearBCEWithLogitsLoss",
           "LinearCrossEntropyLoss", "convert", "autograd", "functional", "reference", "sklearn",
           "utils"]

# The runtime helpers' earlier top-level names, importable (without a warning, not in __all__)
# for one release so that code written against them keeps working; they live in utils.
from .utils import (BUILD_INFO, cpu_cache_info, cpu_kernels_isa, empty_cpu_cache,  # noqa: F401,E402
                    fit_logistic_regression, info)


def __getattr__(name):
    """manual_layers.sklearn (the scikit-learn estimator) is imported on first use, so that
    importing manual_layers does not need scikit-learn."""
    if name == "sklearn":
        import importlib
        return importlib.import_module(".sklearn", __name__)
    raise AttributeError(f"module 'manual_layers' has no attribute {name!r}")
