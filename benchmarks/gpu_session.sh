#!/usr/bin/env bash
# The prepared GPU check for a session that is lent an H100/H200 (sm_90) for a few minutes:
# every stage under its own time limit, every log under $OUT, one summary line per stage, so a
# 15-minute device budget is spent on measuring, not on typing. Run from the repository root:
#
#   bash benchmarks/gpu_session.sh build tests          # ~7 min: build for 9.0, the whole suite
#   bash benchmarks/gpu_session.sh bench profile        # ~4 min: benchmarks, ncu on the kernels
#   bash benchmarks/gpu_session.sh sanitize             # ~3 min: compute-sanitizer on every path
#   bash benchmarks/gpu_session.sh cutlass              # ~3 min: the sm_90 CUTLASS Linear kernels
#   bash benchmarks/gpu_session.sh all                  # everything (more than one 10-min call)
#
# Stages:
#   build    python setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16
#   tests    pytest tests (CPU and CUDA; CUDA tests poison outputs and check every launch),
#            then 1000 more random samples per op on CUDA (tests/test_fuzz.py, seeds 100..1099)
#   bench    bench_logreg, bench_linear, bench_overhead, bench_mlp, bench_ce_large (no compile
#            baseline: torch.compile's first call costs minutes of device time)
#   profile  Nsight Compute (SpeedOfLight, Occupancy) on bce_fused_kernel (bf16 and fp32,
#            4,194,304 x 512), cross entropy C=10 1,048,576 x 512 with dX: bf16 on three paths
#            (ce_tc_kernel, ce_fused_kernel, the chunked path's GEMMs and ce_rows_kernel),
#            fp32 on ce_tc_kernel (3xTF32), C=128 on the cluster instances of ce_tc_kernel
#            (MANUAL_LAYERS_CE_CLUSTER=1) and on the chunked path, and one Linear+GELU
#            step (act_bwd_colsum_kernel), plus a torch.profiler kernel table of the same calls
#   sanitize compute-sanitizer memcheck, racecheck and synccheck on benchmarks/sanitize_calls.py
#            (every kernel path once, small shapes; PyTorch's caching allocator off so that an
#            access past an output is past its allocation). The host emulation's ThreadSanitizer
#            and AddressSanitizer runs (tests/cuda_emu/test_cuda_emu.py) are the same checks without a GPU.
#   cutlass  the Linear and MLP tests with MANUAL_LAYERS_CUTLASS=1 (csrc/cuda/experimental/linear_sm90.h: GELU /
#            SiLU in the forward GEMM's epilogue, the MLP backward's dgrad with the activation
#            and bias gradients in its epilogue; opt-in until this stage has passed on a GPU),
#            then bench_linear for gelu / silu and bench_mlp (each also timed with the switch,
#            interleaved), and ncu on the CUTLASS kernels of a Linear+GELU and an MLP step
# Results: $OUT/summary.txt, $OUT/<stage>.log, $OUT/results/ (benchmark CSV/Markdown).
#
# The device machine has no network, no expecttest (torch.library.opcheck needs it) and no
# CUTLASS headers (the sm_90 Linear kernels need them): put the wheels in .gpu_wheels/
# (untracked, not ignored, so they travel with the tree) beforehand:
#   pip download expecttest --python-version 3.12 --only-binary=:all: -d .gpu_wheels
#   pip download nvidia-cutlass --no-deps --only-binary=:all: -d .gpu_wheels
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PATH="/usr/local/cuda/bin:$PATH"

if ! $PY -c "import expecttest" 2>/dev/null; then
  for w in .gpu_wheels/expecttest-*.whl; do
    [ -f "$w" ] && $PY -m zipfile -e "$w" .gpu_wheels/site
  done
  [ -d .gpu_wheels/site ] && export PYTHONPATH="$PWD/.gpu_wheels/site:${PYTHONPATH:-}"
fi
if [ -z "${CUTLASS_PATH:-}" ] && ! $PY -c "import cutlass_library" 2>/dev/null; then
  for w in .gpu_wheels/nvidia_cutlass-*.whl; do
    [ -f "$w" ] && $PY -m zipfile -e "$w" .gpu_wheels/cutlass \
      && export CUTLASS_PATH="$PWD/.gpu_wheels/cutlass/cutlass_library/source"
  done
fi

# stage NAME SECONDS CMD...: runs CMD under `timeout`, output to $OUT/NAME.log, one line to
# $OUT/summary.txt with the exit status (124: the time limit) and the seconds it took.
stage() {
  local name=$1 secs=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s (limit ${secs}s)" | tee -a "$OUT/summary.txt"
  return $rc
}

# One call of each profiled op, for ncu and torch.profiler (fresh random inputs, warmed up).
PROFILE_PY='
import os, sys, torch
import manual_layers as ml
F = ml.functional
torch.manual_seed(0)
dev = "cuda"
def bce(dt):
    x = torch.randn(4194304, 512, device=dev, dtype=dt)
    w = torch.randn(1, 512, device=dev, dtype=dt) * 0.05
    b = torch.zeros(1, device=dev, dtype=dt, requires_grad=True)
    w.requires_grad_()
    y = (torch.rand(4194304, device=dev) > 0.5).to(dt)
    return lambda: F.linear_binary_cross_entropy_with_logits(x, w, b, y).backward()
