"""CUDA kernels run on the CPU: g++ compiles their .cu files with tests/cuda_emu/kernels_emu.cpp,
whose host emulation runs a block's 256 threads as fibers on one OS thread
(tests/cuda_emu/fibers.h: cooperative, in a schedule chosen to expose missing barriers), the
shuffles and __syncthreads as barriers, cp.async as a copy and mma.sync from the PTX ISA's
fragment layouts.
Each case compares a kernel's outputs with a float64 reference of the same inputs:
- the tensor-core cross-entropy kernel (csrc/cuda/losses/ce_tc_kernels.cuh; bf16, fp16, and
  fp32 through 3xTF32): loss, residual, and the dW / db partials summed in block order; and its
  sm_90a cluster instances (C up to 256, ce_tc_cluster.cu), whose blocks the emulator runs at
  the same time, with the multicast bulk copies, mbarriers, cluster barrier and distributed
  shared memory they use (csrc/cuda/common/cluster_sm90.cuh);
- the CUDA-core single-pass cross-entropy kernel (csrc/cuda/losses/ce_fused_kernels.cuh) the
  same way, with the mean denominator from its own kernels (csrc/cuda/losses/common.cu);
- the losses' dX kernel for few classes (csrc/cuda/losses/loss_dx.cu), every dtype;
- Linear backward's activation gradient with the bias gradient's column sums in the same pass
  (csrc/cuda/linear/linear_kernels.cuh: act_bwd_colsum_kernel, colsum_final_kernel), and Linear's other
  kernels (activation forward / backward, softmax forward / backward, the column sum);
- the cross-entropy row kernel of the GEMM and chunked paths with G lanes per row
  (csrc/cuda/losses/gemm_path.cu: ce_rows_kernel), in each of its callers' modes;
- the GEMM path's binary row kernel (csrc/cuda/losses/gemm_path.cu: bce_rows_kernel);
- the fused binary cross entropy (csrc/cuda/losses/bce_fused.cu, every instance: 1, 2, 4 and
  (fp32) 8 chunks, 1 to 8 warps per row, the 16-bit row-ahead loads, the scalar load path) and
  the finalize step that sums every mean/sum path's block partials (csrc/cuda/losses/common.cu).
Fixed cases name what each covers; test_random_cases_emulated adds random shapes of every kernel.
This checks the kernels' tiling, shared-memory layout, fragment addressing, tile ring and row
phase where no GPU is (CI); the PTX itself and timing need one (tests/test_ce_tc.py). Small cases
of each kernel run again built with ThreadSanitizer (shared-memory races between barriers) and
with AddressSanitizer + UBSan (out-of-bounds shared or global accesses): test_kernels_sanitized,
marked slow (`make test-all`): the sanitizer builds take minutes of compiling.

Every test here is marked emu. The executables are cached under build/cuda_emu/, keyed by a hash
of everything they are built from (the emulator, csrc/, the compiler, torch), so a second run
compiles nothing."""

import hashlib
import os
import shutil
import subprocess

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))  # the checkout (this file: tests/cuda_emu/)
CACHE = os.path.join(ROOT, "build", "cuda_emu")

pytestmark = pytest.mark.emu


def _cuda_include_dirs():
    """CUDA's own include directory (cuda_runtime.h with its crt/ headers), then the pip
    wheels' (the math-library headers ATen's CUDA headers include)."""
    dirs = []
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "crt", "host_config.h")):
            dirs.append(os.path.join(home, "include"))
            break
    site = os.path.dirname(os.path.dirname(torch.__file__))
    for sub in ("cu13", "cu12"):
        d = os.path.join(site, "nvidia", sub, "include")
        if os.path.isdir(d):
            dirs.append(d)
    return dirs


def _sources_digest(cmd, cxx):
    """A hash of what the executable is built from: the command, the compiler's version, torch's
    version, and every file of tests/cuda_emu/ and csrc/ (the emulated .cu files and the headers
    they include; the rest of csrc/ is hashed too, which costs little and misses nothing)."""
    h = hashlib.sha256()
    h.update(repr(cmd).encode())
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(torch.__version__.encode())
    for top in (HERE, os.path.join(ROOT, "csrc")):
        for d, dirs, files in sorted(os.walk(top)):
            dirs.sort()
            for f in sorted(files):
                path = os.path.join(d, f)
                h.update(os.path.relpath(path, ROOT).encode())
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:16]


