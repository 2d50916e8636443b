"""One sample-input generator per public op (as pytorch/extension-cpp's `sample_inputs`): the
same inputs feed the reference comparison, gradcheck and opcheck of tests/paths/test_samples.py, so a
case added here is checked all three ways, on every device and dtype.

    sample_inputs(op, device, dtype, requires_grad) -> [Sample, ...]
    random_sample(op, device, seed) -> Sample       (tests/paths/test_fuzz.py)
    check_reference(sample)                         (values and gradients against float64)

op is one of OPS: "linear", "logistic_regression", "mlp", "linear_bce", "linear_ce". A Sample
holds the arguments of the functional call (manual_layers.functional.<fn>) and knows the
matching manual_layers.reference call and torch.ops.manual_layers call. With requires_grad the
floating inputs a layer trains (x and the weights and biases; not targets or loss weights)
require grad; strided inputs are leaf views of a larger tensor. Tensors are drawn from torch's
global generator (tests/conftest.py seeds it per test)."""

import contextlib
import dataclasses
import os
import random
from unittest import mock

import torch

import manual_layers as ml
from conftest import TOL, assert_rel, rel_error
from manual_layers import reference as R

OPS = ("linear", "logistic_regression", "mlp", "linear_bce", "linear_ce")
ACTS = (None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
REDUCTIONS = ("mean", "sum", "none")
_RED_CODE = {"none": 0, "mean": 1, "sum": 2}

_FUNCTIONAL = {
    "linear": ml.functional.linear,
    "logistic_regression": ml.functional.logistic_regression,
    "mlp": ml.functional.mlp,
    "linear_bce": ml.functional.linear_binary_cross_entropy_with_logits,
    "linear_ce": ml.functional.linear_cross_entropy,
}


def _reference_mlp(x, w1, b1, w2, b2, activation="gelu"):
    return R.linear(R.linear(x, w1, b1, activation), w2, b2)


_REFERENCE = {
    "linear": R.linear,
    "logistic_regression": R.logistic_regression,
    "mlp": _reference_mlp,
    "linear_bce": R.linear_binary_cross_entropy_with_logits,
    "linear_ce": R.linear_cross_entropy,
}


@dataclasses.dataclass
class Sample:
    op: str
    desc: str
    args: tuple
    kwargs: dict
    env: dict = dataclasses.field(default_factory=dict)  # environment the call runs under

    def __repr__(self):
        return f"Sample({self.op}: {self.desc})"

    # -- the tensors that require grad, and calls with them replaced --------------------------
    def grad_inputs(self):
        return [t for t in (*self.args, *self.kwargs.values())
                if isinstance(t, torch.Tensor) and t.requires_grad]

    def _substituted(self, replacements, convert=None):
        it = iter(replacements or ())

        def sub(t):
            if isinstance(t, torch.Tensor) and t.requires_grad and replacements is not None:
                return next(it)
            return convert(t) if convert is not None and isinstance(t, torch.Tensor) else t

        return tuple(sub(a) for a in self.args), {k: sub(v) for k, v in self.kwargs.items()}

    def call(self, *grad_inputs):
        """manual_layers.functional on the sample, with the grad inputs replaced by
        `grad_inputs` when given (gradcheck passes its own copies)."""
        args, kwargs = self._substituted(grad_inputs if grad_inputs else None)
        return _FUNCTIONAL[self.op](*args, **kwargs)

    def reference(self, dtype=None):
        """manual_layers.reference on the sample, its floating tensors cast to dtype (float64 for
        the yardstick, None: as they are), with fresh leaves in place of the grad inputs.
        Returns (output, leaves)."""
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in self.grad_inputs()]
        cast = (lambda t: t.to(dtype) if t.is_floating_point() else t) if dtype else None
        args, kwargs = self._substituted(leaves, cast)
        return _REFERENCE[self.op](*args, **kwargs), leaves

    def op_args(self):
        """The positional arguments of the torch.ops.manual_layers call the functional makes."""
        a, k = self.args, self.kwargs
        if self.op == "linear":
            return (a[0], a[1], a[2], a[3] or "none")
        if self.op == "logistic_regression":
            return (a[0], a[1], a[2], "sigmoid" if a[1].shape[0] == 1 else "softmax")
        if self.op == "mlp":
            return (*a[:5], k.get("activation", "gelu") or "none")
        red = _RED_CODE[k.get("reduction", "mean")]
        if self.op == "linear_bce":
            return (*a, k.get("pos_weight"), k.get("sample_weight"), red, None)
        return (*a, k.get("class_weight"), k.get("ignore_index", -100),
                float(k.get("label_smoothing", 0.0)), red, None)

    def public_op(self):
        name = "linear" if self.op == "logistic_regression" else self.op
        return getattr(torch.ops.manual_layers, name).default

    @contextlib.contextmanager
    def environment(self):
        """Runs the block with the sample's environment variables set (e.g. the CE path)."""
        with mock.patch.dict(os.environ, self.env):
            yield


