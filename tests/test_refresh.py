"""The nightly refresh: gate, atomic promotion, history, drift, and surviving SIGKILL."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from quantray.artifacts import sha256_file
from quantray.refresh import promoted_run, refresh
from quantray.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def _job(tmp_path: Path, gate: str = "") -> Path:
    job = tmp_path / f"digits{abs(hash(gate))}.toml"
    job.write_text((ROOT / "jobs" / "digits.toml").read_text() + gate)
    return job


def _intact(run: Path) -> bool:
    manifest = json.loads((run / "manifest.json").read_text())
    return all(sha256_file(run / name) == digest for name, digest in manifest["files"].items())


@pytest.fixture(scope="module")
def registry(ray_cluster, tmp_path_factory):
    """A registry with one promoted digits run."""
    base = tmp_path_factory.mktemp("registry")
    log = io.StringIO()
    row = refresh(load_spec(_job(base)), base / "reg", workers=2, console=Console(file=log, width=300))
    assert row["promoted"] and row["gate"] == "passed", log.getvalue()
    return base / "reg"


def test_first_refresh_promotes_and_records_history(registry):
    run = Path(promoted_run(registry))
    assert _intact(run)
    history = pq.read_table(registry / "history.parquet").to_pylist()
    assert history[0]["run_id"] == run.name and history[0]["promoted"] and history[0]["gate"] == "passed"
    assert history[0]["qparams_digest"] == json.loads((run / "manifest.json").read_text())["qparams_digest"]
    assert len(history[0]["data_digest"]) == 64


def test_gated_out_run_is_kept_marked_and_not_promoted(registry, tmp_path):
    before = (registry / "PROMOTED").read_text()
    time.sleep(1.1)  # run ids have one-second resolution
    log = io.StringIO()
    strict = _job(tmp_path, "\n[gate]\nmax_top1_drop = 0.0\n")  # the demo's INT8 trails FP32 by 0.28 pt
    row = refresh(load_spec(strict), registry, workers=2, console=Console(file=log, width=300))
    assert not row["promoted"] and row["gate"] == "failed"
    assert "INT8 top-1 trails FP32 by 0.28 pt > max_top1_drop 0.00 pt" in row["reason"]
    assert (registry / "PROMOTED").read_text() == before
    kept = registry / "runs" / row["run_id"]
    assert _intact(kept) and json.loads((registry / "gates" / f"{row['run_id']}.json").read_text())["gate"] == "failed"
    drift = pq.read_table(kept / "drift.parquet").to_pylist()
    assert drift and all(r["scale_change"] == 0.0 for r in drift)  # same data, same exact qparams
    assert "range drift against the promoted run" in log.getvalue()
    history = pq.read_table(registry / "history.parquet").to_pylist()
    assert [h["promoted"] for h in history][-1] is False and len(history) >= 2


def test_sigkill_at_any_moment_leaves_the_promoted_model_and_history_intact(registry, ray_cluster, tmp_path):
    promoted_before = Path(promoted_run(registry))
    rows_before = pq.read_table(registry / "history.parquet").num_rows
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    exe = shutil.which("quantray", path=os.path.dirname(sys.executable))
    job = _job(tmp_path, "\n[gate]\nmax_top1_drop = 0.05\n")
    for delay in (0.5, 3.0, 6.0, 9.0):
        time.sleep(1.1)
        proc = subprocess.Popen([exe, "refresh", str(job), "--registry", str(registry), "--workers", "2"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL or delay > 3.0  # the early kills land mid-run for sure
        promoted = Path(promoted_run(registry))
        assert _intact(promoted)
        history = pq.read_table(registry / "history.parquet").to_pylist()  # readable, never half-written
        assert len(history) >= rows_before
        if promoted != promoted_before:  # the refresh got as far as promoting before the kill
            assert history[-1]["run_id"] == promoted.name and history[-1]["promoted"] in (True, False)
        visible = [p for p in (registry / "runs").iterdir() if not p.name.startswith(".")]
        assert all((p / "manifest.json").is_file() and _intact(p) for p in visible)


def test_registry_can_be_a_pyarrow_uri(ray_cluster, tmp_path):
    uri = f"file://{tmp_path}/store/registry"
    row = refresh(load_spec(_job(tmp_path)), uri, workers=2, console=Console(file=io.StringIO()))
    assert row["promoted"] and promoted_run(uri) == f"{uri}/runs/{row['run_id']}"
    local = tmp_path / "store" / "registry"
    assert _intact(local / "runs" / row["run_id"])
    assert pq.read_table(local / "history.parquet").column("run_id").to_pylist() == [row["run_id"]]
    assert sorted(p.name for p in local.iterdir()) == ["PROMOTED", "gates", "history.parquet", "runs"]
