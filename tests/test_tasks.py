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

JOBS = {"regression": ROOT / "jobs" / "diabetes_regression.toml", "agreement": ROOT / "jobs" / "photos_agreement.toml",
        "segmentation": ROOT / "jobs" / "scenes_segmentation.toml", "multilabel": ROOT / "jobs" / "scenes_multilabel.toml"}
HEADLINES = {"regression": "rmse", "agreement": "sqnr_db", "segmentation": "miou", "multilabel": "micro_f1"}
TIMINGS = ("latency", "speed", "timings", "throughput", "torchscript_size")


@pytest.mark.parametrize("name", list(examples.CHECKPOINTS))
def test_each_shipped_example_checkpoint_is_the_one_quantray_names(name):
    file, sha256 = examples.CHECKPOINTS[name]
    assert hashlib.sha256(resources.files("quantray").joinpath("assets", file).read_bytes()).hexdigest() == sha256
    figures = examples._figures(name, getattr(examples, name)())
    key, expected = {"diabetes_mlp": ("test_rmse", 57.656), "photo_autoencoder": ("test_rmse", 0.05919),   # as the
                     "scene_segmenter": ("test_miou", SEGMENTER_MIOU), "scene_tagger": ("test_micro_f1", 0.95528)}[name]  # README says
    assert figures[key] == pytest.approx(expected, abs=1e-5 if expected < 1 else 1e-3)


def test_the_examples_data_are_scikit_learns_files_split_once():
    x, y = examples.diabetes("all").tensors
    assert x.shape == (442, 10) and y.shape == (442, 1) and 25 <= y.min() and y.max() <= 346
    assert len(examples.diabetes("train")) == 354 and len(examples.diabetes("test")) == 88
    train = examples.diabetes("train").tensors[0]
    assert train.mean(0).abs().max() < 1e-5 and (train.std(0) - 1).abs().max() < 1e-5   # standardized by train
    patches = examples.photo_patches("all")
    assert len(patches) == 520 and patches[0].shape == (3, 32, 32) and 0 <= patches.x.min() and patches.x.max() <= 1
    assert len(examples.photo_patches("test")) == 104 and isinstance(patches[0], torch.Tensor)  # no labels


SEGMENTER_MIOU = 0.79029


