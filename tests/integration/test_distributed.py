"""manual_layers under torch.distributed: DistributedDataParallel and FSDP2 (fully_shard).

Models built from manual_layers.Linear (fused activations), LogisticRegression (as a layer and
as a fused-loss head) and the fused losses must train under DDP and FSDP2 exactly as the same
models built from torch layers do. Each check trains k steps from the same start on the same
per-rank data and compares the parameters:
  (a) ours under DDP/FSDP2 against the torch-layer model under DDP/FSDP2;
  (b) ours on 2 ranks against ours in one process on the concatenated batch (gradient
      averaging semantics);
  (c) the parameters agree bitwise across ranks.

Each distributed run is 2 processes (one subprocess per rank, gloo on CPU; NCCL on CUDA where
two GPUs are visible) that run dist_worker.py as a script (`--worker ddp|fsdp`), do every check
of their kind, and write the numbers to a JSON file per rank; the tests then assert on them.
A hang fails: the ranks run under a deadline and are killed when it passes.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_fit import DIST_FIT_CASES
from dist_models import WORLD

# Every test here is marked distributed. The DDP run (one launch does every DDP check) stays in
# `make test` as the smoke test of multi-process training and fitting; the FSDP2 run is marked
# slow (`make test-all`).
pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().with_name("dist_worker.py")
DEADLINE_S = 180  # whole run (2 ranks importing torch on a 2-core machine take ~10 s of it)


# ================================================================================================
# The launcher and the tests (the ranks: dist_worker.py, dist_models.py, dist_fit.py)
# ================================================================================================

def _free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a rank prints when the rendezvous port _free_port() chose was taken by another process
# between the probe and rank 0's TCPStore binding it (the probe cannot hold the port): the one
# failure a second attempt with a fresh port may fix.
_PORT_TAKEN = ("Address already in use", "EADDRINUSE", "failed to listen on any local network")


def _launch(kind, device_type, out_dir):
    """Runs the 2 ranks; returns each rank's results. Fails (with the ranks' output) on a
    non-zero exit or when the deadline passes (the ranks are killed: a hang fails). A run that
    failed because its rendezvous port was taken is run once more on another port (seen: rank 0
    fails with EADDRINUSE, rank 1 waits at the rendezvous until it is stopped)."""
    for attempt in range(2):
        results, text = _launch_once(kind, device_type, Path(out_dir) / f"attempt{attempt}")
        if results is not None:
            return results
        if attempt == 0 and any(m in text for m in _PORT_TAKEN):
            continue
        pytest.fail(text)


def _launch_once(kind, device_type, out_dir):
    """One run of the ranks: (results, "") or (None, the failure and the ranks' output)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WORLD_SIZE=str(WORLD), RESULT_DIR=str(out_dir),
               INIT_METHOD=f"tcp://127.0.0.1:{_free_port()}", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get(
                   "PYTHONPATH")] if p]))
    procs, logs = [], []
    for r in range(WORLD):
        log = open(out_dir / f"rank{r}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--worker", kind,
             "--device", device_type], env=dict(env, RANK=str(r)), cwd=str(ROOT),
            stdout=log, stderr=subprocess.STDOUT))
    # Wait for every rank; once one has failed the others cannot finish (they wait for it in
    # a collective or at the rendezvous), so they are stopped then instead of at the deadline.
    t0 = time.monotonic()
    timed_out = False
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        if time.monotonic() - t0 > DEADLINE_S:
            timed_out = True
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = []
    for r, log in enumerate(logs):
        log.seek(0)
        text.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    if timed_out:
        return None, (f"{kind} run on {device_type} did not finish within {DEADLINE_S} s "
                      f"(hang?)\n" + "\n".join(text))
    if any(p.returncode != 0 for p in procs):
        return None, f"{kind} run on {device_type} failed\n" + "\n".join(text)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)], ""


def _check(results, key):
    """The results of one check on every rank; fails with the rank's traceback on error."""
    out = []
    for r, res in enumerate(results):
        v = res.get(key)
        assert v is not None, f"rank {r}: no result for {key}"
        if isinstance(v, dict) and "error" in v:
            pytest.fail(f"rank {r}: {key} raised\n{v['error']}")
        out.append(v)
    return out


@pytest.fixture(scope="module")
def ddp_cpu(tmp_path_factory):
    return _launch("ddp", "cpu", tmp_path_factory.mktemp("ddp_cpu"))


