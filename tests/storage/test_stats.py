"""Stored calibration statistics and FP32 outputs: keys, any storage location, and runs that reuse
them (a rerun computes nothing, a changed image recomputes only its batch)."""

import io
import json
from pathlib import Path

import pytest
import torch
from helpers import DEMO_JOB, stored_demo_job
from PIL import Image
from rich.console import Console

import quantray
from quantray.errors import SpecError
from quantray.inputs.data import batch_identities
from quantray.spec import load_spec
from quantray.storage.stats import StatsStore


def _run(job: Path, out: Path, **kwargs):
    log = io.StringIO()
    result = quantray.run(job, workers=2, out=out, console=Console(file=log, width=300), **kwargs)
    return result.manifest, log.getvalue()


def test_keys_depend_on_the_weights_threads_and_parts_not_on_the_quantization_config(tiny_model, tmp_path):
    a = StatsStore(tmp_path, tiny_model, threads=1)
    assert a.key("log", "batch-0") == StatsStore(tmp_path / "elsewhere", tiny_model, threads=1).key("log", "batch-0")
    assert a.key("log", "batch-0") != a.key("log", "batch-1") != a.key("count", "batch-1")
    assert a.key("log", "batch-0") != StatsStore(tmp_path, tiny_model, threads=2).key("log", "batch-0")
    with torch.no_grad():
        tiny_model.fc.bias[0] += 1e-6
    assert a.key("log", "batch-0") != StatsStore(tmp_path, tiny_model, threads=1).key("log", "batch-0")


def test_entries_round_trip_through_a_file_uri_and_bad_entries_are_misses(tiny_model, tmp_path):
    store = StatsStore(f"file://{tmp_path}/stats", tiny_model, threads=1)
    key = store.key("log", "batch-0")
    value = {"conv1@x": {"tensor": (torch.tensor(-1.0), torch.tensor(2.0))}, ("v", 0.5, 1.0, 2048): (torch.ones(3), 7)}
    store.put(key, value)
    assert [p.name for p in (tmp_path / "stats").iterdir()] == [f"{key}.pt"]  # no temporary left behind
    again = store.get(key)
    assert torch.equal(again["conv1@x"]["tensor"][1], torch.tensor(2.0)) and again[("v", 0.5, 1.0, 2048)][1] == 7
    (tmp_path / "stats" / f"{key}.pt").write_bytes(b"truncated by a crash")
    assert store.get(key) is None and store.get(store.key("log", "absent")) is None
    assert (store.hits, store.misses) == (1, 2)


def test_cache_dir_takes_a_uri_as_a_uri_and_a_path_relative_to_the_job(tmp_path):
    job = tmp_path / "jobs" / "digits.toml"
    job.parent.mkdir()
    for given, expected in (('"s3://bucket/stats"', "s3://bucket/stats"), (f'"file://{tmp_path}/s"', f"file://{tmp_path}/s"),
                            ('"stats"', str(tmp_path / "jobs" / "stats")), ('"../shared"', str(tmp_path / "shared"))):
        job.write_text(DEMO_JOB.read_text().replace("threads = 1 ", f"cache_dir = {given}\nthreads = 1 "))
        assert load_spec(job).run.cache_dir == expected
    job.write_text(DEMO_JOB.read_text().replace("threads = 1 ", 'cache_dir = "bogus://x"\nthreads = 1 '))
    with pytest.raises(SpecError, match=r"digits.toml: \[run\] cache_dir = 'bogus://x': not a location pyarrow.fs can open"):
        quantray.run(job, out=tmp_path / "never", console=Console(file=io.StringIO()))
    assert not (tmp_path / "never").exists()


