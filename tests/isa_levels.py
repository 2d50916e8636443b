"""The CPU instruction-set levels of this build and this CPU, shared by the tests that force a
level in a fresh process (tests/paths/test_isa.py, tests/ops/test_ce_soft.py): the levels
compiled, the ones this CPU can run, and the checkout to put on the child's PYTHONPATH."""

import os
import re

import manual_layers as ml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
COMPILED = ml.utils.BUILD_INFO["cpu_isa"].split(",")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^flags\s*:(.*)$", f.read(), re.M)
        return set(m.group(1).split()) if m else set()
    except OSError:
        return set()


_FLAGS = _cpu_flags()
CPU_HAS = {
    "DEFAULT": True,
    "AVX2": {"avx2", "fma", "f16c"} <= _FLAGS,
    "AVX512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"} <= _FLAGS,
}
RUNNABLE = [isa for isa in COMPILED if CPU_HAS.get(isa)]
