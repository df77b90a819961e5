"""The demo job end to end through Ray: exactness across worker counts, artifacts, accuracy."""

import copy
import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console
from torch.ao.quantization import QConfigMapping, get_default_qconfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import quantray
from quantray import calibration, data, observers
from quantray.demo import digits_cnn
from quantray.errors import DataError, SpecError
from quantray.job import run_job
from quantray.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(demo_runs):
    return demo_runs


def test_qparams_are_bit_identical_for_1_2_3_workers_and_permuted_shards(runs):
    manifests = {k: json.loads((d / "manifest.json").read_text()) for k, d in runs.items()}
    assert [m["workers"] for m in manifests.values()] == [1, 2, 3, 3]
    for name in ("qparams.parquet", "model_int8.pth"):
        assert len({_sha(d / name) for d in runs.values()}) == 1, name
    assert len({m["qparams_digest"] for m in manifests.values()}) == 1
    table = pq.read_table(runs["1 worker"] / "qparams.parquet")
    assert table.column_names == ["name", "aliases", "observer", "dtype", "min", "max", "scale", "zero_point", "count"]
    assert table.num_rows >= 5 and all(c > 0 for c in table.column("count").to_pylist())


def test_demo_accuracy_meets_the_bar(runs):
    metrics = json.loads((runs["2 workers"] / "metrics.json").read_text())
    assert metrics["samples"] == 359
    assert metrics["fp32"]["top1"] >= 0.95
    assert metrics["int8"]["top1"] >= metrics["fp32"]["top1"] - 0.01
    for model in ("fp32", "int8"):
        assert {"top1", "top5", "latency_ms", "size_mb"} <= set(metrics[model])
    assert metrics["int8"]["size_mb"] < metrics["fp32"]["size_mb"] / 2.5
    predictions = pq.read_table(runs["2 workers"] / "predictions.parquet").to_pydict()
    assert predictions["index"] == sorted(predictions["index"]) and len(predictions["index"]) == 359
    for top, pred, margin in zip(predictions["int8_top5"], predictions["int8_pred"], predictions["int8_margin"]):
        assert len(top) == 5 and (top[0] == pred or margin == 0)  # only a tie may reorder top-1
    assert all(m >= 0 for m in predictions["fp32_margin"] + predictions["int8_margin"])
    top5 = sum(y in t for y, t in zip(predictions["label"], predictions["int8_top5"]))
    assert top5 / 359 == metrics["int8"]["top5"]
    correct = sum(p == y for p, y in zip(predictions["int8_pred"], predictions["label"]))
    agree = sum(a == b for a, b in zip(predictions["int8_pred"], predictions["fp32_pred"]))
    assert correct / 359 == metrics["int8"]["top1"] and agree / 359 == metrics["agreement"]


def test_seed_recipe_torchscript_and_load_quantized_match_the_in_memory_int8_model(runs):
    run = runs["3 workers"]
    manifest = json.loads((run / "manifest.json").read_text())
    # The in-memory INT8 model, rebuilt in this process from the manifest's batches and shards.
    spec = load_spec(ROOT / "jobs" / "digits.toml")
    fp32 = digits_cnn()
    dataset = data.digits("train")
    example = data.load_batch(dataset, manifest["calibration"]["batches"][0][:1])[0]
    logs, counts = calibration.calibrate_serial(fp32, example, "x86", spec.calibration,
                                                manifest["calibration"]["batches"], manifest["calibration"]["shards"])
    prepared = calibration.prepare(fp32, "x86", example)
    observers.load_merged(prepared, "exact", logs, counts)
    assert observers.state_digest(prepared) == manifest["qparams_digest"]
    in_memory = calibration.convert(prepared)

    # The seed's own recipe: build FP32, prepare_fx + convert_fx without calibration, load_state_dict.
    torch.backends.quantized.engine = "x86"
    seed = convert_fx(prepare_fx(copy.deepcopy(fp32), QConfigMapping().set_global(get_default_qconfig("x86")),
                                 (torch.randn(1, 1, 8, 8),)))
    seed.load_state_dict(torch.load(run / "model_int8.pth", weights_only=True))
    scripted = torch.jit.load(str(run / "model_int8.pt"))
    loaded = quantray.load_quantized(run)

    x = data.digits("test").tensors[0][:128]
    expected = in_memory(x)
    for model in (seed, scripted, loaded):
        assert torch.equal(model(x), expected)


