"""Cross-layer equalization without Ray: the function is kept, the ranges are equal, the collapse
is cured, the statistics key changes with it, and a model with nothing to equalize says so."""

import torch
from torch import nn

from quantray.core import flow, sites
from quantray.core.equalize import equalize
from quantray.demo import digits_cnn, digits_cnn_spread, digits_mobilenet
from quantray.inputs import data
from quantray.spec import QuantSpec


def _top1(model, x, y):
    with torch.inference_mode():
        return (model(x).argmax(1) == y).float().mean().item()


def test_equalized_model_computes_the_same_function_with_equal_channel_ranges():
    x, _ = data.digits("test").tensors
    for model in (digits_cnn_spread(), digits_mobilenet()):  # ReLU pairs; BatchNorm folded, hardswish skipped
        equalized, done = equalize(model)
        assert done["pairs"]
        with torch.inference_mode():
            a, b = model(x), equalized(x)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
        for first, second in done["pairs"]:
            w1, w2 = equalized.get_submodule(first).weight, equalized.get_submodule(second)
            view = w2.weight.view(w2.groups, -1, *w2.weight.shape[1:])
            r2 = view.abs().amax(dim=(1, *range(3, view.dim()))).reshape(-1)
            r1 = w1.abs().amax(dim=tuple(range(1, w1.dim())))
            assert torch.allclose(r1, r2, rtol=1e-4)
    assert equalize(digits_mobilenet())[1]["folded_batchnorm"] > 0
    assert any("Hardswish" in why for why in equalize(digits_mobilenet())[1]["skipped"])


def test_equalization_cures_the_per_tensor_collapse_of_the_spread_case():
    calib, _ = data.digits("train").tensors
    x, y = data.digits("test").tensors
    model = digits_cnn_spread()
    fp32 = _top1(model, x, y)
    assert fp32 == _top1(digits_cnn(), x, y)  # the spread is function-preserving
    top1 = {}
    for eq in (False, True):
        quant = QuantSpec(weight="per_tensor", equalize=eq)
        prepared = flow.prepare(model, quant, calib[:1])
        with torch.inference_mode():
            for batch in calib[:320].split(32):
                prepared(batch)
        top1[eq] = _top1(flow.convert(prepared), x, y)
    assert top1[False] < fp32 - 0.10
    assert top1[True] >= fp32 - 0.01


def test_equalization_changes_every_statistics_key_and_nothing_else_does():
    example = torch.zeros(1, 1, 8, 8)
    keys = {eq: {v.key for o in sites.observed_values(flow.prepare(digits_cnn(), QuantSpec(equalize=eq), example)).values()
                 for v in o.values} for eq in (False, True)}
    assert not keys[False] & keys[True]
    again = {v.key for o in sites.observed_values(flow.prepare(digits_cnn(), QuantSpec(), example)).values() for v in o.values}
    assert again == keys[False]


def test_a_model_with_nothing_to_equalize_says_why():
    model = nn.Sequential(nn.Linear(4, 8), nn.Hardswish(), nn.Linear(8, 2)).eval()
    equalized, done = equalize(model)
    assert done["pairs"] == [] and done["sweeps"] == 0
    assert done["skipped"] == ["0 -> 2: through Hardswish, which clips"]
    x = torch.randn(5, 4)
    assert torch.equal(model(x), equalized(x))
