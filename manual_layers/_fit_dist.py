"""Data parallelism of the logistic-regression fit (manual_layers/_fit.py): which process group
a fit runs over, the one agreement of every rank's checks, n_features and labels before the
solver, and the collectives of the solver (_Comm)."""

import numpy as np
import torch

__all__ = ["resolve_process_group", "agree_across_ranks"]


def resolve_process_group(distributed, process_group, caller):
    """The process group a fit is data-parallel over, or None for a local fit.

    A fit is data-parallel only when asked: process_group= given (that group), or
    distributed=True (the default group, which must be initialised; also with one rank).
    distributed=False (the default) with no process_group is a local fit whatever is
    initialised: an initialised default group (torchrun) never makes a fit wait on other ranks.
    distributed="auto" (the old default, data-parallel whenever a default group existed) is
    refused, since it silently counted each rank's rows in every rank's model."""
    if isinstance(distributed, str) and distributed == "auto":
        raise ValueError(f"{caller}: distributed='auto' was removed: a fit is data-parallel "
                         f"only when asked; pass distributed=True (the default process group) "
                         f"or process_group=, or leave distributed=False for a local fit")
    if not (distributed is True or distributed is False):
        raise ValueError(f"{caller}: distributed must be True or False, got {distributed!r}")
    if process_group is None and distributed is False:
        return None
    import torch.distributed as dist
    if not dist.is_available():
        raise ValueError(f"{caller}: distributed=True or process_group= needs "
                         f"torch.distributed, which this torch build lacks")
    if process_group is None:
        if not dist.is_initialized():
            raise ValueError(f"{caller}: distributed=True needs an initialised default "
                             f"process group (torch.distributed.init_process_group) or "
                             f"process_group=")
        process_group = dist.group.WORLD
    return process_group


class _Comm:
    """The collectives of a data-parallel fit over `group`; tensors reduce on X's device under
    NCCL (CUDA), on the CPU otherwise (gloo)."""

    def __init__(self, group, device):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            self.device = device if device.type == "cuda" else \
                torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.n_allreduce, self.bytes = 0, 0

    def all_reduce(self, t):
        """SUM over ranks of a float64 tensor (any device); returns it on self.device."""
        t = t.to(device=self.device, dtype=torch.float64).contiguous()
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)
        self.n_allreduce += 1
        self.bytes += t.numel() * t.element_size()
        return t

    def broadcast_np(self, a):
        """Rank 0's float64 numpy vector, on every rank."""
        t = torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64)).to(self.device)
        self.dist.broadcast(t, src=self.dist.get_global_rank(self.group, 0), group=self.group)
        return t.cpu().numpy()


def agree_across_ranks(group, caller, error, n_features, local_classes):
    """One all_gather_object of every rank's (validation error text or None, n_features, local
    label set). Raises ValueError on EVERY rank when any rank's local checks failed or the ranks
    disagree on n_features (rather than leaving the others waiting in a collective); returns the
    sorted union of the label sets (numpy), the same on every rank. Labels may be numbers or
    strings (any picklable, mutually sortable values)."""
    import torch.distributed as dist
    world = dist.get_world_size(group)
    err = None if error is None else f"{type(error).__name__}: {error}"
    lc = None if local_classes is None else np.asarray(local_classes)
    got = [None] * world
    dist.all_gather_object(got, (err, None if n_features is None else int(n_features), lc),
                           group=group)
    errs = [f"rank {r}: {e}" for r, (e, _, _) in enumerate(got) if e is not None]
    if errs:
        raise ValueError(f"{caller} (data-parallel over {world} ranks): a rank's data failed "
                         f"its checks; " + "; ".join(errs))
    ds = [d for _, d, _ in got]
    if len(set(ds)) > 1:
        raise ValueError(f"{caller} (data-parallel over {world} ranks): the ranks disagree on "
                         f"the number of features (in_features): " +
                         ", ".join(f"rank {r}: {d}" for r, d in enumerate(ds)))
    parts = [c for _, _, c in got if c is not None and len(c)]
    if not parts:
        return np.array([])
    if any(p.dtype.kind in "OUS" for p in parts) and not all(p.dtype.kind in "OUS"
                                                             for p in parts):
        parts = [p.astype(object) for p in parts]
    return np.unique(np.concatenate(parts))
