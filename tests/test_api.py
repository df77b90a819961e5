"""quantray.run and quantray.evaluate end to end through Ray: exactness across worker counts, the
run directory's files, one calibration serving another config, and failures that write nothing."""

import copy
import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import DEMO_JOB, quiet, serial_calibration
from torch.ao.quantization import QConfigMapping, get_default_qconfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import quantray
from quantray.core import flow, merge
from quantray.core.evaluation import state_dict_bytes
from quantray.demo import digits_cnn
from quantray.errors import DataError, SpecError
from quantray.inputs import data
from quantray.spec import load_spec
from quantray.storage.artifacts import QPARAMS_SCHEMA

DEMO = DEMO_JOB.read_text()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _job(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    job = tmp_path / name
    job.write_text(text)
    return job


@pytest.mark.ray
def test_qparams_are_bit_identical_for_1_and_2_workers_with_shards_handed_out_in_reverse(demo_runs):
    dirs = {k: Path(r.location) for k, r in demo_runs.items()}
    assert [r.manifest["workers"] for r in demo_runs.values()] == [1, 2]
    for name in ("qparams.parquet", "model_int8.pth"):
        assert len({_sha(d / name) for d in dirs.values()}) == 1, name
    assert len({r.manifest["qparams_digest"] for r in demo_runs.values()}) == 1
    table = pq.read_table(dirs["1 worker"] / "qparams.parquet")
    assert table.column_names == ["name", "aliases", "observer", "dtype", "min", "max", "range_method", "scale",
                                  "zero_point", "count"]
    assert set(table.column("range_method").to_pylist()) == {"l2"}
    assert table.num_rows >= 5 and all(c > 0 for c in table.column("count").to_pylist())


@pytest.mark.ray
def test_demo_accuracy_and_predictions_agree_with_the_metrics(demo_runs):
    result = demo_runs["2 workers"]
    metrics = result.metrics
    assert metrics == json.loads((Path(result.location) / "metrics.json").read_text())
    assert metrics["samples"] == 359
    assert metrics["fp32"]["top1"] >= 0.95 and metrics["int8"]["top1"] >= metrics["fp32"]["top1"] - 0.01
    assert metrics["int8"]["size_mb"] < metrics["fp32"]["size_mb"] / 2.5
    predictions = pq.read_table(Path(result.location) / "predictions.parquet").to_pydict()
    assert predictions["index"] == sorted(predictions["index"]) and len(predictions["index"]) == 359
    for top, pred, margin in zip(predictions["int8_top5"], predictions["int8_pred"], predictions["int8_margin"]):
        assert len(top) == 5 and (top[0] == pred or margin == 0)  # only a tie may reorder top-1
    correct = sum(p == y for p, y in zip(predictions["int8_pred"], predictions["label"]))
    agree = sum(a == b for a, b in zip(predictions["int8_pred"], predictions["fp32_pred"]))
    assert correct / 359 == metrics["int8"]["top1"] and agree / 359 == metrics["agreement"]
    top5 = sum(y in t for y, t in zip(predictions["label"], predictions["int8_top5"]))
    assert top5 / 359 == metrics["int8"]["top5"]


@pytest.mark.ray
def test_seed_recipe_torchscript_and_the_result_s_model_match_the_in_memory_int8_model(demo_runs):
    result = demo_runs["2 workers"]
    run = Path(result.location)
    batches, shards = result.manifest["calibration"]["batches"], result.manifest["calibration"]["shards"]
    spec = load_spec(DEMO_JOB)
    fp32 = digits_cnn()
    example = data.load_batch(data.digits("train"), batches[0][:1])[0]
    prepared, _ = serial_calibration(fp32, example, "x86", spec.calibration, batches, shards)
    assert merge.state_digest(prepared) == result.manifest["qparams_digest"]
    in_memory = flow.convert(prepared)

    # The seed's own recipe: build FP32, prepare_fx + convert_fx without calibration, load_state_dict.
    torch.backends.quantized.engine = "x86"
    seed = convert_fx(prepare_fx(copy.deepcopy(fp32), QConfigMapping().set_global(get_default_qconfig("x86")),
                                 (torch.randn(1, 1, 8, 8),)))
    seed.load_state_dict(torch.load(run / "model_int8.pth", weights_only=True))
    x = data.digits("test").tensors[0][:128]
    expected = in_memory(x)
    for model in (seed, torch.jit.load(str(run / "model_int8.pt")), result.int8(), quantray.load_quantized(run)):
        assert torch.equal(model(x), expected)


@pytest.mark.ray
def test_manifest_records_files_shards_versions_and_stage_timings(demo_runs):
    result = demo_runs["2 workers"]
    run, manifest = Path(result.location), result.manifest
    assert manifest == json.loads((run / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in run.iterdir()} - {"manifest.json"}
    assert all(_sha(run / name) == digest for name, digest in manifest["files"].items())
    batches, shards = manifest["calibration"]["batches"], manifest["calibration"]["shards"]
    assert sorted(b for s in shards for b in s) == list(range(len(batches))) and len(shards) == 2
    assert sum(map(len, batches)) == manifest["calibration"]["samples"] == 320
    assert {"torch", "torchvision", "ray", "pyarrow", "python"} <= set(manifest["versions"])
    assert set(manifest["timings_s"]) == {"load", "prepare", "ray_start", "calibrate", "convert", "evaluate", "speed", "write"}
    assert manifest["wall_s"] >= sum(manifest["timings_s"].values()) * 0.99
    assert manifest["spec"]["model"]["factory"] == "quantray.demo:digits_cnn"
    assert manifest["model_init_seed"] == 0  # no checkpoint in the job: the factory ran under this seed
    pool = manifest["pool"]  # each worker's kind of CPU (one kind here), and the driver's
    assert set(pool["cpu"]) == {"0", "1"} and pool["cpu_kinds"] == 1 and "mixed_cpus" not in pool
    assert pool["cpu"]["0"] == pool["driver_cpu"] and pool["driver_cpu"]["torch_capability"]


@pytest.mark.ray
def test_layers_parquet_names_every_quantized_layer_and_metrics_the_worst(demo_runs):
    result = demo_runs["2 workers"]
    rows = pq.read_table(Path(result.location) / "layers.parquet").to_pylist()
    assert rows == result.layers and [r["position"] for r in rows] == list(range(len(rows)))
    assert {"conv1", "conv2", "conv3", "fc"} <= {r["module"] for r in rows if r["quantized"]}
    assert all(r["samples"] == result.manifest["evaluation"]["layer_samples"] == 64 for r in rows)
    worst = result.metrics["layers"]["worst"]
    assert [w["sqnr_db"] for w in worst] == sorted(r["sqnr_db"] for r in rows if r["quantized"])[:5]
    # Same test batches and threads: the same figures whatever the calibration layout.
    assert len({_sha(Path(r.location) / "layers.parquet") for r in demo_runs.values()}) == 1


@pytest.mark.ray
@pytest.mark.parametrize("layout, where", [("1 worker", "one Ray task holding all 2 CPUs of its node"),
                                           ("2 workers", "worker 0 of the job's pool, whose workers hold all CPUs")])
def test_speed_is_measured_alone_on_a_node_to_the_stated_precision(demo_runs, layout, where):
    """On a worker of the pool when the pool holds its whole node, else in a task that does. Each
    latency stops once its 95% interval is within +-2% of the mean, or at latency_iters; the
    throughput comes from the evaluation's own timings, and says so."""
    result = demo_runs[layout]
    conditions = result.manifest["speed_conditions"]
    assert conditions["where"].startswith(where)
    assert conditions["threads"] == conditions["torch_threads"] == 1 and conditions["engine"] == "x86"
    assert len(conditions["node"]) == 56 and conditions["precision"] == 0.02 and conditions["iters"] == 100
    assert conditions["throughput"].startswith("from the evaluation") and conditions["throughput_batch_size"] == 64
    for model in ("fp32", "int8", "int8_torchscript"):
        s = result.metrics["speed"][model]
        assert 0 < s["p50_ms"] <= s["p90_ms"] and s["mean_ms"] > 0
        assert s["iters"] == 100 or (s["iters"] >= 10 and s["ci95_ms"] <= 0.02 * s["mean_ms"])
    assert all(result.metrics["speed"][m]["throughput_per_s"] > 0 for m in ("fp32", "int8_torchscript"))


@pytest.mark.ray
def test_evaluating_a_run_again_reproduces_its_predictions_and_metrics(demo_runs, tmp_path):
    run = demo_runs["2 workers"]
    again = quantray.evaluate(run.location, out=tmp_path / "again", console=quiet())
    for name in ("predictions.parquet", "layers.parquet"):
        assert _sha(Path(again.location) / name) == _sha(Path(run.location) / name), name
    before, after = copy.deepcopy(run.metrics), copy.deepcopy(again.metrics)
    for key in ("speed", "fp32", "int8"):
        before.pop(key), after.pop(key)
    assert after == before
    assert again.manifest["evaluates"]["run_dir"] == str(Path(run.location).resolve())
    assert again.manifest["qparams_digest"] == run.manifest["qparams_digest"]
    assert set(again.manifest["files"]) == {"metrics.json", "predictions.parquet", "layers.parquet", "report.html"}


@pytest.mark.ray
def test_one_calibration_builds_another_config_s_int8_model_byte_for_byte(ray_cluster, tmp_path):
    """Calibrate the demo once; build the INT8 model of a config that keeps conv2 in FP32 and uses
    per-tensor Linear weights from those statistics; a full run of that config (to a file:// URI,
    with more workers than batches) writes the same qparams.parquet and model_int8.pth."""
    other = DEMO.replace("samples = 320", "samples = 64").replace(
        'backend = "x86"', 'backend = "x86"\nmodule_names = { conv2 = "fp32" }\n'
                           'module_types = { Linear = { weight = "per_tensor" } }')
    spec = load_spec(_job(tmp_path, other))
    log = io.StringIO()
    from rich.console import Console

    uri = f"file://{tmp_path}/store/other"
    result = quantray.run(spec, workers=3, out=uri, console=Console(file=log, width=300), use_cache=False)
    assert result.location == uri and "2 calibration batches: using 2 workers, not 3" in log.getvalue()
    written = tmp_path / "store" / "other"
    assert {p.name for p in written.iterdir()} == set(result.manifest["files"]) | {"manifest.json"}

    batches, shards = result.manifest["calibration"]["batches"], result.manifest["calibration"]["shards"]
    fp32 = digits_cnn()
    example = data.load_batch(data.digits("train"), batches[0][:1])[0]
    _, default_config = serial_calibration(fp32, example, "x86", spec.calibration, batches, shards)
    prepared = flow.prepare(fp32, spec.quantization, example)
    counts = default_config.stats.load(prepared)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(merge.qparam_rows(prepared, counts), schema=QPARAMS_SCHEMA), sink)
    assert sink.getvalue().to_pybytes() == (written / "qparams.parquet").read_bytes()
    assert state_dict_bytes(flow.convert(prepared)) == (written / "model_int8.pth").read_bytes()
    assert type(flow.convert(prepared).get_submodule("conv2")).__name__ == "ConvReLU2d"  # kept in FP32


@pytest.mark.ray
def test_nan_fails_the_run_naming_the_layer_and_leaves_no_run_directory(ray_cluster, tmp_path):
    state = digits_cnn().state_dict()
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], 3e38)  # activations overflow to inf
    torch.save(state, tmp_path / "broken.pth")
    job = _job(tmp_path, DEMO.replace('factory = "quantray.demo:digits_cnn"',
                                      'factory = "quantray.demo:digits_cnn"\ncheckpoint = "broken.pth"'))
    with pytest.raises(DataError, match=r"^NaN or Inf in the output of layer conv1 \(ConvReLU2d\) \(calibration batch 0, "):
        quantray.run(job, workers=2, out=tmp_path / "runs" / "broken", console=quiet())
    assert not (tmp_path / "runs").exists()  # nor the folder made for it