def test_manifest_records_files_shards_versions_and_stage_timings(runs):
    run = runs["2 workers"]
    manifest = json.loads((run / "manifest.json").read_text())
    on_disk = {p.name for p in run.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert all(_sha(run / name) == digest for name, digest in manifest["files"].items())
    batches, shards = manifest["calibration"]["batches"], manifest["calibration"]["shards"]
    assert sorted(b for s in shards for b in s) == list(range(len(batches))) and len(shards) == 2
    assert sum(map(len, batches)) == manifest["calibration"]["samples"] == 320
    assert {"torch", "torchvision", "ray", "pyarrow", "python"} <= set(manifest["versions"])
    assert {"load", "prepare", "ray_start", "calibrate", "convert", "evaluate", "speed", "write"} == set(manifest["timings_s"])
    assert manifest["wall_s"] >= sum(manifest["timings_s"].values()) * 0.99
    assert manifest["spec"]["model"]["factory"] == "quantray.demo:digits_cnn"


def test_a_failing_run_leaves_no_run_directory(ray_cluster, tmp_path):
    state = digits_cnn().state_dict()
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], 3e38)  # activations overflow to inf
    torch.save(state, tmp_path / "broken.pth")
    job = tmp_path / "broken.toml"
    job.write_text((ROOT / "jobs" / "digits.toml").read_text().replace(
        'factory = "quantray.demo:digits_cnn"', 'factory = "quantray.demo:digits_cnn"\ncheckpoint = "broken.pth"'))
    out = tmp_path / "runs" / "broken"
    with pytest.raises(DataError, match=r"NaN or Inf in the activation observed by activation_post_process_\d+ \(shard \d"):
        run_job(load_spec(job), workers=2, out=out, console=Console(file=io.StringIO()))
    assert list((tmp_path / "runs").iterdir()) == []


def test_empty_calibration_split_is_a_spec_error_before_ray(tmp_path):
    job = tmp_path / "empty.toml"
    job.write_text((ROOT / "jobs" / "digits.toml").read_text().replace(
        'source = "digits"\nsplit = "train"',
        'source = "factory"\nfactory = "quantray.testing:random_images"\nkwargs = { n = 0, shape = [1, 8, 8] }'
    ).replace("samples = 320\n", ""))
    with pytest.raises(SpecError, match=r"\[calibration\] the calibration split is empty"):
        run_job(load_spec(job), out=tmp_path / "run", console=Console(file=io.StringIO()))
    assert not (tmp_path / "run").exists()


def test_fewer_batches_than_workers_uses_fewer_workers_and_says_so(ray_cluster, tmp_path):
    job = tmp_path / "small.toml"
    job.write_text((ROOT / "jobs" / "digits.toml").read_text().replace("samples = 320", "samples = 64"))
    log = io.StringIO()
    run = run_job(load_spec(job), workers=3, out=tmp_path / "run", console=Console(file=log, width=300))
    assert "2 calibration batches: using 2 workers, not 3" in log.getvalue()
    assert json.loads((run / "manifest.json").read_text())["workers"] == 2


def test_layers_parquet_names_every_quantized_layer_and_metrics_the_worst(runs):
    run = runs["2 workers"]
    rows = pq.read_table(run / "layers.parquet").to_pylist()
    assert [r["position"] for r in rows] == list(range(len(rows)))
    assert {"conv1", "conv2", "conv3", "fc"} <= {r["module"] for r in rows if r["quantized"]}
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(r["samples"] == manifest["evaluation"]["layer_samples"] == 64 for r in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    worst = metrics["layers"]["worst"]
    assert [w["sqnr_db"] for w in worst] == sorted(r["sqnr_db"] for r in rows if r["quantized"])[:5]
    # Same test batches and threads: the same figures whatever the calibration layout.
    assert len({_sha(d / "layers.parquet") for d in runs.values()}) == 1


def test_speed_is_measured_in_a_task_holding_a_whole_node(runs):
    manifest = json.loads((runs["1 worker"] / "manifest.json").read_text())
    conditions = manifest["speed_conditions"]
    assert conditions["where"].startswith("one Ray task holding all 2 CPUs of its node")
    assert conditions["threads"] == conditions["torch_threads"] == 1 and conditions["engine"] == "x86"
    speed = json.loads((runs["1 worker"] / "metrics.json").read_text())["speed"]
    for model in ("fp32", "int8", "int8_torchscript"):
        s = speed[model]
        assert 0 < s["p50_ms"] <= s["p90_ms"] and s["mean_ms"] > 0 and s["throughput_per_s"] > 0


def test_evaluating_a_run_again_reproduces_its_predictions_and_metrics(runs, tmp_path):
    from quantray.reevaluate import evaluate_run

    run = runs["3 workers"]
    again = evaluate_run(run, out=tmp_path / "again", console=Console(file=io.StringIO()))
    for name in ("predictions.parquet", "layers.parquet"):
        assert _sha(again / name) == _sha(run / name), name
    before, after = (json.loads((d / "metrics.json").read_text()) for d in (run, again))
    for key in ("speed", "fp32", "int8"):
        before.pop(key), after.pop(key)
    assert after == before
    manifest = json.loads((again / "manifest.json").read_text())
    assert manifest["evaluates"]["run_dir"] == str(run.resolve())
    assert manifest["qparams_digest"] == json.loads((run / "manifest.json").read_text())["qparams_digest"]
    assert set(manifest["files"]) == {"metrics.json", "predictions.parquet", "layers.parquet", "report.html"}
