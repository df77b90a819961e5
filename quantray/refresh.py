"""The nightly flow: a new versioned run, an accuracy gate, an atomic promotion, a history.

    quantray refresh jobs/digits.toml --registry /srv/models/digits

Registry layout (a local folder; every write is a temporary file renamed into place):
    runs/RUN_ID/          run directories (RUN_ID = UTC time + the job file's digest)
    gates/RUN_ID.json     each run's gate verdict, kept whether it passed or not
    PROMOTED              {"run_id": ...}: the promoted run, replaced by rename only
    history.parquet       one row per refresh, rewritten by rename only

Killed at any moment, the registry keeps the previous PROMOTED pointer, the run it names, and a
readable history: a half-finished run is only ever a hidden staging folder.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from .artifacts import read_manifest
from .errors import QuantrayError, SpecError
from .spec import JobSpec

__all__ = ["refresh", "promoted_run", "HISTORY_SCHEMA", "DRIFT_SCHEMA"]

HISTORY_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("time", pa.timestamp("s", tz="UTC")), ("data_digest", pa.string()),
    ("qparams_digest", pa.string()), ("fp32_top1", pa.float64()), ("int8_top1", pa.float64()),
    ("fp32_top5", pa.float64()), ("int8_top5", pa.float64()), ("agreement", pa.float64()),
    ("gate", pa.string()), ("reason", pa.string()), ("promoted", pa.bool_()),
])
DRIFT_SCHEMA = pa.schema([
    ("name", pa.string()), ("min_change", pa.float64()), ("max_change", pa.float64()),
    ("scale_change", pa.float64()), ("promoted_scale", pa.float64()), ("scale", pa.float64()),
])


def promoted_run(registry: str | Path) -> Path | None:
    """The run directory PROMOTED names, or None before the first promotion."""
    pointer = Path(registry) / "PROMOTED"
    if not pointer.is_file():
        return None
    return Path(registry) / "runs" / json.loads(pointer.read_text())["run_id"]


def refresh(spec: JobSpec, registry: str | Path, *, workers: int | None = None, address: str | None = None,
            console: Console | None = None) -> dict:
    """Run `spec` into the registry, gate it, promote it if it passes; returns the history row."""
    from .job import run_job

    console = console or Console(stderr=True)
    registry = Path(registry)
    if "://" in str(registry):
        raise SpecError(f"--registry {registry}: only a local or mounted folder is supported for now")
    (registry / "runs").mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{hashlib.sha256(spec.path.read_bytes()).hexdigest()[:8]}"
    previous = promoted_run(registry)
    previous_metrics = json.loads((previous / "metrics.json").read_text()) if previous else None

    def add_drift(run, manifest):
        if previous is not None:
            rows = _drift(pq.read_table(previous / "qparams.parquet").to_pylist(),
                          pq.read_table(run.path("qparams.parquet")).to_pylist())
            run.write_parquet("drift.parquet", rows, DRIFT_SCHEMA)
            _print_drift(console, rows, previous.name)

    row = {"run_id": run_id, "time": now, "data_digest": None, "qparams_digest": None, "fp32_top1": None,
           "int8_top1": None, "fp32_top5": None, "int8_top5": None, "agreement": None, "promoted": False}
    try:
        run_dir = Path(run_job(spec, workers=workers, out=registry / "runs" / run_id, address=address,
                               console=console, before_commit=add_drift))
    except QuantrayError as e:
        row.update(gate="error", reason=str(e))
        _write_gate(registry, run_id, row)
        _append_history(registry, row)
        raise
    manifest, metrics = read_manifest(run_dir), json.loads((run_dir / "metrics.json").read_text())
    row.update(data_digest=manifest["data_digest"], qparams_digest=manifest["qparams_digest"],
               fp32_top1=metrics["fp32"]["top1"], int8_top1=metrics["int8"]["top1"], fp32_top5=metrics["fp32"]["top5"],
               int8_top5=metrics["int8"]["top5"], agreement=metrics["agreement"])
    reasons = _gate(spec, metrics, previous_metrics)
    row.update(gate="failed" if reasons else "passed", reason="; ".join(reasons))
    _write_gate(registry, run_id, row)
    if not reasons:
        _atomic_write(registry / "PROMOTED", json.dumps({"run_id": run_id, "qparams_digest": row["qparams_digest"],
                                                         "promoted_at": now.isoformat()}) + "\n")
        row["promoted"] = True
    _append_history(registry, row)
    verdict = "promoted" if row["promoted"] else f"not promoted: {row['reason']}"
    console.print(f"run {run_id}: gate {row['gate']}, {verdict}")
    return row


def _gate(spec: JobSpec, metrics: dict, previous: dict | None) -> list[str]:
    reasons = []
    drop = metrics["fp32"]["top1"] - metrics["int8"]["top1"]
    if drop > spec.gate.max_top1_drop + 1e-12:
        reasons.append(f"INT8 top-1 trails FP32 by {drop * 100:.2f} pt > max_top1_drop {spec.gate.max_top1_drop * 100:.2f} pt")
    if previous is not None:
        regression = previous["int8"]["top1"] - metrics["int8"]["top1"]
        if regression > spec.gate.max_regression + 1e-12:
            reasons.append(f"INT8 top-1 is {regression * 100:.2f} pt below the promoted model's "
                           f"> max_regression {spec.gate.max_regression * 100:.2f} pt")
    return reasons


def _drift(old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """Per observer, the relative change of min, max and scale against the promoted run, largest first."""
    old = {r["name"]: r for r in old_rows}

    def rel(new, before):
        if new is None or before is None:
            return None
        return abs(new - before) / max(abs(before), 1e-12)

    rows = [{"name": r["name"], "min_change": rel(r["min"], old[r["name"]]["min"]),
             "max_change": rel(r["max"], old[r["name"]]["max"]), "scale_change": rel(r["scale"], old[r["name"]]["scale"]),
             "promoted_scale": old[r["name"]]["scale"], "scale": r["scale"]}
            for r in new_rows if r["name"] in old]
    return sorted(rows, key=lambda r: -(r["scale_change"] or 0))


def _print_drift(console: Console, rows: list[dict], against: str, most: int = 5) -> None:
    table = Table(title=f"range drift against the promoted run {against} (largest {most})")
    for column in ("observer", "min", "max", "scale"):
        table.add_column(column, justify="left" if column == "observer" else "right")
    for r in rows[:most]:
        table.add_row(r["name"], *(f"{r[k]:.2%}" if r[k] is not None else "-" for k in ("min_change", "max_change", "scale_change")))
    console.print(table)


def _write_gate(registry: Path, run_id: str, row: dict) -> None:
    (registry / "gates").mkdir(exist_ok=True)
    _atomic_write(registry / "gates" / f"{run_id}.json",
                  json.dumps({k: (v.isoformat() if isinstance(v, datetime.datetime) else v) for k, v in row.items()},
                             indent=2, sort_keys=True) + "\n")


def _append_history(registry: Path, row: dict) -> None:
    path = registry / "history.parquet"
    rows = pq.read_table(path).to_pylist() if path.is_file() else []
    table = pa.Table.from_pylist(rows + [row], schema=HISTORY_SCHEMA)
    fd, tmp = tempfile.mkstemp(dir=registry, prefix=".history.")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
