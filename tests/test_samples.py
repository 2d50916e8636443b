"""Every public op on every sample of tests/samples.py, three ways: against
manual_layers.reference in float64 (values and gradients, every float dtype), float64 gradcheck,
and torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch)."""

import pytest
import torch

from conftest import DEVICES, TOL, assert_rel
from samples import OPS, sample_ids, sample_inputs

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CASES = [pytest.param(op, i, id=f"{op}[{desc}]")
         for op in OPS for i, desc in enumerate(sample_ids(op))]


def _sample(op, i, device, dtype):
    return sample_inputs(op, device, dtype, requires_grad=True)[i]


def _grad_output(out):
    """grad_output: random (and not all ones) for tensors, 2.5 for a scalar loss."""
    if out.dim() == 0:
        return torch.full_like(out, 2.5)
    return torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)


def _value_and_grads(out, leaves, g):
    return [out] + list(torch.autograd.grad(out, leaves, g)) if leaves else [out]


def _rel_err(a, e):
    a, e = a.detach().double(), e.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item() if e.numel() else 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,i", CASES)
def test_matches_reference(op, i, dtype, device):
    """Ours in the sample's dtype against the reference in float64 on the same (rounded)
    inputs. In 16-bit the bar is the dtype's tolerance or, if larger, 1.5x the error of the
    plain PyTorch composition run in that dtype on the same inputs."""
    s = _sample(op, i, device, dtype)
    leaves = s.grad_inputs()
    with s.environment():
        out = s.call()
    assert out.dtype == dtype, f"{s}: output dtype {out.dtype}"
    g = _grad_output(out)
    ours = _value_and_grads(out, leaves, g)
    ref_out, ref_leaves = s.reference(torch.float64)
    ref = _value_and_grads(ref_out, ref_leaves, g.double())
    low = dtype in (torch.float16, torch.bfloat16)
    same = _value_and_grads(*s.reference(None), g) if low else [None] * len(ref)
    names = ["output"] + [f"grad of input {k}" for k in range(len(leaves))]
    for name, a, e, t in zip(names, ours, ref, same):
        assert a.dtype == dtype and a.shape == e.shape, f"{s} {name}: {a.dtype} {a.shape}"
        bar = max(TOL[dtype], 1.5 * _rel_err(t, e)) if low else TOL[dtype]
        assert_rel(a, e, bar, f"{s} {name} ({dtype})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,i", CASES)
def test_gradcheck(op, i, device):
    """float64 gradcheck of the functional call with respect to every input that requires
    grad; the samples marked (big) in fast mode (random projections of the Jacobian)."""
    s = _sample(op, i, device, torch.float64)
    inputs = s.grad_inputs()
    with s.environment():
        assert torch.autograd.gradcheck(s.call, tuple(inputs), fast_mode="(big)" in s.desc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,i", CASES)
def test_opcheck(op, i, device):
    """The public op (torch.ops.manual_layers.*) on the sample's float32 inputs, which require
    grad, so opcheck also tests the op's C++ autograd kernel."""
    s = _sample(op, i, device, torch.float32)
    with s.environment():
        torch.library.opcheck(s.public_op(), s.op_args())
