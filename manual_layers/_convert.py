"""convert(model): swap a model's torch layers for manual_layers layers, in place."""

import logging

import torch
from torch import nn

from .layers import (FusedLinear, Linear, MLP, _activation_name, _mlp_activation)

__all__ = ["convert"]

logger = logging.getLogger("manual_layers")


def convert(model, *, fuse=True, verbose=False):
    """Swap, in place, every nn.Linear in `model` for a manual_layers layer that shares its
    parameters, and fuse what can be fused; returns `model` (the same object).

    - an nn.Linear becomes a manual_layers.Linear (the same object: its class is swapped, as
      torch.nn.utils.parametrize does, so references, hooks and state_dict keys stay);
    - with fuse=True, an nn.Linear whose output goes only into a supported activation module
      (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh) becomes one FusedLinear, and that
      activation module becomes nn.Identity (indices and state_dict keys unchanged). Found in an
      nn.Sequential by position, and in any other module by tracing its forward with torch.fx
      (a block whose forward calls self.fc1, self.act, self.fc2); a forward that cannot be traced
      keeps its layers unfused;
    - with fuse=True, an nn.Sequential that is exactly (nn.Linear, activation, nn.Linear)
      becomes a manual_layers.MLP (its class is swapped; same keys "0.weight" ... "2.bias").

    Subclasses of nn.Linear (e.g. MultiheadAttention's out_proj) and layers with hooks are left
    alone. The outputs are unchanged. What was swapped and fused is logged (logger
    "manual_layers", level INFO) and printed with verbose=True.

    Parameters
    ----------
    model : nn.Module
    fuse : bool, default True
        Fuse Linear + activation and (Linear, activation, Linear) blocks; False swaps the
        nn.Linear layers only (for tools that must see nn.Linear + activation, e.g. LoRA on
        every layer).
    verbose : bool, default False
        Print the summary of what changed.

    Returns
    -------
    The same ``model`` object, converted in place.

    Examples
    --------
    >>> import torch, manual_layers as ml
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    >>> ml.convert(model) is model
    True
    >>> type(model).__name__
    'MLP'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"manual_layers.convert: expected an nn.Module, got "
                        f"{type(model).__name__}")
    report = []
    _convert(model, "", fuse, report)
    summary = _summary(model, report)
    logger.info(summary)
    if verbose:
        print(summary)
    return model


def _name(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _swap_linear(module, path, report):
    """nn.Linear -> manual_layers.Linear, in place."""
    if type(module) is nn.Linear and not _hooked(module):
        module.__class__ = Linear
        module.activation = None
        report.append((path or "(model)", "nn.Linear -> manual_layers.Linear"))


def _hooked(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or
                module._backward_pre_hooks)


def _fuse(parent, lin_name, act_name, path, report):
    """parent.<lin_name> (nn.Linear) + parent.<act_name> -> FusedLinear + nn.Identity."""
    lin, act = parent._modules[lin_name], parent._modules[act_name]
    name = _activation_name(act)
    parent._modules[lin_name] = FusedLinear.from_linear(lin, name)
    parent._modules[act_name] = nn.Identity()
    report.append((f"{_name(path, lin_name)} + {_name(path, act_name)}",
                   f"nn.Linear + {type(act).__name__} -> manual_layers.FusedLinear({name!r})"))


def _convert(model, path, fuse, report):
    if type(model) is nn.Linear:
        _swap_linear(model, path, report)
        return
    if fuse and _mlp_activation(model) is not False and not any(_hooked(m) for m in model):
        act = _mlp_activation(model)
        model.__class__ = MLP
        model.activation = act
        model._act_type = type(model[1])
        report.append((path or "(model)", "nn.Sequential(Linear, activation, Linear) -> "
                                          f"manual_layers.MLP({act!r})"))
        return
    if fuse:
        pairs = _sequential_pairs(model) if isinstance(model, nn.Sequential) else \
            _traced_pairs(model, path, report)
        for lin_name, act_name in pairs:
            _fuse(model, lin_name, act_name, path, report)
    for name, child in list(model.named_children()):
        _convert(child, _name(path, name), fuse, report)


def _fusable_pair(model, lin_name, act_name):
    lin, act = model._modules.get(lin_name), model._modules.get(act_name)
    return (type(lin) is nn.Linear and not _hooked(lin) and act is not None and
            _activation_name(act) is not None)


def _sequential_pairs(seq):
    """(Linear, activation) names that follow each other in an nn.Sequential."""
    names = list(seq._modules.keys())
    return [(a, b) for a, b in zip(names, names[1:]) if _fusable_pair(seq, a, b)]


class _ChildrenAreLeaves(torch.fx.Tracer):
    """Traces one module's forward, its direct and deeper submodules as opaque calls."""

    def is_leaf_module(self, m, qualname):
        return True


def _traced_pairs(model, path, report):
    """(Linear, activation) child names where model's forward feeds the Linear's output only
    into the activation, each called exactly once; [] when the forward cannot be traced."""
    kids = model._modules
    if not any(type(m) is nn.Linear for m in kids.values()) or \
            not any(_activation_name(m) is not None for m in kids.values() if m is not None):
        return []
    try:
        graph = _ChildrenAreLeaves().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure only means "do not fuse"
        report.append((path or "(model)", f"not fused: its forward could not be traced "
                                          f"({type(e).__name__})"))
        return []
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs = []
    for lin_name, nodes in calls.items():
        if len(nodes) != 1 or "." in lin_name:
            continue
        node = nodes[0]
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args != (node,) or \
                users[0].kwargs:
            continue
        act_name = users[0].target
        if "." in act_name or len(calls.get(act_name, ())) != 1:
            continue
        if _fusable_pair(model, lin_name, act_name):
            pairs.append((lin_name, act_name))
    return pairs


def _summary(model, report):
    if not report:
        return f"manual_layers.convert: nothing to convert in {type(model).__name__}"
    lines = [f"manual_layers.convert: {len(report)} change(s)"]
    lines += [f"  {where}: {what}" for where, what in report]
    return "\n".join(lines)
