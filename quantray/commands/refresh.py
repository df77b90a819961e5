"""The nightly flow: a new versioned run, an accuracy gate, an atomic promotion, a history.

    quantray refresh jobs/digits.toml --registry /srv/models/digits

Registry layout (a local folder or a URI pyarrow.fs opens; every file is written whole, then moved):
    runs/RUN_ID/          run directories (RUN_ID: UTC time, the job file's digest, a random suffix),
                          each with its gate.json: the verdict, decided before the run is published
    gates/RUN_ID.json     each run's verdict (passed, failed: gated out, error: the run failed) and figures
    promotions/RUN_ID     written once PROMOTED names RUN_ID
    PROMOTED              {"run_id": ...}: the promoted run, replaced whole
    history.parquet       one row per run, rebuilt from gates/ and promotions/

history.parquet is a view of gates/ and promotions/, rebuilt and then checked against them until
it holds every gate: two refreshes writing at once cannot lose a row. Killed at any moment, the
registry keeps the previous PROMOTED pointer, the run it names and a readable history; the next
refresh removes staging folders no live process holds, copies the verdict of a run that was
published but not yet entered in gates/ (its refresh may still be on its way there: the copy is the
same bytes), and marks a promotion whose marker was not written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import tempfile
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from ..core.metrics import headline, worsening
from ..errors import QuantrayError, SpecError
from ..spec import JobSpec
from ..storage.artifacts import RunFiles
from ..storage.store import Store, failpoint, json_bytes, sweep_staging

__all__ = ["refresh", "promoted_run", "gate", "drift", "tidy", "write_gate", "rebuild_history", "HISTORY_SCHEMA",
           "DRIFT_SCHEMA"]

HISTORY_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("time", pa.timestamp("s", tz="UTC")), ("data_digest", pa.string()),
    ("qparams_digest", pa.string()), ("fp32_top1", pa.float64()), ("int8_top1", pa.float64()),
    ("fp32_top5", pa.float64()), ("int8_top5", pa.float64()), ("agreement", pa.float64()),
    ("gate", pa.string()), ("reason", pa.string()), ("promoted", pa.bool_()),
    # any task: its headline (top1, rmse, miou, micro_f1, sqnr_db, a metric's) and the INT8 vs FP32 output SQNR
    ("task", pa.string()), ("headline", pa.string()), ("fp32_headline", pa.float64()), ("int8_headline", pa.float64()),
    ("output_sqnr_db", pa.float64()),
    # INT8's headline interval (95%, where the task gives one) and the largest relative scale change
    # against the run promoted that night (None: nothing promoted yet)
    ("int8_headline_low", pa.float64()), ("int8_headline_high", pa.float64()), ("max_scale_drift", pa.float64()),
])
DRIFT_SCHEMA = pa.schema([
    ("name", pa.string()), ("min_change", pa.float64()), ("max_change", pa.float64()),
    ("scale_change", pa.float64()), ("promoted_scale", pa.float64()), ("scale", pa.float64()),
])
STALE_UPLOAD = datetime.timedelta(days=1)  # an unfinished run upload older than this is a killed refresh's
_FIGURES = ("data_digest", "qparams_digest", "fp32_top1", "int8_top1", "fp32_top5", "int8_top5", "agreement", "task",
            "headline", "fp32_headline", "int8_headline", "output_sqnr_db", "int8_headline_low", "int8_headline_high",
            "max_scale_drift")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def promoted_run(registry: str) -> str | None:
    """Where the run PROMOTED names lives (a local path or a URI), or None before any promotion."""
    reg = Store(registry, "--registry")
    pointer = reg.read("PROMOTED")
    return str(reg.where("runs", json.loads(pointer)["run_id"])) if pointer else None


def refresh(spec: JobSpec, registry: str, *, workers: int | None = None, address: str | None = None,
            executor: str | None = None, console: Console | None = None, now: Callable[[], datetime.datetime] = _utc_now) -> dict:
    """Run `spec` into the registry, gate it, promote it if it passes; returns its history row.
    A run that fails is recorded (gate "error") and its QuantrayError raised again."""
    from ..api import run

    console = console or Console(stderr=True)
    check_gate(spec)
    reg = Store(registry, "--registry")
    reg.check_writable()
    tidy(reg, console, now)
    started = now().replace(microsecond=0)
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{hashlib.sha256(spec.source()).hexdigest()[:8]}-{secrets.token_hex(3)}"
    pointer = reg.read("PROMOTED")
    previous = json.loads(pointer)["run_id"] if pointer else None
    if previous is not None:  # the promoted run is the baseline: every file as its manifest recorded it
        RunFiles(reg.where("runs", previous), "--registry").verify()
    previous_metrics = json.loads(reg.read("runs", previous, "metrics.json") or b"null") if previous else None

    row = {"run_id": run_id, "time": started, **dict.fromkeys(_FIGURES), "promoted": False}

    def judge(staged, manifest):
        """Gate the run before it is published, its verdict a file of the run (gate.json): another
        refresh that finds the run before this one wrote gates/RUN_ID.json copies that verdict."""
        largest = None
        if previous is not None:
            old = reg.read("runs", previous, "qparams.parquet")
            if old is not None:
                rows = drift(pq.read_table(pa.BufferReader(old)).to_pylist(),
                             pq.read_table(staged.path("qparams.parquet")).to_pylist())
                staged.write_parquet("drift.parquet", rows, DRIFT_SCHEMA)
                _print_drift(console, rows, previous)
                changes = [abs(r["scale_change"]) for r in rows if r["scale_change"] is not None]
                largest = max(changes) if changes else None
        metrics = json.loads(staged.path("metrics.json").read_bytes())
        row.update(data_digest=manifest["data_digest"], qparams_digest=manifest["qparams_digest"],
                   **_figures(spec, metrics), max_scale_drift=largest)
        reasons = gate(spec, metrics, previous_metrics)
        row.update(gate="failed" if reasons else "passed", reason="; ".join(reasons))
        staged.write_bytes("gate.json", _verdict(row))
        failpoint("staged")

    try:
        result = run(spec, workers=workers, out=reg.where("runs", run_id), address=address, console=console,
                     before_commit=judge, executor=executor)
    except Exception as e:  # the night is recorded whatever stopped the run
        if not _copy_verdict(reg, run_id):  # not published: no other refresh can have judged it
            row.update({k: None for k in _FIGURES}, gate="error",
                       reason=str(e) if isinstance(e, QuantrayError) else f"{type(e).__name__}: {e}")
            write_gate(reg, row)
        write_history_page(reg, rebuild_history(reg))
        raise
    failpoint("committed")
    write_gate(reg, row)  # the bytes of its gate.json, whichever refresh writes them first
    result.print(console)
    if row["gate"] == "passed":
        reg.write(json_bytes({"run_id": run_id, "qparams_digest": row["qparams_digest"],
                              "promoted_at": now().isoformat()}), "PROMOTED")
        reg.write(b"", "promotions", run_id)  # a kill before this line: the next refresh's tidy writes it
        row["promoted"] = True
    write_history_page(reg, rebuild_history(reg))
    verdict = "promoted" if row["promoted"] else f"not promoted: {row['reason']}"
    console.print(f"run {run_id}: gate {row['gate']}, {verdict}")
    return row


def _figures(spec: JobSpec, metrics: dict) -> dict:
    """A run's row in history.parquet: classification's own columns, and any task's headline."""
    h = headline(metrics)
    interval = metrics["int8"].get(f"{h['key']}_ci95") or [None, None]
    out = {"task": spec.test.task_name, "headline": h["key"], "fp32_headline": h["fp32"], "int8_headline": h["int8"],
           "int8_headline_low": interval[0], "int8_headline_high": interval[1]}
    if "output_agreement" in metrics:
        out["output_sqnr_db"] = metrics["output_agreement"]["sqnr_db"]
    else:
        out.update(fp32_top1=metrics["fp32"]["top1"], int8_top1=metrics["int8"]["top1"], fp32_top5=metrics["fp32"]["top5"],
                   int8_top5=metrics["int8"]["top5"], agreement=metrics["agreement"], output_sqnr_db=metrics["logit_sqnr_db"])
    return out


