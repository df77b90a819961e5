"""Per-layer SQNR: paired with the right INT8 layers, merged exactly whatever the batch split."""

import math

import torch
from helpers import serial_calibration

from quantray.core import flow, layers
from quantray.inputs import data
from quantray.spec import QuantSpec


def _int8(model, digits_plan, quant="x86"):
    spec, _, batches, example = digits_plan
    prepared, _ = serial_calibration(model, example, quant, spec, batches, [list(range(len(batches)))])
    return flow.convert(prepared)


def test_layer_sqnr_merges_exactly_and_the_last_layer_equals_the_logit_sqnr(tiny_model, digits_plan):
    int8 = _int8(tiny_model, digits_plan)
    test = data.digits("test")
    batches = data.make_batches(list(range(96)), 16)
    whole = layers.layer_rows(layers.merge_layers([layers.layer_errors(tiny_model, int8, test, batches)]))
    split = [layers.layer_errors(tiny_model, int8, test, batches[k::3]) for k in (2, 0, 1)]
    assert layers.layer_rows(layers.merge_layers(split)) == whole

    quantized = {n for n, m in int8.named_modules() if type(m).__module__.startswith("torch.ao.nn.") and "quantized" in type(m).__module__}
    named = {r["module"] for r in whole}
    assert {"conv1", "conv2", "conv3", "fc"} <= quantized & named
    assert all(r["quantized"] for r in whole)
    assert all(r["samples"] == 96 and r["sqnr_db"] is not None and 10 < r["sqnr_db"] < 80 for r in whole)

    # The classifier's output is the logits: its SQNR is the logits' SQNR over the same samples.
    x = test.tensors[0][:96]
    with torch.inference_mode():
        fp32, q = tiny_model(x).double(), int8(x).double()
    expected = 10 * math.log10(float((fp32 ** 2).sum()) / float(((q - fp32) ** 2).sum()))
    fc = next(r for r in whole if r["module"] == "fc")
    assert math.isclose(fc["sqnr_db"], expected, rel_tol=1e-9)
    assert fc["int8_type"] == "quantized Linear" and fc["fp32_type"] == "Linear"


def test_a_layer_kept_in_fp32_is_marked_not_quantized(tiny_model, digits_plan):
    quant = QuantSpec(module_names={"conv2": "fp32"})
    int8 = _int8(tiny_model, digits_plan, quant)
    rows = layers.layer_rows(layers.merge_layers([layers.layer_errors(tiny_model, int8, data.digits("test"),
                                                                      [list(range(32))])]))
    quantized = {r["module"]: r["quantized"] for r in rows}
    assert quantized["conv2"] is False and all(quantized[m] for m in ("conv1", "conv3", "fc"))
    conv2 = next(r for r in rows if r["module"] == "conv2")
    assert conv2["int8_type"] == "ConvReLU2d" and conv2["sqnr_db"] is not None  # error from conv1 reaches it


def test_pairing_once_finds_torchs_own_pairs_on_a_model_with_many_fusions(digits_plan):
    """The logger hands torch's graph matcher its fusion list built once (2.5 s less here on
    mobilenet_v2): the layers it logs are the ones torch's own add_loggers pairs, in the same order."""
    import torch.ao.ns._numeric_suite_fx as ns

    from quantray.demo import digits_mobilenet

    model = digits_mobilenet().eval()
    int8 = _int8(model, digits_plan)
    x = data.digits("test").tensors[0][:16]
    logger = layers.LayerLogger(model, int8)
    logged = [name for name, *_ in logger.log(x, list(range(16)))[1].layers]
    with flow.without_stack_traces():
        fp32_logged, int8_logged = ns.add_loggers("fp32", model, "int8", int8, ns.OutputLogger)
    with torch.inference_mode():
        fp32_logged(x)
        int8_logged(x)
    info = ns.extract_logger_info(fp32_logged, int8_logged, ns.OutputLogger, "int8")
    torchs = [name for name, entry in info.items()
              if entry.get("node_output", {}).get("fp32") and entry["node_output"].get("int8")]
    assert len(logged) > 50 and logged == [name for name in torchs if name in logged]
    assert set(torchs) - set(logged) <= {name for name in torchs
                                         if info[name]["node_output"]["int8"][0]["values"][0].shape
                                         != info[name]["node_output"]["fp32"][0]["values"][0].shape}
