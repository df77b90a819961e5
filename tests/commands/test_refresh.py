"""The nightly refresh: gate and drift (pure), a history that concurrent refreshes cannot lose rows
of, tidying after killed refreshes, and real refreshes through Ray, one SIGKILLed mid-run."""

import datetime
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import DEMO_JOB, quiet
from rich.console import Console

from quantray.commands.refresh import drift, gate, promoted_run, rebuild_history, refresh, tidy, write_gate
from quantray.errors import QuantrayError
from quantray.spec import load_spec
from quantray.storage.store import StagedDir, Store, json_bytes

# A night three days before the real clock's now: a refresh run as a subprocess stamps its run with
# the real clock, so no night of these tests may be a fixed date that the real clock overtakes.
NIGHT = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)).replace(
    hour=2, minute=30, second=0, microsecond=0)


def _job(tmp_path: Path, extra: str = "", name: str = "digits.toml") -> Path:
    job = tmp_path / name
    job.write_text(DEMO_JOB.read_text() + extra)
    return job


def _metrics(fp32, int8):
    return {"fp32": {"top1": fp32}, "int8": {"top1": int8}}


def _intact(run: Path) -> bool:
    from quantray.digest import sha256_bytes

    manifest = json.loads((run / "manifest.json").read_text())
    return all(sha256_bytes((run / name).read_bytes()) == digest for name, digest in manifest["files"].items())


def _history(registry) -> list[dict]:
    return pq.read_table(Path(registry) / "history.parquet").to_pylist()


def test_gate_checks_the_drop_against_fp32_and_the_promoted_model(tmp_path):
    spec = load_spec(_job(tmp_path, "\n[gate]\nmax_top1_drop = 0.01\nmax_regression = 0.005\n"))
    assert gate(spec, _metrics(0.90, 0.89), None) == []
    assert gate(spec, _metrics(0.90, 0.885), None) == ["INT8 top-1 trails FP32 by 1.50 pt > max_top1_drop 1.00 pt"]
    assert gate(spec, _metrics(0.90, 0.895), _metrics(0.91, 0.901)) == ["INT8 top-1 is 0.60 pt below the promoted "
                                                                        "model's > max_regression 0.50 pt"]
    assert gate(spec, _metrics(0.90, 0.897), _metrics(0.91, 0.901)) == []


def test_drift_is_the_relative_change_per_observer_largest_first():
    old = [{"name": "a", "min": 0.0, "max": 2.0, "scale": 0.1}, {"name": "b", "min": -1.0, "max": 1.0, "scale": 0.2}]
    new = [{"name": "a", "min": 0.0, "max": 2.0, "scale": 0.1}, {"name": "b", "min": -1.0, "max": 1.5, "scale": 0.25},
           {"name": "c", "min": 0.0, "max": 1.0, "scale": 0.1}]
    rows = drift(old, new)
    assert [r["name"] for r in rows] == ["b", "a"]
    assert rows[0]["max_change"] == pytest.approx(0.5) and rows[0]["scale_change"] == pytest.approx(0.25)
    assert rows[1]["scale_change"] == 0.0


def _gate_row(run_id: str, minute: int) -> dict:
    return {"run_id": run_id, "time": NIGHT + datetime.timedelta(minutes=minute), "data_digest": None,
            "qparams_digest": None, "fp32_top1": 0.9, "int8_top1": 0.9, "fp32_top5": 1.0, "int8_top5": 1.0,
            "agreement": 1.0, "gate": "passed", "reason": ""}


def test_concurrent_refreshes_never_lose_a_history_row(tmp_path):
    """Eight writers record a gate and rebuild the history at once, many times over."""
    reg = Store(tmp_path / "registry", "--registry")
    errors = []

    def writer(k):
        try:
            for i in range(6):
                write_gate(reg, _gate_row(f"run-{k}-{i}", 10 * k + i))
                rebuild_history(reg)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = _history(tmp_path / "registry")
    assert len(rows) == 48 and len({r["run_id"] for r in rows}) == 48
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)


def test_a_stale_history_is_repaired_from_the_gates(tmp_path):
    reg = Store(tmp_path / "registry", "--registry")
    for k in range(3):
        write_gate(reg, _gate_row(f"run-{k}", k))
    rebuild_history(reg)
    stale = (tmp_path / "registry" / "history.parquet").read_bytes()
    write_gate(reg, _gate_row("run-3", 3))
    rebuild_history(reg)
    (tmp_path / "registry" / "history.parquet").write_bytes(stale)  # a slower writer's older view lands last
    assert [r["run_id"] for r in rebuild_history(reg)] == ["run-0", "run-1", "run-2", "run-3"]
    assert len(_history(tmp_path / "registry")) == 4


