"""The PT2E flow without Ray: the same exact merge over torchao's observers (any worker count,
shard and batch order), replay equal to torchao's own single-process calibration, the spec mapped
onto X86InductorQuantizer, the saved INT8 program, and the one-line refusals."""

import subprocess
import sys

import pytest
import torch
from helpers import serial_calibration
from torch import nn

from quantray.core import flow, merge, pt2e, sites
from quantray.errors import SpecError
from quantray.inputs import data
from quantray.spec import QuantSpec

PT2E = QuantSpec(flow="pt2e")


def _layouts(n):
    return [[list(range(n))], data.assign_shards(n, 2), data.assign_shards(n, 3), [list(reversed(range(n)))]]


def _digest(model, example, quant, spec, batches, shards, order=None):
    return merge.state_digest(serial_calibration(model, example, quant, spec, batches, shards, order=order)[0])


def test_exact_state_is_bit_identical_for_any_worker_count_shard_and_batch_order(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    digests = {_digest(tiny_model, example, PT2E, spec, batches, shards, order)
               for shards in _layouts(len(batches)) for order in (None, list(reversed(range(len(shards)))))}
    assert len(digests) == 1


def test_replay_is_bit_identical_to_torchaos_single_process_calibration(tiny_model, digits_plan):
    """torchao's own flow, as its docs write it: export, prepare_pt2e, every batch in order."""
    spec, dataset, batches, example = digits_plan
    quant = QuantSpec(flow="pt2e", mode="replay")
    theirs = pt2e.prepare(tiny_model, quant, example)
    assert any(type(o).__module__.startswith("torchao") for o in sites.find_observers(theirs).values())
    for batch in batches:
        theirs(data.load_batch(dataset, batch)[0])
    theirs = merge.state_digest(theirs)
    for shards in _layouts(len(batches))[:3]:
        assert _digest(tiny_model, example, quant, spec, batches, shards, list(reversed(range(len(shards))))) == theirs
    assert _digest(tiny_model, example, PT2E, spec, batches, [list(range(len(batches)))]) != theirs  # re-binning


def test_weights_are_observed_in_the_graph_and_left_out_of_qparams(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    prepared, _ = serial_calibration(tiny_model, example, PT2E, spec, batches, [list(range(len(batches)))])
    weights = sites.weight_observers(prepared)
    observers = sites.find_observers(prepared)
    assert len(weights) == 4 and all(type(observers[w]).__name__ == "PerChannelMinMaxObserver" for w in weights)
    rows = merge.qparam_rows(prepared)
    assert rows and not {r["name"] for r in rows} & weights
    assert all(r["dtype"] == "uint8" and 0 <= r["zero_point"] <= 255 for r in rows)
    assert prepared.quantray_export == "strict"  # the digits CNN calls one ReLU module three times


@pytest.mark.parametrize("choice, observer, method", [
    ({"activation_range": "mse"}, "RangeObserverPT2E", "mse"),
    ({"activation": "minmax"}, "MinMaxObserver", "minmax"),
    ({"activation": "moving_average"}, "MovingAverageMinMaxObserver", "moving_average"),
])
def test_activation_choices_map_onto_torchaos_observers(tiny_model, digits_plan, choice, observer, method):
    spec, _, batches, example = digits_plan
    quant = QuantSpec(flow="pt2e", **choice)
    prepared, _ = serial_calibration(tiny_model, example, quant, spec, batches, data.assign_shards(len(batches), 2))
    rows = merge.qparam_rows(prepared)
    assert {r["observer"] for r in rows} == {observer} and {r["range_method"] for r in rows} == {method}
    assert _digest(tiny_model, example, quant, spec, batches, [list(range(len(batches)))]) == merge.state_digest(prepared)


def test_per_tensor_weights_and_fp32_modules(tiny_model, digits_plan):
    spec, dataset, batches, example = digits_plan
    quant = QuantSpec(flow="pt2e", weight="per_tensor", module_names={"fc": "fp32"})
    prepared, _ = serial_calibration(tiny_model, example, quant, spec, batches, [list(range(len(batches)))])
    observers = sites.find_observers(prepared)
    weights = sorted(type(observers[w]).__name__ for w in sites.weight_observers(prepared))
    assert weights == ["MinMaxObserver"] * 3  # conv1..conv3; fc stays FP32
    int8 = flow.convert(prepared)
    linear = [n for n in int8.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert linear and linear[0].args[1].op == "get_attr"  # its FP32 weight, not a dequantized INT8 one
    x, y = data.load_batch(dataset, batches[0])
    assert (int8(x).argmax(1) == tiny_model(x).argmax(1)).float().mean() > 0.9


@pytest.mark.ray  # starts a process
def test_the_saved_program_loads_without_quantray_and_its_compiled_runtime_agrees(tiny_model, digits_plan, tmp_path):
    spec, dataset, batches, example = digits_plan
    prepared, _ = serial_calibration(tiny_model, example, PT2E, spec, batches, data.assign_shards(len(batches), 2))
    int8 = flow.convert(prepared)
    path = tmp_path / "model_int8.pt2"
    path.write_bytes(pt2e.save_program(int8, example))
    x = data.load_batch(dataset, batches[0])[0]
    torch.save(x, tmp_path / "x.pt")
    # torchao registers the quantize/dequantize ops the program calls (torch's quantized_decomposed)
    script = ("import sys, torch, torchao; assert 'quantray' not in sys.modules\n"
              f"m = torch.export.load({str(path)!r}).module()\n"
              f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
              f"torch.save((m(x), m(x[:5])), {str(tmp_path / 'y.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    full, five = torch.load(tmp_path / "y.pt")
    reference = int8(x)
    assert torch.equal(full, reference) and torch.equal(five, reference[:5])  # dynamic batch
    runtime = pt2e.Compiled(pt2e.load_program(path.read_bytes()))
    assert runtime.warm(x) > 0 and runtime.warm(x) == 0.0 and runtime.warm(x[:7]) == 0.0
    compiled = runtime(x)
    assert set(runtime.compile_s) == {len(x)}
    partial = runtime(x[:7])  # padded to the compiled size: no second compile
    assert set(runtime.compile_s) == {len(x)} and torch.equal(partial, compiled[:7])
    # INT8 kernels and the reference differ by rounding at most: the same class almost everywhere
    assert (compiled.argmax(1) == reference.argmax(1)).float().mean() >= 0.95


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: neither export nor FX can trace it
            return y.relu()
        return y


def test_a_model_that_cannot_be_exported_gets_one_line_naming_the_error_and_fx(digits_plan):
    example = digits_plan[3]
    with pytest.raises(SpecError) as e:
        flow.prepare(_DataDependent().eval(), PT2E, example)
    message = str(e.value)
    assert "\n" not in message and 'flow = "pt2e"' in message and 'use flow = "fx"' in message
    assert "non-strict export:" in message and "strict export:" in message
    with pytest.raises(SpecError) as e:
        flow.prepare(_DataDependent().eval(), QuantSpec(), example)
    assert "\n" not in str(e.value) and "TraceError" in str(e.value) and 'try flow = "pt2e"' in str(e.value)


@pytest.mark.parametrize("settings, key", [
    ({"backend": "qnnpack"}, "backend"),
    ({"mapping": "default"}, "mapping"),
    ({"bias_correction": True}, "bias_correction"),
])
def test_settings_pt2e_cannot_express_are_refused_in_one_line(settings, key):
    with pytest.raises(SpecError) as e:
        QuantSpec(flow="pt2e", **settings)
    assert f"[quantization] {key}" in str(e.value) and 'flow = "pt2e"' in str(e.value) and "\n" not in str(e.value)


def test_a_module_type_the_quantizer_cannot_configure_is_refused(tiny_model, digits_plan):
    with pytest.raises(SpecError, match=r"module_types.ReLU: X86InductorQuantizer takes no per-type config .*Conv2d"):
        flow.prepare(tiny_model, QuantSpec(flow="pt2e", module_types={"ReLU": "fp32"}), digits_plan[3])
