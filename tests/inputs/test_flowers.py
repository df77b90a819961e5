"""The seed article's job (Flowers102 + resnet18) through the CLI, on a Flowers102 folder in
torchvision's real layout, and its INT8 file loaded back with the article's own recipe."""

import json

import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from helpers import ROOT
from torch import nn
from torch.ao.quantization import QConfigMapping, get_default_qconfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import quantray
from quantray.cli import main
from quantray.errors import SpecError
from quantray.inputs import data
from quantray.spec import DataSpec, load_spec
from quantray.testing import article_job

JOB = ROOT / "jobs" / "flowers102_resnet18.toml"


def load_quantized_model(model_path):
    """The article's recipe, as its readers have it: no quantray involved."""
    model = torchvision.models.resnet18()
    model.fc = nn.Linear(model.fc.in_features, 102)
    model.eval()
    qconfig_mapping = QConfigMapping().set_global(get_default_qconfig("x86"))
    example_inputs = torch.randn(1, 3, 224, 224)
    prepared = prepare_fx(model, qconfig_mapping, example_inputs)
    quantized = convert_fx(prepared)
    quantized.load_state_dict(torch.load(model_path))
    return quantized


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """The shipped job with a written Flowers102 folder and 20 calibration samples; short speed
    measurements (speed is not what this test is about)."""
    base = tmp_path_factory.mktemp("flowers")
    article_job(base, samples=20, latency_iters=5, run_extra="throughput_batch = 2\n")
    return base


def test_shipped_job_is_the_articles_setup():
    text = JOB.read_text()
    for line in ('arch = "resnet18"', "num_classes = 102", 'dataset = "Flowers102"', "samples = 100",
                 "batch_size = 10", 'backend = "x86"', 'transform = "imagenet_eval"', "download = false",
                 "latency_iters = 100"):
        assert line in text
    with pytest.raises(SpecError, match=r"checkpoint = '.*resnet18_flowers102.pth': file not found"):
        load_spec(JOB)  # no checkpoint ships with the repository


def test_torchvision_flowers102_reads_the_written_layout(flowers):
    spec = DataSpec(source="torchvision", dataset="Flowers102", root=flowers / "data", split="test",
                    transform="imagenet_eval", verify=False)
    dataset = data.build_dataset(spec)
    x, y = data.load_batch(dataset, list(range(len(dataset))))
    assert x.shape == (12, 3, 224, 224) and sorted(set(y.tolist())) == [0, 16, 39, 76, 100, 101]
    with pytest.raises(SpecError, match="cannot read it: Dataset not found or corrupted"):
        data.build_dataset(DataSpec(source="torchvision", dataset="Flowers102", root=flowers / "data", split="test"))


@pytest.mark.ray
def test_article_job_runs_through_the_cli_and_loads_with_the_articles_recipe(flowers, ray_cluster, capsys):
    out = flowers / "run"
    assert main(["run", str(flowers / "flowers102_resnet18.toml"), "--out", str(out), "--workers", "2"]) == 0
    assert "FP32 vs INT8 (12 test samples)" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert metrics["samples"] == 12 and manifest["calibration"]["samples"] == 20
    assert [len(b) for b in manifest["calibration"]["batches"]] == [10, 10]
    assert manifest["input_shape"] == [1, 3, 224, 224]
    assert metrics["int8"]["size_mb"] < metrics["fp32"]["size_mb"] / 3.5  # the article: about 4x smaller

    test_set = data.build_dataset(DataSpec(source="torchvision", dataset="Flowers102", root=flowers / "data",
                                           split="test", transform="imagenet_eval", verify=False))
    x, _ = data.load_batch(test_set, list(range(len(test_set))))
    article = load_quantized_model(out / "model_int8.pth")
    ours = quantray.load_quantized(out)
    scripted = torch.jit.load(str(out / "model_int8.pt"))
    expected = ours(x)
    assert torch.equal(article(x), expected) and torch.equal(scripted(x), expected)
    predictions = pq.read_table(out / "predictions.parquet").to_pydict()
    assert predictions["int8_pred"] == expected.argmax(1).tolist()  # what the Ray tasks saw
    # resnet18's per-layer SQNR: every conv and the residual add_relu functions are named, in graph order.
    layers = pq.read_table(out / "layers.parquet").to_pylist()
    convs = [n for n, m in torchvision.models.resnet18().named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert [r["module"] for r in layers if r["int8_type"].startswith("quantized Conv")] == convs
    adds = [r for r in layers if r["int8_type"] == "quantized add_relu"]
    assert len(adds) == 8 and all(r["module"] == "" and r["quantized"] for r in adds)
    assert all(r["samples"] == 12 and r["sqnr_db"] is not None for r in layers)