def gate(spec: JobSpec, metrics: dict, previous: dict | None) -> list[str]:
    """Why a run may not be promoted (none: it passes): its task's headline (top-1, RMSE, mIoU, F1,
    output SQNR) INT8 against FP32 and against the promoted run's INT8, by the job's [gate] limits
    (`GateSpec.limits`), in the headline's unit and direction."""
    h = headline(metrics)
    limits = check_gate(spec)
    fmt = _formatter(h)
    name = "top-1" if h["key"] == "top1" else h["label"]
    subject = name if name.startswith("INT8") else f"INT8 {name}"
    reasons = []
    drop = worsening(h, h["fp32"], h["int8"])
    if limits["drop"] is not None and drop is not None and drop > limits["drop"] + 1e-12:
        key = "max_top1_drop" if h["key"] == "top1" else "max_drop"
        verb = "trails" if h["higher_is_better"] else "exceeds"
        reasons.append(f"INT8 {name} {verb} FP32 by {fmt(drop)} > {key} {fmt(limits['drop'])}")
    if limits["min_sqnr_db"] is not None and h["int8"] is not None and h["int8"] < limits["min_sqnr_db"] - 1e-12:
        reasons.append(f"INT8 vs FP32 output SQNR {h['int8']:.2f} dB < min_sqnr_db {limits['min_sqnr_db']:.2f} dB")
    before = headline(previous) if previous is not None else None
    if before is not None and before["key"] == h["key"] and limits["regression"] is not None:
        regression = worsening(h, before["int8"], h["int8"])
        if regression is not None and regression > limits["regression"] + 1e-12:
            where = "below" if h["higher_is_better"] else "above"
            reasons.append(f"{subject} is {fmt(regression)} {where} the promoted model's "
                           f"> max_regression {fmt(limits['regression'])}")
    return reasons