class _Maker:
    def __init__(self, device, dtype, requires_grad):
        self.device, self.dtype, self.rg = device, dtype, requires_grad

    def param(self, *shape, scale=1.0):
        """A trainable input: a contiguous leaf."""
        t = torch.randn(*shape, device=self.device, dtype=torch.float64) * scale
        return t.to(self.dtype).requires_grad_(self.rg)

    def strided(self, *shape, scale=1.0):
        """A trainable input as a non-contiguous leaf view: every other element of its last
        dim, of a tensor stored transposed in its last two dims."""
        big = (*shape[:-1], 2 * shape[-1])
        base = torch.randn(*big[:-2], big[-1], big[-2], device=self.device,
                           dtype=torch.float64) if len(big) > 1 else \
            torch.randn(*big, device=self.device, dtype=torch.float64)
        base = (base * scale).to(self.dtype)
        t = (base.transpose(-1, -2) if len(big) > 1 else base)[..., ::2]
        assert t.shape == shape and not t.is_contiguous()
        return t.requires_grad_(self.rg)

    def data(self, *shape):
        """A floating input that is not trained: uniform in [0, 1) (targets, loss weights)."""
        return torch.rand(shape, device=self.device, dtype=torch.float64).to(self.dtype)

    def labels(self, c, *shape):
        return torch.randint(0, c, shape, device=self.device)


def _linear(m):
    for act in ACTS:
        yield f"{act}, 2-D x, bias", (m.param(9, 17), m.param(6, 17, scale=0.25), m.param(6),
                                      act), {}
        yield f"{act}, 3-D x, no bias", (m.param(2, 3, 17), m.param(6, 17, scale=0.25), None,
                                         act), {}
    for act in (None, "gelu", "tanh"):
        yield (f"{act}, strided x, transposed weight, strided bias",
               (m.strided(30, 20), m.strided(9, 20, scale=0.25), m.strided(9), act), {})
        yield (f"{act}, 3-D x strided in its last dim",
               (m.strided(4, 7, 20), m.param(9, 20, scale=0.25), m.param(9), act), {})
    for act in (None, "relu", "gelu"):
        yield f"{act}, 1-D x (one row)", (m.param(13), m.param(5, 13, scale=0.3), m.param(5),
                                          act), {}
        yield f"{act}, empty batch", (m.param(0, 3, 8), m.param(5, 8), m.param(5), act), {}
        yield f"{act}, in_features 1", (m.param(11, 1), m.param(4, 1), m.param(4), act), {}
    yield "silu, 300 rows, 40 -> 72 features (big)", \
        (m.param(300, 40), m.param(72, 40, scale=0.15), m.param(72), "silu"), {}


def _logistic_regression(m):
    for c in (1, 4):
        yield f"{c} output(s)", (m.param(7, 5), m.param(c, 5), m.param(c)), {}
        yield f"{c} output(s), 3-D strided x, no bias", (m.strided(2, 3, 5), m.param(c, 5),
                                                          None), {}


def _mlp(m):
    for act in ACTS:
        yield (f"{act}, 2-D x, biases",
               (m.param(7, 5), m.param(9, 5, scale=0.4), m.param(9), m.param(4, 9, scale=0.3),
                m.param(4)), {"activation": act})
    for act in ("gelu", "relu", None):
        yield (f"{act}, 3-D strided x, no biases",
               (m.strided(2, 3, 6), m.param(8, 6, scale=0.4), None, m.param(5, 8, scale=0.3),
                None), {"activation": act})
        yield (f"{act}, 1-D x, transposed w2",
               (m.param(6), m.param(8, 6, scale=0.4), m.param(8), m.strided(5, 8, scale=0.3),
                m.param(5)), {"activation": act})
    yield ("gelu, empty batch",
           (m.param(0, 6), m.param(10, 6), m.param(10), m.param(4, 10), m.param(4)),
           {"activation": "gelu"})
    yield ("gelu_tanh, 300 rows, 33 -> 70 -> 17 (big)",
           (m.param(300, 33), m.param(70, 33, scale=0.2), m.param(70),
            m.param(17, 70, scale=0.15), m.param(17)), {"activation": "gelu_tanh"})


