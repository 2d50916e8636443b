"""manual_layers: fused Linear(+activation) and logistic-regression layers whose forward and
backward passes are hand-written C++ (CPU) and CUDA kernels.

    import manual_layers as ml
    layer = ml.Linear(256, 256, activation="gelu")      # nn.Linear + nn.GELU(), fused
    clf = ml.LogisticRegression(30).fit(X, y)            # the layer, fitted like scikit-learn
    from manual_layers.sklearn import LogisticRegression  # a scikit-learn estimator, CPU or CUDA
"""

from ._ops import BUILD_INFO  # noqa: F401

#: What this installation's extension was built with (a dict): the torch version it was built
#: against, the CPU instruction sets compiled, whether the CUDA kernels were compiled and why,
#: their architectures, the experimental kernels. :func:`info` shows it with the running system.
BUILD_INFO = BUILD_INFO
from . import autograd, functional, reference
from .modules import (MLP, FusedLinear, Linear, LinearBCEWithLogitsLoss, LinearCrossEntropyLoss,
                      LogisticRegression, convert)

__version__ = "0.1.0"

__all__ = ["Linear", "FusedLinear", "MLP", "LogisticRegression", "LinearBCEWithLogitsLoss",
           "LinearCrossEntropyLoss", "convert", "autograd", "functional", "reference", "sklearn",
           "fit_logistic_regression", "BUILD_INFO", "info", "cpu_kernels_isa", "cpu_cache_info",
           "empty_cpu_cache"]

from ._fit import fit_logistic_regression  # noqa: E402


def __getattr__(name):
    """manual_layers.sklearn (the scikit-learn estimator) is imported on first use, so that
    importing manual_layers does not need scikit-learn."""
    if name == "sklearn":
        import importlib
        return importlib.import_module(".sklearn", __name__)
    raise AttributeError(f"module 'manual_layers' has no attribute {name!r}")


def cpu_kernels_isa():
    """The ISA whose copy of the CPU kernels runs: "DEFAULT", "AVX2" or "AVX512". Chosen once
    when the library loads: MANUAL_LAYERS_CPU_ISA=default|avx2|avx512 if set, else ATen's level
    (torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY pins), never a level
    this CPU lacks (a refused request warns and falls back)."""
    import torch
    return torch.ops.manual_layers._cpu_kernels_isa()


def cpu_cache_info():
    """The reuse cache of large CPU outputs (csrc/cpu_alloc.cpp): outputs of 8 MiB and more that
    the kernels write whole (Linear/MLP outputs and gradients, the losses' dX) take the memory
    of a freed output of the same size, already mapped, instead of fresh pages; the memory of
    freed ones is kept up to a cap, MANUAL_LAYERS_CPU_CACHE_MB (default: an eighth of physical
    memory, at most 4096 MiB; 0: no reuse). Returns a dict: idle_bytes (kept, unused), cap_bytes,
    reuses, new_buffers (counts since the library loaded)."""
    import torch
    idle, cap, hits, misses = torch.ops.manual_layers._cpu_output_cache(False)
    return {"idle_bytes": idle, "cap_bytes": cap, "reuses": hits, "new_buffers": misses}


def empty_cpu_cache():
    """Frees the idle memory of the CPU output cache (see cpu_cache_info); outputs in use are
    untouched. The CPU counterpart of torch.cuda.empty_cache()."""
    import torch
    torch.ops.manual_layers._cpu_output_cache(True)


def info():
    """A dict describing this installation: versions, the CPU kernels (the ISA that runs and
    the ones compiled), the CUDA build, the visible GPUs."""
    import torch
    d = {
        "manual_layers": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_against_torch": BUILD_INFO["torch_version"],
        "cpu_kernels_isa": cpu_kernels_isa(),
        "cpu_kernels_compiled": BUILD_INFO["cpu_isa"].split(","),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_kernels_compiled": BUILD_INFO["cuda_compiled"],
        "cuda_kernels_why": BUILD_INFO.get("cuda_why") or None,
        "cuda_archs": BUILD_INFO["cuda_archs"] or None,
        # Kernels never run on a GPU, built only with MANUAL_LAYERS_CUDA_EXPERIMENTAL=1: Linear +
        # GELU / SiLU in one CUTLASS kernel on sm_90 (used with MANUAL_LAYERS_CUTLASS=1) and the
        # sm_90a cluster cross entropy (used with MANUAL_LAYERS_CE_CLUSTER=1)
        "cuda_experimental_kernels": BUILD_INFO.get("experimental_why") or None,
        "cuda_sm90_cutlass_kernels": BUILD_INFO.get("cutlass_sm90", False),
        "cuda_ce_cluster_kernels": BUILD_INFO.get("ce_cluster_sm90a", False),
        "gpu_visible": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        d["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return d
