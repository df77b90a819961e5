"""The engine check, equalization and bias correction through whole runs and tunes on Ray, on the
shipped cases: what metrics.json, layers.parquet, report.html and the manifest say, and tune's exit."""

import io
import json
import platform
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import ROOT, quiet
from rich.console import Console

import quantray
from quantray.commands.tune import tune
from quantray.errors import EngineFault
from quantray.inputs import data

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
x86_only = pytest.mark.skipif(not X86, reason="qnnpack's ReLU6 fault is seen on x86 CPUs")


def _job(tmp_path, name, extra=""):
    text = (ROOT / "jobs" / f"{name}.toml").read_text().replace("[run]", f'[run]\ncache_dir = "{tmp_path / "stats"}"')
    job = tmp_path / f"{name}.toml"
    job.write_text(text.replace("[quantization]", f"[quantization]\n{extra}") if extra else text)
    return job


def _rebuilt_is_the_runs_model(result):
    """The seed's recipe (`load_quantized`) and the run's TorchScript give the same logits."""
    x, _ = data.digits("test").tensors
    with torch.inference_mode():
        assert torch.equal(result.int8()(x), torch.jit.load(str(Path(result.location) / "model_int8.pt"))(x))


@pytest.mark.ray
def test_the_demo_runs_kernels_pass_the_engine_check(demo_runs):
    for result in demo_runs.values():
        check = result.metrics["engine_check"]
        assert check["ok"] is True and check["engine"] == "x86" and check["samples"] == 8
        assert check["layers_checked"] >= 6 and check["first_layer"] is None
        rows = pq.read_table(Path(result.location) / "layers.parquet").to_pylist()
        assert {r["engine_fault"] for r in rows if r["quantized"]} == {False}
        assert "Engine check: the x86 kernels agree with the reference" in (Path(result.location) / "report.html").read_text()


@pytest.mark.ray
@x86_only
def test_a_qnnpack_fault_is_named_in_the_run_and_tune_stops_at_once(ray_cluster, tmp_path):
    out = io.StringIO()
    result = quantray.run(_job(tmp_path, "digits_qnnpack_relu6"), out=tmp_path / "run", workers=2,
                          console=Console(file=out, width=400))
    check = result.metrics["engine_check"]
    assert check["ok"] is False and check["first_layer"]["module"] == "relu"
    assert check["int8_top1"] < 0.3 and check["reference_top1"] > 0.9 and check["reference_samples"] == 64
    assert result.metrics["int8"]["top1"] < 0.3  # the engine's own figures stay what the engine computes
    assert "the qnnpack kernels disagree with the reference quantization from layer relu (ReLU6)" in out.getvalue()
    rows = pq.read_table(Path(result.location) / "layers.parquet").to_pylist()
    faults = [r for r in rows if r["engine_fault"]]
    assert faults and faults[0]["module"] == "relu" and faults[0]["engine_sqnr_db"] < 10
    page = (Path(result.location) / "report.html").read_text()
    assert "Engine check failed" in page and "engine fault: relu" in page
    # tune: no trial is spent, nothing is written, and the error is the diagnosis
    with pytest.raises(EngineFault, match="ran no trial") as failed:
        tune(_job(tmp_path, "digits_qnnpack_relu6"), max_drop=0.01, out=tmp_path / "tune", workers=2, console=quiet())
    assert failed.value.exit_code == 3 and not (tmp_path / "tune").exists()
    # ... unless trials are to be scored with the reference model, which it then says
    scored = tune(_job(tmp_path, "digits_qnnpack_relu6"), max_drop=0.01, out=tmp_path / "ref", workers=2, trials=2,
                  score_with="reference", console=quiet())
    assert scored.scored_with == "reference" and scored.best["top1"] > 0.9
    summary = json.loads((Path(scored.location) / "tune.json").read_text())
    assert summary["scored_with"] == "reference" and summary["engine_check"]["ok"] is False


@pytest.mark.ray
def test_equalization_recovers_the_spread_case_and_is_recorded(ray_cluster, tmp_path):
    plain = quantray.run(_job(tmp_path, "digits_spread"), out=tmp_path / "plain", workers=2, console=quiet())
    fixed = quantray.run(_job(tmp_path, "digits_spread_equalized"), out=tmp_path / "fixed", workers=2, console=quiet())
    fp32 = plain.metrics["fp32"]["top1"]
    assert fixed.metrics["fp32"]["top1"] == fp32  # FP32 figures are the user's model's
    assert plain.metrics["int8"]["top1"] < fp32 - 0.10 and fixed.metrics["int8"]["top1"] >= fp32 - 0.01
    assert plain.metrics["engine_check"]["ok"] is fixed.metrics["engine_check"]["ok"] is True  # quantization error
    assert fixed.manifest["transforms"]["equalization"]["pairs"] == [["conv1", "conv2"], ["conv2", "conv3"]]
    assert "transforms" not in plain.manifest
    _rebuilt_is_the_runs_model(fixed)  # load_quantized equalizes the FP32 model again before its recipe


@pytest.mark.ray
def test_bias_correction_is_recorded_and_a_model_with_nothing_to_correct_says_so(ray_cluster, tmp_path):
    result = quantray.run(_job(tmp_path, "digits", "bias_correction = true"), out=tmp_path / "bc", workers=2,
                          console=quiet())
    done = result.manifest["bias_correction"]
    assert done["layers"] == 4 and done["mean_abs_correction"] > 0 and done["not_corrected"] == []
    _rebuilt_is_the_runs_model(result)  # the corrected biases are in model_int8.pth
    out = io.StringIO()
    nothing = 'bias_correction = true\nmodule_names = { conv1 = "fp32", conv2 = "fp32", conv3 = "fp32", fc = "fp32" }'
    result = quantray.run(_job(tmp_path, "digits", nothing), out=tmp_path / "none", workers=2,
                          console=Console(file=out, width=400))
    assert result.manifest["bias_correction"]["layers"] == 0
    assert "bias_correction = true: no quantized conv or linear layer to correct" in out.getvalue()


@pytest.mark.ray
def test_tune_finds_equalization_for_the_spread_case(ray_cluster, tmp_path):
    result = tune(_job(tmp_path, "digits_spread"), max_drop=0.01, out=tmp_path / "tune", workers=2, console=quiet())
    rows = result.trials
    assert [r["phase"] for r in rows] == ["range"] * 5 + ["cure"] * 3  # per_tensor is the job's: 5 range methods
    assert all(r["drop"] > 0.10 for r in rows[:5])
    assert result.met and result.best["equalize"] and result.stopped.startswith("the budget was met by a cure")
    assert result.best["fp32_modules"] == []
    run = result.best_run
    assert run.manifest["spec"]["quantization"]["equalize"] is True
    assert run.metrics["int8"]["top1"] >= run.metrics["fp32"]["top1"] - 0.01
    summary = json.loads((Path(result.location) / "tune.json").read_text())
    assert "calibrate_equalized" in summary["timings_s"]
