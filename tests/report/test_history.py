"""The registry's history.html: every night on a self-contained page that renders in a real browser."""

import datetime
import re
import subprocess

import pytest
from PIL import Image

from helpers import CHROMIUM, chromium_flags
from helpers import CHROMIUM_REQUIRED as REQUIRED

from quantray.report.history import render_history
from quantray.report.html import COLORS

# Nights a month before the real clock's now (labels on the page; no calendar date the clock could overtake).
START = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)).replace(
    hour=2, minute=30, second=0, microsecond=0)


def _nights(n: int = 6) -> list[dict]:
    """n nights of a classification job: passed and promoted, then one gated out, one failed to run."""
    rows = []
    for k in range(n):
        gate = "failed" if k == n - 2 else "error" if k == n - 1 else "passed"
        scored = gate != "error"
        night = START + datetime.timedelta(days=k)
        rows.append({"run_id": f"{night:%Y%m%dT%H%M%SZ}-abcd{k:04d}-{k:06d}", "time": night,
                     "gate": gate, "reason": {"failed": "INT8 top-1 trails FP32 by 3.00 pt > max_top1_drop 1.00 pt <b>",
                                              "error": "evaluate: sample 5 failed to load"}.get(gate, ""),
                     "promoted": gate == "passed", "headline": "top1" if scored else None,
                     "fp32_headline": 0.95 if scored else None,
                     "int8_headline": (0.92 if gate == "failed" else 0.945 + 0.001 * k) if scored else None,
                     "int8_headline_low": 0.93 if scored else None, "int8_headline_high": 0.96 if scored else None,
                     "output_sqnr_db": 30.0 + k if scored else None, "max_scale_drift": 0.01 * k if 0 < k < n - 1 else None,
                     "qparams_digest": "0123456789abcdef0123" if scored else None})
    return rows


def test_the_page_shows_every_night_its_gate_promotion_drift_and_a_link_to_its_report():
    rows = _nights()
    promoted = rows[3]["run_id"]
    page = render_history(rows, promoted, "s3://bucket/models/digits")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg class=plot") == 2
    for fetch in ("src=", "url(", "@import", "<script", "<link", "http:", "https:"):
        assert fetch not in page, fetch
    for r in rows[:-1]:  # a run that failed has no run directory: no link
        links = 2 + (r["run_id"] == promoted)   # the point, the table and, for the promoted run, the header
        assert page.count(f"href=\"runs/{r['run_id']}/report.html\"") == links
    assert f"href=\"runs/{rows[-1]['run_id']}/report.html\"" not in page
    assert "6 nights: 4 passed, 1 gated out, 1 failed to run" in page
    assert f"promoted: <a href=\"runs/{promoted}/report.html\">{promoted}</a>" in page
    assert "INT8 top-1 trails FP32 by 3.00 pt &gt; max_top1_drop 1.00 pt &lt;b&gt;" in page   # escaped
    assert "<td>current</td>" in page and "92.00%" in page and "93.00%-96.00%" in page and "4.00%" in page
    assert len(re.findall(r"r=\"9\"", page)) == 4    # the promoted nights are ringed


def test_an_empty_or_label_free_history_still_renders():
    assert "No night has been scored yet" in render_history([], None, "/srv/registry")
    rows = [{**r, "headline": "sqnr_db", "fp32_headline": None, "int8_headline": 38.0 - k, "int8_headline_low": None,
             "int8_headline_high": None} for k, r in enumerate(_nights(3)[:2])]
    page = render_history(rows, rows[0]["run_id"], "/srv/registry")
    assert "INT8 vs FP32 output SQNR (dB) per night" in page and "38" in page and "FP32</td>" not in page


@pytest.mark.ray
@pytest.mark.skipif(not CHROMIUM and not REQUIRED, reason="chromium is not installed (CI installs it: .ci/run)")
def test_history_renders_in_headless_chromium(tmp_path):
    assert CHROMIUM, "QUANTRAY_REQUIRE_CHROMIUM=1 but no chromium on PATH"
    rows = _nights(12)
    page = tmp_path / "history.html"
    page.write_text(render_history(rows, rows[-3]["run_id"], str(tmp_path)))
    flags = chromium_flags(tmp_path / "profile")
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<svg class=\"plot\"", dom.stdout)) == 2
    assert dom.stdout.count("<circle") >= 11 * 2 and dom.stdout.count("<tr>") == 12 + 1
    shot = tmp_path / "shot.png"
    result = subprocess.run([*flags, "--window-size=1100,1400", f"--screenshot={shot}", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = list(Image.open(shot).convert("RGB").getdata())
    for name in ("good", "bad"):  # passed and gated-out nights were painted, as points and drift bars
        rgb = tuple(int(COLORS[name][i:i + 2], 16) for i in (1, 3, 5))
        assert sum(p == rgb for p in pixels) > 40, f"no {name} marks painted"
