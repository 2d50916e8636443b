"""The op layer: autograd registered with the ops in C++ (one dispatcher call forward, one node
backward), torch.export graphs that train, no host synchronisation (CUDA), CUDA-graph capture of
a training step, returned gradients that never alias saved tensors, autocast loss dtype, and the
edge cases of a drop-in layer (meta device, zero in_features, NaN through relu, TorchScript)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manual_layers as ml
from manual_layers import reference as R
from conftest import CUDA, DEVICES, assert_rel

MF = ml.functional
ops = torch.ops.manual_layers
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible: CUDA kernels not exercised")


class Net(nn.Module):
    """An MLP of manual_layers.Linear layers with a fused cross-entropy head (or the same in
    torch layers, torch_layers=True)."""

    def __init__(self, d=12, h=24, c=5, torch_layers=False):
        super().__init__()
        self.torch_layers = torch_layers
        if torch_layers:
            self.body = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, h), nn.ReLU())
        else:
            self.body = nn.Sequential(ml.Linear(d, h, activation="gelu"),
                                      ml.Linear(h, h, activation="relu"))
        self.head = nn.Linear(h, c)

    def forward(self, x, y):
        h = self.body(x)
        if self.torch_layers:
            return F.cross_entropy(self.head(h), y, label_smoothing=0.05)
        return MF.linear_cross_entropy(h, self.head.weight, self.head.bias, y,
                                       label_smoothing=0.05)


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model(x, y)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


def _torch_twin(net):
    """The same model in torch layers (nn.Sequential numbers the activation modules too)."""
    twin = Net(torch_layers=True)
    sd = {k.replace("body.1.", "body.2."): v for k, v in net.state_dict().items()}
    twin.load_state_dict(sd)
    return twin


def test_one_node_per_op():
    x = torch.randn(6, 12, requires_grad=True)
    w = torch.randn(5, 12, requires_grad=True)
    y = MF.linear(x, w, None, "gelu")
    assert "LinearFn" in y.grad_fn.name()
    t = torch.randint(0, 5, (6,))
    loss = MF.linear_cross_entropy(x, w, None, t)
    assert "CeFn" in loss.grad_fn.name()
    loss = MF.linear_binary_cross_entropy_with_logits(x, w[:1], None, torch.rand(6))
    assert "BceFn" in loss.grad_fn.name()


def test_export_trains_in_grad_mode(tmp_path):
    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(32, 12), torch.randint(0, 5, (32,))
    ep = torch.export.export(net, (x, y))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.linear.default in targets and ops.linear_ce.default in targets
    expected = _loss_and_grads(_torch_twin(net), x, y)
    eager = _loss_and_grads(net, x, y)
    for a, e in zip(eager, expected):
        assert_rel(a, e, 1e-5)

    def run_exported(module):
        # The exported module holds its own copies of the parameters.
        params = dict(module.named_parameters())
        for p in params.values():
            p.grad = None
        loss = module(x, y)
        loss.backward()
        names = [n for n, _ in net.named_parameters()]
        return [loss.detach()] + [params[n].grad for n in names]

    got = run_exported(ep.module())
    for a, e in zip(got, expected):
        assert_rel(a, e, 1e-5)
    path = tmp_path / "net.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path))
    for a, e in zip(run_exported(loaded.module()), expected):
        assert_rel(a, e, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_returned_gradients_do_not_alias_the_graph(loss, reduction):
    """Modify a gradient from autograd.grad(..., retain_graph=True) in place, call
    autograd.grad again: the same answer as the first time (and as torch)."""
    x = torch.randn(20, 6, requires_grad=True)
    if loss == "bce":
        w = torch.randn(1, 6, requires_grad=True)
        b = torch.randn(1, requires_grad=True)
        out = MF.linear_binary_cross_entropy_with_logits(x, w, b, torch.rand(20),
                                                         reduction=reduction)
    else:
        w = torch.randn(4, 6, requires_grad=True)
        b = torch.randn(4, requires_grad=True)
        out = MF.linear_cross_entropy(x, w, b, torch.randint(0, 4, (20,)), reduction=reduction)
    out = out.sum() if reduction == "none" else out
    first = torch.autograd.grad(out, (x, w, b), retain_graph=True)
    kept = [g.clone() for g in first]
    for g in first:
        g.mul_(-7.0).add_(3.0)
    second = torch.autograd.grad(out, (x, w, b), retain_graph=True)
    for a, e in zip(second, kept):
        assert torch.equal(a, e)
    # And a grad_output other than 1 after that.
    third = torch.autograd.grad(out * 2.5, (x, w, b))
    for a, e in zip(third, kept):
        assert_rel(a, 2.5 * e, 1e-6)


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_autocast_loss_is_float32_and_as_accurate_as_torch(loss):
    torch.manual_seed(3)
    N, D, C = 512, 64, 10
    x = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(1 if loss == "bce" else C, D) / 8).requires_grad_()
    b = torch.randn(w.shape[0], requires_grad=True)
    tgt = torch.rand(N) if loss == "bce" else torch.randint(0, C, (N,))
    ours_fn = MF.linear_binary_cross_entropy_with_logits if loss == "bce" else \
        MF.linear_cross_entropy
    ref_fn = R.linear_binary_cross_entropy_with_logits if loss == "bce" else \
        R.linear_cross_entropy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ours_fn(x, w, b, tgt)
        theirs = ref_fn(x, w, b, tgt)
    assert ours.dtype == theirs.dtype == torch.float32
    exact = ref_fn(x.double(), w.double(), b.double(), tgt.double() if loss == "bce" else tgt)
    err_ours = abs(ours.double() - exact).item() / abs(exact).item()
    err_torch = abs(theirs.double() - exact).item() / abs(exact).item()
    assert err_ours <= max(2 * err_torch, 1e-4), (err_ours, err_torch)
    gx, gw = torch.autograd.grad(ours, (x, w))
    assert gx.dtype == gw.dtype == torch.float32  # the parameters' dtype, through the casts


def test_meta_device():
    layer = ml.Linear(4, 3, activation="gelu", device="meta")
    y = layer(torch.randn(2, 5, 4, device="meta"))
    assert y.shape == (2, 5, 3) and y.device.type == "meta"
    loss = MF.linear_cross_entropy(torch.randn(7, 4, device="meta"), layer.weight, layer.bias,
                                   torch.zeros(7, dtype=torch.long, device="meta"))
    assert loss.shape == () and loss.device.type == "meta"


@pytest.mark.parametrize("device", DEVICES)
def test_zero_in_features_any_leading_dims(device):
    w = torch.randn(5, 0, device=device)
    b = torch.randn(5, device=device)
    x = torch.randn(2, 3, 0, device=device)
    for act in (None, "gelu"):
        assert_rel(MF.linear(x, w, b, act), R.linear(x, w, b, act), 1e-6)
    assert torch.equal(MF.linear(x, w), torch.zeros(2, 3, 5, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_relu_gradient_passes_through_nan(device):
    x = torch.tensor([[float("nan"), 1.0], [2.0, -3.0]], device=device, requires_grad=True)
    w = torch.eye(2, device=device, requires_grad=True)
    g = torch.ones(2, 2, device=device)
    (gx,) = torch.autograd.grad(MF.linear(x, w, None, "relu"), x, g)
    xr = x.detach().requires_grad_()
    (ex,) = torch.autograd.grad(F.relu(F.linear(xr, w)), xr, g)
    assert torch.equal(gx.isnan(), ex.isnan())
    assert torch.equal(gx.nan_to_num(), ex.nan_to_num())


def test_torchscript_says_unsupported():
    with pytest.raises(RuntimeError, match=r"torch.jit.script.*not supported.*torch.compile"):
        torch.jit.script(ml.Linear(3, 2))


def test_bad_ignore_index_and_label_smoothing_types():
    x, W = torch.randn(4, 3), torch.randn(2, 3)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match=r"ignore_index must be an integer, got float 2.7"):
        MF.linear_cross_entropy(x, W, None, t, ignore_index=2.7)
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64"):
        MF.linear_cross_entropy(x, W, None, t, ignore_index=2 ** 70)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        MF.linear([[1.0, 2.0, 3.0]], W)
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor, got list"):
        MF.linear(x, [[1.0, 2.0, 3.0]])


# ---- CUDA: no host synchronisation, CUDA graphs -----------------------------------------------
@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_host_sync_forward_backward(reduction):
    dev = "cuda"
    x = torch.randn(300, 40, device=dev, requires_grad=True)
    cases = [
        (MF.linear_binary_cross_entropy_with_logits, torch.randn(1, 40, device=dev),
         torch.rand(300, device=dev), {}),
        (MF.linear_binary_cross_entropy_with_logits, torch.randn(1, 40, device=dev),
         torch.rand(300, device=dev), {"pos_weight": torch.tensor([2.0], device=dev),
                                       "sample_weight": torch.rand(300, device=dev)}),
        (MF.linear_cross_entropy, torch.randn(7, 40, device=dev),
         torch.randint(0, 7, (300,), device=dev), {"label_smoothing": 0.1}),
        (MF.linear_cross_entropy, torch.randn(100, 40, device=dev),  # GEMM path
         torch.randint(0, 100, (300,), device=dev), {"class_weight": torch.rand(100, device=dev)}),
    ]
    torch.cuda.synchronize()
    for fn, w, t, kw in cases:
        w.requires_grad_()
        b = torch.randn(w.shape[0], device=dev, requires_grad=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = fn(x, w, b, t, reduction=reduction, **kw)
            loss = loss.sum() if reduction == "none" else loss
            loss.backward()
            layer_out = MF.linear(x, w, b, "gelu")
            layer_out.backward(torch.ones_like(layer_out))
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("ce_path", ["single", "chunked"])
def test_cuda_graph_training_step_matches_eager(ce_path, monkeypatch):
    """Both cross-entropy paths (the chunked one is CUDA's default from 32 MiB of x) run without
    a host sync, so a whole step can be captured."""
    monkeypatch.setenv("MANUAL_LAYERS_CE_PATH", ce_path)
    torch.manual_seed(0)
    dev = "cuda"
    net = Net().to(dev)
    twin = copy.deepcopy(net)
    x, y = torch.randn(64, 12, device=dev), torch.randint(0, 5, (64,), device=dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)

    # Warm up on a side stream, as torch.cuda.graphs requires, then capture one step.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            net(x, y).backward()
    torch.cuda.current_stream().wait_stream(s)
    # The warm-up did not step: both models still hold the initial parameters.
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = net(x, y)
        static_loss.backward()
        opt.step()
    # Capture records the step without running it.
    for _ in range(20):
        graph.replay()
    for _ in range(20):
        opt_twin.zero_grad(set_to_none=True)
        twin(x, y).backward()
        opt_twin.step()
    torch.cuda.synchronize()
    for (n, p), q in zip(net.named_parameters(), twin.parameters()):
        assert_rel(p, q, 1e-5, n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [33, 65, 129, 300])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_one_class(dtype, D, reduction, monkeypatch):
    """C = 1 cross entropy (every loss 0, every gradient 0, as F.cross_entropy) on every CPU: the
    binary pass's short tiles are never picked for it, whatever the CPU or a forced tile."""
    for tile in (None, "4", "8,noprefetch"):
        if tile is None:
            monkeypatch.delenv("MANUAL_LAYERS_CPU_BINARY_TILE", raising=False)
        else:
            monkeypatch.setenv("MANUAL_LAYERS_CPU_BINARY_TILE", tile)
        x = torch.randn(37, D, dtype=dtype, requires_grad=True)
        w = torch.randn(1, D, dtype=dtype, requires_grad=True)
        t = torch.zeros(37, dtype=torch.long)
        loss = MF.linear_cross_entropy(x, w, None, t, reduction=reduction)
        ref = R.linear_cross_entropy(x, w, None, t, reduction=reduction)
        assert_rel(loss, ref, 1e-2, "loss")
        g = torch.randn_like(loss)
        gx, gw = torch.autograd.grad(loss, (x, w), g)
        rx, rw = torch.autograd.grad(ref, (x, w), g)
        assert_rel(gx, rx, 1e-2, "grad x")
        assert_rel(gw, rw, 1e-2, "grad w")


@pytest.mark.parametrize("make", [lambda: ml.MLP(4, 8, 2), lambda: ml.LogisticRegression(3),
                                  lambda: ml.Linear(4, 2, activation="gelu"),
                                  lambda: ml.LinearCrossEntropyLoss(),
                                  lambda: ml.LinearBCEWithLogitsLoss()])
def test_torchscript_says_what_to_use(make):
    with pytest.raises(RuntimeError, match="torch.jit.script is not supported.*torch.compile"):
        torch.jit.script(make())


def test_repr_names_the_package():
    assert repr(ml.Linear(4, 2)).startswith("manual_layers.Linear(")
    assert repr(ml.Linear(4, 2, activation="gelu")).startswith("manual_layers.FusedLinear(")
    assert repr(ml.MLP(4, 8, 2)).startswith("manual_layers.MLP(")
    assert repr(ml.LogisticRegression(3)).startswith("manual_layers.LogisticRegression(")