def _fsdp2_cpu_skip_reason():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    except ImportError as e:
        return f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}"
    return None


@pytest.fixture(scope="module")
def fsdp_cpu(tmp_path_factory):
    reason = _fsdp2_cpu_skip_reason()
    if reason:
        pytest.skip(reason)
    return _launch("fsdp", "cpu", tmp_path_factory.mktemp("fsdp_cpu"))


MODELS = ["mlp_logreg_layer", "fused_ce_head", "ce_loss_module", "bce_logreg_head"]
DTYPES = ["float64", "float32"]
TOL = {"float64": 1e-10, "float32": 2e-5}  # parameters after STEPS steps


def _assert_training(results, model, dtype, ref_key):
    for r, v in enumerate(_check(results, f"{model}/{dtype}")):
        tol = TOL[dtype]
        for what in (ref_key, "vs_single_process"):
            assert v[what]["rel_err"] <= tol, \
                f"rank {r} {model} {dtype} {what}: rel err {v[what]['rel_err']:.3g} > {tol:g}"
        assert v["ranks_agree"], f"{model} {dtype}: parameters differ across ranks"
    return results


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
def test_ddp_cpu_matches_torch_and_single_process(ddp_cpu, model, dtype):
    _assert_training(ddp_cpu, model, dtype, "vs_torch_ddp")
    for v in _check(ddp_cpu, f"{model}/{dtype}"):
        assert v["torch_ranks_agree"]


@pytest.mark.parametrize("option", ["gradient_as_bucket_view", "static_graph",
                                    "find_unused_parameters", "no_sync_accumulation"])
def test_ddp_cpu_options(ddp_cpu, option):
    for r, v in enumerate(_check(ddp_cpu, "ddp_options")):
        assert v[option]["ranks_agree"], option
        # the DDP options change nothing numerically; no_sync halves the batch (two half-batch
        # GEMMs), which rounds differently
        tol = 1e-12 if option == "no_sync_accumulation" else 0.0
        assert v[option]["rel_err"] <= tol, f"rank {r} {option}: {v[option]}"


def test_logreg_fit_under_torchrun_is_data_parallel_only_when_asked(ddp_cpu):
    for r, v in enumerate(_check(ddp_cpu, "fit_under_torchrun")):
        assert v["ranks_agree"], f"rank {r}: fit gives different models on different ranks"
        err = v["vs_sklearn_on_all_shards"]["rel_err"]
        assert err <= 1e-4, f"rank {r}: fit is {err:.3g} away from the fit on all shards"
        d = v["default_is_local"]
        assert not d["ranks_agree"], f"rank {r}: the default fit synchronised the ranks"
        assert d["vs_sklearn_on_own_shard"]["rel_err"] <= 1e-4, (r, d)
        # rank 0's lone fit returned (the run finished); it did not wait for rank 1
        assert v["one_rank_fit_seconds"] < 60, (r, v["one_rank_fit_seconds"])


@pytest.mark.parametrize("case", DIST_FIT_CASES)
def test_distributed_fit_equals_fit_on_concatenation(ddp_cpu, case):
    """Estimator and module on 2 ranks (unequal shards, string labels, a shard missing a
    class, a shard with no rows, balanced class weights, an explicit process_group) end where
    one process ends on the concatenated shards, bitwise the same on both ranks;
    distributed=False fits the local shard (scikit-learn on it)."""
    for r, res in enumerate(_check(ddp_cpu, "distributed_fit")):
        v = res[case]
        if case == "local_when_distributed_false":  # each rank's own shard: its own model
            assert not v["ranks_agree"], f"rank {r}: distributed=False still synchronised"
        else:
            assert v["ranks_agree"], f"rank {r} {case}: models differ across ranks"
        assert v["classes_match"], (r, case, v)
        tol = 1e-5 if case == "local_when_distributed_false" else 1e-6
        assert v["rel_err"] <= tol, f"rank {r} {case}: rel err {v['rel_err']:.3g}"
    if case == "est_multi_strings_missing_class":
        assert res[case]["classes"] == ["a", "b", "c"]


def test_distributed_fit_errors_on_every_rank(ddp_cpu):
    for r, res in enumerate(_check(ddp_cpu, "distributed_fit")):
        e = res["errors"]
        for k in ("estimator", "module"):
            assert "disagree on the number of features" in e[k], (r, k, e[k])
            assert "rank 0: 5, rank 1: 6" in e[k], (r, k, e[k])
        assert "rank 1: ValueError" in e["module_bad_shape_one_rank"] and \
            "must have shape (N, 5)" in e["module_bad_shape_one_rank"], (r, e)


