"""`ray job submit` against a real head on loopback: the demo job runs unchanged, a broken spec
fails with its one-line error in the job's logs, and the head is stopped by its PID."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
         "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
         "object-manager-port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's unix sockets live under it
    ports = {name: _free_port() for name in PORTS}
    # Workers take a range of 200 ports: one that holds none of the single ports above (Ray refuses an
    # overlap: "worker_ports is trying to use a port number ... used by other components").
    low = next(p for p in iter(_free_port, None) if not any(p <= q <= p + 200 for q in ports.values()))
    ports.update({"min-worker-port": low, "max-worker-port": low + 200})
    # Loopback test cluster: no token auth, on server and clients alike (DESIGN.md).
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                             *[f"--{k}={v}" for k, v in ports.items()]], env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, (Path(temp) / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the head's job server did not answer in 120 s"
            time.sleep(1)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # only the head this test started, by its PID
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()


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