def ce(path, tc="1", dt=torch.bfloat16, classes=10, cluster="0"):
    x = torch.randn(1048576, 512, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(classes, 512, device=dev, dtype=dt) * 0.05).requires_grad_()
    t = torch.randint(0, classes, (1048576,), device=dev)
    env = {"MANUAL_LAYERS_CE_PATH": path, "MANUAL_LAYERS_CE_TC": tc,
           "MANUAL_LAYERS_CE_CLUSTER": cluster}
    def call():
        os.environ.update(env)
        F.linear_cross_entropy(x, w, None, t).backward()
        for k in env:
            del os.environ[k]
    return call
def lin():
    m = ml.Linear(1024, 4096, activation="gelu", device=dev, dtype=torch.bfloat16)
    x = torch.randn(16384, 1024, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(16384, 4096, device=dev, dtype=torch.bfloat16)
    return lambda: m(x).backward(g)
calls = {"bce_bf16": bce(torch.bfloat16), "bce_fp32": bce(torch.float32),
         "ce_bf16_tc": ce("single"), "ce_bf16_cudacore": ce("single", "0"),
         "ce_bf16_chunked": ce("chunked"), "ce_fp32_tc": ce("single", "1", torch.float32),
         "ce_bf16_c128_cluster": ce("single", classes=128, cluster="1"),
         "ce_bf16_c128_chunked": ce("chunked", classes=128), "linear_gelu": lin()}
for f in calls.values():
    f(); f()
torch.cuda.synchronize()
if "table" in sys.argv:
    from torch.profiler import profile, ProfilerActivity
    for name, f in calls.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            f(); torch.cuda.synchronize()
        print("###", name)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
else:
    torch.cuda.cudart().cudaProfilerStart()
    for f in calls.values():
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
'

run_build() {
  stage build 300 $PY setup.py build_ext --inplace || return 1
  stage info 60 $PY -m manual_layers info
}
run_tests() {
  stage tests 360 $PY -m pytest tests -q -p no:cacheprovider -rfEs --durations=15
  MANUAL_LAYERS_FUZZ_CASES=1000 MANUAL_LAYERS_FUZZ_SEED=100 \
    stage fuzz 180 $PY -m pytest tests/test_fuzz.py -q -p no:cacheprovider -rfE -k cuda
}
run_bench() {
  stage bench_logreg 150 $PY benchmarks/bench_logreg.py --device cuda --no-compile
  stage bench_linear 150 $PY benchmarks/bench_linear.py --device cuda --no-compile
  stage bench_overhead 90 $PY benchmarks/bench_overhead.py --device cuda
  stage bench_mlp 90 $PY benchmarks/bench_mlp.py --no-compile
  stage bench_ce_large 90 $PY benchmarks/bench_ce_large.py
  mkdir -p "$OUT/results" && cp benchmarks/results/* "$OUT/results/" 2>/dev/null
  return 0
}
run_profile() {
  stage kernel_table 90 $PY -c "$PROFILE_PY" table
  stage ncu 180 ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
    --kernel-name regex:'bce_fused_kernel|ce_fused_kernel|ce_tc_kernel|loss_dx_kernel|ce_rows_kernel|act_|gemm|nvjet|Kernel' \
    --launch-count 24 \
    $PY -c "$PROFILE_PY"
}

run_cutlass() {
  MANUAL_LAYERS_CUTLASS=1 stage tests_cutlass 240 $PY -m pytest tests/test_linear_sm90.py \
    tests/test_linear.py tests/test_mlp.py -q -p no:cacheprovider -rfEs
  stage bench_linear_cutlass 150 $PY benchmarks/bench_linear.py --device cuda --no-compile \
    --activation gelu,silu --dtype bfloat16
  stage bench_mlp_cutlass 90 $PY benchmarks/bench_mlp.py --no-compile
  MANUAL_LAYERS_CUTLASS=1 stage ncu_cutlass 120 ncu --section SpeedOfLight --section Occupancy \
    --kernel-name regex:'cutlass|nvjet|act_' --launch-count 12 $PY -c "
import torch, manual_layers as ml
m = ml.Linear(1024, 4096, activation='gelu', device='cuda', dtype=torch.bfloat16)
x = torch.randn(16384, 1024, device='cuda', dtype=torch.bfloat16, requires_grad=True)
for _ in range(2): m(x).backward(torch.randn(16384, 4096, device='cuda', dtype=torch.bfloat16))
p = ml.MLP(1024, 4096, 1024, activation='gelu', device='cuda', dtype=torch.bfloat16)
x = torch.randn(8192, 1024, device='cuda', dtype=torch.bfloat16, requires_grad=True)
for _ in range(2): p(x).backward(torch.randn(8192, 1024, device='cuda', dtype=torch.bfloat16))
torch.cuda.synchronize()"
}

run_sanitize() {
  local cs=compute-sanitizer
  if ! command -v $cs >/dev/null; then
    echo "sanitize: no compute-sanitizer on PATH" | tee -a "$OUT/summary.txt"
    return 0
  fi
  for tool in memcheck racecheck synccheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage "sanitize_$tool" 150 \
      $cs --tool $tool --error-exitcode 9 --print-limit 20 $PY benchmarks/sanitize_calls.py
  done
}

[ $# -eq 0 ] && set -- build tests
for s in "$@"; do
  case "$s" in
    build) run_build || { echo "build failed: see $OUT/build.log"; exit 1; } ;;
    tests) run_tests ;;
    bench) run_bench ;;
    profile) run_profile ;;
    sanitize) run_sanitize ;;
    cutlass) run_cutlass ;;
    all) run_build || exit 1; run_tests; run_cutlass; run_sanitize; run_bench; run_profile ;;
    *) echo "unknown stage '$s' (build, tests, cutlass, sanitize, bench, profile, all)"; exit 2 ;;
  esac
done
cat "$OUT/summary.txt"
