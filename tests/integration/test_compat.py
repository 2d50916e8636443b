"""The names kept for one release after the layout change (issue 30): the runtime helpers'
top-level names (now in manual_layers.utils) and the module manual_layers.modules (now
layers.py, losses.py, logistic_regression.py). They import without a warning, are the same
objects as the new ones, stay out of __all__, and models pickled under the old module names
load as the current classes."""

import io
import pickle
import warnings

import numpy as np
import pytest
import torch

import manual_layers as ml

OLD_TOP_LEVEL = ["info", "BUILD_INFO", "cpu_kernels_isa", "cpu_cache_info", "empty_cpu_cache",
                 "fit_logistic_regression"]
MODULE_NAMES = ["Linear", "FusedLinear", "MLP", "convert", "LogisticRegression",
                "LinearBCEWithLogitsLoss", "LinearCrossEntropyLoss"]


@pytest.mark.parametrize("name", OLD_TOP_LEVEL)
def test_old_top_level_names_are_the_utils_ones(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = getattr(ml, name)
    assert old is getattr(ml.utils, name)
    assert name not in ml.__all__ and name in ml.utils.__all__


def test_all_is_the_public_api():
    assert set(ml.__all__) == {"Linear", "FusedLinear", "MLP", "LogisticRegression",
                               "LinearBCEWithLogitsLoss", "LinearCrossEntropyLoss", "convert",
                               "autograd", "functional", "reference", "sklearn", "utils"}
    for name in ml.__all__:
        assert getattr(ml, name) is not None


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_modules_alias_holds_the_same_objects(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import manual_layers.modules as old
    assert getattr(old, name) is getattr(ml, name)


@pytest.mark.parametrize("name", [n for n in MODULE_NAMES if n != "convert"])
def test_pickle_naming_the_old_module_loads_the_current_class(name):
    """A pickle written before the move names the class manual_layers.modules.<name>; the
    opcode below is what such a pickle holds for it."""
    data = b"cmanual_layers.modules\n" + name.encode() + b"\n."
    assert pickle.loads(data) is getattr(ml, name)


def test_whole_model_and_state_dict_round_trip(tmp_path):
    X = np.random.default_rng(0).normal(size=(60, 4))
    clf = ml.LogisticRegression(4, 3).fit(X, np.arange(60) % 3)
    model = torch.nn.Sequential(ml.Linear(4, 5), ml.Linear(5, 6, activation="gelu"),
                                ml.MLP(6, 7, 4))
    x = torch.randn(3, 4)
    buf = io.BytesIO()
    torch.save({"model": model, "clf": clf}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert [type(m) for m in back["model"]] == [ml.Linear, ml.FusedLinear, ml.MLP]
    assert torch.equal(back["model"](x), model(x))
    assert np.array_equal(back["clf"].predict_proba(X), clf.predict_proba(X))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "clf": clf.state_dict()}, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = torch.nn.Sequential(ml.Linear(4, 5), ml.Linear(5, 6, activation="gelu"),
                                ml.MLP(6, 7, 4))
    fresh.load_state_dict(sd["model"])
    clf2 = ml.LogisticRegression(4, 3)
    clf2.load_state_dict(sd["clf"])
    assert torch.equal(fresh(x), model(x)) and list(clf2.classes_) == [0, 1, 2]
