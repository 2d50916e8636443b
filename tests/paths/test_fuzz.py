"""Random samples of every public op (tests/samples.py: random_sample) against
manual_layers.reference in float64: shapes on both sides of every kernel boundary (tiles, vector
widths, the CUDA kernels' chunk and warp counts, the cross-entropy paths' class limits), every
float dtype, 1-D to 3-D and strided x, biases, every loss option and reduction, the chunked
cross entropy forced with small chunks. Each case is drawn from its seed alone, so a failure
names the seed that reproduces it:

    MANUAL_LAYERS_FUZZ_CASES=2000 MANUAL_LAYERS_FUZZ_SEED=1 pytest tests/paths/test_fuzz.py

runs 2000 cases per op from seed 1 on (default: 100 per op from seed 0, on every device; the
first FAST_CASES of them run in `make test`, the others are marked slow: `make test-all`). The
bar is samples.FUZZ_TOL (fp32 1e-3, bf16 0.25), raised where the grad_output's signs make the
result cancel: random shapes include ill-conditioned results where any computation in the dtype
misses the tight tolerance of the fixed samples, and the bugs this test is for (indexing, tiles,
paths) give errors of order 1."""

import os

import pytest

from conftest import DEVICES
from samples import OPS, check_reference, random_sample

CASES = int(os.environ.get("MANUAL_LAYERS_FUZZ_CASES", "100"))
FIRST = int(os.environ.get("MANUAL_LAYERS_FUZZ_SEED", "0"))
FAST_CASES = 20  # per op: the random repeats past these add coverage by count, not by path
SEEDS = [pytest.param(s, marks=[pytest.mark.slow] if s >= FIRST + FAST_CASES else [])
         for s in range(FIRST, FIRST + CASES)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("op", OPS)
def test_random_sample_matches_reference(op, seed, device):
    s = random_sample(op, device, seed)
    print(s)  # shown with the failure
    check_reference(s, fuzz=True)
