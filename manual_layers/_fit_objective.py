"""The objective of the logistic-regression fit (manual_layers/_fit.py runs the solvers on it):
scikit-learn's regularised log-loss and its gradient at a float64 parameter vector, each
evaluation ONE call of the fused loss+gradient kernel on X's device (dense or sparse X), the
data-parallel sums all-reduced once per evaluation."""

import math

import numpy as np
import torch

from . import _sparse

__all__ = ["LinearObjective"]


_ops = torch.ops.manual_layers
_SUM, _NONE = 2, 0  # the kernels' reduction codes (csrc/common.h)


def _loss_and_grads(X, W, b, target, binary, s, cw_only):
    """(sum_i s_i loss_i, its gradient in W, in b) from ONE call of the fused forward kernel,
    which computes the loss and the weight/bias gradients in its single pass over X; no autograd
    graph, no backward call (a fit evaluation is tens of microseconds on small data, where the
    autograd machinery cost as much as the kernel).

    s: per-sample weights (N,) or None. cw_only: s is exactly class_weight[target] (no sample
    weights), passed as the cross-entropy kernel's class weight so its reduction="sum" pass is
    used; other per-sample weights in the multinomial case go through reduction="none": the
    kernel's per-row losses and unscaled residuals R, then sum s_i loss_i, X^T (s R), sum s R.

    X may be a manual_layers._sparse.CSR: then one call of the sparse op, which takes any
    per-sample weights s (class weights included) in its single pass."""
    if isinstance(X, _sparse.CSR):
        return _sparse.loss_and_grads(X, W, b, target, s)
    has_b = b is not None
    if binary:
        loss, gw, gb, _ = _ops._linear_bce_fwd(X, W, b, target, None, s, _SUM, False, True, has_b)
        return loss, gw, gb
    if s is None or cw_only is not None:
        loss, gw, gb, _ = _ops._linear_ce_fwd(X, W, b, target, cw_only, -100, 0.0, _SUM, False,
                                               True, has_b)
        return loss, gw, gb
    rows, _, _, R = _ops._linear_ce_fwd(X, W, b, target, None, -100, 0.0, _NONE, False, True,
                                        has_b)
    G = R * s.to(R.dtype).unsqueeze(1)
    return torch.dot(rows, s.to(rows.dtype)), G.t().mm(X.to(G.dtype)), G.sum(0)


