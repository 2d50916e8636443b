"""The fused sparse logistic-regression op _sparse_linear_loss_fwd (CPU kernel
csrc/cpu/kernels/sparse.cpp, and the ATen composite of manual_layers/_sparse.py that CUDA runs)
against a float64 dense reference: shapes, dtypes, index types, duplicates, determinism across
thread counts, finite differences, opcheck, errors. The fits on sparse X:
tests/integration/test_sparse_fit.py."""

import numpy as np
import pytest
import torch

sp = pytest.importorskip("scipy.sparse")

from manual_layers import _sparse  # noqa: E402
from conftest import TOL, assert_rel  # noqa: E402
from sparse_inputs import _dense, _random_csr, _rng  # noqa: E402

ops = torch.ops.manual_layers

def _args(A, dtype):
    return (torch.from_numpy(A.indptr), torch.from_numpy(A.indices),
            torch.from_numpy(A.data).to(dtype))


def _weighted_rows(z, target, s):
    """Each row's loss s_i loss_i from the logits z (N, C), float64."""
    if target.is_floating_point():
        y = target.double()
        rows = (1 - y) * z[:, 0] + torch.nn.functional.softplus(-z[:, 0])
    else:
        rows = torch.logsumexp(z, 1) - z.gather(1, target.unsqueeze(1)).squeeze(1)
    return rows if s is None else rows * s.double()


def _reference(Xd, W, b, target, s):
    """(sum s_i loss_i, dW, db) in float64 by autograd on the dense X."""
    W = W.detach().double().requires_grad_()
    b = None if b is None else b.detach().double().requires_grad_()
    z = Xd @ W.t() + (0 if b is None else b)
    loss = _weighted_rows(z, target, s).sum()
    gW, gb = torch.autograd.grad(loss, [W] + ([b] if b is not None else []),
                                 allow_unused=True) + ((None,) if b is None else ())
    return loss.detach(), gW if gW is not None else torch.zeros_like(W), gb


def _logits_and_magnitude(Xd, W, b):
    """The logits z = X W^T + b (N, C) and, per row, the magnitude of their terms,
    m_i = max_c sum_j |x_ij w_cj| + max |b| (a float32 logit is off by about eps m_i), float64."""
    Wd = W.detach().double()
    z = Xd @ Wd.t() + (0 if b is None else b.detach().double())
    mag = (Xd.abs() @ Wd.abs().t()).max(1).values
    if b is not None:
        mag = mag + b.detach().double().abs().max()
    return z, mag


def _loss_terms_abs_sum(Xd, W, b, target, s):
    """sum_i |s_i| (|a_i| + |c_i| + max_c sum_j |x_ij w_cj| + |b|_max): the magnitude of the
    terms whose rounding the loss carries, in float64. A row's loss is a difference, a_i - c_i
    (multinomial: logsumexp(z_i) - z_it; binary: softplus(-z_i) + (1 - y_i) z_i, two terms of
    either sign), of logits that are themselves sums of products; in float32 it can cancel to
    far below its terms (one row, N = 1: a loss of about 1e-3 off by 1e-3 of itself)."""
    z, mag = _logits_and_magnitude(Xd, W, b)
    if target.is_floating_point():
        a = torch.nn.functional.softplus(-z[:, 0])
        c = (1 - target.double()) * z[:, 0]
    else:
        a = torch.logsumexp(z, 1)
        c = z.gather(1, target.unsqueeze(1)).squeeze(1)
    rows = a.abs() + c.abs() + mag
    return (rows if s is None else rows * s.double().abs()).sum()


