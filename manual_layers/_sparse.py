"""Sparse X for the logistic-regression fit: a CSR container, intake of scipy.sparse matrices and
torch sparse tensors, and the sparse loss+gradient op's CUDA composite.

The fit engine (manual_layers/_fit.py) takes a `CSR` wherever it takes a dense X: it has the
shape, dtype and device a dense X has, row selection for the mini-batch solvers, and
`_fit_objective._loss_and_grads` sends it to torch.ops.manual_layers._sparse_linear_loss_fwd
(contract in csrc/contracts/sparse.h): on the CPU one fused pass over the non-zeros
(csrc/cpu/kernels/sparse.cpp), on CUDA the composite below. X is never densified; its index and
value arrays are read in place (scipy's int32 or int64 indices as they are, read-only /
memory-mapped arrays included); only a CSC (or COO, ...) matrix is converted to CSR, once, and
values of another dtype than the fit's are cast (a copy of the values only).
"""

import sys
import warnings

import numpy as np
import torch

__all__ = ["CSR", "is_sparse", "to_csr", "torch_to_scipy", "loss_and_grads", "logits"]

_TORCH_SPARSE = (torch.sparse_csr, torch.sparse_csc, torch.sparse_coo, torch.sparse_bsr,
                 torch.sparse_bsc)


