"""Tasks beyond classification, end to end through Ray: the shipped regression and label-free jobs
(quantray.examples) give the same figures for 1 and 2 workers, equal to one pass over the whole
test set in this process; a refresh on the label-free job promotes, then gates out a night whose
INT8 model went bad."""

import hashlib
import io
import json
import math
from importlib import resources

import pytest
import torch
from helpers import ROOT, quiet
from rich.console import Console

import quantray
from quantray import examples
from quantray.cli import main
from quantray.commands.refresh import refresh
from quantray.spec import load_spec

JOBS = {"regression": ROOT / "jobs" / "diabetes_regression.toml", "agreement": ROOT / "jobs" / "photos_agreement.toml"}
TIMINGS = ("latency", "speed", "timings", "throughput", "torchscript_size")


@pytest.mark.parametrize("name", list(examples.CHECKPOINTS))
def test_each_shipped_example_checkpoint_is_the_one_quantray_names(name):
    file, sha256 = examples.CHECKPOINTS[name]
    assert hashlib.sha256(resources.files("quantray").joinpath("assets", file).read_bytes()).hexdigest() == sha256
    figures = examples._figures(name, getattr(examples, name)())
    expected = {"diabetes_mlp": 57.656, "photo_autoencoder": 0.05919}[name]   # test RMSE, as the README says
    assert figures["test_rmse"] == pytest.approx(expected, abs=1e-3 if name == "diabetes_mlp" else 1e-5)


def test_the_examples_data_are_scikit_learns_files_split_once():
    x, y = examples.diabetes("all").tensors
    assert x.shape == (442, 10) and y.shape == (442, 1) and 25 <= y.min() and y.max() <= 346
    assert len(examples.diabetes("train")) == 354 and len(examples.diabetes("test")) == 88
    train = examples.diabetes("train").tensors[0]
    assert train.mean(0).abs().max() < 1e-5 and (train.std(0) - 1).abs().max() < 1e-5   # standardized by train
    patches = examples.photo_patches("all")
    assert len(patches) == 520 and patches[0].shape == (3, 32, 32) and 0 <= patches.x.min() and patches.x.max() <= 1
    assert len(examples.photo_patches("test")) == 104 and isinstance(patches[0], torch.Tensor)  # no labels


def _without_timings(metrics: dict) -> dict:
    """metrics.json less what is measured, not computed: timings, and the TorchScript file's size
    (its serialized code differs by a few bytes between processes)."""
    return {k: _without_timings(v) if isinstance(v, dict) else v for k, v in metrics.items()
            if not any(t in k for t in TIMINGS)}


