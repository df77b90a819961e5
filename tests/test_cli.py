"""The installed `quantray` command, as a user runs it: exit codes, one-line errors, the demo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = (ROOT / "jobs" / "digits.toml").read_text()


def _quantray(*args, cwd=ROOT, timeout=300):
    exe = shutil.which("quantray", path=os.path.dirname(sys.executable)) or "quantray"
    return subprocess.run([exe, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("edit, expected", [
    (("samples = 320", "samples = 320\nbatch = 8"), "[calibration] batch unknown key (did you mean 'batch_size'?)"),
    (('factory = "quantray.demo:digits_cnn"', 'factory = "quantray.demo:digits_cnn"\ncheckpoint = "gone.pth"'),
     "gone.pth': file not found"),
    (('factory = "quantray.demo:digits_cnn"', 'arch = "resnet19"\nnum_classes = 10'),
     "[model] arch = 'resnet19': unknown torchvision architecture (did you mean 'resnet18'?)"),
])
def test_spec_errors_exit_2_with_one_line_and_no_run_directory(tmp_path, edit, expected):
    job = tmp_path / "job.toml"
    job.write_text(DEMO.replace(*edit))
    result = _quantray("run", job, "--out", tmp_path / "runs" / "r")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"quantray: error: {job}: ") and expected in lines[0]
    assert not (tmp_path / "runs").exists()


def test_existing_out_directory_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = _quantray("run", ROOT / "jobs" / "digits.toml", "--out", tmp_path / "taken")
    assert result.returncode == 2 and "already exists and is not empty" in result.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`quantray run` of the demo job, as a user types it."""
    run = tmp_path_factory.mktemp("cli") / "run"
    result = _quantray("run", "jobs/digits.toml", "--out", run, "--workers", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    return run, result


def test_demo_job_runs_end_to_end_from_the_command_line(cli_run):
    run, result = cli_run
    assert "FP32 vs INT8" in result.stdout and "top-1 accuracy" in result.stdout and "worst of" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fp32"]["top1"] >= 0.95 and metrics["int8"]["top1"] >= metrics["fp32"]["top1"] - 0.01


def test_report_prints_the_table_again_from_the_files(cli_run, tmp_path):
    run, _ = cli_run
    result = _quantray("report", run)
    assert result.returncode == 0
    for text in ("FP32 vs INT8 (359 test samples)", "top-1 95% CI", "latency p50/p90", "logit SQNR", "qparams digest",
                 "worst of 7 layers (64 samples)", "quantized Linear"):
        assert text in result.stdout
    missing = _quantray("report", tmp_path)
    assert missing.returncode == 2 and "not a quantray run directory (no manifest.json)" in missing.stderr


def test_evaluate_on_another_test_set_without_calibrating(cli_run, tmp_path):
    run, _ = cli_run
    other = tmp_path / "other.toml"
    other.write_text('[test]\nsource = "digits"\nsplit = "train"\nbatch_size = 50\n')
    out = tmp_path / "eval"
    result = _quantray("evaluate", run, "--data", other, "--samples", "300", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FP32 vs INT8 (300 test samples)" in result.stdout and f"evaluation of {run}" in result.stdout
    assert "calibrate" not in result.stderr  # no calibration progress: the run's INT8 model is reused
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["test"]["split"] == "train" and manifest["evaluation"]["samples"] == 300
    assert (out / "data.toml").read_text() == other.read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 300 and metrics["int8"]["top1"] >= 0.9  # digits it was calibrated near
    assert _quantray("report", out).returncode == 0


def test_evaluate_refuses_what_it_cannot_trust_with_one_line(cli_run, tmp_path):
    run, _ = cli_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)

    def refused(*args, expected):
        result = _quantray("evaluate", *args, "--out", tmp_path / "never")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
        assert not (tmp_path / "never").exists()

    no_test = tmp_path / "no_test.toml"
    no_test.write_text('[calibration]\nsource = "digits"\n')
    refused(copy, "--data", no_test, expected="no_test.toml: test missing section [test]")
    typo = tmp_path / "typo.toml"
    typo.write_text('[test]\nsource = "digits"\nbatchsize = 8\n')
    refused(copy, "--data", typo, expected="[test] batchsize unknown key (did you mean 'batch_size'?)")
    refused(tmp_path, expected="not a quantray run directory (no manifest.json)")
    refused(copy, "--samples", 5000, expected="[test] samples = 5000: asked for 5000 samples but the split has only 359")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["fp32_state_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    refused(copy, expected="the FP32 model is not the one this run quantized")
    (copy / "model_int8.pth").write_bytes(b"truncated")
    refused(copy, expected="model_int8.pth: missing or changed since the run")