def test_digit_scenes_hold_real_digits_their_masks_and_labels():
    scenes = examples.digit_scenes("test")
    labels = examples.digit_scenes("test", "labels")
    assert len(scenes) == 300 and len(examples.digit_scenes("train")) == 1200
    image, mask = scenes[0]
    assert image.shape == (1, 48, 48) and mask.shape == (48, 48) and mask.dtype == torch.int64
    for k in range(20):  # every class in a mask is a digit its labels name; ink is where the mask says
        image, mask = scenes[k]
        classes = set(mask.unique().tolist()) - {0, 255}
        assert classes == {d + 1 for d in labels[k][1].nonzero().flatten().tolist()}
        assert bool((image[0][mask > 0][mask[mask > 0] != 255] > 0.3).all()) and bool((image[0][mask == 0] == 0).all())
    with pytest.raises(ValueError, match="target = 'boxes': mask or labels"):
        examples.digit_scenes("test", "boxes")


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
    if task in ("segmentation", "multilabel"):
        scenes = examples.digit_scenes("test", "mask" if task == "segmentation" else "labels")
        fp32 = examples.scene_segmenter() if task == "segmentation" else examples.scene_tagger()
        out = {}
        with torch.inference_mode():
            for model, m in (("fp32", fp32), ("int8", int8)):
                logits = torch.cat([m(x)["out"] if task == "segmentation" else m(x) for x in scenes.x.split(50)])
                if task == "segmentation":
                    keep = scenes.y != 255
                    p, t = logits.argmax(1)[keep], scenes.y[keep]
                    iou = [((p == c) & (t == c)).sum().item() / ((p == c) | (t == c)).sum().item() for c in range(11)]
                    out[model] = {"miou": sum(iou) / 11, "pixel_accuracy": (p == t).double().mean().item()}
                else:
                    on, y = logits.sigmoid() >= 0.5, scenes.y.bool()
                    tp, fp, fn = (on & y).sum().item(), (on & ~y).sum().item(), (~on & y).sum().item()
                    out[model] = {"micro_f1": 2 * tp / (2 * tp + fp + fn)}
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
    assert metrics["task"] == task and metrics["headline"]["key"] == HEADLINES[task]
    whole = _whole_set(task, one.location)
    if task in ("segmentation", "multilabel"):
        # The same figures in one pass here, up to what thread counts change in float kernels: a
        # pixel's argmax (a logit's sign) on a near tie.
        assert metrics["samples"] == 300
        for model in ("fp32", "int8"):
            for key, value in whole[model].items():
                assert metrics[model][key] == pytest.approx(value, abs=2e-4), (model, key)
        assert metrics["headline"]["fp32"] - metrics["headline"]["int8"] < 0.01   # within the job's gate
    elif task == "regression":
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
    in at a quarter of their brightness (an exposure fault), so ranges are too narrow and INT8 clips
    the real patches: gated out on min_sqnr_db and on max_regression, and the promotion stays. (Half
    the brightness is not a fault here: x86's reduce_range observers leave INT8 twice the range.)"""
    registry = tmp_path / "registry"
    job = tmp_path / "photos.toml"
    job.write_text(JOBS["agreement"].read_text() + "max_regression = 3.0\n")
    log = io.StringIO()
    first = refresh(load_spec(job), str(registry), workers=2, console=Console(file=log, width=300))
    assert first["gate"] == "passed" and first["promoted"], log.getvalue()
    assert first["task"] == "agreement" and first["headline"] == "sqnr_db" and first["int8_headline"] > 25
    promoted = (registry / "PROMOTED").read_text()
    job.write_text(job.read_text().replace('factory = "quantray.examples:photo_patches"\nsplit = "train"',
                                           'factory = "quantray.testing:dim_photo_patches"\nkwargs = { factor = 0.25 }\n'
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
    assert history[0]["max_scale_drift"] is None and history[1]["max_scale_drift"] > 0.5   # ranges quartered, or so
    page = (registry / "history.html").read_text()   # rewritten by every refresh
    assert "2 nights: 1 passed, 1 gated out, 0 failed to run" in page and "INT8 vs FP32 output SQNR (dB) per night" in page
    for night in (first, second):
        assert f"href=\"runs/{night['run_id']}/report.html\"" in page and (registry / "runs" / night["run_id"] /
                                                                            "report.html").is_file()


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


@pytest.mark.ray
@pytest.mark.parametrize("task", ["regression", "agreement"])
def test_packed_tensor_targets_and_label_free_shards_give_the_same_figures(task_runs, tmp_path, task):
    from quantray.commands.pack import pack

    pack(JOBS[task], tmp_path / "shards", rows_per_shard=50, job_out=tmp_path / "packed.toml", console=quiet())
    packed = quantray.run(tmp_path / "packed.toml", workers=2, console=quiet(), out=tmp_path / "run", use_cache=False)
    assert _without_timings(packed.metrics) == _without_timings(task_runs[(task, 1)].metrics)
    assert packed.manifest["qparams_digest"] == task_runs[(task, 1)].manifest["qparams_digest"]


@pytest.mark.ray
def test_a_rerun_reuses_stored_dict_outputs_with_the_same_figures(ray_cluster, tmp_path):
    """FP32's outputs are stored per test batch as the model returns them (here a dict), and a rerun
    reads them back instead of running FP32 again: the same figures, bit for bit."""
    job = tmp_path / "photos.toml"
    job.write_text(JOBS["agreement"].read_text().replace("threads = 1", f'threads = 1\ncache_dir = "{tmp_path / "stats"}"'))
    cold = quantray.run(job, workers=2, console=quiet(), out=tmp_path / "cold")
    warm = quantray.run(job, workers=2, console=quiet(), out=tmp_path / "warm")
    batches = len(cold.manifest["evaluation"]["batches"])
    assert (cold.manifest["evaluation"]["fp32_batches_reused"], warm.manifest["evaluation"]["fp32_batches_reused"]) == \
        (0, batches)
    assert _without_timings(warm.metrics) == _without_timings(cold.metrics)


@pytest.mark.ray
def test_a_users_metric_runs_end_to_end_and_gates_a_refresh(task_runs, tmp_path):
    """[test] metric: the user's object scores FP32 and INT8 on the workers, merged in batch order;
    its mean absolute error is the regression task's MAE on the same data, and a refresh gates on
    it (max_drop in its unit)."""
    job = tmp_path / "custom.toml"
    job.write_text(JOBS["regression"].read_text().replace('task = "regression"  # headline: RMSE, lower is better',
                                                          'metric = "quantray.testing:mean_abs_metric"'))
    result = quantray.run(job, workers=2, console=quiet(), out=tmp_path / "run")
    mae = task_runs[("regression", 1)].metrics
    assert result.metrics["task"] == "custom" and result.metrics["headline"]["key"] == "mean_abs"
    for model in ("fp32", "int8"):
        assert result.metrics[model]["mean_abs"] == pytest.approx(mae[model]["mae"], rel=1e-12)
        assert result.metrics[model]["values"] == 88
    row = refresh(load_spec(job), str(tmp_path / "registry"), workers=2, console=quiet())
    assert row["gate"] == "passed" and row["task"] == "custom" and row["int8_headline"] == result.metrics["int8"]["mean_abs"]
