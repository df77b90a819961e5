"""The registry's history.html: every refresh night on one self-contained page (inline SVG, no
fetch), from history.parquet's rows: the headline per night with its interval, gate verdicts and
their reasons, promotions, range drift against the promoted run, and a link to each run's report.

    page = render_history(rows, promoted="RUN_ID", registry="s3://bucket/models/flowers")
"""

from __future__ import annotations

from .html import COLORS, _e, _page, _svg, _text

__all__ = ["render_history"]

_VERDICT = {"passed": COLORS["good"], "failed": COLORS["bad"], "error": "#888888"}


def render_history(rows: list[dict], promoted: str | None, registry: str) -> str:
    """The page, rows in time order (as history.parquet holds them)."""
    scored = [r for r in rows if r.get("int8_headline") is not None]
    last = scored[-1] if scored else None
    key = last["headline"] if last else None
    label = _LABELS.get(key, key or "headline")
    fraction = key in _FRACTIONS
    nights = [r for r in scored if r["headline"] == key]
    counts = {v: sum(r["gate"] == v for r in rows) for v in ("passed", "failed", "error")}
    head = (f"<h1>Nightly refreshes</h1><p class=muted>{_e(registry)} · {len(rows)} nights: "
            f"{counts['passed']} passed, {counts['failed']} gated out, {counts['error']} failed to run · "
            + (f"promoted: <a href=\"runs/{_e(promoted)}/report.html\">{_e(promoted)}</a>" if promoted else "nothing promoted")
            + "</p>")
    parts = [head, f"<h2>{_e(label)} per night (INT8, with its 95% interval where the task gives one; "
                   f"{'higher' if key not in _LOWER else 'lower'} is better)</h2>",
             _headline_plot(nights, label, fraction),
             "<h2>Largest range drift against the promoted run (relative change of a scale)</h2>",
             _drift_plot(nights),
             "<h2>Nights</h2>", _nights(rows, fraction, promoted)]
    return _page("quantray: nightly refreshes", parts)


_LABELS = {"top1": "top-1 accuracy", "rmse": "RMSE", "miou": "mIoU", "micro_f1": "micro F1",
           "sqnr_db": "INT8 vs FP32 output SQNR (dB)"}
_FRACTIONS = {"top1", "miou", "micro_f1"}
_LOWER = {"rmse"}