def test_empty_calibration_split_is_a_spec_error_before_ray(tmp_path):
    job = _job(tmp_path, DEMO.replace(
        'source = "digits"\nsplit = "train"',
        'source = "factory"\nfactory = "quantray.testing:random_images"\nkwargs = { n = 0, shape = [1, 8, 8] }'
    ).replace("samples = 320\n", ""))
    with pytest.raises(SpecError, match=r"\[calibration\] the calibration split is empty"):
        quantray.run(job, out=tmp_path / "run", console=quiet())
    assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == [job]


@pytest.mark.ray
def test_a_job_spec_built_in_python_runs_and_its_run_keeps_a_job_file_that_loads_back(ray_cluster, tmp_path):
    """No job file at all: the run directory's job.toml is one that loads back as the spec."""
    from quantray.spec import DataSpec, JobSpec, ModelSpec, RunSpec

    spec = JobSpec("python-built", tmp_path / "never-written.toml", ModelSpec(factory="quantray.demo:digits_cnn"),
                   DataSpec(samples=64), DataSpec(samples=64, batch_size=32),
                   run=RunSpec(latency_warmup=1, latency_iters=3, layer_samples=0))
    result = quantray.run(spec, workers=2, out=tmp_path / "run", console=quiet())
    kept = tmp_path / "run" / "job.toml"
    assert kept.read_text().startswith("# Built in Python") and not spec.path.exists()
    again = load_spec(kept)
    assert (again.model, again.calibration, again.test, again.run) == (spec.model, spec.calibration, spec.test, spec.run)
    assert result.metrics["samples"] == 64