def _bce(m):
    for red in REDUCTIONS:
        kw = {"reduction": red}
        yield f"{red}, soft labels", (m.param(9, 4), m.param(1, 4), m.param(1), m.data(9)), kw
        yield f"{red}, pos_weight and sample_weight", \
            (m.param(9, 4), m.param(1, 4), m.param(1), m.data(9)), \
            {**kw, "pos_weight": m.data(1) + 1.2, "sample_weight": m.data(9)}
        yield f"{red}, 3-D strided x, no bias, broadcast sample_weight", \
            (m.strided(3, 5, 6), m.param(1, 6), None, m.data(3, 5)), \
            {**kw, "sample_weight": m.data(5)}
        yield f"{red}, D = 1, 0/1 labels", \
            (m.param(10, 1), m.param(1, 1), m.param(1), m.labels(2, 10).to(m.dtype)), kw
        if red != "mean":  # the mean of nothing is NaN (as torch's), checked in test_logreg
            yield f"{red}, empty batch", (m.param(0, 5), m.param(1, 5), m.param(1),
                                          m.data(0)), kw
        yield f"{red}, 1000 rows, D = 17 (big)", \
            (m.param(1000, 17), m.param(1, 17, scale=0.3), m.param(1), m.data(1000)), \
            {**kw, "pos_weight": m.data(1) + 2.0, "sample_weight": m.data(1000)}


_CHUNKED = {"MANUAL_LAYERS_CE_PATH": "chunked", "MANUAL_LAYERS_CE_CHUNK_ROWS": "3"}


def _ce(m):
    for red in REDUCTIONS:
        kw = {"reduction": red}
        t = m.labels(5, 9)
        t[4] = -100
        yield f"{red}, C = 5", (m.param(9, 4), m.param(5, 4), m.param(5), t), kw
        t = m.labels(3, 9)
        t[::4] = 1
        yield f"{red}, class_weight, ignore_index 1, label_smoothing", \
            (m.param(9, 4), m.param(3, 4), m.param(3), t), \
            {**kw, "class_weight": m.data(3) + 0.5, "ignore_index": 1, "label_smoothing": 0.1}
        yield f"{red}, C = 2, 3-D strided x, no bias", \
            (m.strided(2, 4, 6), m.param(2, 6), None, m.labels(2, 2, 4)), kw
        yield f"{red}, C = 17", (m.param(8, 3), m.param(17, 3), m.param(17), m.labels(17, 8)), kw
        if red != "mean":
            yield f"{red}, empty batch", (m.param(0, 5), m.param(4, 5), m.param(4),
                                          m.labels(4, 0)), kw
        t = m.labels(40, 7)
        t[0] = -100
        s = (f"{red}, chunked path (3-row chunks), C = 40, class_weight, label_smoothing",
             (m.param(7, 6), m.param(40, 6), m.param(40), t),
             {**kw, "class_weight": m.data(40) + 0.5, "label_smoothing": 0.1})
        yield (*s, _CHUNKED)
        t = m.labels(70, 11)
        t[2] = -100
        yield (f"{red}, single pass (forced), C = 70, class_weight, label_smoothing",
               (m.param(11, 9), m.param(70, 9, scale=0.4), m.param(70), t),
               {**kw, "class_weight": m.data(70) + 0.5, "label_smoothing": 0.05},
               {"MANUAL_LAYERS_CE_PATH": "single"})
        yield (f"{red}, chunked path, C = 300, 3-D strided x, no bias",
               (m.strided(2, 3, 8), m.param(300, 8, scale=0.4), None, m.labels(300, 2, 3)), kw,
               _CHUNKED)
        t = m.labels(10, 1000)
        t[::7] = 3
        yield f"{red}, 1000 rows, C = 10, D = 17, all options (big)", \
            (m.param(1000, 17), m.param(10, 17, scale=0.3), m.param(10), t), \
            {**kw, "class_weight": m.data(10) + 0.1, "ignore_index": 3, "label_smoothing": 0.15}


_GENERATORS = {"linear": _linear, "logistic_regression": _logistic_regression, "mlp": _mlp,
               "linear_bce": _bce, "linear_ce": _ce}