def check_gate(spec: JobSpec) -> dict:
    """The [gate] limits the job's task needs (`GateSpec.limits`), checked before a refresh does any
    work and read by `gate`: a SpecError naming the job file."""
    try:
        return spec.gate.limits(spec.test.task_name, spec.test.headline_is_fraction)
    except SpecError as e:
        raise SpecError(f"{spec.path}: {e}") from None


def _formatter(h: dict):
    if h["unit"] == "fraction":
        return lambda v: f"{v * 100:.2f} pt"
    if h["unit"] == "dB":
        return lambda v: f"{v:.2f} dB"
    return lambda v: f"{v:.4g}"


def drift(old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
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


def write_history_page(reg: Store, rows: list[dict], most: int = 20) -> None:
    """history.html from the settled history rows, written whole (atomically, as every registry file).
    A refresh that settled the history before another one's row landed would leave a page without
    it: the page is rewritten until the rows it shows are the history's."""
    from ..report.history import render_history

    for _ in range(most):
        pointer = reg.read("PROMOTED")
        promoted = json.loads(pointer)["run_id"] if pointer else None
        reg.write(render_history(rows, promoted, str(reg.where())).encode(), "history.html")
        settled = rebuild_history(reg)
        if [r["run_id"] for r in settled] == [r["run_id"] for r in rows] and \
                [r["promoted"] for r in settled] == [r["promoted"] for r in rows]:
            return
        rows = settled


def rebuild_history(reg: Store, most: int = 50) -> list[dict]:
    """history.parquet from gates/ and promotions/: the rows it has, plus any gate it lacks, with
    `promoted` as promotions/ says. Written, then read back and checked until it holds every gate
    and promotion: a concurrent refresh that overwrote it with fewer rows is repaired here."""
    for _ in range(most):
        existing = reg.read("history.parquet")
        rows = {r["run_id"]: r for r in (pq.read_table(pa.BufferReader(existing)).to_pylist() if existing else [])}
        gates = [n.removesuffix(".json") for n in reg.names("gates") if n.endswith(".json") and not n.startswith(".")]
        promoted = {n for n in reg.names("promotions") if not n.startswith(".")}
        missing = [g for g in gates if g not in rows]
        flags = [r for r in rows.values() if r["promoted"] != (r["run_id"] in promoted)]
        if not missing and not flags:
            return sorted(rows.values(), key=lambda r: (r["time"], r["run_id"]))
        for run_id in missing:
            payload = reg.read("gates", f"{run_id}.json")
            if payload is not None:
                rows[run_id] = _from_gate(json.loads(payload))
        for r in rows.values():
            r["promoted"] = r["run_id"] in promoted
        ordered = sorted(rows.values(), key=lambda r: (r["time"], r["run_id"]))
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(ordered, schema=HISTORY_SCHEMA), sink)
        reg.write(sink.getvalue().to_pybytes(), "history.parquet")
    raise QuantrayError(f"{reg.where('history.parquet')}: could not settle after {most} rewrites; "
                        "too many refreshes are writing this registry at once")


