"""Builds manual_layers._C: the C++ (CPU) kernels always, the CUDA kernels where they can run.

Environment (the build prints what it chose and why; `python -m manual_layers info` repeats it):
  MANUAL_LAYERS_CUDA=1    build the CUDA kernels, or fail with the reason (torchvision's
                          FORCE_CUDA): for a machine without a GPU that builds for one, and CI
  MANUAL_LAYERS_CUDA=0    build CPU kernels only (a CUDA tensor then gets a clear error)
  (unset)                 build the CUDA kernels when torch is a CUDA build, nvcc is found, and
                          a GPU is visible or TORCH_CUDA_ARCH_LIST is set; otherwise CPU only,
                          since kernels for a GPU that is not there cannot run (and cost
                          minutes to compile on a small machine)
  TORCH_CUDA_ARCH_LIST    GPU architectures; default: the visible GPUs' own, else "8.0;9.0"
  MANUAL_LAYERS_CUDA_EXPERIMENTAL=1
                          also build the CUDA kernels that have never run on a GPU: the sm_90
                          CUTLASS Linear/MLP kernels (csrc/cuda/experimental/) and the sm_90a
                          cluster instances of the tensor-core cross entropy. Needs 9.0 in the
                          arch list, which is then compiled as 9.0a (wgmma, TMA multicast; such a
                          cubin runs on exactly the GPUs a 9.0 cubin runs on). At run time they
                          are still opt-in (MANUAL_LAYERS_CUTLASS=1, MANUAL_LAYERS_CE_CLUSTER=1)
  CUTLASS_PATH            a CUTLASS checkout (its include/ is used); otherwise the headers of the
                          nvidia-cutlass wheel when it is installed (experimental kernels only)
  CUDA_HOME               the CUDA toolkit; otherwise resolved from /usr/local/cuda or from
                          the nvcc on PATH (following wrapper scripts to the real toolkit)
  MANUAL_LAYERS_CPU_ISAS  x86-64 vector ISAs to compile the CPU kernels for, besides the portable
                          DEFAULT copy: "native" (default: the ones this CPU runs),
                          "avx2,avx512" (every copy: a wheel for other machines, and CI),
                          "avx2", or "none". The copy
                          that runs is chosen at load (run time, not build time):
                          MANUAL_LAYERS_CPU_ISA=default|avx2|avx512, else ATen's level
                          (ATEN_CPU_CAPABILITY), never one the CPU lacks. Non-x86: DEFAULT only.
  MANUAL_LAYERS_DEBUG_INFO=1
                          keep the C++ debug information (-g, from Python's own flags); by
                          default it is dropped (-g0): torch's templates make it cost more than
                          half of every C++ file's compile time
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


def _flag(name):
    """An on/off environment switch: True, False, or None when unset or empty."""
    v = os.environ.get(name, "").strip().lower()
    if v in ("1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    if v:
        sys.exit(f"[manual_layers build] {name}={os.environ[name]!r}: expected 1 or 0")
    return None


def want_cuda():
    """(build the CUDA kernels?, why): the reason is printed and kept in the build info."""
    flag = _flag("MANUAL_LAYERS_CUDA")
    if flag is False:
        return False, "MANUAL_LAYERS_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        reasons.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    if reasons:
        if flag:
            sys.exit("[manual_layers build] MANUAL_LAYERS_CUDA=1 but the CUDA kernels cannot be "
                     "built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    if flag:
        return True, "MANUAL_LAYERS_CUDA=1"
    if torch.cuda.is_available():
        return True, f"a GPU is visible ({torch.cuda.get_device_name(0)})"
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return True, f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    return False, ("no GPU is visible and neither TORCH_CUDA_ARCH_LIST nor MANUAL_LAYERS_CUDA=1 "
                   "is set (set MANUAL_LAYERS_CUDA=1 to build them for another machine)")


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


def write_build_config(values):
    """build/generated/ml_build_config.h: what was built and why, as string macros that
    csrc/module.cpp puts into the build info (a header, so that no define with spaces has to
    survive a compiler command line). Rewritten only when it changes (no needless rebuild)."""
    d = os.path.join(ROOT, "build", "generated")
    os.makedirs(d, exist_ok=True)
    esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"')
    text = "// Generated by setup.py: the build's configuration.\n#pragma once\n" + "".join(
        f'#define {k} "{esc(v)}"\n' for k, v in values.items())
    path = os.path.join(d, "ml_build_config.h")
    if not os.path.isfile(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return d


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


# The CPU kernels (csrc/cpu/kernels/*.cpp) are compiled once per ISA, ATen's way
# (cmake/Codegen.cmake): each copy with its -m flags and -DCPU_CAPABILITY=<ISA>, which puts it in
# the namespace manual_layers::<ISA>; csrc/cpu/runtime/dispatch.cpp picks one at load. Everything
# else (op schemas, registration, the ISA choice, csrc/cpu/runtime) is ISA-neutral: no -m flags.
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    # ATen's AVX512 set (cmake/Codegen.cmake), and no (maybe-)uninitialized warnings: GCC 12's
    # own avx512fintrin.h seeds the masked intrinsics behind _mm512_max_pd/ps (ATen's maximum)
    # with `__m512d __Y = __Y;`, which GCC 12 then reports at every inlined use (GCC bug 105593:
    # 2,554 warnings per build, nothing of ours). The DEFAULT and AVX2 copies compile the same
    # sources with these warnings on, so a real one in our code still shows.
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-Wno-maybe-uninitialized", "-Wno-uninitialized"],
}


def _cpu_runs(isa):
    """Whether this machine's CPU runs the ISA copy (/proc/cpuinfo; ISA_FLAGS's extensions)."""
    need = {"AVX2": {"avx2", "fma", "f16c"},
            "AVX512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}}[isa]
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^flags\s*:(.*)$", f.read(), re.M)
    except OSError:
        return False
    return bool(m) and need <= set(m.group(1).split())


def cpu_isas():
    """The ISA copies to compile and why: DEFAULT always; on x86-64 AVX2/AVX512 as
    MANUAL_LAYERS_CPU_ISAS says, by default those this CPU runs (like the CUDA default: build
    what can run here; a wheel for other machines asks for all of them)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["DEFAULT"], f"{platform.machine()}: the portable copy only"
    want = os.environ.get("MANUAL_LAYERS_CPU_ISAS", "").strip().lower()
    if "MANUAL_LAYERS_CPU_ARCH" in os.environ:
        log("MANUAL_LAYERS_CPU_ARCH is gone (the ISA is chosen at run time now); see "
            "MANUAL_LAYERS_CPU_ISAS / MANUAL_LAYERS_CPU_ISA in setup.py's docstring")
    if want in ("", "native"):
        names = [n for n in ("AVX2", "AVX512") if _cpu_runs(n)]
        why = ("the levels this CPU runs; MANUAL_LAYERS_CPU_ISAS=avx2,avx512 builds every copy, "
               "for other machines")
    else:
        names = ([] if want in ("none", "default")
                 else [w.strip().upper() for w in want.split(",")])
        why = f"MANUAL_LAYERS_CPU_ISAS={want}"
    bad = [n for n in names if n not in ISA_FLAGS or n == "DEFAULT"]
    if bad:
        sys.exit(f"[manual_layers build] MANUAL_LAYERS_CPU_ISAS: unknown {bad}; "
                 "expected native, a list of avx2 and avx512, or none")
    return ["DEFAULT"] + [n for n in ("AVX2", "AVX512") if n in names], why


