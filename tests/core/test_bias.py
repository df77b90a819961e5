"""Bias correction without Ray: its sums merge to the same bits in any layout, and the corrected
INT8 layer's mean output is the FP32 layer's."""

import io

import torch
import torch.nn.functional as F
from helpers import serial_calibration

from quantray.core import flow
from quantray.core.bias import correct_biases, corrected_layers
from quantray.inputs import data
from quantray.spec import QuantSpec


def _bytes(sums):
    buffer = io.BytesIO()
    torch.save({k: (s, n) for k, (s, n) in sorted(sums.items())}, buffer)
    return buffer.getvalue()


def test_bias_sums_are_byte_identical_for_1_2_3_workers_and_shuffled_shard_orders(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    quant = QuantSpec(weight="per_tensor", bias_correction=True)
    n = len(batches)
    layouts = [[list(range(n))], data.assign_shards(n, 2), data.assign_shards(n, 3),
               [[b for b in range(n) if b % 3 == k] for k in range(3)]]
    seen = set()
    for shards in layouts:
        for order in (None, list(reversed(range(len(shards))))):
            _, result = serial_calibration(tiny_model, example, quant, spec, batches, shards, order=order)
            assert set(result.stats.bias) == {"conv1", "conv2", "conv3", "fc"}
            seen.add(_bytes(result.stats.bias))
    assert len(seen) == 1


def test_corrected_layers_mean_output_equals_the_fp32_layers(tiny_model, digits_plan):
    spec, dataset, batches, example = digits_plan
    quant = QuantSpec(weight="per_tensor", bias_correction=True)
    prepared, result = serial_calibration(tiny_model, example, quant, spec, batches, data.assign_shards(len(batches), 2))
    int8 = flow.convert(prepared)
    before = int8.conv2.bias().clone()
    done = correct_biases(int8, prepared, result.stats.bias)
    assert done["layers"] == 4 and done["not_corrected"] == []
    # conv2's input over the calibration set, as the calibration forward saw it (FP32 upstream)
    x = torch.cat([data.load_batch(dataset, b)[0] for b in batches])
    with torch.inference_mode():
        h = F.relu(tiny_model.conv1(x))
    conv = corrected_layers(prepared)["conv2"]
    w, wq = conv.weight.double(), int8.conv2.weight().dequantize().double()
    fp32 = F.conv2d(h.double(), w, conv.bias.double(), padding=1).mean((0, 2, 3))
    plain = F.conv2d(h.double(), wq, before.double(), padding=1).mean((0, 2, 3))
    fixed = F.conv2d(h.double(), wq, int8.conv2.bias().double(), padding=1).mean((0, 2, 3))
    assert (fixed - fp32).abs().max() < 1e-5 < (plain - fp32).abs().max()