def tidy(reg: Store, console: Console, now: Callable[[], datetime.datetime] = _utc_now) -> None:
    """What killed refreshes left behind: staging folders no live process holds, a committed run
    with no gate (recorded as an error), a promotion without its marker. Then the history."""
    for removed in sweep_staging(reg.local / "runs" if reg.local else tempfile.gettempdir()):
        console.print(f"removed {removed}, left by a refresh that was stopped")
    gated = {n.removesuffix(".json") for n in reg.names("gates")}
    for run_id in reg.names("runs"):
        if run_id.startswith(".") or run_id in gated:
            continue
        if reg.exists("runs", run_id, "manifest.json"):
            # its refresh gated it before publishing it (gate.json), and may be writing gates/ now
            if not _copy_verdict(reg, run_id):  # a run an older quantray published ungated
                write_gate(reg, {"run_id": run_id, "time": _time_of(run_id), **dict.fromkeys(_FIGURES), "gate": "error",
                                  "reason": "the refresh stopped after writing this run and before gating it"})
        elif reg.local is None and now() - _time_of(run_id) > STALE_UPLOAD:
            # On an object store a run is uploaded file by file, manifest.json last: one without it
            # is an upload a killed refresh left (no reader takes it), or one still going on; past
            # STALE_UPLOAD it cannot be the latter.
            reg.delete_dir("runs", run_id)
            console.print(f"removed {reg.where('runs', run_id)}, an upload a stopped refresh left unfinished")
    pointer = reg.read("PROMOTED")
    if pointer is not None:
        run_id = json.loads(pointer)["run_id"]
        if not reg.exists("promotions", run_id):
            reg.write(b"", "promotions", run_id)
    rebuild_history(reg)


def _time_of(run_id: str) -> datetime.datetime:
    try:
        return datetime.datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return _utc_now().replace(microsecond=0)


def write_gate(reg: Store, row: dict) -> None:
    reg.write(_verdict(row), "gates", f"{row['run_id']}.json")


def _verdict(row: dict) -> bytes:
    """A run's gate verdict as gates/RUN_ID.json and the run's gate.json hold it (the same bytes)."""
    return json_bytes({k: (v.isoformat() if isinstance(v, datetime.datetime) else v) for k, v in row.items()
                       if k != "promoted"})


def _copy_verdict(reg: Store, run_id: str) -> bool:
    """gates/RUN_ID.json from a published run's own gate.json; False where the run is not published
    or has none."""
    if not reg.exists("runs", run_id, "manifest.json"):
        return False
    payload = reg.read("runs", run_id, "gate.json")
    if payload is None:
        return False
    reg.write(payload, "gates", f"{run_id}.json")
    return True


def _from_gate(verdict: dict) -> dict:
    row = {name: verdict.get(name) for name in HISTORY_SCHEMA.names}
    row["time"] = datetime.datetime.fromisoformat(verdict["time"])
    row["promoted"] = False
    return row


def _print_drift(console: Console, rows: list[dict], against: str, most: int = 5) -> None:
    table = Table(title=f"range drift against the promoted run {against} (largest {most})")
    for column in ("observer", "min", "max", "scale"):
        table.add_column(column, justify="left" if column == "observer" else "right")
    for r in rows[:most]:
        table.add_row(r["name"], *(f"{r[k]:.2%}" if r[k] is not None else "-" for k in ("min_change", "max_change", "scale_change")))
    console.print(table)
