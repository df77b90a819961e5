"""The figures of a task other than classification (metrics.json's "task" runs) as table rows of
text, shared by the console table and report.html: [label, FP32, INT8, INT8 vs FP32]."""

from __future__ import annotations

__all__ = ["figure_rows", "agreement_rows", "fmt"]

# figure key -> (label, shown as a fraction in %)
_KNOWN = {"rmse": ("RMSE", False), "mae": ("MAE", False), "r2": ("R²", False), "miou": ("mIoU", True),
          "pixel_accuracy": ("pixel accuracy", True), "micro_f1": ("micro F1", True), "macro_f1": ("macro F1", True),
          "precision": ("precision", True), "recall": ("recall", True)}
_SPEED = {"latency_ms", "size_mb", "torchscript_latency_ms", "torchscript_size_mb", "compiled_latency_ms",
          "uncompiled_latency_ms", "compile_s", "evaluation_compile_s", "values", "pixels", "labels"}


def fmt(value, fraction: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if fraction else f"{value:.4g}"


def figure_rows(metrics: dict) -> list[list[str]]:
    """The headline first, then the task's other numeric figures (with their 95% intervals)."""
    fp32, int8, head = metrics["fp32"], metrics["int8"], metrics["headline"]
    keys = [k for k in int8 if k not in _SPEED and not k.endswith("_ci95")
            and isinstance(int8[k], (int, float)) and not isinstance(int8[k], bool)]
    keys.sort(key=lambda k: k != head["key"])
    rows = []
    for key in keys:
        label, fraction = _KNOWN.get(key, (key, head["unit"] == "fraction" and key == head["key"]))
        a, b = fp32.get(key), int8.get(key)
        change = "" if a is None or b is None else (f"{(b - a) * 100:+.2f} pt" if fraction else f"{b - a:+.4g}")
        rows.append([label + (" (headline)" if key == head["key"] else ""), fmt(a, fraction), fmt(b, fraction), change])
        if f"{key}_ci95" in int8:
            rows.append([f"{label} 95% CI", *(_interval(m.get(f"{key}_ci95"), fraction) for m in (fp32, int8)), ""])
    return rows


def agreement_rows(metrics: dict) -> list[list[str]]:
    """INT8 against FP32, label-free: output SQNR (all outputs, then each), cosine, argmax agreement."""
    a = metrics["output_agreement"]
    rows = [["output SQNR (INT8 vs FP32)", "", "identical" if a["sqnr_db"] is None else f"{a['sqnr_db']:.2f} dB", ""]]
    if len(a["outputs_sqnr_db"]) > 1:
        rows += [[f"  output {name!r} SQNR", "", "identical" if v is None else f"{v:.2f} dB", ""]
                 for name, v in a["outputs_sqnr_db"].items()]
    rows.append(["cosine similarity (mean per sample)", "", f"{a['cosine']:.6f}", ""])
    if a["argmax_agreement"] is not None:
        rows.append(["argmax agreement", "", f"{a['argmax_agreement']:.2%}", ""])
    return rows


def _interval(bounds, fraction: bool) -> str:
    return "-" if not bounds else f"{fmt(bounds[0], fraction)}-{fmt(bounds[1], fraction)}"