class CSR:
    """A CSR matrix (N, D) as three 1-D tensors on one device: crow (N + 1,) and col (nnz,) of
    one integer dtype (int32 or int64), values (nnz,) floating. Duplicate column indices in a row
    are summed (scipy's meaning); unsorted columns are fine."""

    is_sparse = True

    def __init__(self, crow, col, values, shape):
        self.crow, self.col, self.values = crow, col, values
        self.shape = (int(shape[0]), int(shape[1]))

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def device(self):
        return self.values.device

    @property
    def nnz(self):
        return int(self.values.shape[0])

    def dim(self):
        return 2

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return (f"CSR(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, "
                f"index={self.col.dtype}, device={self.device})")

    def to(self, device=None, dtype=None):
        """The same matrix on `device` with values of `dtype` (no copy when both already are)."""
        values = self.values.to(device=device, dtype=dtype)
        crow, col = self.crow.to(device=device), self.col.to(device=device)
        if values is self.values and crow is self.crow and col is self.col:
            return self
        return CSR(crow, col, values, self.shape)

    def __getitem__(self, rows):
        """The rows `rows` (an integer index tensor, any order, repeats allowed) as a new CSR:
        the mini-batches of the sgd/adam solvers."""
        rows = torch.as_tensor(rows, device=self.device).long().reshape(-1)
        crow = self.crow.long()
        starts, ends = crow[rows], crow[rows + 1]
        lengths = ends - starts
        new_crow = torch.zeros(rows.numel() + 1, dtype=torch.long, device=self.device)
        torch.cumsum(lengths, 0, out=new_crow[1:])
        # entry k of the result: starts[row(k)] + (k - new_crow[row(k)])
        row_of = torch.repeat_interleave(torch.arange(rows.numel(), device=self.device),
                                         lengths)
        src = starts[row_of] + (torch.arange(row_of.numel(), device=self.device) -
                                new_crow[:-1][row_of])
        return CSR(new_crow.to(self.col.dtype), self.col[src], self.values[src],
                   (rows.numel(), self.shape[1]))

    def torch_sparse(self):
        """The matrix as a torch.sparse_csr tensor sharing these arrays (for ATen's sparse ops)."""
        crow, col = self.crow, self.col
        if crow.dtype != col.dtype:
            crow = crow.to(col.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "beta", "invariant checks disabled"
            return torch.sparse_csr_tensor(crow, col, self.values, self.shape,
                                           check_invariants=False)


def is_sparse(X):
    """Whether X is a scipy.sparse matrix / array or a torch sparse tensor (or a CSR)."""
    if isinstance(X, CSR):
        return True
    if isinstance(X, torch.Tensor):
        return X.layout in _TORCH_SPARSE
    sp = sys.modules.get("scipy.sparse")  # a scipy matrix means scipy.sparse is imported
    return sp is not None and sp.issparse(X)


def _from_numpy(a):
    """A tensor sharing a's memory; read-only arrays (memory maps) too: the kernels only read."""
    if not a.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
            return torch.from_numpy(a)
    return torch.from_numpy(a)


def to_csr(X, device=None, dtype=None, fn="LogisticRegression.fit"):
    """X (scipy.sparse matrix or array of any format, torch sparse tensor, or CSR) as a CSR on
    `device` (default: X's) with values of `dtype` (default: X's floating dtype, float64 for
    integer values). CSR input is read in place; CSC and other formats are converted to CSR once
    (a copy: CSR is the layout the kernels read). Raises ValueError naming X when it is not 2-D
    or holds NaN or infinity, TypeError for non-numeric values."""
    if isinstance(X, CSR):
        csr = X
    elif isinstance(X, torch.Tensor):
        if X.dim() != 2:
            raise ValueError(f"{fn}: X must be a 2-D sparse matrix (N, n_features), got a "
                             f"{X.dim()}-D {X.layout} tensor of shape {tuple(X.shape)}")
        t = X.detach()
        if t.layout != torch.sparse_csr:
            t = t.to_sparse_csr()  # CSC, COO, BSR, BSC: converted once
        csr = CSR(t.crow_indices(), t.col_indices(), t.values(), t.shape)
    else:
        import scipy.sparse as sp
        if X.ndim != 2:
            raise ValueError(f"{fn}: X must be a 2-D sparse matrix, got shape {X.shape}")
        if X.format != "csr":
            X = X.tocsr()  # CSC, COO, LIL, ...: converted to CSR once (a copy)
        elif not isinstance(X, (sp.csr_matrix, sp.csr_array)):
            X = sp.csr_matrix(X)
        csr = CSR(_from_numpy(np.asarray(X.indptr)), _from_numpy(np.asarray(X.indices)),
                  _from_numpy(np.asarray(X.data)), X.shape)
    v = csr.values
    if v.dtype.is_complex:
        raise TypeError(f"{fn}: X must hold real numbers, got values of dtype {v.dtype}")
    if dtype is None:
        dtype = v.dtype if v.dtype.is_floating_point else torch.float64
    csr = csr.to(device=device, dtype=dtype)
    if csr.nnz and not bool(torch.isfinite(csr.values).all()):
        raise ValueError(f"{fn}: X contains NaN or infinity (in its stored values); remove or "
                         f"impute them first")
    return csr


def torch_to_scipy(X):
    """A torch sparse tensor (any layout, any device) as a scipy.sparse CSR matrix over the same
    host arrays where it can (the estimator validates X with scikit-learn, which takes scipy;
    scipy may narrow int64 indices that fit in int32, a copy of the indices only)."""
    import scipy.sparse as sp
    t = X.detach()
    if t.layout != torch.sparse_csr:
        t = t.to_sparse_csr()
    crow, col, values = (a.cpu().numpy() for a in (t.crow_indices(), t.col_indices(),
                                                    t.values()))
    return sp.csr_matrix((values, col, crow), shape=tuple(t.shape))


def loss_and_grads(X, W, b, target, s):
    """(sum_i s_i loss_i, its gradient in W (K, D), in b (K,) or None) on the CSR X: one call of
    the fused sparse op. Binary when target is floating (W (1, D)), multinomial for int64."""
    loss, gw, gb = torch.ops.manual_layers._sparse_linear_loss_fwd(
        X.crow, X.col, X.values, W, b, target, s, True, b is not None)
    return loss, gw, (gb if b is not None else None)


def logits(X, W, b):
    """X W^T + b (N, K) for the CSR X through ATen's sparse CSR matmul; X is not densified."""
    z = torch.sparse.mm(X.torch_sparse(), W.t().to(X.dtype).contiguous())
    return z if b is None else z + b.to(z.dtype)


# ---- the CUDA kernel: a composite of ATen's sparse ops ------------------------------------------

def _composite(crow_indices, col_indices, values, weight, bias, target, sample_weight,
               need_weight, need_bias):
    """_sparse_linear_loss_fwd as a composite of ATen ops (csrc/contracts/sparse.h's contract), for
    any device: z = X W^T + b and X^T r through torch's sparse CSR matmul (cuSPARSE on CUDA), the
    losses and residuals as elementwise ops. It is what runs for CUDA tensors (registered below;
    there is no fused CUDA kernel), so its reads of X are two sparse matmuls rather than one
    pass, and its determinism is that of ATen's sparse kernels. The CPU tests call it directly."""
    N = crow_indices.shape[0] - 1
    C, D = weight.shape
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    crow = crow_indices if crow_indices.dtype == col_indices.dtype else \
        crow_indices.to(col_indices.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        X = torch.sparse_csr_tensor(crow, col_indices, values.to(acc), (N, D),
                                    check_invariants=False)
    z = torch.sparse.mm(X, weight.to(acc).t().contiguous())  # (N, C)
    if bias is not None:
        z = z + bias.to(acc)
    if target.is_floating_point():  # binary: C == 1
        zc, y = z[:, 0], target.to(acc)
        losses = (1 - y) * zc + torch.nn.functional.softplus(-zc)
        r = (torch.sigmoid(zc) - y).unsqueeze(1)
    else:
        lse = torch.logsumexp(z, dim=1)
        losses = lse - z.gather(1, target.long().unsqueeze(1)).squeeze(1)
        r = torch.softmax(z, dim=1)
        r.scatter_add_(1, target.long().unsqueeze(1),
                       torch.full((N, 1), -1.0, dtype=acc, device=r.device))
    if sample_weight is not None:
        sw = sample_weight.to(acc)
        losses = losses * sw
        r = r * sw.unsqueeze(1)
    loss = losses.to(torch.float64).sum().to(acc)
    empty = values.new_empty((0,), dtype=acc)
    gw = torch.sparse.mm(X.t(), r).t().contiguous() if need_weight else empty
    gb = r.sum(0) if need_bias else empty.clone()
    return loss, gw, gb


_LIB = torch.library.Library("manual_layers", "IMPL")  # noqa: TOR901 - kept for the process
_LIB.impl("_sparse_linear_loss_fwd", _composite, "CUDA")
