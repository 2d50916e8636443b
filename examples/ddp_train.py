"""Data-parallel training of a small manual_layers MLP with DistributedDataParallel (or FSDP2).

    torchrun --nproc-per-node 2 examples/ddp_train.py            # 2 processes on this machine
    torchrun --nproc-per-node 2 examples/ddp_train.py --fsdp     # the same under fully_shard
    python examples/ddp_train.py                                 # one process, no torchrun

gloo on the CPU; NCCL with one GPU per process where CUDA GPUs are visible and the extension
was built with its CUDA kernels. Each rank generates its own shard of a synthetic 10-class
problem (seeded by its rank), so nothing is read from disk. The model is
manual_layers.Linear(+GELU) x 2 and a head trained through the fused linear + cross-entropy
loss (the N x C logits are never stored); the layers need nothing special: DDP all-reduces the
gradients, FSDP2 all-gathers the parameters before each forward and reduce-scatters gradients.
Rank 0 prints the mean loss over all ranks each epoch; at the end every rank checks that its
parameters are bitwise those of rank 0.
"""

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import manual_layers as ml


class MLPClassifier(nn.Module):
    """forward(x, y) returns the mean loss, so that DDP/FSDP see the head's weights used inside
    forward (a wrapped model must do its whole computation in forward)."""

    def __init__(self, d_in, hidden, classes):
        super().__init__()
        self.body = nn.Sequential(ml.Linear(d_in, hidden, activation="gelu"),
                                  ml.Linear(hidden, hidden, activation="gelu"))
        self.head = ml.Linear(hidden, classes)

    def forward(self, x, y):
        return ml.functional.linear_cross_entropy(self.body(x), self.head.weight,
                                                  self.head.bias, y)

    @torch.no_grad()
    def predict(self, x):
        return self.head(self.body(x)).argmax(-1)


def make_shard(rank, n, d_in, classes, device):
    """This rank's data: inputs seeded by rank, labels from one teacher shared by all ranks."""
    teacher = torch.Generator().manual_seed(0)
    w1 = torch.randn(d_in, 64, generator=teacher) / d_in ** 0.5
    w2 = torch.randn(64, classes, generator=teacher) / 8
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n, d_in, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(-1)
    return x.to(device), y.to(device)


def setup():
    """Process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); a one-process group when started without torchrun."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and ml.utils.BUILD_INFO["cuda_compiled"]
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=120))
    return dist.get_rank(), dist.get_world_size(), device


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples-per-rank", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=256, help="per rank")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rank, world, device = setup()
    d_in, classes = 32, 10
    torch.manual_seed(0)  # the same start on every rank (DDP also broadcasts rank 0's)
    model = MLPClassifier(d_in, args.hidden, classes).to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.body:
            fully_shard(layer)
        fully_shard(model)  # the head stays in the root's group: forward uses its weights
        wrapped = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=args.lr)

    # Every rank holds the same number of samples, hence the same number of steps per epoch
    # (DDP and FSDP need every rank in every collective; for uneven shards see
    # torch.distributed.algorithms.Join).
    x, y = make_shard(rank, args.samples_per_rank, d_in, classes, device)
    x_test, y_test = make_shard(10_000 + rank, 2048, d_in, classes, device)
    shuffle = torch.Generator().manual_seed(rank)
    if rank == 0:
        print(f"{world} rank(s), backend {dist.get_backend()}, device {device}, "
              f"{'FSDP2' if args.fsdp else 'DDP'}, {args.samples_per_rank} samples per rank, "
              f"global batch {args.batch_size * world}")
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x), generator=shuffle).to(device)
        total = torch.zeros(2, device=device, dtype=torch.float64)
        for i in range(0, len(x), args.batch_size):
            idx = perm[i:i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = wrapped(x[idx], y[idx])
            loss.backward()  # DDP: gradients all-reduced (averaged) in buckets during backward
            opt.step()
            total += torch.stack([loss.detach().double() * len(idx),
                                  torch.tensor(float(len(idx)), device=device,
                                               dtype=torch.float64)])
        dist.all_reduce(total)  # the mean loss over all ranks' samples
        if args.fsdp:  # unsharded for predict (called outside forward)
            model.unshard()
        correct = torch.tensor([(model.predict(x_test) == y_test).sum().item(), len(y_test)],
                               device=device, dtype=torch.float64)
        if args.fsdp:
            model.reshard()
        dist.all_reduce(correct)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {total[0] / total[1]:.4f}  "
                  f"test accuracy {correct[0] / correct[1]:.3f}  "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)

    # The replicas must be identical: every rank compares its parameters with rank 0's.
    flat = torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([float(torch.equal(flat, ref))], device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"parameters identical on all {world} ranks: {bool(same.item())}")
    dist.barrier()  # no rank tears down its communicator while another still uses it
    dist.destroy_process_group()
    if not same.item():
        raise SystemExit("parameters differ across ranks")


if __name__ == "__main__":
    main()
