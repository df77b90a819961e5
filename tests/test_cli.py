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


def test_demo_job_runs_end_to_end_from_the_command_line(tmp_path):
    result = _quantray("run", "jobs/digits.toml", "--out", tmp_path / "run", "--workers", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FP32 vs INT8" in result.stdout and "top-1 accuracy" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["fp32"]["top1"] >= 0.95 and metrics["int8"]["top1"] >= metrics["fp32"]["top1"] - 0.01


def test_report_prints_the_table_again_from_the_files(tmp_path):
    run = tmp_path / "run"
    assert _quantray("run", "jobs/digits.toml", "--out", run, "--workers", "1").returncode == 0
    result = _quantray("report", run)
    assert result.returncode == 0
    for text in ("FP32 vs INT8 (359 test samples)", "top-1 95% CI", "latency p50/p90", "logit SQNR", "qparams digest"):
        assert text in result.stdout
    missing = _quantray("report", tmp_path)
    assert missing.returncode == 2 and "not a quantray run directory (no manifest.json)" in missing.stderr