def _residual_terms_abs(Xd, W, b, target, s):
    """(N, C): |s_i| (p_ic + y_ic + m_i), the magnitude of the residual r = p - y of each row
    and of its rounding: r is a difference (p the softmax or sigmoid, y the one-hot or binary
    target) whose float32 value is off by about eps (p + y), plus what the logits' own rounding
    (at most eps m_i, m_i the magnitude of their terms, as in _loss_terms_abs_sum) moves it. One
    confident row (N = 1) has every |r| small, and the gradients it makes cannot be measured
    against themselves (N = 1 came to 2.6e-3 of grad_bias, 2e-4 of grad_weight in float32)."""
    z, mag = _logits_and_magnitude(Xd, W, b)
    if target.is_floating_point():
        pr = torch.sigmoid(z)
        y = target.double().abs().unsqueeze(1)
    else:
        pr = torch.softmax(z, 1)
        y = torch.nn.functional.one_hot(target, z.shape[1]).double()
    rows = pr + y + mag.unsqueeze(1)
    return rows if s is None else rows * s.double().abs().unsqueeze(1)


def _problem(rng, A, C, dtype, bias=True, weights=True):
    N, D = A.shape
    W = torch.from_numpy(rng.normal(size=(C, D))).to(dtype)
    b = torch.from_numpy(rng.normal(size=C)).to(dtype) if bias else None
    if C == 1:
        target = torch.from_numpy(rng.random(N)).to(dtype)
    else:
        target = torch.from_numpy(rng.integers(0, C, size=N)).long()
    s = torch.from_numpy(rng.random(N) * 2).to(dtype) if weights else None
    return W, b, target, s


# ---- the op against the float64 dense reference --------------------------------------------------
SHAPES = [(0, 5), (1, 1), (1, 9), (17, 3), (64, 37), (300, 17)]


@pytest.mark.parametrize("C", [1, 3, 5, 13, 33, 70])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("index", [np.int32, np.int64])
@pytest.mark.parametrize("impl", ["kernel", "composite"])
def test_op_matches_dense_reference(C, dtype, index, impl):
    """Every shape, binary (C = 1) and multinomial (C 3 to 70: register blocks of 1 to 5
    vectors, and the generic path: 33 classes in float64, 70 in float32), with and without bias
    and sample weights; duplicate and unsorted
    columns, empty rows and columns. The composite (what CUDA runs) on the CPU too."""
    rng = _rng()
    fn = ops._sparse_linear_loss_fwd if impl == "kernel" else _sparse._composite
    for N, D in SHAPES:
        for bias, weights, dup in ((True, True, True), (False, False, False), (True, False, True)):
            A = _random_csr(rng, N, D, density=0.4, dtype=np.float64, index=index,
                            duplicates=dup, empty_rows=0.2)
            W, b, target, s = _problem(rng, A, C, dtype, bias, weights)
            loss, gw, gb = fn(*_args(A, dtype), W, b, target, s, True, bias)
            Xd = _dense(A).to(dtype).double()
            rl, rgw, rgb = _reference(Xd, W, b, target, s)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert loss.dtype == acc and loss.dim() == 0 and gw.dtype == acc
            tol = TOL[dtype] * 10
            what = f"{impl} N={N} D={D} C={C} {dtype} bias={bias} sw={weights}"
            # the loss's error against the magnitude of its terms (_loss_terms_abs_sum), not
            # against the loss itself, which may cancel
            lscale = _loss_terms_abs_sum(Xd, W, b, target, s)
            err = abs(float(loss) - float(rl)) / max(float(lscale), 1e-30)
            assert err <= tol, f"{what} loss: error {err:.3g} of sum|terms| > {tol:.1g}"
            # grad_W = R^T X and grad_b = sum_i R_i: sums that may cancel, of residuals that
            # are themselves differences; measured against the magnitude of their terms
            # (_residual_terms_abs), not against the sums (C = 1, N = 64 once came to 2.6e-4 of
            # the bias gradient in float32)
            assert torch.isfinite(gw).all() and gw.shape == rgw.shape, what + " grad_weight"
            terms = _residual_terms_abs(Xd, W, b, target, s)
            err = ((gw.double() - rgw).abs() / (terms.t() @ Xd.abs()).clamp_min(1e-30)).max()
            assert err <= tol, f"{what} grad_weight: error {err:.3g} of sum|terms| > {tol:.1g}"
            if bias:
                err = ((gb.double() - rgb).abs() / terms.sum(0).clamp_min(1e-30)).max().item()
                assert err <= tol, f"{what} grad_bias: error {err:.3g} of sum|terms| > {tol:.1g}"
            else:
                assert gb.numel() == 0