def sample_inputs(op, device="cpu", dtype=torch.float32, requires_grad=True):
    """The samples of op (one of OPS) on device in dtype; see the module docstring."""
    m = _Maker(device, dtype, requires_grad)
    out = []
    for item in _GENERATORS[op](m):
        desc, args, kwargs = item[:3]
        out.append(Sample(op, desc, args, kwargs, dict(item[3]) if len(item) > 3 else {}))
    return out


def sample_ids(op):
    """The descriptions of op's samples, in order (test ids; drawn on the CPU in float64)."""
    with torch.random.fork_rng():
        return [s.desc for s in sample_inputs(op, "cpu", torch.float64, False)]


# ---- checking a sample against the reference ----------------------------------------------

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


# The bar of random samples (tests/paths/test_fuzz.py). Random shapes include ill-conditioned results,
# where any computation in the dtype misses TOL: a two-class cross-entropy bias gradient summed
# over 31 rows of both signs (fp32: 3e-5 here, PyTorch 4e-6); a bf16 softmax gradient
# y (g - sum g y) whose terms cancel to 1 %, from outputs rounded to bf16 that do not sum to 1
# (13 % here, PyTorch 0.3 % by the luck of its rounding: the 16-bit FUZZ_TOL); a bf16 sigmoid
# bias gradient sum_i g_i y_i (1 - y_i) of 100 terms whose magnitudes add to 3000x the sum
# (120 % here, PyTorch 41 %). So the bar is FUZZ_TOL or, where larger, 8 x the dtype's unit
# roundoff x the cancellation the grad_output's signs cause: |reference with |g|| / |reference
# with g|. Indexing, tiling and path bugs, what random shapes are for, give errors of order 1
# (one wrong row of 2049 similar rows is about 2 % of the norm; 60 % of the samples are fp32 /
# fp64, held to 1e-3); accuracy is held to TOL by the fixed samples.
# relu's kink is the other exception: a pre-activation within rounding of 0 may land on either
# side of it in the dtype (ours and PyTorch's alike), which moves relu's derivative from 0 to 1
# there and the gradients by that element's whole contribution: one flip among 1000 x 1024
# elements is 1.3e-3 of the input gradient's norm, past fp32's 1e-3 (seed 107422 of the linear
# samples). So relu samples also get twice the change that flipping every such element makes
# in the float64 reference (_relu_flip_reference), a few 1e-3 where there are any, none
# elsewhere.
FUZZ_TOL = {torch.float64: 1e-7, torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}
_UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24,
                  torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -11}


def _relu_flip_reference(s):
    """For a linear or MLP sample with relu: the float64 reference (output, leaves) with relu's
    derivative flipped wherever the pre-activation x W^T + b is within 8 u (|x| |W|^T + |b|) of
    0 (u the unit roundoff of the accumulation: fp32's for 16-bit x, whose products are exact
    and whose rounding to 16 bits keeps the sign), its values moved by no more than that. None
    for other samples, or where no element is that close."""
    if s.op == "linear" and s.args[3] == "relu":
        x, w, b = s.args[:3]
    elif s.op == "mlp" and s.kwargs.get("activation", "gelu") == "relu":
        x, w, b = s.args[:3]
    else:
        return None
    d = lambda t: None if t is None else t.detach().double()
    z = torch.nn.functional.linear(d(x), d(w), d(b))
    reach = torch.nn.functional.linear(d(x).abs(), d(w).abs(), None if b is None else d(b).abs())
    u = _UNIT_ROUNDOFF[torch.float64 if x.dtype == torch.float64 else torch.float32]
    near = z.abs() <= 8 * u * reach
    if not near.any():
        return None

    def flipped(v):  # relu, but the derivative 1 - relu'(v) at the near elements
        return torch.relu(v) + torch.where(near, torch.where(v > 0, -v, v), torch.zeros_like(v))

    with mock.patch.dict(R.ACTIVATIONS, {"relu": flipped}):
        return s.reference(torch.float64)