@pytest.mark.parametrize("case", ["est_sgd", "est_adam", "module_sgd_empty_rank",
                                  "module_adam_empty_rank"])
def test_distributed_minibatch_fit(ddp_cpu, case):
    """sgd/adam: every rank takes the same steps (one all-reduce per step), so the ranks end
    bitwise equal, near the L-BFGS optimum on all the data."""
    for r, res in enumerate(_check(ddp_cpu, "distributed_fit")):
        v = res[case]
        assert v["ranks_agree"], f"rank {r} {case}: models differ across ranks"
        # sgd/adam with 256-row batches: as near the L-BFGS optimum as one process gets with
        # the same number of epochs on all the rows
        tol = 1e-10 if case.startswith("module") else max(0.1, 1.5 * v["one_process_rel_err"])
        assert v["rel_err"] <= tol, f"rank {r} {case}: {v}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
def test_fsdp2_cpu_matches_torch_and_single_process(fsdp_cpu, model, dtype):
    _assert_training(fsdp_cpu, model, dtype, "vs_torch_fsdp")
    for v in _check(fsdp_cpu, f"{model}/{dtype}"):
        assert v["param_types"] == ["DTensor"] and v["grad_types"] == ["DTensor"], v


@pytest.mark.slow
def test_fsdp2_kernels_get_plain_tensors(fsdp_cpu):
    """FSDP2 all-gathers before forward: our Functions see plain tensors of the full shape
    (the head's weight (5, 17) whole, though each rank holds a (3, 17) or (2, 17) shard)."""
    for v in _check(fsdp_cpu, "fsdp_inputs_are_plain_tensors"):
        calls = [s for s in v["seen"] if s[0] != "grads"]
        assert {c[0] for c in calls} == {"linear", "linear_ce", "linear_bce"}
        for c in calls:
            # x a Tensor; weight and bias the unsharded nn.Parameters FSDP2 swaps in for the
            # forward (plain tensors of the full shape), never the DTensor shards
            assert c[1] == "Tensor" and c[2] == "Parameter" and \
                c[3] in ("Parameter", "NoneType"), c
        assert {c[4][0] for c in calls if c[0] == "linear_ce"} == {5}
        assert all(s[1:] == ["DTensor"] for s in v["seen"] if s[0] == "grads"), v["seen"]


@pytest.mark.slow
def test_fsdp2_loss_method_needs_registration(fsdp_cpu):
    """Calling LogisticRegression.loss (not forward) on a fully_shard-ed layer sees the sharded
    DTensors and fails exactly as torch's F.linear on them does; with
    register_fsdp_forward_method(clf, "loss") it trains as one process on the whole batch."""
    for v in _check(fsdp_cpu, "fsdp_loss_method"):
        assert "mixed torch.Tensor and DTensor" in v["ours_unregistered"], v
        assert "mixed torch.Tensor and DTensor" in v["torch_F_linear_unregistered"], v
        assert v["registered_vs_single_process"]["rel_err"] <= 1e-10, v


@pytest.mark.slow
def test_fsdp2_mixed_precision_bf16(fsdp_cpu):
    for v in _check(fsdp_cpu, "fsdp_mixed_precision"):
        assert v["ranks_agree"]
        assert v["vs_torch_fsdp"]["rel_err"] <= 2e-2, v


@pytest.mark.slow
def test_fsdp2_full_state_dict_loads_into_plain_model(fsdp_cpu):
    for v in _check(fsdp_cpu, "fsdp_state_dict"):
        for name, c in v.items():
            assert c["keys_match"] and c["plain_tensors"], (name, c)
            assert c["loss_rel_err"] <= 1e-12, (name, c)


def _two_gpus():
    import torch
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2 and \
        torch.distributed.is_nccl_available()


@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs and NCCL")
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_nccl_cuda(tmp_path, kind):
    """The same checks on 2 GPUs over NCCL (TF32 off), float64 and float32."""
    results = _launch(kind, "cuda", tmp_path)
    for model in MODELS:
        for dtype in DTYPES:
            _assert_training(results, model, dtype,
                             "vs_torch_ddp" if kind == "ddp" else "vs_torch_fsdp")