@pytest.mark.ray
def test_tidy_records_what_killed_refreshes_left_and_never_touches_a_live_staging_folder(tmp_path):
    root = tmp_path / "registry"
    reg = Store(root, "--registry")
    committed = root / "runs" / f"{NIGHT:%Y%m%dT%H%M%SZ}-aaaaaaaa-000001"  # committed, then killed before its gate
    committed.mkdir(parents=True)
    (committed / "manifest.json").write_text("{}")
    reg.write(json_bytes({"run_id": committed.name}), "PROMOTED")  # promoted, then killed before its marker
    dead = subprocess.run([sys.executable, "-c", (
        "import os, signal; from quantray.storage.store import StagedDir\n"
        f"s = StagedDir({str(root / 'runs' / 'killed')!r}); (s.staging / 'half.bin').write_bytes(b'x')\n"
        "os.kill(os.getpid(), signal.SIGKILL)")])
    assert dead.returncode == -signal.SIGKILL
    live = StagedDir(root / "runs" / "live")  # this process is writing it
    log = io.StringIO()
    tidy(reg, Console(file=log, width=300))
    hidden = sorted(p.name for p in (root / "runs").iterdir() if p.name.startswith("."))
    assert [h for h in hidden if h.startswith(".killed")] == [] and any(h.startswith(".live.partial-") for h in hidden)
    assert "left by a refresh that was stopped" in log.getvalue()
    gate_file = json.loads((root / "gates" / f"{committed.name}.json").read_text())
    assert gate_file["gate"] == "error" and "stopped after writing this run and before gating it" in gate_file["reason"]
    assert (root / "promotions" / committed.name).exists()
    assert [(r["run_id"], r["gate"], r["promoted"]) for r in _history(root)] == [(committed.name, "error", True)]
    live.abort()


@pytest.fixture(scope="module")
def registry(ray_cluster, tmp_path_factory):
    """A registry, at a file:// URI, with one promoted digits run."""
    base = tmp_path_factory.mktemp("registry")
    log = io.StringIO()
    row = refresh(load_spec(_job(base)), f"file://{base}/reg", workers=2, console=Console(file=log, width=300),
                  now=lambda: NIGHT)
    assert row["promoted"] and row["gate"] == "passed", log.getvalue()
    return base / "reg"


@pytest.mark.ray
def test_first_refresh_promotes_and_records_history(registry):
    uri = f"file://{registry}"
    run = Path(promoted_run(uri).removeprefix("file://"))
    assert promoted_run(uri) == f"{uri}/runs/{run.name}" and _intact(run)
    assert run.name.startswith(f"{NIGHT:%Y%m%dT%H%M%SZ}-")
    history = _history(registry)
    assert history[0]["run_id"] == run.name and history[0]["promoted"] and history[0]["gate"] == "passed"
    assert history[0]["qparams_digest"] == json.loads((run / "manifest.json").read_text())["qparams_digest"]
    assert len(history[0]["data_digest"]) == 64
    assert sorted(p.name for p in registry.iterdir()) == ["PROMOTED", "gates", "history.html", "history.parquet", "promotions",
                                                         "runs"]


@pytest.mark.ray
def test_gated_out_run_is_kept_marked_and_not_promoted(registry, tmp_path):
    """A night whose test data is mislabelled scores far below the promoted model: held back. It is
    refreshed in the same second as the first run (an injected clock): run ids still differ."""
    before = (registry / "PROMOTED").read_text()
    promoted_top1 = _history(registry)[0]["int8_top1"]
    log = io.StringIO()
    mislabelled = _job(tmp_path)
    mislabelled.write_text(mislabelled.read_text().replace(
        '[test]\nsource = "digits"\nsplit = "test"',
        '[test]\nsource = "factory"\nfactory = "quantray.testing:digits_relabelled"\nkwargs = { split = "test" }'))
    row = refresh(load_spec(mislabelled), str(registry), workers=2, console=Console(file=log, width=300),
                  now=lambda: NIGHT)
    regression = (promoted_top1 - row["int8_top1"]) * 100
    assert not row["promoted"] and row["gate"] == "failed" and regression > 90
    assert row["reason"] == f"INT8 top-1 is {regression:.2f} pt below the promoted model's > max_regression 0.50 pt"
    assert (registry / "PROMOTED").read_text() == before
    kept = registry / "runs" / row["run_id"]
    assert _intact(kept) and json.loads((registry / "gates" / f"{row['run_id']}.json").read_text())["gate"] == "failed"
    drift_rows = pq.read_table(kept / "drift.parquet").to_pylist()
    assert drift_rows and all(r["scale_change"] == 0.0 for r in drift_rows)  # same calibration data, same qparams
    assert "range drift against the promoted run" in log.getvalue()
    history = _history(registry)
    assert len({h["run_id"] for h in history}) == len(history) >= 2  # the same second, two run ids
    # Ordered by time, then run id: within one second the order is the ids', not the runs'.
    assert [h["promoted"] for h in history if h["run_id"] == row["run_id"]] == [False]