def check_reference(s, fuzz=False):
    """Ours in the sample's dtype (its x's) against manual_layers.reference in float64 on the
    same (rounded) inputs: the output and the gradient of every input that requires grad, for
    a random grad_output. The bar is TOL for the dtype or, in 16-bit and if larger, 1.5x the
    error of the plain PyTorch composition run in that dtype on the same inputs; with fuzz,
    FUZZ_TOL and the cancellation allowance above."""
    dtype = s.args[0].dtype
    leaves = s.grad_inputs()
    with s.environment():
        out = s.call()
    assert out.dtype == dtype, f"{s}: output dtype {out.dtype}"
    g = _grad_output(out)
    with s.environment():
        ours = _value_and_grads(out, leaves, g)
    ref_out, ref_leaves = s.reference(torch.float64)
    ref = _value_and_grads(ref_out, ref_leaves, g.double())
    low = dtype in (torch.float16, torch.bfloat16)
    same = _value_and_grads(*s.reference(None), g) if low else [None] * len(ref)
    mag = _value_and_grads(*s.reference(torch.float64), g.double().abs()) if fuzz \
        else [None] * len(ref)
    flip = _relu_flip_reference(s) if fuzz else None
    kink = _value_and_grads(*flip, g.double()) if flip else [None] * len(ref)
    names = ["output"] + [f"grad of input {k}" for k in range(len(leaves))]
    for name, a, e, t, m, k in zip(names, ours, ref, same, mag, kink):
        assert a.dtype == dtype and a.shape == e.shape, f"{s} {name}: {a.dtype} {a.shape}"
        bar = (FUZZ_TOL if fuzz else TOL)[dtype]
        if low:
            bar = max(bar, 1.5 * _rel_err(t, e))
        if fuzz:
            cancel = m.detach().norm().item() / max(e.detach().norm().item(), 1e-300)
            bar = max(bar, 8 * _UNIT_ROUNDOFF[dtype] * cancel)
        if k is not None:
            bar += 2 * max(rel_error(k, e, 0.0), rel_error(k, e, 1.0))  # either measure
        assert_rel(a, e, bar, f"{s} {name} ({dtype})")


# ---- random samples (tests/paths/test_fuzz.py) --------------------------------------------------
# Sizes on both sides of every boundary the kernels have: the CPU's 16-row tiles and 4-row
# logits steps, vector widths (8 / 16 lanes), the CUDA kernels' chunk widths (32 lanes x 4 / 8
# values per warp, 1 / 2 / 4 / 8 chunks, 1 to 8 warps per row: D 128 / 256 / 512 / 1024 /
# 4096 / 8192), the tensor-core cross entropy's D % 8 and C <= 16 / 32, the few-class dX kernel
# (C <= 16), and the chunked cross entropy (C >= 128, forced with small chunks).
_ROWS = (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 64, 100, 257, 1000, 2049)
_FEATURES = (1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33, 64, 100, 127, 128, 129, 255, 256, 257,
             511, 512, 513, 1000, 1024, 1025, 2048, 4095, 4096, 4097, 5001, 8192, 8193)
_CLASSES = (2, 3, 5, 10, 15, 16, 17, 31, 32, 33, 64, 127, 128, 129, 300, 1000)
_OUT_FEATURES = (1, 2, 7, 16, 17, 64, 100, 257, 1024)
_BUDGET = 1 << 21  # elements of x, of W and of the N x C logits, each: keeps a case < ~0.5 s
_DTYPES = (torch.float64, torch.float32, torch.float32, torch.bfloat16, torch.float16)


def _pick(rng, choices, fits):
    ok = [c for c in choices if fits(c)]
    return rng.choice(ok) if ok else min(choices)


