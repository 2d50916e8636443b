"""Every public op on every sample of tests/samples.py, three ways: against
manual_layers.reference in float64 (values and gradients, every float dtype), float64 gradcheck,
and torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch)."""

import contextlib

import pytest
import torch

from conftest import DEVICES
from samples import OPS, check_reference, sample_ids, sample_inputs

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CASES = [pytest.param(op, i, id=f"{op}[{desc}]")
         for op in OPS for i, desc in enumerate(sample_ids(op))]


def _sample(op, i, device, dtype):
    return sample_inputs(op, device, dtype, requires_grad=True)[i]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,i", CASES)
def test_matches_reference(op, i, dtype, device):
    """Ours in the sample's dtype against the reference in float64 on the same (rounded)
    inputs (samples.check_reference)."""
    check_reference(_sample(op, i, device, dtype))


@contextlib.contextmanager
def _one_intra_op_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,i", CASES)
def test_gradcheck(op, i, device):
    """float64 gradcheck of the functional call with respect to every input that requires
    grad; the samples marked (big) in fast mode (random projections of the Jacobian).

    On one intra-op thread: the numerical Jacobian calls the op thousands of times on a small
    sample, and with two threads MKL splits each of those tiny GEMMs across them, which costs
    far more than the GEMM (on 2 cores with other work running, milliseconds per call). The
    thread count changes how the work is divided (MKL's blocking, the rows each thread takes),
    not which kernels and paths run; test_matches_reference runs every sample at the default
    thread count."""
    s = _sample(op, i, device, torch.float64)
    inputs = s.grad_inputs()
    with s.environment(), _one_intra_op_thread():
        assert torch.autograd.gradcheck(s.call, tuple(inputs), fast_mode="(big)" in s.desc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,i", CASES)
def test_opcheck(op, i, device):
    """The public op (torch.ops.manual_layers.*) on the sample's float32 inputs, which require
    grad, so opcheck also tests the op's C++ autograd kernel."""
    s = _sample(op, i, device, torch.float32)
    with s.environment():
        torch.library.opcheck(s.public_op(), s.op_args())
