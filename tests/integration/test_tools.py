"""Tools that special-case nn.Linear, on a converted 3-layer MLP, against the same tool on the
torch model: PEFT's LoRA, Opacus's per-sample gradients, DTensor tensor parallelism, and
torch.ao dynamic quantization. Each gives the torch model's result or refuses clearly."""

import copy
import socket

import pytest
import torch
from torch import nn

import manual_layers as ml

DT = torch.float64


def _torch_mlp3(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4)).double()


def _torch_block(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).double()


# ---- PEFT (LoRA) ------------------------------------------------------------------------------

def _peft():
    return pytest.importorskip("peft")


def _lora(model, targets):
    p = _peft()
    cfg = p.LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)
    torch.manual_seed(123)  # the same random LoRA weights for both models
    return p.get_peft_model(model, cfg)


def test_lora_on_converted_mlp_block_equals_torch():
    """convert() turns the block into an ml.MLP of nn.Linear layers; LoRA wraps them and the MLP
    runs the wrapped layers instead of its fused op."""
    x = torch.randn(5, 8, dtype=DT)
    ref = _lora(_torch_block(), ["0", "2"])
    ours = _lora(ml.convert(_torch_block()), ["0", "2"])
    assert isinstance(ours.base_model.model, ml.MLP)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_lora_on_unfused_linear_equals_torch():
    x = torch.randn(5, 8, dtype=DT)
    ref = _lora(_torch_mlp3(), ["0", "2", "4"])
    ours = _lora(ml.convert(_torch_mlp3(), fuse=False), ["0", "2", "4"])
    assert type(ours.base_model.model[0].base_layer) is ml.Linear
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_lora_refuses_a_fused_linear():
    """A FusedLinear is not an nn.Linear: LoRA's update would land after the activation, so PEFT
    refuses it with its own error instead of computing something else."""
    model = ml.convert(_torch_mlp3())
    assert type(model[0]) is ml.FusedLinear
    with pytest.raises(ValueError, match="not supported"):
        _lora(model, ["0"])


# ---- Opacus -------------------------------------------------------------------------------------

def _grad_samples(model, x, y):
    opacus = pytest.importorskip("opacus")
    gsm = opacus.GradSampleModule(model)
    loss = nn.functional.cross_entropy(gsm(x), y, reduction="sum")
    loss.backward()
    return {n: p.grad_sample for n, p in gsm.named_parameters()}


@pytest.mark.parametrize("fuse", [True, False])
def test_opacus_per_sample_gradients_equal_torch(fuse):
    torch.manual_seed(1)
    x, y = torch.randn(6, 8, dtype=DT), torch.randint(0, 4, (6,))
    ref = _grad_samples(_torch_mlp3(), x, y)
    got = _grad_samples(ml.convert(_torch_mlp3(), fuse=fuse), x, y)
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k] is not None, f"{k}: no per-sample gradient"
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)


def test_opacus_on_converted_block():
    torch.manual_seed(2)
    x, y = torch.randn(6, 8, dtype=DT), torch.randint(0, 4, (6,))
    ref = _grad_samples(_torch_block(), x, y)
    got = _grad_samples(ml.convert(_torch_block()), x, y)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)


# ---- tensor parallelism (DTensor), one process ----------------------------------------------

@pytest.fixture(scope="module")
def mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def _tp(model, mesh):
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


@pytest.mark.parametrize("fuse", [True, False])
def test_tensor_parallel_equals_torch(mesh, fuse):
    x = torch.randn(5, 8, dtype=DT)
    ref = _tp(_torch_block(), mesh)
    ours = _tp(ml.convert(_torch_block(), fuse=fuse), mesh)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    ours(x).sum().backward()
    ref(x).sum().backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad.full_tensor(), rtol=1e-10,
                                   atol=1e-12, msg=n)


def test_tensor_parallel_refuses_a_fused_linear(mesh):
    model = ml.convert(_torch_mlp3())
    with pytest.raises(NotImplementedError, match="nn.Linear"):
        _tp(model, mesh)


# ---- dynamic quantization ----------------------------------------------------------------------

def test_quantize_then_convert_equals_torch():
    """torch.ao.quantization.quantize_dynamic matches modules by their exact type, so it would
    leave manual_layers layers in floating point without a word; quantize first, then convert:
    convert() leaves the quantized layers alone."""
    from torch.ao.quantization import quantize_dynamic
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    ref = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    ours = ml.convert(quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8))
    torch.testing.assert_close(ours(x), ref(x))