def random_sample(op, device="cpu", seed=0):
    """One random sample of op, drawn from op and seed alone (structure from
    random.Random(f"{op}-{seed}"), values from torch's generators seeded with seed): dtype,
    shape near a kernel boundary, leading dims (1-D to 3-D), strided x, biases and every loss
    option and reduction. Inputs require grad as in sample_inputs."""
    rng = random.Random(f"{op}-{seed}")
    torch.manual_seed(seed)
    dtype = rng.choice(_DTYPES)
    m = _Maker(device, dtype, True)
    N = rng.choice(_ROWS + (0,))
    D = _pick(rng, _FEATURES, lambda d: max(N, 1) * d <= _BUDGET)
    lead = rng.choice(["2d", "2d", "3d", "1d"]) if N > 0 else "2d"
    if lead == "1d":
        N = 1
    strided = rng.random() < 0.3 and D > 1 and (N > 1 or lead == "1d")  # else contiguous anyway
    shape = {"2d": (N, D), "1d": (D,)}.get(lead) or (*_split(rng, N), D)
    x = m.strided(*shape) if strided else m.param(*shape)
    lead_shape = shape[:-1]
    desc = [f"{tuple(shape)}{' strided' if strided else ''}"]
    kwargs, env = {}, {}
    bias = rng.random() < 0.75

    if op in ("linear", "logistic_regression"):
        if op == "linear":
            M = _pick(rng, _OUT_FEATURES, lambda o: o * D <= _BUDGET and max(N, 1) * o <= _BUDGET)
            act = rng.choice(ACTS)
        else:
            M, act = rng.choice((1, 2, 5)), None
        w = m.param(M, D, scale=D ** -0.5)
        args = (x, w, m.param(M) if bias else None) + ((act,) if op == "linear" else ())
        desc.append(f"out {M} {act}")
    elif op == "mlp":
        H = _pick(rng, _OUT_FEATURES, lambda h: h * D <= _BUDGET and max(N, 1) * h <= _BUDGET)
        O = _pick(rng, _OUT_FEATURES[:6], lambda o: True)
        act = rng.choice(ACTS)
        args = (x, m.param(H, D, scale=D ** -0.5), m.param(H) if bias else None,
                m.param(O, H, scale=H ** -0.5), m.param(O) if rng.random() < 0.75 else None)
        kwargs["activation"] = act
        desc.append(f"{D} -> {H} -> {O} {act}")
    else:
        red = rng.choice(REDUCTIONS)
        if N == 0 and red == "mean":
            red = "sum"  # the mean of nothing is NaN, as torch's (test_logreg checks it)
        kwargs["reduction"] = red
        if op == "linear_bce":
            y = m.data(*lead_shape) if rng.random() < 0.5 else m.labels(2, *lead_shape).to(dtype)
            args = (x, m.param(1, D, scale=D ** -0.5), m.param(1) if bias else None, y)
            if rng.random() < 0.4:
                # torch's BCE broadcasts pos_weight onto the logits: 0-d for one row (1-D x)
                kwargs["pos_weight"] = m.data(*(() if lead == "1d" else (1,))) + 0.5
            if rng.random() < 0.4:
                sw_shape = lead_shape[-1:] if len(lead_shape) > 1 and rng.random() < 0.5 \
                    else lead_shape
                kwargs["sample_weight"] = m.data(*sw_shape) + 0.1
            desc.append(f"{red} {sorted(k for k in kwargs if k != 'reduction')}")
        else:
            C = _pick(rng, _CLASSES, lambda c: c * D <= _BUDGET and max(N, 1) * c <= _BUDGET)
            t = m.labels(C, *lead_shape)
            if rng.random() < 0.3 and t.numel() > 1:
                ii = rng.choice((-100, 0, C - 1))
                t.view(-1)[1::3] = ii  # ignored rows
                if t.view(-1)[0] == ii:  # row 0 counted, so the mean's denominator is not 0
                    t.view(-1)[0] = (ii + 1) % C
                kwargs["ignore_index"] = ii
            if rng.random() < 0.4:
                kwargs["class_weight"] = m.data(C) + 0.1
            if rng.random() < 0.3:
                kwargs["label_smoothing"] = rng.choice((0.05, 0.1, 0.3))
            args = (x, m.param(C, D, scale=D ** -0.5), m.param(C) if bias else None, t)
            if rng.random() < 0.25:
                env = {"MANUAL_LAYERS_CE_PATH": "chunked",
                       "MANUAL_LAYERS_CE_CHUNK_ROWS": str(rng.choice((1, 5, 64)))}
            elif C >= 32 and rng.random() < 0.3:
                # from C = 32 (CPU, mean/sum) the chunked path may be the default: keep the
                # single pass drawn too
                env = {"MANUAL_LAYERS_CE_PATH": "single"}
            path = {"chunked": f" chunked {env.get('MANUAL_LAYERS_CE_CHUNK_ROWS')}",
                    "single": " single pass"}.get(env.get("MANUAL_LAYERS_CE_PATH"), "")
            desc.append(f"C {C} {red} {sorted(k for k in kwargs if k != 'reduction')}{path}")
    desc.append(f"{str(dtype)[6:]} bias={bias}")
    return Sample(op, f"seed {seed}: " + ", ".join(desc), args, kwargs, env)


def _split(rng, n):
    """Two leading dims whose product is n (> 0)."""
    a = rng.choice([d for d in range(1, n + 1) if n % d == 0])
    return a, n // a
