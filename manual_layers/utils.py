"""Runtime helpers: what this installation was built with, which CPU kernels run, the CPU output
cache, and the logistic-regression fit engine as a plain function.

These are not layers, losses or estimators, so they live here rather than in the package's
top level (``manual_layers.__all__`` is the public layer/loss/estimator API). The old top-level
names (``manual_layers.info``, ``manual_layers.BUILD_INFO``, ``manual_layers.cpu_kernels_isa``,
``manual_layers.cpu_cache_info``, ``manual_layers.empty_cpu_cache``,
``manual_layers.fit_logistic_regression``) still import, without a warning, for one release.

    import manual_layers.utils as mlu
    mlu.info()["cpu_kernels_isa"]      # "DEFAULT", "AVX2" or "AVX512"
"""

from ._fit import fit_logistic_regression
from ._ops import BUILD_INFO as _BUILD_INFO

__all__ = ["info", "BUILD_INFO", "cpu_kernels_isa", "cpu_cache_info", "empty_cpu_cache",
           "fit_logistic_regression"]

#: What this installation's extension was built with (a dict): the torch version it was built
#: against, the CPU instruction sets compiled, whether the CUDA kernels were compiled and why,
#: their architectures, the experimental kernels. :func:`info` shows it with the running system.
BUILD_INFO = _BUILD_INFO


def cpu_kernels_isa():
    """The ISA whose copy of the CPU kernels runs: "DEFAULT", "AVX2" or "AVX512". Chosen once
    when the library loads: MANUAL_LAYERS_CPU_ISA=default|avx2|avx512 if set, else ATen's level
    (torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY pins), never a level
    this CPU lacks (a refused request warns and falls back)."""
    import torch
    return torch.ops.manual_layers._cpu_kernels_isa()


def cpu_cache_info():
    """The reuse cache of large CPU outputs (the extension's CPU output allocator): outputs of
    8 MiB and more that the kernels write whole (Linear/MLP outputs and gradients, the losses'
    dX) take the memory of a freed output of the same size, already mapped, instead of fresh
    pages; the memory of freed ones is kept up to a cap, MANUAL_LAYERS_CPU_CACHE_MB (default: an
    eighth of physical memory, at most 4096 MiB; 0: no reuse). Returns a dict: idle_bytes (kept,
    unused), cap_bytes, reuses, new_buffers (counts since the library loaded)."""
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
    from . import __version__
    d = {
        "manual_layers": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_against_torch": BUILD_INFO["torch_version"],
        "cpu_kernels_isa": cpu_kernels_isa(),
        "cpu_kernels_compiled": BUILD_INFO["cpu_isa"].split(","),
        "cpu_kernels_why": BUILD_INFO.get("cpu_isa_why") or None,
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
