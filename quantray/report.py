"""What people read: rich progress bars (stderr) and the FP32 vs INT8 comparison table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["make_progress", "comparison_table", "print_summary"]


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def comparison_table(metrics: dict) -> Table:
    fp32, int8 = metrics["fp32"], metrics["int8"]
    table = Table(title=f"FP32 vs INT8 ({metrics['samples']} test samples)")
    table.add_column("metric")
    table.add_column("FP32", justify="right")
    table.add_column("INT8", justify="right")
    table.add_column("INT8 vs FP32", justify="right")
    for key, label in (("top1", "top-1 accuracy"), ("top5", "top-5 accuracy")):
        table.add_row(label, f"{fp32[key]:.2%}", f"{int8[key]:.2%}", f"{(int8[key] - fp32[key]) * 100:+.2f} pt")
    table.add_row("latency, batch 1", f"{fp32['latency_ms']:.3f} ms", f"{int8['latency_ms']:.3f} ms",
                  _ratio(fp32["latency_ms"], int8["latency_ms"], "faster", "slower"))
    table.add_row("size", f"{fp32['size_mb']:.3f} MB", f"{int8['size_mb']:.3f} MB",
                  _ratio(fp32["size_mb"], int8["size_mb"], "smaller", "larger"))
    table.add_row("top-1 agreement", "", f"{metrics['agreement']:.2%}", "")
    return table


def print_summary(console: Console, metrics: dict, manifest: dict, run_dir) -> None:
    console.print(comparison_table(metrics))
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings_s"].items())
    console.print(f"{manifest['workers']} calibration workers, {manifest['threads']} thread(s) each; "
                  f"wall {manifest['wall_s']:.1f}s ({timings})")
    console.print(f"qparams digest {manifest['qparams_digest'][:16]}  run directory {run_dir}")


def _ratio(fp32: float, int8: float, better: str, worse: str) -> str:
    return f"{fp32 / int8:.2f}x {better}" if int8 <= fp32 else f"{int8 / fp32:.2f}x {worse}"
