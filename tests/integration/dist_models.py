"""The models and the training loop every rank of tests/integration/test_distributed.py runs:
pairs of identical-start models (manual_layers layers and the same model in torch layers),
the per-rank batches, STEPS steps of SGD with momentum, and the comparisons of the parameters.

The functions take torch and its modules as arguments: this file is imported both by the ranks
(dist_worker.py) and by the test process, which must not import torch.distributed state."""

WORLD = 2
STEPS = 3


def _models(torch, nn, F, ml, D, H, C, dtype):
    """Pairs (ours, torch's) of identical-start models; each model's forward(x, y) returns the
    mean loss, so that DDP/FSDP see the whole computation in forward."""

    class OursMLP(nn.Module):  # Linear+act layers, LogisticRegression as the output layer
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(ml.Linear(D, H, activation="gelu"),
                                     ml.Linear(H, H, activation="silu"),
                                     ml.Linear(H, H, activation="tanh"),
                                     ml.LogisticRegression(H, num_classes=C))

        def forward(self, x, y):
            return F.nll_loss(torch.log(self.net(x)), y)

    class TorchMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, H), nn.SiLU(),
                                     nn.Linear(H, H), nn.Tanh(), nn.Linear(H, C),
                                     nn.Softmax(dim=-1))

        def forward(self, x, y):
            return F.nll_loss(torch.log(self.net(x)), y)

    class OursCE(nn.Module):  # MLP body, fused linear + cross-entropy head
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(ml.Linear(D, H, activation="relu"),
                                      ml.Linear(H, H, activation="gelu_tanh"))
            self.head = nn.Linear(H, C)

        def forward(self, x, y):
            return ml.functional.linear_cross_entropy(self.body(x), self.head.weight,
                                                      self.head.bias, y)

    class TorchCE(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H),
                                      nn.GELU(approximate="tanh"))
            self.head = nn.Linear(H, C)

        def forward(self, x, y):
            return F.cross_entropy(self.head(self.body(x)), y)

    class OursCELoss(nn.Module):  # the LinearCrossEntropyLoss module (class-weight buffer)
        def __init__(self):
            super().__init__()
            self.body = ml.Linear(D, H, activation="sigmoid")
            self.head = ml.Linear(H, C)
            cw = torch.linspace(0.5, 1.5, C, dtype=dtype)
            self.loss_fn = ml.LinearCrossEntropyLoss(weight=cw, label_smoothing=0.1)

        def forward(self, x, y):
            return self.loss_fn(self.body(x), self.head.weight, self.head.bias, y)

    class TorchCELoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(D, H), nn.Sigmoid())
            self.head = nn.Linear(H, C)
            self.register_buffer("cw", torch.linspace(0.5, 1.5, C, dtype=dtype))

        def forward(self, x, y):
            return F.cross_entropy(self.head(self.body(x)), y, weight=self.cw,
                                   label_smoothing=0.1)

    class OursBCE(nn.Module):  # binary LogisticRegression head through its fused loss
        def __init__(self):
            super().__init__()
            self.body = ml.Linear(D, H, activation="relu")
            self.clf = ml.LogisticRegression(H)

        def forward(self, x, y):
            return self.clf.loss(self.body(x), (y % 2).to(x.dtype))

    class TorchBCE(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(D, H), nn.ReLU())
            self.clf = nn.Linear(H, 1)

        def forward(self, x, y):
            return F.binary_cross_entropy_with_logits(self.clf(self.body(x)).squeeze(-1),
                                                      (y % 2).to(x.dtype))

    pairs = {"mlp_logreg_layer": (OursMLP, TorchMLP), "fused_ce_head": (OursCE, TorchCE),
             "ce_loss_module": (OursCELoss, TorchCELoss), "bce_logreg_head": (OursBCE, TorchBCE)}
    out = {}
    for name, (Ours, Torch) in pairs.items():
        torch.manual_seed(0)
        ours = Ours().to(dtype)
        ref = Torch().to(dtype)
        with torch.no_grad():  # same start: ours' parameters into torch's, in order
            po, pt = list(ours.parameters()), list(ref.parameters())
            assert [p.shape for p in po] == [p.shape for p in pt], name
            for a, b in zip(po, pt):
                b.copy_(a)
        out[name] = (ours, ref)
    return out


def _batch(torch, rank, step, n, D, C, dtype, device):
    """Rank `rank`'s batch at `step`: its own shard, seeded by rank and step (every rank can
    regenerate every other rank's batch for the single-process reference)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (n,), generator=g)
    return x.to(device), y.to(device)


def _full(torch, p):
    """A parameter as a plain tensor (DTensor under FSDP2: gathered)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _train(torch, model, params, rank, n, D, C, dtype, device, concat=False, no_sync=None,
           shard_mean=False):
    """STEPS steps of SGD with momentum; rank's own batch, or (concat) all ranks' batches
    concatenated in rank order; or (shard_mean) the mean over ranks of each rank's loss on its
    own batch, which is what DDP's gradient averaging computes. no_sync: a DDP model whose no_sync() makes each step two
    micro-batches (halves of the batch, loss halved) with the first one unsynchronised."""
    opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    for step in range(STEPS):
        if concat:
            xs, ys = zip(*(_batch(torch, r, step, n, D, C, dtype, device) for r in range(WORLD)))
            x, y = torch.cat(xs), torch.cat(ys)
        else:
            x, y = _batch(torch, rank, step, n, D, C, dtype, device)
        opt.zero_grad(set_to_none=True)
        if shard_mean:
            sum(model(*_batch(torch, r, step, n, D, C, dtype, device))
                for r in range(WORLD)).div(WORLD).backward()
        elif no_sync is not None:
            h = n // 2
            with no_sync.no_sync():
                (model(x[:h], y[:h]) * 0.5).backward()
            (model(x[h:], y[h:]) * 0.5).backward()
        else:
            model(x, y).backward()
        opt.step()


def _compare(torch, a_params, b_params):
    """Max relative error over parameters (max |a-b| / max |b| per tensor) and bitwise flag."""
    err, bitwise = 0.0, True
    for a, b in zip(a_params, b_params):
        a, b = _full(torch, a).double().cpu(), _full(torch, b).double().cpu()
        assert a.shape == b.shape
        bitwise &= bool(torch.equal(a, b))
        err = max(err, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return {"rel_err": err, "bitwise": bitwise}


def _same_across_ranks(torch, dist, params):
    """True when every rank holds bitwise the same parameters."""
    flat = torch.cat([_full(torch, p).reshape(-1).double().cpu() for p in params])
    got = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather_object(got, flat)  # object collective: works on gloo and nccl alike
    return all(torch.equal(got[0], g) for g in got)
