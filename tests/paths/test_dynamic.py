"""Symbolic sizes and autocast at the op: torch.export with dynamic batch and sequence dimensions
exports once and runs at other sizes; torch.compile(dynamic=True, fullgraph=True) compiles once
for 12 batch sizes; autocast applies to direct torch.ops calls and inside exported graphs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import manual_layers as ml
from manual_layers import reference as R

ops = torch.ops.manual_layers
MF = ml.functional


class Head(nn.Module):
    """Linear + GELU, an MLP, and a fused cross-entropy head: every public op."""

    def __init__(self, d=12, h=16, c=5):
        super().__init__()
        self.body = ml.Linear(d, h, activation="gelu")
        self.mlp = ml.MLP(h, 2 * h, h, activation="silu")
        self.head = nn.Linear(h, c)
        self.bin = nn.Linear(h, 1)

    def forward(self, x, y, t):
        z = self.mlp(self.body(x))
        ce = MF.linear_cross_entropy(z, self.head.weight, self.head.bias, y, label_smoothing=0.1)
        bce = MF.linear_binary_cross_entropy_with_logits(z, self.bin.weight, self.bin.bias, t)
        return ce + bce


def _reference(model, x, y, t):
    z = model.body(x)
    z = model.mlp[2](F.silu(model.mlp[0](z)))
    ce = R.linear_cross_entropy(z, model.head.weight, model.head.bias, y, label_smoothing=0.1)
    bce = R.linear_binary_cross_entropy_with_logits(z, model.bin.weight, model.bin.bias, t)
    return ce + bce


def _inputs(*lead, d=12, c=5):
    return torch.randn(*lead, d), torch.randint(0, c, lead), torch.rand(*lead)


def test_export_dynamic_batch_and_sequence_runs_at_other_sizes():
    torch.manual_seed(0)
    model = Head()
    B, T = Dim("B", min=2, max=1024), Dim("T", min=2, max=1024)
    dyn = {"x": {0: B, 1: T}, "y": {0: B, 1: T}, "t": {0: B, 1: T}}
    ep = torch.export.export(model, _inputs(4, 7), dynamic_shapes=dyn)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert {ops.linear.default, ops.mlp.default, ops.linear_ce.default,
            ops.linear_bce.default} <= targets
    for lead in ((3, 5), (9, 2), (16, 31)):
        args = _inputs(*lead)
        torch.testing.assert_close(ep.module()(*args), _reference(model, *args))


def test_export_dynamic_batch_trains():
    torch.manual_seed(1)
    model = Head()
    ep = torch.export.export(model, _inputs(8), dynamic_shapes={"x": {0: Dim("B")},
                                                               "y": {0: Dim("B")},
                                                               "t": {0: Dim("B")}})
    m = ep.module()
    args = _inputs(21)
    loss = m(*args)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    ref = Head()
    ref.load_state_dict(model.state_dict())
    _reference(ref, *args).backward()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_compile_dynamic_once_for_twelve_batch_sizes():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = Head()
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for n in (2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377):
        args = _inputs(n)
        loss = step(*args)
        loss.backward()
        torch.testing.assert_close(loss, _reference(model, *args))
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    torch._dynamo.reset()


# ---- autocast at the op --------------------------------------------------------------------

def test_autocast_direct_op_calls():
    torch.manual_seed(3)
    x, w, b = torch.randn(6, 8), torch.randn(4, 8), torch.randn(4)
    t = torch.randint(0, 4, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear(x, w, b, "gelu")
        y_ref = F.gelu(F.linear(x, w, b))
        loss = ops.linear_ce(x, w, b, t)
        loss_ref = F.cross_entropy(F.linear(x, w, b), t)
        bce = ops.linear_bce(x, w[:1], b[:1], torch.rand(6))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    assert loss.dtype == loss_ref.dtype == torch.float32
    assert bce.dtype == torch.float32
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    # the loss is not rounded to bfloat16 on its way to float32
    exact = F.cross_entropy(F.linear(x.bfloat16().float(), w.bfloat16().float(),
                                     b.bfloat16().float()), t)
    torch.testing.assert_close(loss, exact, rtol=1e-5, atol=1e-6)


def test_autocast_float64_untouched_and_explicit_dtype():
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.linear(x, w, None, "none").dtype == torch.float64
        assert ops.linear_ce(x, w, None, torch.tensor([0, 1, 1])).dtype == torch.float64
    xb, wb = x.bfloat16(), w.bfloat16()
    loss = ops.linear_ce(xb, wb, None, torch.tensor([0, 1, 1]), dtype=torch.float32)
    assert loss.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        ops.linear_ce(xb, wb, None, torch.tensor([0, 1, 1]), dtype=torch.int64)


class Amp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = ml.Linear(8, 4, activation="relu")

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.fc(x)


def test_autocast_inside_an_exported_graph():
    torch.manual_seed(4)
    model = Amp()
    x = torch.randn(5, 8)
    ep = torch.export.export(model, (x,))
    out = ep.module()(torch.randn(5, 8))
    assert out.dtype == torch.bfloat16
    x2 = torch.randn(5, 8)
    torch.testing.assert_close(ep.module()(x2), model(x2))
