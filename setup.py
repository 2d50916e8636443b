"""Builds manual_layers._C: the C++ (CPU) kernels always, the CUDA kernels when possible.

Environment:
  MANUAL_LAYERS_CUDA=0    build CPU kernels only (fast iteration; a CUDA tensor then gets a
                          clear error at run time)
  MANUAL_LAYERS_CUDA=1    build the CUDA kernels or fail with the reason
  (unset)                 build the CUDA kernels when torch is a CUDA build and nvcc is found,
                          with or without a visible GPU
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: the visible GPUs', else "8.0;9.0")
  CUDA_HOME               the CUDA toolkit; otherwise resolved from /usr/local/cuda or from
                          the nvcc on PATH (following wrapper scripts to the real toolkit)
  MANUAL_LAYERS_CPU_ARCH  x86-64 vector ISA for the CPU kernels: "avx2" (default) or "none"
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import platform
import re
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[manual_layers build] {msg}", flush=True)


def _real_toolkit_from_nvcc(nvcc):
    """The toolkit root of an nvcc, following a wrapper script (`exec /x/bin/nvcc "$@"`)."""
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"\x7fELF"):
        return os.path.dirname(os.path.dirname(nvcc))
    m = re.search(rb"(/[^\s\"']+)/bin/nvcc\b", head)
    if m:
        root = m.group(1).decode()
        if os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def resolve_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v and os.path.isfile(os.path.join(v, "bin", "nvcc")):
            return _real_toolkit_from_nvcc(os.path.join(v, "bin", "nvcc")) or v
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return _real_toolkit_from_nvcc("/usr/local/cuda/bin/nvcc") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _real_toolkit_from_nvcc(nvcc)
    return None


# torch.utils.cpp_extension reads CUDA_HOME when imported: resolve it first, so that a
# wrapper nvcc in /usr/local/bin does not make torch guess CUDA_HOME=/usr/local.
CUDA_HOME = resolve_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    flag = os.environ.get("MANUAL_LAYERS_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False, "MANUAL_LAYERS_CUDA=0"
    forced = flag in ("1", "on", "true", "yes")
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        reasons.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    if reasons:
        if forced:
            sys.exit("[manual_layers build] MANUAL_LAYERS_CUDA=1 but the CUDA kernels cannot be "
                     "built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, ("MANUAL_LAYERS_CUDA=1" if forced else
                  f"torch {torch.__version__} is a CUDA {torch.version.cuda} build and nvcc is at "
                  f"{CUDA_HOME}/bin/nvcc")


def cuda_lib_dirs():
    """Include and library folders holding cuBLASLt: pip wheels (nvidia/cu13, nvidia/cublas)
    and the toolkit. Returns (include_dirs, library_dirs, libraries-as-link-args)."""
    roots = []
    for sp in site.getsitepackages() + [site.getusersitepackages(),
                                        os.path.dirname(os.path.dirname(torch.__file__))]:
        roots += glob.glob(os.path.join(sp, "nvidia", "*"))
    roots.append(CUDA_HOME)
    incs, libdirs, link = [], [], None
    for r in roots:
        inc = os.path.join(r, "include")
        if os.path.isfile(os.path.join(inc, "cublasLt.h")) and inc not in incs:
            incs.append(inc)
        for sub in ("lib", "lib64", os.path.join("targets", "x86_64-linux", "lib")):
            d = os.path.join(r, sub)
            if link is None and os.path.isfile(os.path.join(d, "libcublasLt.so")):
                libdirs.append(d)
                link = "-lcublasLt"
            elif link is None:
                versioned = sorted(glob.glob(os.path.join(d, "libcublasLt.so.[0-9]*")))
                versioned = [v for v in versioned if re.search(r"\.so\.\d+$", v)]
                if versioned:
                    libdirs.append(d)
                    link = "-l:" + os.path.basename(versioned[-1])
    if not incs or link is None:
        sys.exit("[manual_layers build] cuBLASLt headers or library not found in the pip wheels "
                 f"(site-packages/nvidia/*) or in CUDA_HOME={CUDA_HOME}")
    return incs, libdirs, link


def cpu_flags():
    flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    isa = os.environ.get("MANUAL_LAYERS_CPU_ARCH", "avx2").lower()
    if platform.machine() in ("x86_64", "AMD64") and isa == "avx2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        isa = "AVX2"
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
        isa = "DEFAULT"
    return flags, isa


def build_extension():
    with_cuda, why = want_cuda()
    cxx, isa = cpu_flags()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    defines = [f'-DML_TORCH_VERSION="{torch.__version__}"', f'-DML_CPU_ISA="{isa}"']
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    log(f"C++ kernels: {len(sources)} files, CPU vector ISA {isa}")
    if not with_cuda:
        log(f"CUDA kernels: OFF ({why})")
        return CppExtension(
            "manual_layers._C", sources,
            extra_compile_args={"cxx": cxx + defines},
            extra_link_args=["-fopenmp"],
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(caps)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    incs, libdirs, link = cuda_lib_dirs()
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    log(f"CUDA kernels: ON ({why}); archs {archs}; {len(cu_sources)} .cu files; cuBLASLt "
        f"{link} from {libdirs[0]}")
    defines += ["-DWITH_CUDA", f'-DML_CUDA_ARCHS="{archs}"']
    return CUDAExtension(
        "manual_layers._C", sources + cu_sources,
        include_dirs=incs,
        library_dirs=libdirs,
        extra_compile_args={
            "cxx": cxx + defines,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + defines,
        },
        extra_link_args=["-fopenmp", link] + [f"-Wl,-rpath,{d}" for d in libdirs],
    )


setup(
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