@pytest.mark.ray
def test_a_failed_run_is_recorded_as_an_error_night(registry, tmp_path):
    failing = _job(tmp_path)
    failing.write_text(failing.read_text().replace('[test]\nsource = "digits"\nsplit = "test"',
                                                   '[test]\nsource = "factory"\nfactory = "quantray.testing:digits_failing"\n'
                                                   'kwargs = { split = "test", fail_at = 5 }'))
    before = (registry / "PROMOTED").read_text()
    with pytest.raises(QuantrayError, match=r"^evaluate: test batch 0 of"):
        refresh(load_spec(failing), str(registry), workers=2, console=quiet())
    last = _history(registry)[-1]
    assert last["gate"] == "error" and last["reason"].endswith("sample 5 failed to load: ValueError: cannot decode sample 5")
    assert json.loads((registry / "gates" / f"{last['run_id']}.json").read_text())["gate"] == "error"
    assert (registry / "PROMOTED").read_text() == before and not (registry / "runs" / last["run_id"]).exists()


@pytest.mark.ray
def test_sigkill_leaves_the_promoted_model_and_history_intact(registry, ray_cluster, tmp_path):
    """`quantray refresh` killed with SIGKILL with its run staged, not yet committed; the next
    refresh's tidying removes what it left. (The later windows, a run committed but not gated and a
    promotion not yet marked, are built and tidied in the test above.)"""
    promoted_before = Path(promoted_run(str(registry)))
    rows_before = len(_history(registry))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, QUANTRAY_KILL_AT="staged")
    exe = shutil.which("quantray", path=os.path.dirname(sys.executable))
    job = _job(tmp_path, "\n[gate]\nmax_top1_drop = 0.05\n")
    proc = subprocess.run([exe, "refresh", str(job), "--registry", str(registry), "--workers", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    promoted = Path(promoted_run(str(registry)))
    assert _intact(promoted) and len(_history(registry)) == rows_before  # readable, not yet rebuilt
    hidden = [p for p in (registry / "runs").iterdir() if p.name.startswith(".")]
    assert promoted == promoted_before and hidden  # the staging folder the kill left
    tidy(Store(str(registry), "--registry"), quiet())
    assert not [p for p in (registry / "runs").iterdir() if p.name.startswith(".")]
    assert len(_history(registry)) == rows_before and all(_intact(p) for p in (registry / "runs").iterdir())


@pytest.mark.ray
def test_a_promoted_run_changed_on_disk_is_refused_as_the_baseline(registry, tmp_path):
    """The promoted run's every file is checked against its manifest before it is compared with:
    one line naming the file, nothing run, nothing recorded."""
    copy = tmp_path / "registry"
    shutil.copytree(registry, copy)
    promoted = copy / "runs" / json.loads((copy / "PROMOTED").read_text())["run_id"]
    (promoted / "qparams.parquet").write_bytes((promoted / "qparams.parquet").read_bytes()[:100])
    history = (copy / "history.parquet").read_bytes()
    with pytest.raises(QuantrayError, match=rf"^{promoted / 'qparams.parquet'}: changed since the run \(100 bytes"):
        refresh(load_spec(_job(tmp_path)), str(copy), workers=2, console=quiet())
    assert (copy / "history.parquet").read_bytes() == history
    assert sorted(p.name for p in (copy / "runs").iterdir()) == sorted(p.name for p in (registry / "runs").iterdir())


@pytest.mark.ray
def test_a_refresh_that_starts_while_another_is_between_commit_and_gate_does_not_judge_its_run(ray_cluster, tmp_path):
    """Refresh A is held (an injected pause) after its run became visible and before it wrote the
    run's gate; refresh B starts inside that window and runs to the end. History, gates/ and
    PROMOTED must agree afterwards: B may not record A's run as an error night."""
    registry = tmp_path / "registry"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, QUANTRAY_PAUSE_AT="committed:12")
    exe = shutil.which("quantray", path=os.path.dirname(sys.executable))
    held = subprocess.Popen([exe, "refresh", str(_job(tmp_path)), "--registry", str(registry), "--workers", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        runs = registry / "runs"
        while not (runs.exists() and any((p / "manifest.json").exists() for p in runs.iterdir())):
            assert held.poll() is None, held.stdout.read()[-2000:]
            time.sleep(0.1)
        a = next(p.name for p in runs.iterdir() if (p / "manifest.json").exists())
        assert not (registry / "gates" / f"{a}.json").exists()  # A is inside the window
        b = refresh(load_spec(_job(tmp_path, name="other.toml")), str(registry), workers=1, console=quiet())
        out, _ = held.communicate(timeout=300)
        assert held.returncode == 0, out[-2000:]
    finally:
        if held.poll() is None:
            held.kill()
    gates = {p.stem: json.loads(p.read_text()) for p in (registry / "gates").iterdir()}
    history = {r["run_id"]: r for r in _history(registry)}
    promotions = {p.name for p in (registry / "promotions").iterdir()}
    assert set(gates) == set(history) == {a, b["run_id"]}
    for run_id, verdict in gates.items():
        assert verdict["gate"] == history[run_id]["gate"] == "passed", (run_id, verdict, history[run_id])
        assert history[run_id]["promoted"] == (run_id in promotions)
    assert json.loads((registry / "PROMOTED").read_text())["run_id"] in promotions == {a, b["run_id"]}
