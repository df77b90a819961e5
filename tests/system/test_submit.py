"""`ray job submit` against a real head on loopback: the demo job runs unchanged, a broken spec
fails with its one-line error in the job's logs, and the head is stopped by its PID."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import ROOT, start_ray_node, stop_process

pytestmark = pytest.mark.ray  # every test here starts Ray or another process

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head():
    temp = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))  # short: Ray's unix sockets live under it
    process, ports, env = start_ray_node(temp, cpus=2, dashboard=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert process.poll() is None, "".join(p.read_text()[-3000:] for p in temp.glob("node-*.log"))
            assert time.monotonic() < deadline, "the head's job server did not answer in 120 s"
            time.sleep(1)
        yield address, env
    finally:
        stop_process(process)  # only the head this test started, by its PID


def _submit(address, env, *args):
    return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                           "--", "quantray", "run", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_demo_job_runs_unchanged_through_ray_job_submit(head, tmp_path):
    address, env = head
    result = _submit(address, env, "jobs/digits.toml", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["fp32"]["top1"] >= 0.95 and metrics["int8"]["top1"] >= metrics["fp32"]["top1"] - 0.01
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["workers"] == 2


def test_broken_spec_fails_the_job_with_the_spec_error_in_its_logs(head, tmp_path):
    address, env = head
    # Inside the uploaded working dir, and not in .gitignore: Ray leaves ignored files out.
    broken = ROOT / "jobs" / ".broken-for-test.toml"
    broken.write_text((ROOT / "jobs" / "digits.toml").read_text().replace("samples = 320", "sample = 320"))
    try:
        result = _submit(address, env, "jobs/.broken-for-test.toml", "--out", tmp_path / "run")
    finally:
        broken.unlink()
    assert result.returncode == 1
    assert "[calibration] sample unknown key (did you mean 'samples'?)" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()
