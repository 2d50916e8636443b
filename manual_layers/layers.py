"""The layers: drop-in replacements for nn.Linear (+ activation) and for
nn.Sequential(nn.Linear, activation, nn.Linear), and convert(), which swaps them into a model.

The fused losses are in losses.py, the logistic-regression layer in logistic_regression.py."""

import torch
from torch import nn

from . import functional as MF

__all__ = ["Linear", "FusedLinear", "MLP", "convert"]


def _no_script(name):
    raise RuntimeError(
        f"manual_layers.{name}: torch.jit.script is not supported (TorchScript cannot compile "
        f"the Python wrapper of its custom ops); use torch.compile or torch.export, which trace "
        f"the ops as single graph nodes")


class Linear(nn.Linear):
    """nn.Linear whose forward and backward run the manual_layers kernels; with an activation,
    nn.Linear + activation fused in one kernel: y = act(x W^T + b).

    Same constructor arguments, parameters (weight (out_features, in_features), bias
    (out_features,)), initialisation and state_dict keys as nn.Linear, so state dicts load
    both ways. activation: None, "relu", "gelu" (exact, as nn.GELU()), "gelu_tanh"
    (nn.GELU(approximate="tanh")), "silu", "sigmoid", "tanh".

    Without an activation the layer computes exactly what nn.Linear computes and IS an
    nn.Linear (a subclass), so code and tools that look for nn.Linear (initialisation loops, LoRA,
    tensor parallelism, pruning) find it and are right about it. With an activation,
    ``Linear(..., activation="gelu")`` returns a ``FusedLinear``, which is deliberately not an
    nn.Linear: its output is not linear in x and W, and a tool that special-cases nn.Linear would
    silently compute the wrong thing with it (LoRA adds its update after the activation instead of
    before; row-wise tensor parallelism sums activated partial outputs). Such tools refuse a
    FusedLinear with their own "not supported" error instead.

    Any float dtype, any leading dimensions, CPU and CUDA; under torch.autocast the GEMM runs in
    the autocast dtype, as nn.Linear's. Works under torch.compile, torch.export, torch.func
    (grad, vmap, jacrev, jacfwd, hessian, jvp) and double backward.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    activation : one of :data:`manual_layers.functional.ACTIVATIONS`, default None
    device, dtype : as nn.Linear's

    Examples
    --------
    >>> import torch, manual_layers as ml
    >>> layer = ml.Linear(8, 4)
    >>> layer(torch.randn(2, 3, 8)).shape
    torch.Size([2, 3, 4])
    >>> type(ml.Linear(8, 4, activation="gelu")).__name__
    'FusedLinear'
    """

    def __new__(cls, *args, **kwargs):
        if cls is Linear and _activation_arg(args, kwargs) is not None:
            return FusedLinear(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, in_features, out_features, bias=True, activation=None, device=None,
                 dtype=None):
        MF._check_activation(activation, "manual_layers.Linear")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x):
        """x (..., in_features) -> (..., out_features), x's dtype and device."""
        return MF.linear(x, self.weight, self.bias, self.activation)

    def _get_name(self):
        return "manual_layers.Linear"

    def extra_repr(self):
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")

    def __prepare_scriptable__(self):
        _no_script("Linear")

    @classmethod
    def from_linear(cls, linear, activation=None):
        """A manual_layers layer that shares linear's parameters (no copy): a Linear, or a
        FusedLinear when activation is given."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear.from_linear: expected an nn.Linear, got "
                            f"{type(linear).__name__}")
        if activation is not None and cls is Linear:
            return FusedLinear.from_linear(linear, activation)
        MF._check_activation(activation, "manual_layers.Linear.from_linear")
        return _sharing(cls, linear, activation)


def _sharing(cls, linear, activation):
    """A `cls` layer whose weight and bias ARE linear's Parameters (no copy)."""
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    m.in_features, m.out_features = linear.in_features, linear.out_features
    m.weight = linear.weight
    m.bias = linear.bias
    m.activation = activation
    m.train(linear.training)
    return m


