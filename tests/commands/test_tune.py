"""`quantray tune` end to end on Ray: trials built from one calibration, the search's phases, and
best.toml rebuilding exactly the chosen trial's model."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import DEMO_JOB

from quantray import pipeline
from quantray.cli import main
from quantray.commands.tune import TRIALS_SCHEMA, Trial, best_toml, tune
from quantray.spec import load_spec

DEMO = DEMO_JOB.read_text()


def _job(tmp_path, text):
    job = tmp_path / "job.toml"
    job.write_text(text.replace("[run]", f'[run]\ncache_dir = "{tmp_path / "stats"}"'))
    return job


def _trials(location) -> list[dict]:
    table = pq.read_table(Path(location) / "trials.parquet")
    assert table.schema == TRIALS_SCHEMA
    return table.to_pylist()


@pytest.mark.ray
def test_a_budget_met_by_a_range_method_stops_there_and_best_toml_rebuilds_it(ray_cluster, tmp_path, monkeypatch):
    from quantray.core import flow

    prepares, prepare_fx = [], flow.prepare_fx
    monkeypatch.setattr(flow, "prepare_fx", lambda *a, **k: prepares.append(1) or prepare_fx(*a, **k))
    result = tune(_job(tmp_path, DEMO), max_drop=0.003, out=tmp_path / "tune", workers=2)
    assert len(prepares) == 1  # here, in the driver: the best run takes the tune's model and its prepared template
    rows = _trials(result.location)
    assert result.met and result.stopped == "the budget was met by a range method" and result.optimistic
    assert [(r["range_method"], r["weight"]) for r in rows] == [
        (m, w) for w in ("per_channel", "per_tensor") for m in ("l2", "minmax", "percentile", "mse", "entropy")]
    assert {r["phase"] for r in rows} == {"range"} and all(r["samples"] == 359 for r in rows)
    assert rows[0]["drop"] == 0.0 and result.best["trial"] == 0  # the demo's own config loses nothing
    metrics = json.loads((Path(result.location) / "best-run" / "metrics.json").read_text())
    assert metrics["int8"]["top1"] == rows[0]["top1"]  # chosen on [test]: the run scores it the same
    # best.toml is a job file that `quantray run` turns into the chosen trial's model: same digest.
    best_run = json.loads((Path(result.location) / "best-run" / "manifest.json").read_text())
    assert best_run["qparams_digest"] == rows[0]["qparams_digest"]
    spec = load_spec(Path(result.location) / "best.toml")
    assert spec.quantization.activation_range == "l2" and spec.quantization.weight == "per_channel"
    assert len({r["qparams_digest"] for r in rows}) >= 4  # the methods give different models
    manifest = json.loads((Path(result.location) / "manifest.json").read_text())
    assert "best-run/manifest.json" in manifest["files"] and "trials.parquet" in manifest["files"]
    assert "Top-1 against the number of FP32 layers" in (Path(result.location) / "report.html").read_text()


@pytest.mark.ray
def test_layers_kept_in_fp32_need_no_new_calibration(ray_cluster, tmp_path):
    """Keeping a layer in FP32 changes which values are observed only to a subset: the job's merged
    statistics build every such trial."""
    spec = load_spec(_job(tmp_path, DEMO))
    job = pipeline.load(spec)
    from helpers import serial_calibration

    from quantray.inputs.data import make_batches

    batches = make_batches(job.calib_idx, spec.calibration.batch_size)
    prepared, result = serial_calibration(job.fp32, job.example, spec.quantization, spec.calibration, batches,
                                          [list(range(len(batches)))])
    from quantray.core import flow

    for name in ("conv1", "conv2", "conv3", "fc"):
        trial = Trial("l2", "per_channel", (name,))
        other = flow.prepare(job.fp32, trial.quant(spec.quantization), job.example)
        result.stats.load(other)  # raises MissingStatistics if a value was not observed
        converted = dict(flow.convert(other).named_modules())
        assert ".quantized" not in type(converted[name]).__module__, name


@pytest.mark.ray
def test_a_budget_no_range_method_meets_ranks_layers_and_keeps_the_fewest_in_fp32(ray_cluster, tmp_path):
    """One layer whose per-tensor weights cannot be quantized (quantray.testing.one_hostile_layer):
    every range method and cure fails; the one-pass ranking finds it and keeping it alone in FP32
    meets the budget."""
    job = _job(tmp_path, DEMO.replace("quantray.demo:digits_cnn", "quantray.testing:one_hostile_layer")
               .replace('backend = "x86"', 'backend = "x86"\nweight = "per_tensor"'))
    validation = tmp_path / "validation.toml"
    validation.write_text('[test]\nsource = "digits"\nsplit = "train"\nsamples = 256\nseed = 1\nbatch_size = 64\n')
    result = tune(job, max_drop=0.003, validation=validation, out=tmp_path / "tune", workers=2, rank_samples=128)
    rows = _trials(result.location)
    assert [r["phase"] for r in rows[:5]] == ["range"] * 5 and all(r["drop"] > 0.5 for r in rows[:5])
    assert {r["weight"] for r in rows} == {"per_tensor"}  # the job names it: a constraint
    cures = [(r["equalize"], r["bias_correction"]) for r in rows if r["phase"] == "cure"]
    assert cures == [(False, True), (True, False), (True, True)]  # on the best range trial; none cures it
    assert all(r["drop"] > 0.5 for r in rows if r["phase"] == "cure")
    assert "rank" not in {r["phase"] for r in rows}  # layers are ranked in one pass, not one trial each
    assert result.sensitivity[0]["module"] == "mix" and result.sensitivity[0]["kind"] == "LinearReLU"
    assert {s["module"] for s in result.sensitivity} == {"cnn.conv1", "cnn.conv2", "cnn.conv3", "fc", "mix"}
    sqnr = [s["isolated_sqnr_db"] for s in result.sensitivity]
    assert sqnr == sorted(sqnr) and sqnr[0] < 1 < 20 < sqnr[1]  # mix: its identity weights round to zero
    order = [s["module"] for s in result.sensitivity]
    for r in rows:
        if r["phase"] == "fp32":  # the k most sensitive, k = 1, 2, ...
            assert r["fp32_modules"] == order[:len(r["fp32_modules"])] and r["samples"] == 256
    assert result.met and result.best["fp32_modules"] == ["mix"] and result.stopped.endswith("1 layer(s) in FP32")
    assert not result.optimistic
    # the chosen trial as a job, on the job's own test split: the same model, and held-out figures
    best_run = json.loads((Path(result.location) / "best-run" / "manifest.json").read_text())
    assert best_run["qparams_digest"] == result.best["qparams_digest"]
    metrics = json.loads((Path(result.location) / "best-run" / "metrics.json").read_text())
    assert metrics["samples"] == 359 and metrics["int8"]["top1"] >= metrics["fp32"]["top1"] - 0.01
    assert load_spec(Path(result.location) / "best.toml").quantization.module_names == {"mix": "fp32"}


def test_best_toml_is_a_job_file_with_the_trials_choices(tmp_path):
    spec = load_spec(_job(tmp_path, DEMO))
    text = best_toml(spec, Trial("percentile", "per_tensor", ("fc", "conv2")))
    (tmp_path / "best.toml").write_text(text)
    again = load_spec(tmp_path / "best.toml")
    assert again.quantization.activation_range == "percentile" and again.quantization.weight == "per_tensor"
    assert again.quantization.module_names == {"fc": "fp32", "conv2": "fp32"}
    assert (again.model, again.calibration, again.test, again.run) == (spec.model, spec.calibration, spec.test, spec.run)


@pytest.mark.parametrize("args, message", [
    (["--max-drop", "-1"], "argument --max-drop: must be at least 0, got -1"),
    (["--max-drop", "x"], "argument --max-drop: expected points of top-1 (or the headline's unit), e.g. 0.3, got 'x'"),
])
def test_bad_tune_arguments_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["tune", str(DEMO_JOB), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.ray
def test_error_spread_over_one_kind_of_layer_is_met_by_the_group_before_long_prefixes(ray_cluster, tmp_path):
    """quantray.testing.hostile_convs: every convolution broken under per-tensor weights; no single
    one in FP32 helps, the group of all ConvReLU2d does."""
    job = _job(tmp_path, DEMO.replace("quantray.demo:digits_cnn", "quantray.testing:hostile_convs")
               .replace('backend = "x86"', 'backend = "x86"\nweight = "per_tensor"'))
    result = tune(job, max_drop=0.01, out=tmp_path / "tune", workers=2)
    rows = _trials(result.location)
    assert [r["phase"] for r in rows] == ["range"] * 5 + ["cure"] * 3 + ["fp32"] * 2 + ["group"]
    assert [len(r["fp32_modules"]) for r in rows if r["phase"] == "fp32"] == [1, 2]
    assert {s["module"]: s["kind"] for s in result.sensitivity} == {
        "conv1": "ConvReLU2d", "conv2": "ConvReLU2d", "conv3": "ConvReLU2d", "fc": "Linear"}
    assert result.met and sorted(result.best["fp32_modules"]) == ["conv1", "conv2", "conv3"]
    assert result.stopped == "the budget was met with 3 layer(s) in FP32 (a group of one kind)"
    groups = json.loads((Path(result.location) / "tune.json").read_text())["groups"]  # modules in ranking order
    assert [(g["kind"], sorted(g["modules"])) for g in groups] == [("ConvReLU2d", ["conv1", "conv2", "conv3"])]