class LinearObjective:
    """scikit-learn's logistic-regression objective and its gradient at a float64 parameter
    vector params = [W.ravel() (K*D), b (K, only with fit_intercept)], K = 1 for binary."""

    def __init__(self, X, target, n_classes, s=None, class_weight_only=None, C=1.0,
                 fit_intercept=True, comm=None, l1_ratio=0.0):
        self.X, self.target = X, target
        self.binary = n_classes == 2
        self.K = 1 if self.binary else n_classes
        self.D = X.shape[1]
        self.s, self.cw_only = s, class_weight_only
        self.fit_intercept = fit_intercept
        self.comm = comm
        # N and S (the weight total): data-parallel, summed over ranks once, here.
        self.N = float(X.shape[0])
        self.S = float(X.shape[0]) if s is None else float(s.sum())
        if comm is not None:
            ns = comm.all_reduce(torch.tensor([self.N, self.S], dtype=torch.float64)).cpu()
            self.N, self.S = float(ns[0]), float(ns[1])
        self.inv_C = 0.0 if C is None or C == math.inf else 1.0 / C
        # Elastic net, as scikit-learn's saga: ((1 - l1_ratio) ||W||^2 / 2 + l1_ratio ||W||_1)
        # / (C S). evaluate() is the smooth part (the L2 share); the L1 share is the solver's
        # (OWL-QN, manual_layers/_solvers.py), per coordinate from l1_weights().
        self.l1_ratio = float(l1_ratio or 0.0)
        self.l2_inv_C = self.inv_C * (1.0 - self.l1_ratio)
        # the L1 weight of each coefficient of W (the intercepts have none): l1_ratio / (C S)
        self.l1_weight = self.inv_C * self.l1_ratio / self.S
        self.n_evals = 0

    @property
    def n_params(self):
        return self.K * self.D + (self.K if self.fit_intercept else 0)

    def split(self, params):
        """(W (K, D), b (K,) or None) as tensors on X's device in X's dtype."""
        p = np.ascontiguousarray(params, dtype=np.float64)  # no copy
        if self.X.device.type == "cpu" and self.X.dtype == torch.float32:
            p = p.astype(np.float32)  # numpy's one-thread cast: see _local_sums
        t = torch.from_numpy(p)
        if t.dtype != self.X.dtype or t.device != self.X.device:
            t = t.to(device=self.X.device, dtype=self.X.dtype)
        KD = self.K * self.D
        W = t[:KD].view(self.K, self.D)
        b = t[KD:] if self.fit_intercept else None
        return W, b

    def local_sums(self, params):
        """(sum_i s_i loss_i, its gradient [dW.ravel(), db]) over this process's rows, as one
        float64 numpy vector: one fused kernel call, one device-to-host copy."""
        return self._local_sums(params).to(device="cpu").numpy().copy()

    def _local_sums(self, params):
        """local_sums as a float64 tensor on X's device (zeros for a shard with no rows)."""
        if self.X.shape[0] == 0:
            return torch.zeros(1 + self.n_params, dtype=torch.float64, device=self.X.device)
        W, b = self.split(params)
        loss, gw, gb = _loss_and_grads(self.X, W, b, self.target, self.binary, self.s,
                                       self.cw_only)
        # into one float64 vector kept from call to call: a fresh one per call (torch.cat) cost
        # page faults of its own that showed next to a sparse pass at 500,000 coefficients. On
        # the CPU numpy copies it, on one thread: an ATen copy of that size opens a parallel
        # region, which on a loaded machine can wait a scheduler slice for a descheduled worker.
        buf = getattr(self, "_sums_buf", None)
        if buf is None or buf.device != gw.device:
            buf = self._sums_buf = torch.empty(1 + self.n_params, dtype=torch.float64,
                                               device=gw.device)
        KD = self.K * self.D
        if buf.device.type == "cpu":
            a = buf.numpy()
            a[0] = float(loss)
            a[1:1 + KD] = gw.detach().reshape(-1).numpy()
            if b is not None:
                a[1 + KD:] = gb.detach().numpy()
            return buf
        buf[0] = loss
        buf[1:1 + KD].copy_(gw.reshape(-1))
        if b is not None:
            buf[1 + KD:].copy_(gb)
        return buf

    def evaluate(self, params, out=None):
        """The objective f and its gradient at params (float64 numpy), as scipy wants them.
        out: a float64 (n_params,) array to write the gradient into (then returned), so that a
        solver that copies it before the next call saves an allocation per evaluation (page
        faults of their own at 200,000 parameters); None: a fresh array.

        Data-parallel fit: all_reduce (SUM) the vector `sums` right after local_sums, before
        the normalisation below; everything after it is the same on every rank."""
        self.n_evals += 1
        sums = self._local_sums(params)
        if self.comm is not None:  # data-parallel: the one collective per evaluation
            sums = self.comm.all_reduce(sums)
        sums = sums.to(device="cpu").numpy()
        loss = sums[0] / self.S
        grad = np.divide(sums[1:], self.S, out=out)
        KD = self.K * self.D
        if self.l2_inv_C:
            w = params[:KD]
            loss += 0.5 * self.l2_inv_C * float(w @ w) / self.S
            tmp = getattr(self, "_l2_tmp", None)
            if tmp is None or tmp.shape[0] != KD:
                tmp = self._l2_tmp = np.empty(KD)
            np.multiply(w, self.l2_inv_C / self.S, out=tmp)
            grad[:KD] += tmp
        return loss, grad

    def l1_weights(self):
        """The L1 weight of each parameter (float64 (n_params,)): l1_ratio / (C S) on W, 0 on
        the intercepts (not penalised)."""
        w = np.zeros(self.n_params)
        w[:self.K * self.D] = self.l1_weight
        return w
