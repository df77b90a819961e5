"""What people read: rich progress bars (stderr) and the FP32 vs INT8 comparison table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .figures import agreement_rows, figure_rows

__all__ = ["make_progress", "comparison_table", "throughput_row", "class_table", "layer_table", "print_summary"]


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def comparison_table(metrics: dict) -> Table:
    fp32, int8 = metrics["fp32"], metrics["int8"]
    table = Table(title=f"FP32 vs INT8 ({metrics['samples']} test samples)")
    table.add_column("metric", no_wrap=True)
    table.add_column("FP32", justify="right")
    table.add_column("INT8", justify="right")
    table.add_column("INT8 vs FP32", justify="right")
    task = metrics.get("task")
    if task is not None:
        table.title = f"FP32 vs INT8, task {task} ({metrics['samples']} test samples)"
        for row in figure_rows(metrics):
            table.add_row(*row)
    else:
        for key, label in (("top1", "top-1 accuracy"), ("top5", "top-5 accuracy")):
            table.add_row(label, f"{fp32[key]:.2%}", f"{int8[key]:.2%}", f"{(int8[key] - fp32[key]) * 100:+.2f} pt")
    table.add_row("latency, batch 1", f"{fp32['latency_ms']:.3f} ms", f"{int8['latency_ms']:.3f} ms",
                  _ratio(fp32["latency_ms"], int8["latency_ms"], "faster", "slower"))
    table.add_row("size", f"{fp32['size_mb']:.3f} MB", f"{int8['size_mb']:.3f} MB",
                  _ratio(fp32["size_mb"], int8["size_mb"], "smaller", "larger"))
    speed = metrics.get("speed")
    if speed:
        if "int8_compiled" in speed:  # PT2E: the INT8 column is the compiled program
            compile_s = speed["conditions"].get("compile_s") or {}
            table.add_row("latency p50/p90", *(f"{speed[m]['p50_ms']:.2f}/{speed[m]['p90_ms']:.2f} ms"
                                               for m in ("fp32", "int8_compiled")),
                          f"uncompiled {speed['int8']['p50_ms']:.2f} ms")
            table.add_row("compile (not in latency)", "", ", ".join(f"{s:.1f} s at batch {n}" for n, s in compile_s.items()), "")
        else:
            table.add_row("latency p50/p90", *(f"{speed[m]['p50_ms']:.2f}/{speed[m]['p90_ms']:.2f} ms" for m in ("fp32", "int8")),
                          f"script {speed['int8_torchscript']['p50_ms']:.2f} ms")
        row = throughput_row(speed)
        if row:
            label, fp32_rate, int8_rate = row
            table.add_row(label, f"{fp32_rate:.0f}/s", f"{int8_rate:.0f}/s", _ratio(1 / fp32_rate, 1 / int8_rate, "faster", "slower"))
    if task is not None:
        for row in agreement_rows(metrics):
            table.add_row(*row)
        return table
    if "top1_ci95" in fp32:
        table.add_row("top-1 95% CI", _interval(fp32["top1_ci95"]), _interval(int8["top1_ci95"]), "")
    table.add_row("top-1 agreement", "", f"{metrics['agreement']:.2%}", "")
    if metrics.get("logit_sqnr_db") is not None:
        table.add_row("logit SQNR", "", f"{metrics['logit_sqnr_db']:.1f} dB", "")
    return table


def throughput_row(speed: dict) -> tuple[str, float, float] | None:
    """(label, FP32 rate, INT8 rate): INT8 eager where it was measured, else the TorchScript model
    (the evaluation's timings); None where no throughput was measured."""
    deployed = "int8_compiled" if "int8_compiled" in speed else "int8_torchscript"
    int8 = "int8" if "throughput_per_s" in speed.get("int8", {}) and deployed == "int8_torchscript" else deployed
    if "throughput_per_s" not in speed.get("fp32", {}) or "throughput_per_s" not in speed.get(int8, {}):
        return None
    source = "" if int8 == "int8" else (", INT8 TorchScript, in evaluation" if deployed == "int8_torchscript"
                                        else ", INT8 compiled")
    return (f"throughput, batch {speed['conditions']['throughput_batch_size']}{source}",
            speed["fp32"]["throughput_per_s"], speed[int8]["throughput_per_s"])


def class_table(metrics: dict, most: int = 5) -> Table | None:
    """The classes whose top-1 accuracy INT8 lowered most, if any."""
    lost = sorted((c for c in metrics.get("per_class", []) if c["change"] < 0), key=lambda c: c["change"])[:most]
    if not lost:
        return None
    table = Table(title=f"classes INT8 lost most on (of {len(metrics['per_class'])})")
    for column in ("class", "samples", "FP32 top-1", "INT8 top-1", "change"):
        table.add_column(column, justify="right")
    for c in lost:
        table.add_row(str(c["label"]), str(c["n"]), f"{c['fp32_top1']:.2%}", f"{c['int8_top1']:.2%}",
                      f"{c['change'] * 100:+.1f} pt")
    return table


def layer_table(metrics: dict) -> Table | None:
    """The quantized layers whose INT8 output is furthest from FP32 (lowest SQNR), if measured."""
    layers = metrics.get("layers")
    if not layers or not layers["worst"]:
        return None
    table = Table(title=f"worst of {layers['count']} layers ({layers['samples']} samples)")
    for column in ("layer", "INT8 kind", "SQNR"):
        table.add_column(column, justify="right" if column == "SQNR" else "left")
    for r in layers["worst"]:
        table.add_row(r["module"] or r["layer"], r["int8_type"], f"{r['sqnr_db']:.1f} dB")
    return table


def _interval(bounds) -> str:
    return f"{bounds[0]:.1%}-{bounds[1]:.1%}"


def print_summary(console: Console, metrics: dict, manifest: dict, run_dir) -> None:
    """The comparison table, the classes that lost most, and where the time went."""
    console.print(comparison_table(metrics))
    for extra in (class_table(metrics), layer_table(metrics)):
        if extra is not None:
            console.print(extra)
    check = metrics.get("engine_check")
    if check is not None and check["ok"] is False:  # after the tables too: it changes how to read them
        console.print(f"[bold red]engine check failed: {check['message']}[/]")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings_s"].items())
    if "evaluates" in manifest:
        who = f"evaluation of {manifest['evaluates']['run_dir']} in {manifest['workers']} tasks"
    else:
        who = f"{manifest['workers']} calibration workers"
    console.print(f"{who}, {manifest['threads']} thread(s) each; wall {manifest['wall_s']:.1f}s ({timings})")
    console.print(f"qparams digest {manifest['qparams_digest'][:16]}  run directory {run_dir}")


def _ratio(fp32: float, int8: float, better: str, worse: str) -> str:
    return f"{fp32 / int8:.2f}x {better}" if int8 <= fp32 else f"{int8 / fp32:.2f}x {worse}"