def _activation_arg(args, kwargs):
    """The activation argument of Linear(in_features, out_features, bias, activation, ...)."""
    return args[3] if len(args) > 3 else kwargs.get("activation")


class FusedLinear(nn.Module):
    """nn.Linear followed by an activation, in one kernel: y = act(x W^T + b); what
    ``manual_layers.Linear(..., activation=...)`` returns.

    nn.Linear's constructor arguments, parameters (weight, bias), initialisation and state_dict
    keys, so state dicts load both ways with nn.Linear. Not an nn.Linear subclass, on purpose
    (see Linear). Any float dtype, any leading dimensions, CPU and CUDA; autocast as nn.Linear.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    activation : {"relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"}
        ``"gelu"`` is exact (``nn.GELU()``), ``"gelu_tanh"`` is ``nn.GELU(approximate="tanh")``.
    device, dtype : as nn.Linear's

    Examples
    --------
    >>> import torch, manual_layers as ml
    >>> layer = ml.Linear(8, 4, activation="gelu")
    >>> x = torch.randn(5, 8)
    >>> ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, layer.weight, layer.bias))
    >>> torch.allclose(layer(x), ref, atol=1e-6)
    True
    """

    def __init__(self, in_features, out_features, bias=True, activation="gelu", device=None,
                 dtype=None):
        super().__init__()
        MF._check_activation(activation, "manual_layers.FusedLinear")
        if activation is None:
            raise ValueError("manual_layers.FusedLinear: activation must be given; use "
                             "manual_layers.Linear for a layer without one")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self.activation = activation
        self.reset_parameters()

    def reset_parameters(self):
        """nn.Linear's initialisation."""
        nn.Linear.reset_parameters(self)

    def forward(self, x):
        """x (..., in_features) -> act(x W^T + b) (..., out_features)."""
        return MF.linear(x, self.weight, self.bias, self.activation)

    def _get_name(self):
        return "manual_layers.FusedLinear"

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")

    def __prepare_scriptable__(self):
        _no_script("FusedLinear")

    @classmethod
    def from_linear(cls, linear, activation):
        """A FusedLinear sharing linear's parameters (no copy), with the activation fused."""
        if not isinstance(linear, (nn.Linear, FusedLinear)):
            raise TypeError(f"FusedLinear.from_linear: expected an nn.Linear, got "
                            f"{type(linear).__name__}")
        MF._check_activation(activation, "manual_layers.FusedLinear.from_linear")
        return _sharing(cls, linear, activation)


