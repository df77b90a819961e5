"""report.html: one self-contained page (inline CSS and SVG; no script, no network) that shows a
run's comparison: the summary table, per-layer SQNR, per-class accuracy change, latency FP32 vs
INT8 and the INT8 confusion matrix.

    page = render(metrics, layer_rows, manifest)

Plots are drawn here as SVG from the same data as metrics.json and layers.parquet, so the page
needs nothing to open but a browser, and its Content-Security-Policy forbids any fetch.
"""

from __future__ import annotations

import html
import math

from .console import throughput_row
from .figures import agreement_rows, figure_rows

__all__ = ["render", "render_tune", "COLORS"]

COLORS = {"fp32": "#1b6ca8", "int8": "#d95f02", "script": "#7a3e9d", "bad": "#c0392b", "good": "#2e8b57",
          "grid": "#dddddd", "ink": "#222222"}
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .2em .8em; border-bottom: 1px solid #eee; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; } .muted { color: #666; font-size: .9em; }
svg { display: block; margin: .5em 0; } svg text { font: 11px system-ui, sans-serif; fill: #222; }
"""


def render(metrics: dict, layers: list[dict], manifest: dict) -> str:
    """The whole page as a string."""
    job = manifest.get("job", {}).get("name", "run")
    parts = [f"<h1>{_e(job)}: FP32 vs INT8</h1>",
             f"<p class=muted>{_e(manifest.get('created', ''))} · quantray {_e(manifest.get('quantray', ''))} · "
             f"backend {_e(manifest.get('backend', ''))} · {metrics['samples']} test samples · "
             f"qparams digest {_e(manifest.get('qparams_digest', '')[:16])}</p>",
             _summary(metrics), _engine_line(metrics.get("engine_check")),
             "<h2>Per-layer SQNR (INT8 output vs FP32, higher is better)</h2>", _layers_plot(layers),
             _worst_layers(layers),
             *(_per_class(metrics) if "task" in metrics else
               ["<h2>Per-class top-1 change (INT8 minus FP32)</h2>", _class_plot(metrics.get("per_class", []))]),
             "<h2>Latency at batch 1</h2>", _latency_plot(metrics.get("speed")),
             *(["<h2>INT8 confusion matrix (rows: true class, columns: predicted)</h2>",
                _confusion_plot(metrics.get("confusion_int8"))] if "task" not in metrics else []),
             "<h2>Conditions</h2>", _conditions(metrics, manifest)]
    return _page(f"{job}: quantray report", parts)


def _per_class(metrics: dict) -> list[str]:
    """Segmentation's IoU per class, multilabel's F1 per label: FP32, INT8 and the change."""
    for key, title in (("per_class_iou", "IoU per class"), ("per_label_f1", "F1 per label")):
        fp32, int8 = metrics["fp32"].get(key), metrics["int8"].get(key)
        if fp32 is not None and int8 is not None:
            rows = [[k, *(_pct(v) if v is not None else "-" for v in (a, b)),
                     f"{(b - a) * 100:+.2f} pt" if a is not None and b is not None else ""]
                    for k, (a, b) in enumerate(zip(fp32, int8))]
            return [f"<h2>{title}</h2>", _table(["class" if "class" in key else "label", "FP32", "INT8", "change"], rows)]
    return []


def _page(title: str, parts: list[str]) -> str:
    """A self-contained page: inline CSS, and a Content-Security-Policy that forbids any fetch."""
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta http-equiv=Content-Security-Policy content=\"{_CSP}\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    head = "".join(f"<th{' class=n' if i >= numeric_from else ''}>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{' class=n' if i >= numeric_from else ''}>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pct(x) -> str:
    return f"{x:.2%}"


def _summary(metrics: dict) -> str:
    fp32, int8 = metrics["fp32"], metrics["int8"]
    task = metrics.get("task")
    rows = figure_rows(metrics) if task is not None else []
    for key, label in (("top1", "top-1 accuracy"), ("top5", "top-5 accuracy")) if task is None else ():
        ci = [f" ({m[key + '_ci95'][0]:.1%}-{m[key + '_ci95'][1]:.1%})" if key + "_ci95" in m else "" for m in (fp32, int8)]
        rows.append([label, _pct(fp32[key]) + ci[0], _pct(int8[key]) + ci[1], f"{(int8[key] - fp32[key]) * 100:+.2f} pt"])
    rows.append(["latency, batch 1 (mean)", f"{fp32['latency_ms']:.3f} ms", f"{int8['latency_ms']:.3f} ms",
                 _ratio(fp32["latency_ms"], int8["latency_ms"], "faster", "slower")])
    if "uncompiled_latency_ms" in int8:  # PT2E: the INT8 column is the compiled program
        rows.append(["latency, INT8 program uncompiled", "", f"{int8['uncompiled_latency_ms']:.3f} ms",
                     _ratio(fp32["latency_ms"], int8["uncompiled_latency_ms"], "faster", "slower")])
        compile_s = int8.get("compile_s") or {}
        rows.append(["compile time (not in latency)", "", ", ".join(f"{v:.1f} s at batch {n}" for n, v in compile_s.items()), ""])
    if "torchscript_latency_ms" in int8:
        rows.append(["latency, INT8 TorchScript", "", f"{int8['torchscript_latency_ms']:.3f} ms",
                     _ratio(fp32["latency_ms"], int8["torchscript_latency_ms"], "faster", "slower")])
    speed = metrics.get("speed")
    if speed:
        row = throughput_row(speed)
        if row:
            label, fp32_rate, int8_rate = row
            rows.append([label, f"{fp32_rate:.0f}/s", f"{int8_rate:.0f}/s", _ratio(1 / fp32_rate, 1 / int8_rate, "faster", "slower")])
    what = "state_dict; INT8: exported program" if "uncompiled_latency_ms" in int8 else "state_dict"
    rows.append([f"size ({what})", f"{fp32['size_mb']:.3f} MB", f"{int8['size_mb']:.3f} MB",
                 _ratio(fp32["size_mb"], int8["size_mb"], "smaller", "larger")])
    if "torchscript_size_mb" in int8:
        rows.append(["size, INT8 TorchScript file", "", f"{int8['torchscript_size_mb']:.3f} MB",
                     _ratio(fp32["size_mb"], int8["torchscript_size_mb"], "smaller", "larger")])
    if task is not None:
        return "<h2>Summary</h2>" + _table(["metric", "FP32 (95% CI)", "INT8 (95% CI)", "INT8 vs FP32"],
                                           rows + agreement_rows(metrics))
    rows.append(["top-1 agreement", "", _pct(metrics["agreement"]), ""])
    if metrics.get("logit_sqnr_db") is not None:
        rows.append(["logit SQNR", "", f"{metrics['logit_sqnr_db']:.1f} dB", ""])
    return "<h2>Summary</h2>" + _table(["metric", "FP32 (95% CI)", "INT8 (95% CI)", "INT8 vs FP32"], rows)


def _ratio(fp32: float, int8: float, better: str, worse: str) -> str:
    return f"{fp32 / int8:.2f}x {better}" if int8 <= fp32 else f"{int8 / fp32:.2f}x {worse}"


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (f"<svg class=plot role=img aria-label=\"{_e(label)}\" width={width} height={height} "
            f"viewBox=\"0 0 {width} {height}\">" + "".join(body) + "</svg>")


def _rect(x, y, w, h, color, title: str) -> str:
    return (f"<rect x=\"{x:.1f}\" y=\"{y:.1f}\" width=\"{max(w, 0):.1f}\" height=\"{max(h, 0):.1f}\" "
            f"fill=\"{color}\"><title>{_e(title)}</title></rect>")


def _text(x, y, text, anchor="start", extra="") -> str:
    return f"<text x=\"{x:.1f}\" y=\"{y:.1f}\" text-anchor=\"{anchor}\"{extra}>{_e(text)}</text>"


def _layers_plot(layers: list[dict]) -> str:
    rows = [r for r in layers if r["sqnr_db"] is not None]
    if not rows:
        return "<p class=muted>No per-layer diagnostics in this run ([run] layer_samples = 0).</p>"
    top = max(r["sqnr_db"] for r in rows)
    low = min(0.0, min(r["sqnr_db"] for r in rows))
    quantized = [r for r in rows if r["quantized"]]
    worst = {r["layer"] for r in sorted(quantized, key=lambda r: r["sqnr_db"])[:min(5, max(1, len(quantized) // 5))]}
    bars = []
    for r in rows:
        name = (r["module"] or r["layer"]) + ("" if r["quantized"] else " (fp32)")
        fault = bool(r.get("engine_fault"))  # the engine check's mark: this layer's kernel is wrong here
        color = COLORS["bad"] if r["layer"] in worst else COLORS["int8"] if r["quantized"] else COLORS["grid"]
        title = f"{name} ({r['int8_type']}): {r['sqnr_db']:.2f} dB"
        if r.get("engine_sqnr_db") is not None:
            title += f"; engine vs reference {r['engine_sqnr_db']:.1f} dB"
        bars.append((("\u26a0 engine fault: " if fault else "") + name, r["sqnr_db"], color,
                     title + ("; ENGINE FAULT: the kernel disagrees with the reference" if fault else ""),
                     f"{r['sqnr_db']:.1f}"))
    return _hbars(bars, low, top, 560, "per-layer SQNR in dB")


def _hbars(bars: list[tuple], low: float, top: float, width: int, label: str) -> str:
    """Horizontal bars from 0, one row each: (name, value in dB, color, tooltip, value text)."""
    bar, left = 14, 190
    scale = width / (top - low) if top > low else 1.0
    body = []
    for k, (name, value, color, title, text) in enumerate(bars):
        y = 10 + k * bar
        body.append(_text(left - 6, y + bar - 4, name, "end"))
        body.append(_rect(left + (min(0.0, value) - low) * scale, y + 1, abs(value) * scale, bar - 2, color, title))
        body.append(_text(left + (value - low) * scale + 4, y + bar - 4, text))
    axis_y = 10 + len(bars) * bar + 14
    body += _axis(left, axis_y, width, low, top, "dB")
    return _svg(left + width + 60, axis_y + 10, body, label)


def _axis(left, y, width, low, high, unit) -> list[str]:
    """Five ticks along a horizontal axis from `low` to `high`."""
    out = [f"<line x1=\"{left}\" y1=\"{y - 12}\" x2=\"{left + width}\" y2=\"{y - 12}\" stroke=\"{COLORS['grid']}\"/>"]
    for i in range(5):
        value = low + (high - low) * i / 4
        x = left + width * i / 4
        out.append(_text(x, y, f"{value:.3g} {unit}" if i == 4 else f"{value:.3g}", "middle"))
    return out


def _engine_line(check: dict | None) -> str:
    """One line: do the INT8 kernels compute what the quantization says (`core.engine`)?"""
    if check is None:
        return ""
    if check["ok"] is None:
        return f"<p class=muted>Engine check: not made ({_e(check.get('message') or '')}).</p>"
    if check["ok"]:
        return (f"<p class=muted>Engine check: the {_e(check['engine'])} kernels agree with the reference quantization "
                f"on {check['layers_checked']} layers ({check['samples']} samples): every output within "
                f"{check['threshold']['steps'] - 1} quantization step of it.</p>")
    return f"<p style=\"color:{COLORS['bad']};font-weight:bold\">Engine check failed: {_e(check['message'])}</p>"


def _worst_layers(layers: list[dict], most: int = 5) -> str:
    rows = sorted((r for r in layers if r["sqnr_db"] is not None and r["quantized"]), key=lambda r: r["sqnr_db"])[:most]
    if not rows:
        return ""
    return _table(["worst layers", "INT8 kind", "SQNR", "samples"],
                  [[r["module"] or r["layer"], r["int8_type"], f"{r['sqnr_db']:.2f} dB", r["samples"]] for r in rows], 2)


def _class_plot(per_class: list[dict]) -> str:
    if not per_class:
        return "<p class=muted>No per-class figures.</p>"
    changes = [c["change"] * 100 for c in per_class]
    span = max(1.0, max(abs(v) for v in changes))
    height, left = 220, 70
    step = max(4.0, min(24.0, 900 / len(per_class)))
    mid = height / 2
    body = [f"<line x1=\"{left}\" y1=\"{mid}\" x2=\"{left + step * len(per_class)}\" y2=\"{mid}\" stroke=\"{COLORS['ink']}\"/>",
            _text(left - 6, 14, f"+{span:.3g} pt", "end"), _text(left - 6, height - 4, f"-{span:.3g} pt", "end")]
    for k, (c, v) in enumerate(zip(per_class, changes)):
        h = abs(v) / span * (mid - 12)
        y = mid - h if v > 0 else mid
        color = COLORS["good"] if v > 0 else COLORS["bad"]
        title = (f"class {c['label']}: FP32 {c['fp32_top1']:.1%}, INT8 {c['int8_top1']:.1%} "
                 f"({v:+.1f} pt, {c['n']} samples)")
        body.append(_rect(left + k * step + 1, y, step - 2, h if v else 1, color if v else COLORS["grid"], title))
        if len(per_class) <= 40:
            body.append(_text(left + k * step + step / 2, height + 12, str(c["label"]), "middle"))
    return _svg(int(left + step * len(per_class) + 10), height + 20, body, "per-class top-1 change in points")


def _latency_plot(speed: dict | None) -> str:
    if not speed:
        return "<p class=muted>No speed figures.</p>"
    eager = "INT8 uncompiled" if "int8_compiled" in speed else "INT8 eager"
    models = [("fp32", "FP32 eager", COLORS["fp32"]), ("int8", eager, COLORS["int8"]),
              ("int8_torchscript", "INT8 TorchScript", COLORS["script"]),
              ("int8_compiled", "INT8 compiled", COLORS["script"])]
    models = [m for m in models if m[0] in speed]
    stats = [("mean_ms", "mean"), ("p50_ms", "p50"), ("p90_ms", "p90")]
    top = max(speed[m][s] for m, _, _ in models for s, _ in stats)
    left, width, bar = 150, 560, 12
    body, y = [], 8
    for key, label, color in models:
        body.append(_text(left - 6, y + 2 * bar, label, "end"))
        for s, s_label in stats:
            value = speed[key][s]
            body.append(_rect(left, y, value / top * width, bar - 2, color, f"{label} {s_label}: {value:.3f} ms"))
            body.append(_text(left + value / top * width + 4, y + bar - 2, f"{s_label} {value:.3g} ms"))
            y += bar
        y += 10
    body += _axis(left, y + 14, width, 0.0, top, "ms")
    return _svg(left + width + 110, y + 24, body, "latency at batch 1 in milliseconds")


def _confusion_plot(confusion: dict | None) -> str:
    if not confusion:
        return "<p class=muted>No confusion matrix.</p>"
    labels, matrix = confusion["labels"], confusion["rows_true_cols_predicted"]
    n = len(labels)
    cell = max(3.0, min(28.0, 600 / n))
    left = top_margin = 40
    peak = max(max(row) for row in matrix) or 1
    size = cell * n
    body = [f"<rect x=\"{left}\" y=\"{top_margin}\" width=\"{size:.1f}\" height=\"{size:.1f}\" fill=\"#fafafa\" "
            f"stroke=\"{COLORS['grid']}\"/>"]
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                shade = 0.15 + 0.85 * math.sqrt(count / peak)
                color = COLORS["fp32"] if i == j else COLORS["bad"]
                body.append(f"<rect x=\"{left + j * cell:.1f}\" y=\"{top_margin + i * cell:.1f}\" width=\"{cell:.1f}\" "
                            f"height=\"{cell:.1f}\" fill=\"{color}\" fill-opacity=\"{shade:.3f}\"><title>"
                            f"true {_e(labels[i])}, predicted {_e(labels[j])}: {count}</title></rect>")
    if n <= 30:
        for k, label in enumerate(labels):
            body.append(_text(left - 4, top_margin + k * cell + cell / 2 + 4, label, "end"))
            body.append(_text(left + k * cell + cell / 2, top_margin - 6, label, "middle"))
    body.append(_text(left, top_margin + size + 16, "predicted →  (diagonal: correct; hover a cell for its count)"))
    return _svg(int(max(left + size + 20, 420)), int(top_margin + size + 24), body, "INT8 confusion matrix")


def _conditions(metrics: dict, manifest: dict) -> str:
    rows = []
    speed = metrics.get("speed") or {}
    for key, value in sorted(speed.get("conditions", {}).items()):
        rows.append([f"speed: {key}", value])
    layers = metrics.get("layers")
    if layers:
        rows.append(["per-layer SQNR: test samples", layers["samples"]])
    for key, value in (manifest.get("timings_s") or {}).items():
        rows.append([f"stage {key}", f"{value:.2f} s"])
    for key, value in sorted((manifest.get("versions") or {}).items()):
        rows.append([key, value])
    return _table(["", "value"], rows, numeric_from=2)


def render_tune(summary: dict, trials: list[dict], best_metrics: dict) -> str:
    """The tune directory's report.html: outcome, top-1 against FP32 layers, layer sensitivity, trials."""
    full = trials
    best = next(t for t in trials if t["trial"] == summary["best_trial"])
    head = summary.get("headline") or {"key": "top1", "label": "top-1", "unit": "fraction", "higher_is_better": True}
    fraction = head["unit"] == "fraction"
    value = _pct if fraction else (lambda v: "-" if v is None else f"{v:.4g}")
    test = best_metrics.get("headline") or {"fp32": best_metrics["fp32"]["top1"], "int8": best_metrics["int8"]["top1"]}
    outcome = (f"<p><b>{'Budget met' if summary['met'] else 'Budget not met'}</b>: {_e(summary['stopped'])}. "
               f"{summary['trials']} trials (limit {summary['trial_limit']}), chosen on {_e(summary['selection'])}; "
               + (f"max drop {summary['max_drop'] * 100:g} pt.</p>" if fraction else
                  f"max drop of {_e(head['label'])} {summary['max_drop']:g}"
                  f" ({'lower' if head['higher_is_better'] else 'higher'} is worse).</p>") +
               f"<p>Best: trial {best['trial']}, range {_e(best['range_method'])}, weights {_e(best['weight'])}, "
               f"cures {_e(_cures(best))}, "
               f"{len(best['fp32_modules'])} FP32 layer(s) ({_e(', '.join(best['fp32_modules']) or 'none')}). "
               f"On the job's [test]: {'' if head['key'] == 'top1' else _e(head['label']) + ' '}FP32 {value(test['fp32'])}, "
               f"tuned INT8 {value(test['int8'])} (best-run/report.html).</p>")
    if head["key"] != "top1":
        table = _table(["trial", "phase", "range", "weights", "cures", "FP32 layers", "samples", head["label"], "drop",
                        "output SQNR (dB)", "INT8 KB", "FP32 modules"],
                       [[t["trial"], t["phase"], t["range_method"], t["weight"], _cures(t), len(t["fp32_modules"]),
                         t["samples"], value(t["int8_headline"]),
                         f"{t['drop'] * 100:+.2f} pt" if fraction else f"{t['drop']:+.4g}",
                         "-" if t["logit_sqnr_db"] is None else f"{t['logit_sqnr_db']:.2f}",
                         f"{t['int8_size_bytes'] / 1e3:.1f}", ", ".join(t["fp32_modules"])] for t in trials], numeric_from=5)
        return _page("quantray tune", [
            f"<h1>quantray tune</h1><p class=muted>{_e(summary['job'])}</p>", outcome,
            f"<h2>{_e(head['label'])} against the number of FP32 layers</h2>",
            _fp32_layers_plot(full, summary["max_drop"], head),
            "<h2>Layer sensitivity (each layer's INT8 error alone, lower is worse)</h2>",
            _sensitivity_plot(summary["sensitivity"]), "<h2>Trials</h2>", table])
    table = _table(["trial", "phase", "range", "weights", "cures", "FP32 layers", "samples", "top-1", "95% interval",
                    "drop (pt)", "agreement", "INT8 KB", "FP32 modules"],
                   [[t["trial"], t["phase"], t["range_method"], t["weight"], _cures(t), len(t["fp32_modules"]), t["samples"],
                     _pct(t["top1"]), f"{_pct(t['top1_ci95_low'])}-{_pct(t['top1_ci95_high'])}", f"{t['drop'] * 100:+.2f}",
                     f"{t['agreement']:.4f}", f"{t['int8_size_bytes'] / 1e3:.1f}", ", ".join(t["fp32_modules"])]
                    for t in trials], numeric_from=5)
    return _page("quantray tune", [
        f"<h1>quantray tune</h1><p class=muted>{_e(summary['job'])}</p>", outcome,
        "<h2>Top-1 against the number of FP32 layers</h2>", _fp32_layers_plot(full, summary["max_drop"]),
        "<h2>Layer sensitivity (each layer's INT8 error alone, lower is worse)</h2>",
        _sensitivity_plot(summary["sensitivity"]), "<h2>Trials</h2>", table])


def _cures(trial: dict) -> str:
    return "+".join(n for n, on in (("equalize", trial.get("equalize")), ("bias", trial.get("bias_correction"))) if on) or "-"


def _fp32_layers_plot(trials: list[dict], max_drop: float, head: dict | None = None) -> str:
    """One dot per trial on the whole selection set; the dashed line is FP32's headline (top-1 unless
    `head` says otherwise) worsened by the budget."""
    if not trials:
        return "<p class=muted>No trial was evaluated.</p>"
    head = head or {"key": "top1", "label": "top-1", "unit": "fraction", "higher_is_better": True}
    key, fp32_key = ("top1", "fp32_top1") if head["key"] == "top1" else ("int8_headline", "fp32_headline")
    show = _pct if head["unit"] == "fraction" else (lambda v: f"{v:.4g}")
    left, width, height, top_pad = 60, 560, 220, 10
    most = max(1, max(len(t["fp32_modules"]) for t in trials))
    fp32 = trials[0][fp32_key]
    budget = fp32 - max_drop if head["higher_is_better"] else fp32 + max_drop
    values = [t[key] for t in trials] + [fp32, budget]
    low, high = min(values), max(values)
    span = (high - low) or 1e-3
    low, high = low - 0.1 * span, high + 0.1 * span

    def y(v):
        return top_pad + (high - v) / (high - low) * height

    body = []
    for v, label, dash in ((fp32, "FP32", ""), (budget, "budget", " stroke-dasharray=\"4 3\"")):
        body.append(f"<line x1=\"{left}\" y1=\"{y(v):.1f}\" x2=\"{left + width}\" y2=\"{y(v):.1f}\" "
                    f"stroke=\"{COLORS['fp32']}\"{dash}/>")
        body.append(_text(left + width + 4, y(v) + 4, f"{label} {show(v)}"))
    for t in trials:
        x = left + len(t["fp32_modules"]) / most * width
        color = COLORS["good"] if t["drop"] <= max_drop else COLORS["int8"]
        body.append(f"<circle cx=\"{x:.1f}\" cy=\"{y(t[key]):.1f}\" r=\"4\" fill=\"{color}\"><title>"
                    f"trial {t['trial']}: {_e(t['range_method'])}, "
                    f"{_e(t['weight'])}, {len(t['fp32_modules'])} FP32 layers, {_e(head['label'])} {show(t[key])}</title></circle>")
    for i in range(5):
        v = low + (high - low) * i / 4
        body.append(_text(left - 6, y(v) + 4, show(v), "end"))
    axis_y = top_pad + height + 16
    body += [_text(left + width * i / 4, axis_y, f"{most * i / 4:.3g}", "middle") for i in range(5)]
    body.append(_text(left + width / 2, axis_y + 16, "layers kept in FP32", "middle"))
    return _svg(left + width + 110, axis_y + 24, body, f"{head['label']} against the number of FP32 layers")


def _sensitivity_plot(sensitivity: list[dict]) -> str:
    if not sensitivity:
        return "<p class=muted>Layers were not ranked: a range method or a cure met the budget, or trials ran out.</p>"
    exact = [r["module"] for r in sensitivity if r["isolated_sqnr_db"] is None]
    note = (f"<p class=muted>Exact in INT8 (no error alone): {_e(', '.join(exact))}.</p>" if exact else "")
    rows = [r for r in sensitivity if r["isolated_sqnr_db"] is not None]
    if not rows:
        return note
    values = [r["isolated_sqnr_db"] for r in rows]
    bars = [(r["module"], r["isolated_sqnr_db"], COLORS["int8"],
             f"{r['module']} ({r['kind']}) alone in INT8: SQNR {r['isolated_sqnr_db']:.2f} dB",
             f"{r['isolated_sqnr_db']:.1f}") for r in rows]
    return note + _hbars(bars, min(0.0, min(values)), max(values), 500,
                         "each layer's INT8 output on FP32 inputs against FP32, SQNR in dB")