@pytest.fixture(scope="module")
def task_runs(ray_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("tasks")
    return {(task, workers): quantray.run(job, workers=workers, console=quiet(), out=base / f"{task}-{workers}",
                                          shard_order=[1, 0] if workers == 2 else None, use_cache=False)
            for task, job in JOBS.items() for workers in (1, 2)}


def _whole_set(task: str, run_dir) -> dict:
    """The run's figures computed here, in one pass over the whole test set in float64."""
    int8 = quantray.load_quantized(run_dir)
    if task == "regression":
        fp32 = examples.diabetes_mlp()
        x, y = examples.diabetes("test").tensors
        out = {}
        with torch.inference_mode():
            for model, m in (("fp32", fp32), ("int8", int8)):
                e = (m(x).double() - y.double()).ravel()
                out[model] = {"mae": e.abs().mean().item(), "rmse": math.sqrt((e ** 2).mean().item()),
                              "r2": 1 - (e ** 2).sum().item() / ((y.double() - y.double().mean()) ** 2).sum().item()}
        return out
    fp32 = examples.photo_autoencoder()
    x = examples.photo_patches("test").x
    with torch.inference_mode():
        a, b = fp32(x), int8(x)
    signal = sum((a[k].double() ** 2).sum().item() for k in ("image", "code"))
    noise = sum(((b[k].double() - a[k].double()) ** 2).sum().item() for k in ("image", "code"))
    return {"sqnr_db": 10 * math.log10(signal / noise)}


@pytest.mark.ray
@pytest.mark.parametrize("task", list(JOBS))
def test_shipped_task_jobs_give_the_same_figures_for_any_workers_equal_to_one_pass(task_runs, task):
    one, two = task_runs[(task, 1)], task_runs[(task, 2)]
    assert one.manifest["qparams_digest"] == two.manifest["qparams_digest"]
    assert _without_timings(one.metrics) == _without_timings(two.metrics)
    metrics = one.metrics
    assert metrics["task"] == task and metrics["headline"]["key"] == {"regression": "rmse", "agreement": "sqnr_db"}[task]
    whole = _whole_set(task, one.location)
    if task == "regression":
        assert metrics["samples"] == 88 and metrics["headline"]["higher_is_better"] is False
        for model in ("fp32", "int8"):
            for key, value in whole[model].items():
                assert metrics[model][key] == pytest.approx(value, rel=1e-6), (model, key)
        assert metrics["headline"]["int8"] - metrics["headline"]["fp32"] < 1.0   # within the job's gate
    else:
        assert metrics["samples"] == 104 and metrics["headline"]["fp32"] is None    # FP32 is the reference
        assert set(metrics["int8"]) == {"latency_ms", "size_mb", "torchscript_latency_ms", "torchscript_size_mb"}
        assert metrics["headline"]["int8"] == pytest.approx(whole["sqnr_db"], rel=1e-6)
        assert set(metrics["output_agreement"]["outputs_sqnr_db"]) == {"image", "code"}
        assert metrics["output_agreement"]["argmax_agreement"] is None   # an image, not class scores
        assert metrics["headline"]["int8"] > 30


@pytest.mark.ray
def test_report_and_html_show_the_tasks_headline(task_runs, capsys):
    run = task_runs[("regression", 1)].location
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "RMSE (headline)" in out and "R²" in out and "top-1" not in out
    html = (run / "report.html").read_text()
    assert "RMSE" in html and "confusion" not in html.lower()
    assert json.loads((run / "metrics.json").read_text())["headline"]["label"] == "RMSE"
    assert not (run / "predictions.parquet").exists()   # per-sample class predictions are classification's


@pytest.mark.ray
def test_a_label_free_refresh_promotes_then_gates_out_a_bad_night(ray_cluster, tmp_path):
    """Night 1: the shipped job, promoted on its output SQNR. Night 2: its calibration patches came
    in at half their brightness (an exposure fault), so ranges are too narrow and INT8 clips the
    real patches: gated out on min_sqnr_db and on max_regression, and the promotion stays."""
    registry = tmp_path / "registry"
    job = tmp_path / "photos.toml"
    job.write_text(JOBS["agreement"].read_text() + "max_regression = 3.0\n")
    log = io.StringIO()
    first = refresh(load_spec(job), str(registry), workers=2, console=Console(file=log, width=300))
    assert first["gate"] == "passed" and first["promoted"], log.getvalue()
    assert first["task"] == "agreement" and first["headline"] == "sqnr_db" and first["int8_headline"] > 25
    promoted = (registry / "PROMOTED").read_text()
    job.write_text(job.read_text().replace('factory = "quantray.examples:photo_patches"\nsplit = "train"',
                                           'factory = "quantray.testing:dim_photo_patches"\nkwargs = { factor = 0.5 }\n'
                                           'split = "train"'))
    second = refresh(load_spec(job), str(registry), workers=2, console=Console(file=log, width=300))
    assert second["gate"] == "failed" and not second["promoted"]
    drop = first["int8_headline"] - second["int8_headline"]
    assert second["reason"] == (f"INT8 vs FP32 output SQNR {second['int8_headline']:.2f} dB < min_sqnr_db 25.00 dB; "
                                f"INT8 vs FP32 output SQNR is {drop:.2f} dB below the promoted model's "
                                "> max_regression 3.00 dB")
    assert (registry / "PROMOTED").read_text() == promoted
    import pyarrow.parquet as pq

    history = pq.read_table(registry / "history.parquet").to_pylist()
    assert [(h["gate"], h["promoted"], h["headline"]) for h in history] == [("passed", True, "sqnr_db"),
                                                                             ("failed", False, "sqnr_db")]
    assert history[0]["fp32_top1"] is None and history[1]["output_sqnr_db"] == second["int8_headline"]


def test_a_refresh_refuses_a_gate_its_task_cannot_use_before_any_work(tmp_path, capsys):
    job = tmp_path / "photos.toml"
    job.write_text(JOBS["agreement"].read_text().replace("min_sqnr_db = 25.0", "max_top1_drop = 0.02"))
    assert main(["refresh", str(job), "--registry", str(tmp_path / "registry")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"quantray: error: {job}: [gate] max_top1_drop is for classification; task = 'agreement' uses max_drop"]
    assert not (tmp_path / "registry").exists()


@pytest.mark.ray
def test_the_pt2e_flow_scores_dict_outputs_too(ray_cluster, tmp_path):
    """PT2E's compiled runtime pads the last, smaller test batch (104 = 3 x 32 + 8) and drops the
    padding's rows from every output of the dict, not only from a tensor."""
    job = tmp_path / "photos_pt2e.toml"
    job.write_text(JOBS["agreement"].read_text().replace('backend = "x86"', 'backend = "x86"\nflow = "pt2e"')
                   .replace('mapping = "default"', "# mapping: FX only"))
    metrics = quantray.run(job, workers=2, console=quiet(), out=tmp_path / "run").metrics
    assert metrics["samples"] == 104 and set(metrics["output_agreement"]["outputs_sqnr_db"]) == {"image", "code"}
    assert metrics["headline"]["int8"] > 20


@pytest.mark.ray
def test_tune_searches_a_regression_job_by_rmse_in_its_unit(ray_cluster, tmp_path):
    """--max-drop is RMSE's unit and direction (a rise is a drop); trials are scored by the task's
    merged states, and the best trial run as a job gives the RMSE its trial had (the same split)."""
    from quantray.commands.tune import tune

    import pyarrow.parquet as pq

    result = tune(JOBS["regression"], max_drop=0.05, trials=10, workers=2, out=tmp_path / "tune", console=quiet())
    rows = pq.read_table(tmp_path / "tune" / "trials.parquet").to_pylist()
    assert len(rows) == 10 and {r["headline"] for r in rows} == {"rmse"} and all(r["top1"] is None for r in rows)
    for r in rows:
        assert r["drop"] == pytest.approx(r["int8_headline"] - r["fp32_headline"], abs=1e-12)   # lower is better
    assert result.met and result.best["drop"] <= 0.05
    assert result.best["drop"] == min(r["drop"] for r in rows if not r["fp32_modules"])
    best_run = result.best_run.metrics["headline"]
    assert best_run["int8"] == pytest.approx(result.best["int8_headline"], rel=1e-9)
    summary = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert summary["headline"]["key"] == "rmse" and summary["best_run"]["test_headline"] == best_run["int8"]
    assert "RMSE against the number of FP32 layers" in (tmp_path / "tune" / "report.html").read_text()


def test_tune_refuses_label_free_data_before_any_work(tmp_path, capsys):
    assert main(["tune", str(JOBS["agreement"]), "--max-drop", "1", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[test] task = 'agreement': quantray tune trades INT8 against FP32 on a headline" in err[0]
    assert not (tmp_path / "t").exists()