@pytest.mark.ray
def test_a_rerun_computes_nothing(demo_runs, tmp_path):
    """The 2-worker demo run stored everything it computed; the same job again reuses all of it."""
    cold = demo_runs["2 workers"].manifest
    job = stored_demo_job(Path(demo_runs["2 workers"].location).parent)
    warm, said = _run(job, tmp_path / "warm")
    assert cold["calibration_stats"]["cached"] == {"pass1": [0, 10], "pass2": [0, 2]}
    assert warm["calibration_stats"]["cached"] == {"pass1": [10, 10], "pass2": [2, 2]}
    assert "reused stored statistics: pass1 10 of 10, pass2 2 of 2" in said
    for name in ("qparams.parquet", "model_int8.pth", "predictions.parquet", "layers.parquet"):
        assert warm["files"][name] == cold["files"][name], name
    batches = len(cold["evaluation"]["batches"])  # FP32 logits of every test batch were stored, then reused
    assert (cold["evaluation"]["fp32_batches_reused"], warm["evaluation"]["fp32_batches_reused"]) == (0, batches)
    assert f"reused stored FP32 outputs: {batches} of {batches} test batches" in said
    # FP32 speed on this host too, marked as reused; INT8 speed is always measured
    speed = json.loads((tmp_path / "warm" / "metrics.json").read_text())["speed"]
    cold_speed = demo_runs["2 workers"].metrics["speed"]
    assert speed["fp32"]["reused"] is True and "reused" not in cold_speed["fp32"] and "reused" not in speed["int8"]
    assert speed["fp32"]["mean_ms"] == cold_speed["fp32"]["mean_ms"]
    assert demo_runs["1 worker"].manifest["files"]["qparams.parquet"] == cold["files"]["qparams.parquet"]  # uncached


def _image(path: Path, seed: int):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


@pytest.mark.ray
def test_a_changed_image_recomputes_only_its_batch_in_pass_1_and_warm_reruns_change_nothing(ray_cluster, tmp_path):
    images = tmp_path / "images"
    for k, name in enumerate(["a", "b", "c"]):
        (images / name).mkdir(parents=True)
        for i in range(8):
            _image(images / name / f"{i}.png", 100 * k + i)
    job = tmp_path / "images.toml"
    job.write_text(f"""
[model]
factory = "quantray.testing:tiny_cnn"   # no checkpoint: built from the fixed seed, the same weights every run
[calibration]
source = "imagefolder"
root = "images"
transform = "to_tensor"
batch_size = 4
[test]
source = "imagefolder"
root = "images"
transform = "to_tensor"
[run]
cache_dir = "file://{tmp_path}/stats"   # stored statistics at a URI
latency_warmup = 1
latency_iters = 5
throughput_batch = 2
layer_samples = 0
""")
    first, _ = _run(job, tmp_path / "first")
    _image(images / "b" / "3.png", 999)  # new pixels in one file: one batch of six changes
    second, said = _run(job, tmp_path / "second")
    assert first["model_init_seed"] == second["model_init_seed"] == 0
    assert first["fp32_state_sha256"] == second["fp32_state_sha256"]
    assert first["calibration_stats"]["cached"] == {"pass1": [0, 6], "pass2": [0, 2]}
    assert second["calibration_stats"]["cached"]["pass1"] == [5, 6]
    assert second["calibration_stats"]["cached"]["pass2"][0] <= 1  # the changed batch's shard is counted again
    assert "reused stored statistics: pass1 5 of 6" in said
    assert second["qparams_digest"] != first["qparams_digest"]
    assert any(p.name.startswith("log-") for p in (tmp_path / "stats").iterdir())
    # the workers kept the decoded images there too; a warm rerun reads them back and changes no result
    assert any(p.name.startswith("decoded-") for p in (tmp_path / "stats").iterdir())
    third, _ = _run(job, tmp_path / "third")
    for name in ("qparams.parquet", "model_int8.pth", "predictions.parquet"):
        assert third["files"][name] == second["files"][name], name
    assert (tmp_path / "third" / "predictions.parquet").read_bytes() == (tmp_path / "second" / "predictions.parquet").read_bytes()


def test_batch_identities_follow_the_files(tmp_path):
    from quantray.inputs.data import build_dataset
    from quantray.spec import DataSpec

    (tmp_path / "x").mkdir()
    for i in range(4):
        _image(tmp_path / "x" / f"{i}.png", i)
    spec = DataSpec(source="imagefolder", root=tmp_path, transform="to_tensor")
    dataset = build_dataset(spec)
    before = batch_identities(dataset, spec, [[0, 1], [2, 3]])
    _image(tmp_path / "x" / "3.png", 99)
    after = batch_identities(build_dataset(spec), spec, [[0, 1], [2, 3]])
    assert before[0] == after[0] and before[1] != after[1]


def test_a_location_that_cannot_be_written_is_remembered_not_fatal(tiny_model, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    store = StatsStore(tmp_path / "a-file" / "stats", tiny_model, threads=1)
    store.put(store.key("log", "b"), {"x": torch.ones(1)})
    assert store.unwritable and store.unwritable.startswith(("NotADirectoryError", "FileExistsError", "OSError"))
    assert store.get(store.key("log", "b")) is None
