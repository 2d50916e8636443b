"""Builds manual_layers._C: the C++ (CPU) kernels always, the CUDA kernels when possible.

Environment:
  MANUAL_LAYERS_CUDA=0    build CPU kernels only (fast iteration; a CUDA tensor then gets a
                          clear error at run time)
  MANUAL_LAYERS_CUDA=1    build the CUDA kernels or fail with the reason
  (unset)                 build the CUDA kernels when torch is a CUDA build and nvcc is found,
                          with or without a visible GPU
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: the visible GPUs', else "8.0;9.0"); an
                          entry 9.0 is compiled as 9.0a (the H100/H200's wgmma and TMA, which the
                          CUTLASS kernels of csrc/cuda/linear_sm90.h need; such a cubin runs on
                          exactly the GPUs a 9.0 cubin runs on)
  CUTLASS_PATH            a CUTLASS checkout (its include/ is used); otherwise the headers of the
                          nvidia-cutlass wheel when it is installed. Without CUTLASS (or without
                          9.0 in the arch list) the sm_90 CUTLASS kernels are left out
  CUDA_HOME               the CUDA toolkit; otherwise resolved from /usr/local/cuda or from
                          the nvcc on PATH (following wrapper scripts to the real toolkit)
  MANUAL_LAYERS_CPU_ISAS  x86-64 vector ISAs to compile the CPU kernels for, besides the portable
                          DEFAULT copy: "avx2,avx512" (default), "avx2", or "none". The copy
                          that runs is chosen at load (run time, not build time):
                          MANUAL_LAYERS_CPU_ISA=default|avx2|avx512, else ATen's level
                          (ATEN_CPU_CAPABILITY), never one the CPU lacks. Non-x86: DEFAULT only.
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


def cutlass_include_dirs():
    """CUTLASS's include folders (include/ and tools/util/include/): CUTLASS_PATH, else the
    nvidia-cutlass wheel (cutlass_library/source), found without importing it. [] if neither."""
    roots = []
    if os.environ.get("CUTLASS_PATH"):
        roots.append(os.environ["CUTLASS_PATH"])
    try:
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots += [os.path.join(p, "source") for p in spec.submodule_search_locations]
    for r in roots:
        inc = os.path.join(r, "include")
        if os.path.isfile(os.path.join(inc, "cutlass", "gemm", "collective",
                                       "collective_builder.hpp")):
            return [inc, os.path.join(r, "tools", "util", "include")]
    return []


def sm90a_arch_list(archs):
    """TORCH_CUDA_ARCH_LIST with a plain 9.0 entry compiled as 9.0a (arch-specific sm_90a
    code: wgmma, TMA); returns (new list, whether it holds 9.0a)."""
    items = [a.strip() for a in re.split(r"[;\s]+", archs) if a.strip()]
    items = ["9.0a" if a == "9.0" else a for a in items]
    return ";".join(items), "9.0a" in items


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


# The CPU kernels (csrc/cpu/*.cpp) are compiled once per ISA, ATen's way (cmake/Codegen.cmake):
# each copy with its -m flags and -DCPU_CAPABILITY=<ISA>, which puts it in the namespace
# manual_layers::<ISA>; csrc/cpu_dispatch.cpp picks one at load. Everything else (csrc/*.cpp:
# op schemas, registration, the ISA choice) is ISA-neutral: no -m flags.
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    # ATen's AVX512 set (cmake/Codegen.cmake).
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}


def cpu_isas():
    """The ISA copies to compile: DEFAULT always, AVX2/AVX512 on x86-64 (MANUAL_LAYERS_CPU_ISAS)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["DEFAULT"]
    want = os.environ.get("MANUAL_LAYERS_CPU_ISAS", "avx2,avx512").strip().lower()
    if "MANUAL_LAYERS_CPU_ARCH" in os.environ:
        log("MANUAL_LAYERS_CPU_ARCH is gone (the ISA is chosen at run time now); see "
            "MANUAL_LAYERS_CPU_ISAS / MANUAL_LAYERS_CPU_ISA in setup.py's docstring")
    names = [] if want in ("", "none", "default") else [w.strip().upper() for w in want.split(",")]
    bad = [n for n in names if n not in ISA_FLAGS or n == "DEFAULT"]
    if bad:
        sys.exit(f"[manual_layers build] MANUAL_LAYERS_CPU_ISAS: unknown {bad}; "
                 "expected a list of avx2, avx512, or none")
    return ["DEFAULT"] + [n for n in ("AVX2", "AVX512") if n in names]