def _build(name, flags=()):
    """Compiles kernels_emu.cpp with the emulated .cu files, or finds the same build in CACHE;
    returns the executable's path, or (for a sanitizer build) None when the toolchain has no
    runtime for that sanitizer."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    inc = _cuda_include_dirs()
    tlib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if cxx is None or not inc:
        pytest.skip("needs g++ and the CUDA headers")
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", *flags,
           os.path.join(HERE, "kernels_emu.cpp"),
           "-I" + tinc, "-I" + os.path.join(tinc, "torch", "csrc", "api", "include")]
    cmd += ["-I" + d for d in inc]
    # The emulated files' host code is left out (ML_CUDA_HOST_EMU): only c10 is linked.
    cmd += ["-DWITH_CUDA", "-L" + tlib, "-Wl,-rpath," + tlib, "-lc10"]
    exe = os.path.join(CACHE, f"{name}-{_sources_digest(cmd, cxx)}")
    if os.path.exists(exe):
        return exe
    os.makedirs(CACHE, exist_ok=True)
    tmp = f"{exe}.{os.getpid()}.tmp"  # renamed when complete: a concurrent run sees all or none
    r = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True)
    if r.returncode != 0 and flags and any(
            f"-l{lib}" in r.stderr or f"lib{lib}" in r.stderr for lib in ("tsan", "asan", "ubsan")):
        return None
    assert r.returncode == 0, "emulation build failed:\n" + r.stderr[-4000:]
    os.replace(tmp, exe)
    return exe


@pytest.fixture(scope="module")
def emu():
    return _build("kernels_emu")


# dtype, N, D, C, grid, stages, options (w: class weights, W: weights up to 3e4, s: label
# smoothing, i: ignored rows). grid blocks run ceil(N / 32) tiles: several per block, a
# partial last tile, and blocks with one tile more than others.
CASES = [
    ("bf16", 1, 8, 2, 1, 2, "-"),          # one row; three of four k-splits without work
    ("bf16", 33, 24, 10, 2, 2, "i"),       # D not a multiple of 16: zero pad columns
    ("f16", 200, 512, 10, 3, 4, "wsi"),
    ("bf16", 1000, 512, 10, 4, 4, "i"),    # the shape, 8 tiles per block
    ("bf16", 95, 512, 17, 2, 3, "s"),      # CP = 32
    ("f16", 64, 40, 32, 1, 4, "wsi"),      # every padded class in use
    ("bf16", 129, 1024, 16, 2, 2, "-"),    # the largest D: 16 column tiles per warp
    ("f16", 300, 1000, 3, 3, 2, "w"),
    ("bf16", 2000, 256, 5, 7, 3, "ws"),
    ("f16", 77, 64, 12, 2, 3, "Wsi"),      # fp16 residual scaled before its split
    ("f32", 1, 8, 2, 1, 2, "-"),           # fp32: 3xTF32 products, k-steps of 8
    ("f32", 33, 24, 10, 2, 2, "i"),
    ("f32", 1000, 512, 10, 4, 2, "wsi"),   # fp32's largest D for C <= 16
    ("f32", 95, 256, 17, 2, 3, "s"),       # fp32, CP = 32
    ("f32", 64, 40, 32, 1, 4, "wsi"),
    ("bf16", 100, 256, 64, 2, 3, "wsi"),   # CP = 64: its largest D, every padded class used
    ("f16", 77, 200, 33, 2, 2, "s"),       # CP = 64 with one class past 32
    ("bf16", 65, 8, 50, 1, 4, "-"),
    ("f16", 64, 104, 64, 1, 4, "Wsi"),
    ("f32", 129, 128, 64, 3, 3, "wsi"),    # fp32 CP = 64: its largest D
    ("f32", 50, 128, 40, 2, 2, "i"),
]


def _run(emu, args, env=None):
    r = subprocess.run([emu] + [str(v) for v in args], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("OK"), r.stdout


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_ce_tc_kernel_emulated(emu, case):
    _run(emu, ("ce_tc",) + case)


# The same kernel's cluster instances (sm_90a, 33 <= C <= 256): GRID clusters of ceil(C / 32)
# blocks of 32 classes each, run at the same time; X reaches every block of a cluster through
# one multicast bulk copy per row, the row statistics through the blocks' shared memory. After
# each cluster barrier the emulator runs one block as far as it can before the next, in an order
# reversed every other barrier (tests/cuda_emu/fibers.h), so that a copy issued before every
# block is done with a stage changes what a block reads (and the values fail).
CL_CASES = [
    ("bf16", 1, 8, 33, 1, 2, "-"),          # one row, 2 blocks, the second with one class
    ("bf16", 33, 264, 33, 3, 2, "i"),       # D past the one-block kernel's 256; a cluster idle
    ("f16", 77, 40, 65, 1, 2, "Wsi"),       # 3 blocks; fp16's scaled residual
    ("bf16", 100, 64, 100, 2, 3, "wsi"),    # 4 blocks, the last with 4 classes
    ("bf16", 200, 512, 128, 2, 4, "wsi"),   # the C = 128, D = 512: 4 tiles per cluster
    ("f16", 129, 512, 255, 2, 4, "Wsi"),    # 8 blocks, the largest D
    ("bf16", 100, 512, 256, 1, 3, "s"),     # the largest C
    ("f32", 70, 256, 256, 1, 2, "Wsi"),     # fp32 (3xTF32): its largest D and C
    ("f32", 50, 136, 40, 2, 3, "i"),        # fp32 2 blocks, D past the one-block kernel's 128
]


@pytest.mark.parametrize("case", CL_CASES, ids=["-".join(map(str, c)) for c in CL_CASES])
def test_ce_tc_cluster_kernel_emulated(emu, case):
    _run(emu, ("ce_tc_cl",) + case)


# dtype, N, D, C, thread cap, per-row coef (reduction none). Thread caps below N x D / VEC make
# each thread walk several rows; D = 520 / 40 / 6: rows of 130 / 10 / 3 vectors.
DX_CASES = [
    ("bf16", 100, 64, 10, 512, 0),
    ("f16", 1000, 520, 2, 2048, 1),
    ("f32", 333, 40, 16, 256, 1),
    ("f32", 7, 512, 1, 1 << 20, 0),        # more threads than vectors
    ("f64", 50, 6, 3, 100, 1),
]


@pytest.mark.parametrize("case", DX_CASES, ids=["-".join(map(str, c)) for c in DX_CASES])
def test_loss_dx_kernel_emulated(emu, case):
    _run(emu, ("loss_dx",) + case)


# dtype, activation, rows, cols, block target of the row chunking. cols: several 32 x VEC
# column tiles with a partial last one (520 bf16: tiles of 256), one vector (6 fp64 = 3 x 2);
# chunks of 8 rows and more, 1 row.
ACT_CASES = [
    ("bf16", "gelu", 100, 520, 64),
    ("f16", "gelu_tanh", 1, 256, 128),
    ("f32", "silu", 37, 24, 4),
    ("f32", "gelu", 1000, 132, 2112),
    ("f64", "relu", 300, 6, 1000),
]


@pytest.mark.parametrize("case", ACT_CASES, ids=["-".join(map(str, c)) for c in ACT_CASES])
def test_act_bwd_colsum_kernel_emulated(emu, case):
    _run(emu, ("act_bwd",) + case)


# dtype, N, C, grid, mode, options. C picks the lanes per row G (2 -> 2, 3 -> 4, 10 / 16 ->
# 16, 17 / 40 -> 32); grids smaller than N / rows-per-block make blocks loop; 41 rows leave a
# partial last warp.
CE_ROWS_CASES = [
    ("f32", 50, 2, 1, "mean", "-"),
    ("f32", 100, 3, 3, "mean", "ws"),
    ("bf16", 41, 10, 2, "inplace", "ws"),
    ("f16", 300, 16, 2, "inplace", "s"),
    ("f64", 77, 17, 2, "scale", "w"),
    ("f32", 64, 40, 3, "mean", "ws"),
]


@pytest.mark.parametrize("case", CE_ROWS_CASES, ids=["-".join(map(str, c)) for c in CE_ROWS_CASES])
def test_ce_rows_kernel_emulated(emu, case):
    _run(emu, ("ce_rows",) + case)


# dtype, N, D, grid, options (p pos_weight, s sample weights, m sum, u scalar loads). D picks
# the instance: bf16 512 two chunks (rows loaded one ahead), fp16 256 one chunk (ahead), fp16
# 1000 four chunks, fp32 3000 / bf16 8192 four chunks x 8 warps per row, fp32 8192 / 5001 eight
# chunks x 8 warps (vector and scalar loads).
BCE_CASES = [
    ("f32", 100, 64, 3, "-"),
    ("bf16", 300, 512, 4, "ps"),
    ("f16", 1000, 256, 7, "ps"),
    ("f16", 77, 1000, 2, "pm"),
    ("f32", 40, 3000, 2, "p"),
    ("bf16", 20, 8192, 2, "s"),
    ("f32", 21, 8192, 2, "ps"),
    ("f32", 9, 5001, 2, "m"),
    ("bf16", 33, 100, 2, "u"),
    ("f64", 50, 40, 2, "s"),
]


@pytest.mark.parametrize("case", BCE_CASES, ids=["-".join(map(str, c)) for c in BCE_CASES])
def test_bce_fused_kernel_emulated(emu, case):
    _run(emu, ("bce",) + case)


# The CUDA-core kernel: dtype, N, D, C, grid, (unused), options. CMAX 16 / 32, DJ 1 / 2 / 4,
# the scalar load path (D = 7), fp64.
FUSED_CASES = [
    ("f32", 100, 64, 10, 2, 0, "wsi"),
    ("bf16", 300, 512, 10, 3, 0, "i"),
    ("f16", 33, 1000, 3, 2, 0, "w"),
    ("f32", 95, 512, 17, 2, 0, "s"),
    ("f64", 77, 300, 16, 2, 0, "ws"),
    ("f32", 50, 7, 2, 1, 0, "-"),
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=["-".join(map(str, c)) for c in FUSED_CASES])
def test_ce_fused_kernel_emulated(emu, case):
    _run(emu, ("ce_fused",) + case)


# The GEMM path's binary row kernel: dtype, N, grid (blocks of 256 threads; fewer than N / 256
# make them loop), options (p pos_weight, s sample weights, m sum).
BCE_ROWS_CASES = [
    ("f32", 1000, 2, "ps"),
    ("bf16", 77, 1, "s"),
    ("f16", 600, 1, "pm"),
    ("f64", 300, 3, "p"),
]


@pytest.mark.parametrize("case", BCE_ROWS_CASES, ids=["-".join(map(str, c)) for c in BCE_ROWS_CASES])
def test_bce_rows_kernel_emulated(emu, case):
    _run(emu, ("bce_rows",) + case)


# Linear's activation, softmax and column-sum kernels: dtype, rows, cols, grid, block target of
# the column sum's chunking. rows x cols not a multiple of the vector width (the scalar tail),
# a single column, grids smaller than the data.
LINEAR_CASES = [
    ("f32", 37, 45, 2, 64),
    ("bf16", 100, 515, 3, 1024),
    ("f16", 9, 1, 1, 1),
    ("f64", 300, 70, 2, 16),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=["-".join(map(str, c)) for c in LINEAR_CASES])
def test_linear_kernels_emulated(emu, case):
    _run(emu, ("linear_misc",) + case)


# The same kernels built with a sanitizer (cf. compute-sanitizer's racecheck / memcheck on a GPU):
# - thread: ThreadSanitizer orders every memory access of the block's threads by the
#   __syncthreads / __syncwarp barriers, so a shared-memory race (a missing barrier) is reported
#   whatever order the threads happened to run in; the value checks above see it only when the
#   schedule exposes it. Shuffles exchange their values through relaxed atomics in this build
#   and order nothing else (kernels_emu.cpp), as on the GPU, whose memory model gives
#   __shfl_sync no ordering: a __syncwarp replaced by a shuffle in the row kernel
#   (csrc/cuda/losses/gemm_path.cu) is reported, where the value checks pass.
# - address: AddressSanitizer and UBSan. Dynamic shared memory is the launch's size placed at
#   the end of the emulator's array (kernels_emu.cpp: launch), so a kernel reading or writing
#   past the size its host code computes is reported; so are out-of-bounds global accesses.
# Small cases of every kernel (ThreadSanitizer runs a kernel many times slower).
SAN_CASES = [
    ("ce_tc", "bf16", 33, 24, 10, 2, 2, "i"),
    ("ce_tc", "f16", 77, 64, 12, 2, 3, "Wsi"),
    ("ce_tc", "f16", 64, 40, 32, 1, 4, "wsi"),
    ("ce_tc", "f32", 33, 24, 10, 2, 2, "i"),
    ("ce_tc", "bf16", 40, 64, 50, 2, 3, "wsi"),
    ("ce_tc_cl", "bf16", 70, 64, 70, 1, 2, "wsi"),   # 3 blocks: the row statistics' exchange
    ("ce_tc_cl", "f32", 40, 136, 40, 2, 2, "i"),
    ("ce_fused", "f32", 100, 64, 10, 2, 0, "wsi"),
    ("ce_fused", "f16", 33, 1000, 3, 2, 0, "w"),
    ("ce_fused", "f32", 50, 7, 2, 1, 0, "-"),
    ("loss_dx", "bf16", 100, 64, 10, 512, 0),
    ("loss_dx", "f32", 333, 40, 16, 256, 1),
    ("loss_dx", "f64", 50, 6, 3, 100, 1),
    ("act_bwd", "f16", "gelu_tanh", 1, 256, 128),
    ("act_bwd", "f32", "silu", 37, 24, 4),
    ("ce_rows", "f32", 100, 3, 3, "mean", "ws"),
    ("ce_rows", "bf16", 41, 10, 2, "inplace", "ws"),
    ("ce_rows", "f32", 64, 40, 3, "mean", "ws"),
    ("bce", "f32", 100, 64, 3, "-"),
    ("bce", "f16", 60, 256, 2, "ps"),      # one chunk, rows loaded one ahead
    ("bce", "bf16", 40, 512, 2, "ps"),     # two chunks, rows loaded one ahead
    ("bce", "f16", 20, 1000, 1, "pm"),     # four chunks
    ("bce", "f32", 3, 4100, 1, "ps"),      # eight chunks x 8 warps per row
    ("bce", "bf16", 33, 100, 2, "u"),
    ("bce", "f64", 50, 40, 2, "s"),
    ("bce_rows", "f32", 1000, 2, "ps"),
    ("bce_rows", "f16", 600, 1, "pm"),
    ("linear_misc", "f32", 37, 45, 2, 64),
    ("linear_misc", "f16", 9, 1, 1, 1),
]

# Random cases of every emulated kernel, each drawn from its seed alone (as tests/test_fuzz.py
# does for the ops), run in a random thread schedule drawn from the same seed
# (ML_EMU_SCHEDULE_SEED, tests/cuda_emu/fibers.h): 16 per run, MANUAL_LAYERS_EMU_FUZZ_CASES=N
# MANUAL_LAYERS_EMU_FUZZ_SEED=S for more. Shapes stay inside what each kernel's host code
# launches (noted per kind); a case the emulator declines (exit 2: its shared memory, a column
# count its vectors do not divide) is skipped.
EMU_FUZZ_CASES = int(os.environ.get("MANUAL_LAYERS_EMU_FUZZ_CASES", "16"))
EMU_FUZZ_SEED = int(os.environ.get("MANUAL_LAYERS_EMU_FUZZ_SEED", "0"))


def random_case(seed):
    """One emulator command line (tests/cuda_emu/kernels_emu.cpp's usage) from the seed."""
    import random
    rng = random.Random(seed)
    rows = rng.choice([1, 2, 7, 31, 32, 33, 63, 64, 65, 100, 129, 200, 257, 300])
    grid = rng.randint(1, 4)

    def opts(chars):
        return "".join(c for c in chars if rng.random() < 0.5) or "-"

    def tc_dmax(C, dt):  # csrc/contracts/losses.h: ce_tc_dmax
        d = 1024 if C <= 16 else 512 if C <= 32 else 256 if C <= 64 else 0
        return d // 2 if dt == "f32" else d

    kind = rng.choice(["ce_tc", "ce_tc", "ce_tc_cl", "ce_fused", "loss_dx", "act_bwd", "ce_rows",
                       "bce", "bce_rows", "linear_misc"])
    dt = rng.choice(["bf16", "f16", "f32"] if kind.startswith("ce_tc") else
                    ["bf16", "f16", "f32", "f64"])
    if kind == "ce_tc":  # ce_tc_shape_ok: D % 8 == 0, C <= 64, D <= ce_tc_dmax
        C = rng.randint(2, 64)
        D = 8 * rng.randint(1, tc_dmax(C, dt) // 8)
        return kind, dt, rows, D, C, grid, rng.randint(2, 4), opts("wWsi")
    if kind == "ce_tc_cl":  # ce_tc_cluster_shape_ok: 33 <= C <= 256, outside ce_tc_shape_ok
        C = rng.randint(33, 256)
        D = 8 * rng.randint(tc_dmax(C, dt) // 8 + 1, (256 if dt == "f32" else 512) // 8)
        return kind, dt, rows, D, C, rng.randint(1, 3), rng.randint(2, 4), opts("wWsi")
    if kind == "ce_fused":  # ce_fused_config: C <= 32, CMAX x DJ <= 64, fp64 CMAX 16, DJ <= 2
        C = rng.randint(2, 16 if dt == "f64" else 32)
        D = rng.randint(1, 512 if (C > 16 or dt == "f64") else 1024)
        return kind, dt, rows, D, C, grid, 0, opts("wsi")
    if kind == "loss_dx":  # loss_dx_cuda: C <= 16, D a multiple of the vector width
        D = (2 if dt == "f64" else 4) * rng.randint(1, 200)
        return kind, dt, rows, D, rng.randint(1, 16), rng.choice([32, 256, 1024, 1 << 20]), \
            rng.randint(0, 1)
    vec = {"bf16": 8, "f16": 8, "f32": 4, "f64": 2}[dt]  # csrc/cuda/common/cuda_common.cuh: VecWidth
    if kind == "act_bwd":  # act_bwd_colsum_ok: whole vectors per row
        return kind, dt, rng.choice(["gelu", "silu", "gelu_tanh", "relu"]), rows, \
            vec * rng.randint(1, 600 // vec), rng.choice([1, 4, 64, 2112])
    if kind == "ce_rows":
        return kind, dt, rows, rng.randint(2, 300), grid, \
            rng.choice(["mean", "scale", "inplace"]), opts("ws")
    if kind == "bce":  # bce_fused_config: D <= 8192 (fp64 2048)
        return kind, dt, rows, rng.randint(1, 2048 if dt == "f64" else 8192), grid, opts("psmu")
    if kind == "bce_rows":
        return kind, dt, rng.randint(1, 1200), grid, opts("psm")
    return kind, dt, rows, rng.randint(1, 700), grid, rng.choice([1, 16, 64, 1024])


@pytest.mark.parametrize("seed", range(EMU_FUZZ_SEED, EMU_FUZZ_SEED + EMU_FUZZ_CASES))
def test_random_cases_emulated(emu, seed):
    case = random_case(seed)
    r = subprocess.run([emu] + [str(v) for v in case], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, ML_EMU_SCHEDULE_SEED=str(seed + 1)))
    if r.returncode == 2:
        pytest.skip(f"{case}: {r.stdout.strip()[-200:]}")
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), \
        f"{case}:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"


SANITIZERS = {
    "thread": ["-fsanitize=thread"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
}
SAN_ENV = {
    "TSAN_OPTIONS": "halt_on_error=1",
    "ASAN_OPTIONS": "detect_leaks=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}


@pytest.fixture(scope="module", params=sorted(SANITIZERS))
def emu_san(request):
    exe = _build("kernels_emu_" + request.param, SANITIZERS[request.param])
    if exe is None:
        pytest.skip(f"g++ has no {request.param} sanitizer runtime here")
    env = dict(os.environ, **SAN_ENV)
    probe = subprocess.run([exe, "bce_rows", "f32", "1", "1", "-"], capture_output=True,
                           text=True, timeout=300, env=env)
    if "FATAL: ThreadSanitizer" in probe.stderr:  # e.g. an address-space layout it cannot map
        pytest.skip("ThreadSanitizer cannot run on this kernel: " + probe.stderr.strip()[:200])
    return exe, env


@pytest.mark.slow
@pytest.mark.parametrize("case", SAN_CASES, ids=["-".join(map(str, c)) for c in SAN_CASES])
def test_kernels_sanitized(emu_san, case):
    exe, env = emu_san
    _run(exe, case, env)