def test_op_need_flags_and_no_bias():
    rng = _rng()
    A = _random_csr(rng, 40, 11)
    W, b, target, s = _problem(rng, A, 4, torch.float64)
    loss, gw, gb = ops._sparse_linear_loss_fwd(*_args(A, torch.float64), W, b, target, s, False,
                                               False)
    assert gw.numel() == 0 and gb.numel() == 0
    ref, _, _ = ops._sparse_linear_loss_fwd(*_args(A, torch.float64), W, b, target, s, True, True)
    assert torch.equal(loss, ref)


def test_op_duplicates_equal_summed():
    """A row's repeated column indices mean their sum (scipy): the same loss and gradients as the
    canonical matrix (sum_duplicates) to rounding."""
    rng = _rng()
    A = _random_csr(rng, 200, 30, density=0.3, duplicates=True)
    assert not A.has_canonical_format
    B = A.copy()
    B.sum_duplicates()
    for C in (1, 6):
        W, b, target, s = _problem(rng, A, C, torch.float64)
        got = ops._sparse_linear_loss_fwd(*_args(A, torch.float64), W, b, target, s, True, True)
        ref = ops._sparse_linear_loss_fwd(*_args(B, torch.float64), W, b, target, s, True, True)
        for g, r in zip(got, ref):
            assert_rel(g.reshape(-1), r.reshape(-1), 1e-12, f"C={C}")


@pytest.mark.parametrize("C", [1, 4])
def test_op_gradient_finite_differences(C):
    """The op's gradient against central differences of its own loss, float64."""
    rng = _rng()
    A = _random_csr(rng, 30, 6, density=0.5, duplicates=True)
    W, b, target, s = _problem(rng, A, C, torch.float64)
    args = _args(A, torch.float64)
    _, gw, gb = ops._sparse_linear_loss_fwd(*args, W, b, target, s, True, True)
    h = 1e-6

    def f(W_, b_):
        return ops._sparse_linear_loss_fwd(*args, W_, b_, target, s, False, False)[0].item()
    for idx in np.ndindex(*W.shape):
        Wp, Wm = W.clone(), W.clone()
        Wp[idx] += h
        Wm[idx] -= h
        assert abs((f(Wp, b) - f(Wm, b)) / (2 * h) - gw[idx].item()) <= 1e-6 * (1 + abs(
            gw[idx].item()))
    for c in range(C):
        bp, bm = b.clone(), b.clone()
        bp[c] += h
        bm[c] -= h
        assert abs((f(W, bp) - f(W, bm)) / (2 * h) - gb[c].item()) <= 1e-6 * (1 + abs(
            gb[c].item()))


