"""convert(model): in place for every model, the same outputs, a report of what changed; Linear +
activation fused in nn.Sequential and in blocks whose forward calls fc1, act, fc2."""

import logging

import pytest
import torch
from torch import nn

import manual_layers as ml


class Block(nn.Module):
    """A transformer-style MLP block: forward calls self.fc1, self.act, self.fc2."""

    def __init__(self, act=None):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.act = act if act is not None else nn.GELU()
        self.fc2 = nn.Linear(32, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


class Branchy(nn.Module):
    """fc1's output feeds the activation AND a skip: not fusable."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.fc1(x)
        return self.act(h) + h


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.act = nn.Tanh()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.act(self.fc1(x))
        return self.fc1(x)


def _same_outputs(model, make_ref, x):
    ref = make_ref()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


def test_top_level_linear_in_place():
    lin = nn.Linear(4, 3)
    w = lin.weight
    assert ml.convert(lin) is lin
    assert type(lin) is ml.Linear and lin.weight is w and lin.activation is None
    assert isinstance(lin, nn.Linear)


def test_top_level_sequential_becomes_mlp_in_place():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 2))
    keys = list(seq.state_dict())
    ml.convert(seq)  # return value unused: the model itself changed
    assert type(seq) is ml.MLP and seq.activation == "silu"
    assert list(seq.state_dict()) == keys
    _same_outputs(seq, lambda: nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 2)),
                  torch.randn(5, 4))


def test_block_forward_is_traced_and_fused():
    torch.manual_seed(1)
    model = nn.Sequential(Block(), Block(nn.Tanh()))
    keys = list(model.state_dict())
    ml.convert(model)
    for blk, act in ((model[0], "gelu"), (model[1], "tanh")):
        assert type(blk.fc1) is ml.FusedLinear and blk.fc1.activation == act
        assert type(blk.act) is nn.Identity
        assert type(blk.fc2) is ml.Linear
    assert list(model.state_dict()) == keys
    _same_outputs(model, lambda: nn.Sequential(Block(), Block(nn.Tanh())), torch.randn(3, 8))


def test_not_fused_where_the_dataflow_does_not_allow_it():
    torch.manual_seed(2)
    model = nn.Sequential(Branchy(), Untraceable())
    ml.convert(model)
    assert type(model[0].fc1) is ml.Linear and type(model[0].act) is nn.ReLU
    assert type(model[1].fc1) is ml.Linear and type(model[1].act) is nn.Tanh
    _same_outputs(model, lambda: nn.Sequential(Branchy(), Untraceable()), torch.randn(3, 8))


def test_sequential_pairs_fused_and_hooked_layers_left_alone():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(),
                          nn.Linear(8, 2))
    model[2].register_forward_hook(lambda m, i, o: None)
    ml.convert(model)
    assert type(model[0]) is ml.FusedLinear and type(model[1]) is nn.Identity
    assert type(model[2]) is nn.Linear and type(model[3]) is nn.GELU  # hooked: untouched
    assert type(model[4]) is ml.Linear


def test_report_is_logged_and_printed(caplog, capsys):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Softmax(-1))
    with caplog.at_level(logging.INFO, logger="manual_layers"):
        ml.convert(model, verbose=True)
    out = capsys.readouterr().out
    assert "2 change(s)" in out and "FusedLinear('relu')" in out and "2: nn.Linear" in out
    assert "FusedLinear('relu')" in caplog.text


def test_convert_refuses_a_non_module():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        ml.convert("model")


def test_multihead_attention_out_proj_untouched():
    mha = nn.MultiheadAttention(8, 2)
    ml.convert(mha)
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