def _show(value, fraction: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if fraction else f"{value:.4g}"


def _headline_plot(nights: list[dict], label: str, fraction: bool) -> str:
    """One point per night (coloured by its gate, ringed where promoted) with its interval, and FP32's
    headline as a hollow point where the task has one."""
    if not nights:
        return "<p class=muted>No night has been scored yet.</p>"
    left, width, height, top = 70, 720, 220, 12
    values = [v for r in nights for v in (r["int8_headline"], r.get("fp32_headline"), r.get("int8_headline_low"),
                                          r.get("int8_headline_high")) if v is not None]
    low, high = min(values), max(values)
    span = (high - low) or abs(high) * 0.01 or 1.0
    low, high = low - 0.1 * span, high + 0.1 * span

    def y(v):
        return top + (high - v) / (high - low) * height

    def x(k):
        return left + (width * (k + 0.5) / len(nights))

    body = [f"<line x1=\"{left}\" y1=\"{top + height}\" x2=\"{left + width}\" y2=\"{top + height}\" "
            f"stroke=\"{COLORS['grid']}\"/>"]
    for i in range(5):
        v = low + (high - low) * i / 4
        body.append(f"<line x1=\"{left}\" y1=\"{y(v):.1f}\" x2=\"{left + width}\" y2=\"{y(v):.1f}\" "
                    f"stroke=\"{COLORS['grid']}\" stroke-dasharray=\"2 3\"/>")
        body.append(_text(left - 6, y(v) + 4, _show(v, fraction), "end"))
    for k, r in enumerate(nights):
        cx, color = x(k), _VERDICT.get(r["gate"], COLORS["ink"])
        title = (f"{r['run_id']}: {label} INT8 {_show(r['int8_headline'], fraction)}"
                 + (f", FP32 {_show(r['fp32_headline'], fraction)}" if r.get("fp32_headline") is not None else "")
                 + f"; gate {r['gate']}" + (f": {r['reason']}" if r.get("reason") else "")
                 + ("; promoted" if r["promoted"] else ""))
        if r.get("int8_headline_low") is not None and r.get("int8_headline_high") is not None:
            body.append(f"<line x1=\"{cx:.1f}\" y1=\"{y(r['int8_headline_low']):.1f}\" x2=\"{cx:.1f}\" "
                        f"y2=\"{y(r['int8_headline_high']):.1f}\" stroke=\"{color}\" stroke-width=\"2\"/>")
        if r.get("fp32_headline") is not None:
            body.append(f"<circle cx=\"{cx:.1f}\" cy=\"{y(r['fp32_headline']):.1f}\" r=\"4\" fill=\"none\" "
                        f"stroke=\"{COLORS['fp32']}\"><title>{_e(title)}</title></circle>")
        if r["promoted"]:
            body.append(f"<circle cx=\"{cx:.1f}\" cy=\"{y(r['int8_headline']):.1f}\" r=\"9\" fill=\"none\" "
                        f"stroke=\"{COLORS['ink']}\" stroke-width=\"1.5\"/>")
        body.append(f"<a href=\"runs/{_e(r['run_id'])}/report.html\"><circle cx=\"{cx:.1f}\" "
                    f"cy=\"{y(r['int8_headline']):.1f}\" r=\"5\" fill=\"{color}\"><title>{_e(title)}</title></circle></a>")
    labels = _night_labels(nights)
    body += [_text(x(k), top + height + 16, text, "middle") for k, text in labels]
    legend_y = top + height + 36
    legend = [("passed", _VERDICT["passed"]), ("gated out", _VERDICT["failed"])]
    for i, (name, color) in enumerate(legend):
        body.append(f"<circle cx=\"{left + 10 + i * 110}\" cy=\"{legend_y}\" r=\"5\" fill=\"{color}\"/>")
        body.append(_text(left + 20 + i * 110, legend_y + 4, name))
    body.append(f"<circle cx=\"{left + 230}\" cy=\"{legend_y}\" r=\"8\" fill=\"none\" stroke=\"{COLORS['ink']}\"/>")
    body.append(_text(left + 242, legend_y + 4, "promoted"))
    body.append(f"<circle cx=\"{left + 330}\" cy=\"{legend_y}\" r=\"4\" fill=\"none\" stroke=\"{COLORS['fp32']}\"/>")
    body.append(_text(left + 340, legend_y + 4, "FP32"))
    return _svg(left + width + 20, legend_y + 14, body, f"{label} per night")


def _night_labels(nights: list[dict]) -> list[tuple[int, str]]:
    """At most 8 night labels (month-day), evenly spread, the last always shown."""
    step = max(1, -(-len(nights) // 8))
    chosen = sorted({*range(0, len(nights), step), len(nights) - 1})
    return [(k, f"{nights[k]['time']:%m-%d %H:%M}" if hasattr(nights[k]["time"], "strftime") else str(nights[k]["time"]))
            for k in chosen]


def _drift_plot(nights: list[dict]) -> str:
    """A bar per night, in the headline plot's places: its largest relative change of an observer's
    scale against the run promoted then (none where nothing was promoted yet)."""
    if not any(r.get("max_scale_drift") is not None for r in nights):
        return "<p class=muted>No night had a promoted run to compare its ranges with yet.</p>"
    left, width, height, top = 70, 720, 120, 10
    most = max(max(r["max_scale_drift"] for r in nights if r.get("max_scale_drift") is not None), 1e-9)
    slot = width / len(nights)
    bar = min(slot * 0.7, 40)
    body = [f"<line x1=\"{left}\" y1=\"{top + height}\" x2=\"{left + width}\" y2=\"{top + height}\" "
            f"stroke=\"{COLORS['grid']}\"/>", _text(left - 6, top + 8, f"{most:.3g}", "end"),
            _text(left - 6, top + height, "0", "end")]
    for k, r in enumerate(nights):
        if r.get("max_scale_drift") is None:
            continue
        h = r["max_scale_drift"] / most * height
        body.append(f"<rect x=\"{left + (k + 0.5) * slot - bar / 2:.1f}\" y=\"{top + height - h:.1f}\" "
                    f"width=\"{bar:.1f}\" height=\"{h:.1f}\" fill=\"{_VERDICT.get(r['gate'], COLORS['ink'])}\">"
                    f"<title>{_e(r['run_id'])}: largest scale change {r['max_scale_drift']:.2%}</title></rect>")
    body += [_text(left + (k + 0.5) * slot, top + height + 16, text, "middle") for k, text in _night_labels(nights)]
    return _svg(left + width + 20, top + height + 24, body, "largest scale drift per night")


def _nights(rows: list[dict], fraction: bool, promoted: str | None) -> str:
    """Newest first: time, run (linked to its report), gate and reason, promotion, figures."""
    body = []
    for r in reversed(rows):
        run = _e(r["run_id"])
        link = f"<a href=\"runs/{run}/report.html\">{run}</a>" if r["gate"] != "error" else run
        interval = ("-" if r.get("int8_headline_low") is None else
                    f"{_show(r['int8_headline_low'], fraction)}-{_show(r['int8_headline_high'], fraction)}")
        cells = [_e(str(r["time"])[:19]), link, _e(r["gate"]) + (f": {_e(r['reason'])}" if r.get("reason") else ""),
                 "current" if r["run_id"] == promoted else "yes" if r["promoted"] else "",
                 _e(_show(r.get("fp32_headline"), fraction)), _e(_show(r.get("int8_headline"), fraction)), _e(interval),
                 "-" if r.get("output_sqnr_db") is None else f"{r['output_sqnr_db']:.2f} dB",
                 "-" if r.get("max_scale_drift") is None else f"{r['max_scale_drift']:.2%}",
                 _e((r.get("qparams_digest") or "")[:16])]
        body.append("<tr>" + "".join(f"<td{' class=n' if i >= 4 else ''}>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
    head = "".join(f"<th{' class=n' if i >= 4 else ''}>{h}</th>" for i, h in enumerate(
        ["night (UTC)", "run", "gate", "promoted", "FP32", "INT8", "95% interval", "output SQNR", "max drift",
         "qparams digest"]))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


