"""The nightly flow: a new versioned run, an accuracy gate, an atomic promotion, a history.

    quantray refresh jobs/digits.toml --registry /srv/models/digits

Registry layout (a local folder or a pyarrow.fs URI; small files are written whole, then moved into place):
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
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

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


class _Registry:
    """The registry's folder through pyarrow.fs: a local path or a URI (s3://, gs://, file://).

    Small files (PROMOTED, gates, history.parquet) are written whole to a hidden temporary name and
    moved into place: a rename on a local disk; on an object store, a single-object write that
    readers see whole or not at all.
    """

    def __init__(self, location: str | Path):
        import pyarrow.fs as pafs

        if "://" in str(location):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(str(location))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
                raise SpecError(f"--registry {location}: not a location pyarrow.fs can write ({e})") from None
            self.uri = str(location).rstrip("/")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(location).absolute())
            self.uri = self.root
        self.root = self.root.rstrip("/")

    def location(self, *parts: str) -> str:
        """What run_job's `out` takes: a local path or a URI."""
        return "/".join([self.uri, *parts])

    def read(self, *parts: str) -> bytes | None:
        try:
            with self.fs.open_input_stream("/".join([self.root, *parts])) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, payload: bytes, *parts: str) -> None:
        final = "/".join([self.root, *parts])
        folder, _, name = final.rpartition("/")
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(payload)
        self.fs.move(tmp, final)


def promoted_run(registry: str | Path) -> str | None:
    """Where the run PROMOTED names lives (a local path or a URI), or None before any promotion."""
    reg = _Registry(registry)
    pointer = reg.read("PROMOTED")
    return reg.location("runs", json.loads(pointer)["run_id"]) if pointer else None


def refresh(spec: JobSpec, registry: str | Path, *, workers: int | None = None, address: str | None = None,
            console: Console | None = None) -> dict:
    """Run `spec` into the registry, gate it, promote it if it passes; returns the history row."""
    from .job import run_job

    console = console or Console(stderr=True)
    reg = _Registry(registry)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{hashlib.sha256(spec.path.read_bytes()).hexdigest()[:8]}"
    pointer = reg.read("PROMOTED")
    previous = json.loads(pointer)["run_id"] if pointer else None
    previous_metrics = json.loads(reg.read("runs", previous, "metrics.json")) if previous else None

    def add_drift(run, manifest):
        if previous is not None:
            old = pq.read_table(pa.BufferReader(reg.read("runs", previous, "qparams.parquet"))).to_pylist()
            rows = _drift(old, pq.read_table(run.path("qparams.parquet")).to_pylist())
            run.write_parquet("drift.parquet", rows, DRIFT_SCHEMA)
            _print_drift(console, rows, previous)

    row = {"run_id": run_id, "time": now, "data_digest": None, "qparams_digest": None, "fp32_top1": None,
           "int8_top1": None, "fp32_top5": None, "int8_top5": None, "agreement": None, "promoted": False}
    try:
        run_job(spec, workers=workers, out=reg.location("runs", run_id), address=address, console=console,
                before_commit=add_drift)
    except QuantrayError as e:
        row.update(gate="error", reason=str(e))
        _write_gate(reg, run_id, row)
        _append_history(reg, row)
        raise
    manifest = json.loads(reg.read("runs", run_id, "manifest.json"))
    metrics = json.loads(reg.read("runs", run_id, "metrics.json"))
    row.update(data_digest=manifest["data_digest"], qparams_digest=manifest["qparams_digest"],
               fp32_top1=metrics["fp32"]["top1"], int8_top1=metrics["int8"]["top1"], fp32_top5=metrics["fp32"]["top5"],
               int8_top5=metrics["int8"]["top5"], agreement=metrics["agreement"])
    reasons = _gate(spec, metrics, previous_metrics)
    row.update(gate="failed" if reasons else "passed", reason="; ".join(reasons))
    _write_gate(reg, run_id, row)
    if not reasons:
        reg.put((json.dumps({"run_id": run_id, "qparams_digest": row["qparams_digest"],
                             "promoted_at": now.isoformat()}) + "\n").encode(), "PROMOTED")
        row["promoted"] = True
    _append_history(reg, row)
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


def _write_gate(reg: _Registry, run_id: str, row: dict) -> None:
    verdict = {k: (v.isoformat() if isinstance(v, datetime.datetime) else v) for k, v in row.items()}
    reg.put((json.dumps(verdict, indent=2, sort_keys=True) + "\n").encode(), "gates", f"{run_id}.json")


def _append_history(reg: _Registry, row: dict) -> None:
    existing = reg.read("history.parquet")
    rows = pq.read_table(pa.BufferReader(existing)).to_pylist() if existing else []
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows + [row], schema=HISTORY_SCHEMA), sink)
    reg.put(sink.getvalue().to_pybytes(), "history.parquet")