def cpu_flags():
    """Flags of every C++ file (no -m flags), and the ISA list for the neutral files."""
    flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    isas = cpu_isas()
    defines = [f'-DML_CPU_ISA="{",".join(isas)}"'] + [f"-DML_COMPILED_{n}" for n in isas[1:]]
    return flags, isas, defines


def isa_flags(isa):
    return ISA_FLAGS[isa] + [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]


class BuildExt(BuildExtension):
    """BuildExtension plus the per-ISA objects: setuptools gives one flag set per extension, so
    the kernel files are compiled here, once per ISA into their own folder, with the same
    compiler, ninja and flags as the extension's sources plus the ISA's. They are linked AFTER
    the ISA-neutral objects and in the order DEFAULT, AVX2, AVX512: for an inline function
    that several objects emit, the linker keeps the first copy, i.e. never an AVX-512 one
    where a lower level has it (csrc/cpu_dispatch.cpp)."""

    def build_extension(self, ext):
        cxx = ext.extra_compile_args
        cxx = list(cxx["cxx"] if isinstance(cxx, dict) else cxx)
        objects = []
        for isa in ext.ml_isas:
            objects += self.compiler.compile(
                ext.ml_kernel_sources,
                output_dir=os.path.join(self.build_temp, "cpu_" + isa),
                include_dirs=ext.include_dirs,
                extra_postargs=cxx + isa_flags(isa),
                depends=ext.depends)
        ext.extra_objects = objects + [o for o in ext.extra_objects if o not in objects]
        super().build_extension(ext)


def build_extension():
    with_cuda, why = want_cuda()
    cxx, isas, defines = cpu_flags()
    sources = sorted(glob.glob("csrc/*.cpp"))  # ISA-neutral
    kernel_sources = sorted(glob.glob("csrc/cpu/*.cpp"))  # compiled once per ISA (BuildExt)
    # The kernel files and headers as dependencies: otherwise setuptools skips the link when
    # only a kernel file changed.
    depends = kernel_sources + sorted(glob.glob("csrc/**/*.h", recursive=True)
                                      + glob.glob("csrc/**/*.cuh", recursive=True))
    defines += [f'-DML_TORCH_VERSION="{torch.__version__}"']
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    log(f"C++ kernels: {len(kernel_sources)} files x CPU ISAs {', '.join(isas)} (chosen at load), "
        f"{len(sources)} ISA-neutral files")

    def finish(ext):
        ext.ml_isas, ext.ml_kernel_sources = isas, kernel_sources
        return ext

    if not with_cuda:
        log(f"CUDA kernels: OFF ({why})")
        return finish(CppExtension(
            "manual_layers._C", sources,
            depends=depends,
            extra_compile_args={"cxx": cxx + defines},
            extra_link_args=["-fopenmp"],
        ))
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(caps)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs, has_sm90a = sm90a_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    incs, libdirs, link = cuda_lib_dirs()
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    log(f"CUDA kernels: ON ({why}); archs {archs}; {len(cu_sources)} .cu files; cuBLASLt "
        f"{link} from {libdirs[0]}")
    defines += ["-DWITH_CUDA", f'-DML_CUDA_ARCHS="{archs}"']
    if has_sm90a:  # sm_90a code in the build: the cross-entropy cluster kernels can run
        defines += ["-DML_BUILT_SM90A"]
    cutlass_incs = cutlass_include_dirs()
    if cutlass_incs and has_sm90a:
        log(f"sm_90 CUTLASS kernels (Linear + GELU/SiLU, MLP dgrad): ON, headers from "
            f"{cutlass_incs[0]}")
        incs = incs + cutlass_incs
        defines += ["-DML_WITH_CUTLASS_SM90"]
    else:
        log("sm_90 CUTLASS kernels (Linear + GELU/SiLU, MLP dgrad): OFF (" +
            ("no 9.0 in the arch list" if not has_sm90a else
             "CUTLASS headers not found: pip install --no-deps nvidia-cutlass, or set "
             "CUTLASS_PATH") + ")")
    return finish(CUDAExtension(
        "manual_layers._C", sources + cu_sources,
        depends=depends,
        include_dirs=incs,
        library_dirs=libdirs,
        extra_compile_args={
            "cxx": cxx + defines,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + defines,
        },
        extra_link_args=["-fopenmp", link] + [f"-Wl,-rpath,{d}" for d in libdirs],
    ))


setup(
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