class MLP(nn.Sequential):
    """nn.Sequential(nn.Linear(in, hidden), act, nn.Linear(hidden, out)) as one fused op:
    y = act(x W1^T + b1) W2^T + b2, forward and backward hand-written (functional.mlp).

    State dict: the keys of that nn.Sequential, "0.weight", "0.bias", "2.weight", "2.bias"
    (it IS an nn.Sequential of nn.Linear, the activation module and nn.Linear, with forward
    replaced), so state dicts load both ways with no renaming, and nn.Sequential(...) converted
    by convert() keeps its keys. `fc1` / `fc2` name the two layers (self[0], self[2]).
    Parameters and initialisation are nn.Linear's. activation: None, "relu", "gelu" (exact, as
    nn.GELU()), "gelu_tanh", "silu", "sigmoid", "tanh".

    The fused op runs while the three layers are exactly nn.Linear, the activation module and
    nn.Linear, without hooks. When a tool replaces or hooks them (PEFT's LoRA wraps the
    nn.Linear layers, Opacus and pruning register hooks, parametrizations change their class),
    forward runs the layers one by one instead, as nn.Sequential does, so the tool sees the
    calls it expects.

    Parameters
    ----------
    in_features, hidden_features, out_features : int
    activation : one of :data:`manual_layers.functional.ACTIVATIONS`, default "gelu"
    bias : bool, default True
    device, dtype : as nn.Linear's

    Examples
    --------
    >>> import torch, manual_layers as ml
    >>> mlp = ml.MLP(16, 64, 8, activation="gelu")
    >>> mlp(torch.randn(4, 16)).shape
    torch.Size([4, 8])
    """

    def __init__(self, in_features, hidden_features, out_features, activation="gelu", bias=True,
                 device=None, dtype=None):
        MF._check_activation(activation, "manual_layers.MLP")
        from .reference import ACTIVATION_MODULES
        act = ACTIVATION_MODULES[activation]() if activation is not None else nn.Identity()
        kw = dict(bias=bias, device=device, dtype=dtype)
        super().__init__(nn.Linear(in_features, hidden_features, **kw), act,
                         nn.Linear(hidden_features, out_features, **kw))
        self.activation = activation
        self._act_type = type(act)

    @property
    def fc1(self):
        """The first nn.Linear (self[0])."""
        return self[0]

    @property
    def fc2(self):
        """The second nn.Linear (self[2])."""
        return self[2]

    @property
    def in_features(self):
        """fc1's in_features."""
        return self[0].in_features

    @property
    def hidden_features(self):
        """fc1's out_features."""
        return self[0].out_features

    @property
    def out_features(self):
        """fc2's out_features."""
        return self[2].out_features

    def _fusable(self):
        """The three layers are the ones the fused op computes, and nobody hooks them."""
        mods = self._modules
        l1, act, l2 = mods.get("0"), mods.get("1"), mods.get("2")
        if type(l1) is not nn.Linear or type(l2) is not nn.Linear or \
                type(act) is not self._act_type or len(mods) != 3:
            return False
        for m in (l1, act, l2):
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or \
                    m._backward_pre_hooks:
                return False
        return True

    def forward(self, x):
        """x (..., in_features) -> (..., out_features)."""
        if self._fusable():
            return MF.mlp(x, self[0].weight, self[0].bias, self[2].weight, self[2].bias,
                          self.activation)
        return super().forward(x)

    def _get_name(self):
        return "manual_layers.MLP"

    def extra_repr(self):
        return f"activation={self.activation!r}"

    def __prepare_scriptable__(self):
        _no_script("MLP")

    @classmethod
    def from_sequential(cls, seq):
        """An MLP sharing the parameters (no copy) of nn.Sequential(nn.Linear, act, nn.Linear)
        with a supported activation module (or nn.Identity); same state_dict keys."""
        act = _mlp_activation(seq)
        if act is False:
            raise TypeError("MLP.from_sequential: expected nn.Sequential(nn.Linear, activation, "
                            f"nn.Linear) with matching sizes, got {seq!r}")
        m = cls.__new__(cls)
        nn.Sequential.__init__(m, seq[0], seq[1], seq[2])
        m.activation = act
        m._act_type = type(seq[1])
        m.train(seq.training)
        return m


def _mlp_activation(seq):
    """The activation name if `seq` is exactly nn.Sequential(nn.Linear, act, nn.Linear) with
    foldable parts (None for nn.Identity), else False."""
    if type(seq) is not nn.Sequential or len(seq) != 3:
        return False
    l1, a, l2 = seq[0], seq[1], seq[2]
    if type(l1) is not nn.Linear or type(l2) is not nn.Linear:
        return False
    if l1.out_features != l2.in_features or (l1.bias is None) != (l2.bias is None):
        return False
    if l1.weight.dtype != l2.weight.dtype or l1.weight.device != l2.weight.device:
        return False
    if type(a) is nn.Identity:
        return None
    name = _activation_name(a)
    return name if name is not None else False


def _activation_name(module):
    """The fused-activation name of a torch activation module (exactly that class, no hooks),
    or None if not foldable."""
    if module is None or module._forward_hooks or module._forward_pre_hooks:
        return None
    t = type(module)
    if t is nn.ReLU:
        return "relu"
    if t is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    return {nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}.get(t)


from ._convert import convert  # noqa: E402  (uses the classes above)
