"""The engine check without Ray: a real kernel fault is found and named, every shipped job's
kernels pass, the reference it compares with is torch's, and merging does not depend on layout."""

import platform
import tomllib
from pathlib import Path

import pytest
import torch
import torchvision

from quantray.core import flow
from quantray.core.engine import FAULT_STEPS, EngineCheck, engine_rows, engine_verdict, merge_engine
from quantray.demo import digits_cnn_relu6
from quantray.inputs import data
from quantray.inputs.models import build_model
from quantray.spec import QuantSpec, load_spec

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.toml"))


def _int8(model, quant, batches):
    prepared = flow.prepare(model, quant, batches[0][:1])
    with torch.inference_mode():
        for x in batches:
            prepared(x)
    return prepared, flow.convert(prepared)


def _digits(split, n):
    x, y = data.digits(split).tensors
    return x[:n], y[:n]


@pytest.mark.skipif(not X86, reason="qnnpack's ReLU6 fault is seen on x86 CPUs; it is the native engine elsewhere")
def test_qnnpack_relu6_on_x86_is_called_an_engine_fault_and_the_reference_is_torchs():
    calib, _ = _digits("train", 320)
    x, y = _digits("test", 64)
    prepared, int8 = _int8(digits_cnn_relu6(), QuantSpec(backend="qnnpack"), list(calib.split(32)))
    verdict = engine_verdict(merge_engine([EngineCheck(int8).run(x, list(range(64)), y)]), "qnnpack")
    assert verdict["ok"] is False
    first = verdict["first_layer"]
    assert (first["module"], first["type"]) == ("relu", "ReLU6")
    assert first["off_fraction"] > 0.5 and first["max_steps"] >= 10
    assert verdict["int8_top1"] < 0.3 < 0.9 < verdict["reference_top1"]
    assert "the qnnpack kernels disagree with the reference quantization from layer relu (ReLU6)" in verdict["message"]
    assert "use backend x86" in verdict["message"]
    # The reference forward the check runs is torch's reference quantized model, up to rounding.
    with torch.inference_mode():
        theirs = (flow.reference(prepared)(x).argmax(1) == y).sum().item() / 64
    assert abs(theirs - verdict["reference_top1"]) <= 2 / 64
    # The same model under the x86 engine: its kernels agree with the same reference.
    _, healthy = _int8(digits_cnn_relu6(), QuantSpec(backend="x86"), list(calib.split(32)))
    assert engine_verdict(merge_engine([EngineCheck(healthy).run(x, list(range(64)), y)]), "x86")["ok"] is True


@pytest.mark.skipif(not X86, reason="the shipped jobs' figures are for x86 CPUs")
@pytest.mark.parametrize("job", [j for j in JOBS if "qnnpack_relu6" not in j.name  # the engine check is FX's
                                 and tomllib.loads(j.read_text()).get("quantization", {}).get("flow") != "pt2e"],
                         ids=lambda j: j.stem)
def test_every_shipped_jobs_kernels_agree_with_the_reference_within_one_step(job):
    table = tomllib.loads(job.read_text())
    quant = QuantSpec(**table.get("quantization", {}))
    if "checkpoint" in table["model"]:  # the article's resnet18 (its checkpoint is the user's): random weights
        torch.manual_seed(0)
        model = getattr(torchvision.models, table["model"]["arch"])(num_classes=table["model"]["num_classes"]).eval()
        calib, x, y = torch.randn(8, 3, 224, 224), torch.randn(4, 3, 224, 224), torch.zeros(4, dtype=torch.long)
    elif table["calibration"].get("source", "digits") == "digits":
        model = build_model(load_spec(job).model, job)
        calib, _ = _digits("train", 64)
        x, y = _digits("test", 64)
    else:  # the examples' own data (quantray.examples); targets are not class labels
        spec = load_spec(job)
        model = build_model(spec.model, job)
        calib = data.load_batch(data.build_dataset(spec.calibration, "[calibration]"), list(range(64)))[0]
        x, y = data.load_batch(data.build_dataset(spec.test, "[test]"), list(range(64)))[0], None
    _, int8 = _int8(model, quant, list(calib.split(32)))
    rows = engine_rows(merge_engine([EngineCheck(int8).run(x, list(range(len(x))), y)]))
    assert rows and all(r["max_steps"] < FAULT_STEPS for r in rows), [r for r in rows if r["max_steps"] >= FAULT_STEPS]


def test_merged_check_does_not_depend_on_how_batches_were_spread():
    calib, _ = _digits("train", 96)
    x, y = _digits("test", 96)
    _, int8 = _int8(digits_cnn_relu6(), QuantSpec(backend="x86"), list(calib.split(32)))
    check = EngineCheck(int8)
    per_batch = [check.run(x[i:i + 32], list(range(i, i + 32)), y[i:i + 32]) for i in (0, 32, 64)]
    one = engine_rows(merge_engine(per_batch))
    two = engine_rows(merge_engine([merge_engine([per_batch[2], per_batch[0]]), per_batch[1]]))
    assert one == two
    with pytest.raises(ValueError, match="more than one worker"):
        merge_engine([per_batch[0], per_batch[0]])