@pytest.mark.parametrize("C", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_deterministic_across_threads(C, dtype):
    """Bitwise the same results with 1 and 2 threads (row blocks fixed by the problem's shape,
    partials summed in block order), on a matrix large enough for several blocks."""
    rng = _rng()
    N, D = 30000, 40
    A = sp.random(N, D, density=0.2, format="csr", random_state=rng, dtype=np.float64)
    W, b, target, s = _problem(rng, A, C, dtype)
    args = _args(A, dtype)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            outs.append(ops._sparse_linear_loss_fwd(*args, W, b, target, s, True, True))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for a, e in zip(o, outs[0]):
            assert torch.equal(a, e)
    rl, rgw, _ = _reference(_dense(A).to(dtype).double(), W, b, target, s)
    assert_rel(outs[0][1], rgw.to(outs[0][1].dtype), TOL[dtype] * 10, "grad_weight")


@pytest.mark.parametrize("C,D,dtype", [(1, 40000, torch.float64), (5, 20000, torch.float32),
                                       (3, 30000, torch.float64)])
def test_op_wide_tables(C, D, dtype):
    """Tables above 512 KiB (multinomial: the kernel prefetches their rows ahead; binary: W and
    the gradient as two arrays of D values) against the composite, itself checked against the
    dense reference above; a bad column index there still raises (the prefetch of a bad entry
    ahead must not read out of bounds)."""
    rng = _rng()
    A = sp.random(3000, D, density=0.002, format="csr", random_state=rng, dtype=np.float64)
    A.data = rng.normal(size=A.nnz)
    W, b, target, s = _problem(rng, A, C, dtype)
    args = _args(A, dtype)
    got = ops._sparse_linear_loss_fwd(*args, W, b, target, s, True, True)
    ref = _sparse._composite(*(a.clone() for a in args[:2]), args[2].double(), W.double(),
                             b.double(), target if C > 1 else target.double(), s.double(), True,
                             True)
    for g, r in zip(got, ref):
        assert_rel(g.reshape(-1), r.reshape(-1).to(g.dtype), TOL[dtype] * 10, f"C={C} D={D}")
    col = args[1].clone()
    col[len(col) // 2] = D + 7
    with pytest.raises(IndexError, match="column index outside"):
        ops._sparse_linear_loss_fwd(args[0], col, args[2], W, b, target, s, True, True)


def test_op_16bit_values():
    """bf16/fp16 values and weight are widened to float32 (acc_t) in the op."""
    rng = _rng()
    A = _random_csr(rng, 50, 9)
    for dt in (torch.bfloat16, torch.float16):
        W, b, target, s = _problem(rng, A, 3, dt)
        loss, gw, gb = ops._sparse_linear_loss_fwd(*_args(A, dt), W, b, target, s, True, True)
        assert gw.dtype == torch.float32
        Xd = torch.from_numpy(A.toarray()).to(dt).double()
        rl, rgw, rgb = _reference(Xd, W, b, target, s)
        assert_rel(gw, rgw.float(), 1e-5, str(dt))


def test_op_opcheck():
    rng = _rng()
    A = _random_csr(rng, 23, 7, duplicates=True)
    for C in (1, 4):
        W, b, target, s = _problem(rng, A, C, torch.float64)
        for index in (np.int32, np.int64):
            B = _random_csr(rng, 23, 7, index=index)
            torch.library.opcheck(ops._sparse_linear_loss_fwd,
                                  (*_args(B, torch.float64), W, b, target, s, True, True))
        torch.library.opcheck(ops._sparse_linear_loss_fwd,
                              (*_args(A, torch.float32), W.float(), None, target if C > 1 else
                               target.float(), None, True, False))


def test_op_cuda_kernel_is_the_composite():
    """A CUDA tensor reaches the composite (registered for the CUDA key in _sparse.py)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "manual_layers::_sparse_linear_loss_fwd", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "manual_layers::_sparse_linear_loss_fwd", "CPU")


def test_op_errors():
    rng = _rng()
    A = _random_csr(rng, 10, 5)
    crow, col, val = _args(A, torch.float64)
    W, b, target, s = _problem(rng, A, 3, torch.float64)
    bad_col = col.clone()
    bad_col[0] = 5
    with pytest.raises(IndexError, match="column index outside"):
        ops._sparse_linear_loss_fwd(crow, bad_col, val, W, b, target, s, True, True)
    bad_col[0] = -1
    with pytest.raises(IndexError, match="column index outside"):
        ops._sparse_linear_loss_fwd(crow, bad_col, val, W, b, target, s, True, True)
    bad_crow = crow.clone()
    bad_crow[1], bad_crow[2] = int(crow[-1]), 0
    with pytest.raises(ValueError, match="non-decreasing"):
        ops._sparse_linear_loss_fwd(bad_crow, col, val, W, b, target, s, True, True)
    with pytest.raises(IndexError, match="out of bounds for 3 classes"):
        ops._sparse_linear_loss_fwd(crow, col, val, W, b, target + 3, s, True, True)
    with pytest.raises(RuntimeError, match=r"binary\) target needs weight of shape \(1, 5\)"):
        ops._sparse_linear_loss_fwd(crow, col, val, W, b, target.double(), s, True, True)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops._sparse_linear_loss_fwd(crow, col, val.float(), W, b, target, s, True, True)
    with pytest.raises(RuntimeError, match=r"target must have shape \(10,\)"):
        ops._sparse_linear_loss_fwd(crow, col, val, W, b, target[:3], s, True, True)
