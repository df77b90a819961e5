"""`flow.prepare` hands out copies of one prepare_fx result per model, config and example input:
each caller gets a model of its own, the same as a fresh prepare_fx's, and a changed model is
prepared afresh."""

import copy
import warnings

import torch
from torch.ao.quantization.quantize_fx import prepare_fx

from quantray.core import flow
from quantray.spec import QuantSpec


def _fresh(model, quant, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_fx(copy.deepcopy(model).eval(), flow.qconfig_mapping(quant), (example,))


def test_prepared_copies_are_separate_and_equal_to_a_fresh_prepare_and_follow_weight_changes(tiny_model):
    model, example, quant = copy.deepcopy(tiny_model), torch.zeros(1, 1, 8, 8), QuantSpec()
    first, second = flow.prepare(model, quant, example), flow.prepare(model, quant, example)
    assert first is not second and first.code == second.code == _fresh(model, quant, example).code
    x = torch.randn(16, 1, 8, 8)
    with torch.inference_mode():
        first(x)  # observes: the other copy's observers stay empty
    observers = {n: m for n, m in second.named_modules() if isinstance(m, torch.ao.quantization.ObserverBase)}
    assert observers and all(float(m.min_val.max()) == float("inf") for n, m in observers.items() if "weight" not in n)
    with torch.no_grad():
        model.conv1.weight.mul_(2)  # in place: the version counter moves
    changed = flow.prepare(model, quant, example)
    with torch.inference_mode():
        assert torch.equal(changed(x), model(x)) and not torch.equal(first(x), model(x))
    other = flow.prepare(model, QuantSpec(backend="qnnpack"), example)  # another config: its own prepare
    assert other.code == _fresh(model, QuantSpec(backend="qnnpack"), example).code


def test_a_config_key_is_what_prepare_and_convert_make_of_the_spec():
    """Specs that say one thing in other words share a key (and so a prepared template and a tune
    worker's kept build); any difference prepare, convert or bias correction sees gives another."""
    key = flow.config_key
    assert key(QuantSpec()) == key(QuantSpec(activation_range="l2")) == key(QuantSpec(activation="histogram"))
    assert key(QuantSpec()) == key(QuantSpec(mode="fast")) == key("x86")
    same = {key(QuantSpec(**kw)) for kw in ({}, {"backend": "qnnpack"}, {"activation_range": "mse"},
                                            {"activation_range": "percentile"},
                                            {"activation_range": "percentile", "percentile": 99.9},
                                            {"weight": "per_tensor"}, {"module_names": {"fc": "fp32"}},
                                            {"equalize": True}, {"bias_correction": True}, {"mapping": "default"},
                                            {"flow": "pt2e"})}
    assert len(same) == 11