def cpu_flags():
    """Flags of every C++ file (no -m flags), the ISA copies and why, their defines."""
    flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    # Python's CFLAGS carry -g; -g0 comes after them and wins: the debug information of
    # torch's templates is most of a file's compile time, and users of the package do not
    # step through its kernels in a debugger (docs/environment.md has the figures).
    if not _flag("MANUAL_LAYERS_DEBUG_INFO"):
        flags.append("-g0")
    isas, why = cpu_isas()
    defines = [f'-DML_CPU_ISA="{",".join(isas)}"'] + [f"-DML_COMPILED_{n}" for n in isas[1:]]
    return flags, isas, why, defines


def isa_flags(isa):
    return ISA_FLAGS[isa] + [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]


class BuildExt(BuildExtension):
    """BuildExtension plus the per-ISA objects: setuptools gives one flag set per extension, so
    the kernel files are compiled here, once per ISA into their own folder, with the same
    compiler, ninja and flags as the extension's sources plus the ISA's. They are linked AFTER
    the ISA-neutral objects and in the order DEFAULT, AVX2, AVX512: for an inline function
    that several objects emit, the linker keeps the first copy, i.e. never an AVX-512 one
    where a lower level has it (csrc/cpu/runtime/dispatch.cpp)."""

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
    cxx, isas, isa_why, defines = cpu_flags()
    # compiled once per ISA (BuildExt)
    kernel_sources = sorted(glob.glob("csrc/cpu/kernels/*.cpp"))
    # ISA-neutral: every other .cpp under csrc/ (op schemas, autograd, policies, generic ATen
    # compositions, csrc/cpu/runtime); csrc/cuda holds only .cu/.cuh (nvcc, below)
    sources = [f for f in sorted(glob.glob("csrc/**/*.cpp", recursive=True))
               if f not in kernel_sources and not f.startswith(os.path.join("csrc", "cuda"))]
    # The kernel files and headers as dependencies: otherwise setuptools skips the link when
    # only a kernel file changed.
    depends = kernel_sources + sorted(glob.glob("csrc/**/*.h", recursive=True)
                                      + glob.glob("csrc/**/*.cuh", recursive=True))
    defines += [f'-DML_TORCH_VERSION="{torch.__version__}"']
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    log(f"C++ kernels: {len(kernel_sources)} files x CPU ISAs {', '.join(isas)}, the copy that "
        f"runs chosen at load ({isa_why}); {len(sources)} ISA-neutral files")

    def finish(ext, config):
        ext.ml_isas, ext.ml_kernel_sources = isas, kernel_sources
        ext.include_dirs.append(write_build_config(config))
        return ext

    config = {"ML_BUILD_CUDA_WHY": why, "ML_BUILD_EXPERIMENTAL_WHY": "",
              "ML_BUILD_CPU_ISA_WHY": isa_why}
    if not with_cuda:
        log(f"CUDA kernels: OFF ({why})")
        return finish(CppExtension(
            "manual_layers._C", sources,
            depends=depends,
            extra_compile_args={"cxx": cxx + defines},
            extra_link_args=["-fopenmp"],
        ), config)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        if torch.cuda.is_available():  # the visible GPUs' own architectures only
            caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(caps)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    experimental = _flag("MANUAL_LAYERS_CUDA_EXPERIMENTAL")
    # every .cu under csrc/cuda/ but csrc/cuda/experimental/ (built only on request, below)
    cutlass_sources = sorted(glob.glob("csrc/cuda/experimental/*.cu"))
    cu_sources = [f for f in sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
                  if f not in cutlass_sources]
    if not experimental:
        exp_why = ("OFF: never run on a GPU; MANUAL_LAYERS_CUDA_EXPERIMENTAL=1 builds them")
    else:
        archs, has_sm90a = sm90a_arch_list(archs)
        cutlass_incs = cutlass_include_dirs()
        if not has_sm90a:
            exp_why = "OFF: MANUAL_LAYERS_CUDA_EXPERIMENTAL=1 but no 9.0 in the arch list"
        else:
            # sm_90a code in the build: the cross-entropy cluster instances can run
            defines += ["-DML_BUILT_SM90A"]
            exp_why = "ON (MANUAL_LAYERS_CUDA_EXPERIMENTAL=1): cross-entropy cluster instances"
            if cutlass_incs:
                defines += ["-DML_WITH_CUTLASS_SM90"]
                cu_sources += cutlass_sources
                exp_why += f", sm_90 CUTLASS Linear/MLP kernels (headers from {cutlass_incs[0]})"
            else:
                exp_why += ("; sm_90 CUTLASS kernels OFF: CUTLASS headers not found (pip "
                            "install --no-deps nvidia-cutlass, or set CUTLASS_PATH)")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    config["ML_BUILD_EXPERIMENTAL_WHY"] = exp_why
    incs, libdirs, link = cuda_lib_dirs()
    if "-DML_WITH_CUTLASS_SM90" in defines:
        incs = incs + cutlass_incs
    log(f"CUDA kernels: ON ({why}); archs {archs}; {len(cu_sources)} .cu files; cuBLASLt "
        f"{link} from {libdirs[0]}")
    log(f"experimental CUDA kernels: {exp_why}")
    defines += ["-DWITH_CUDA", f'-DML_CUDA_ARCHS="{archs}"']
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
    ), config)


setup(
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
