"""report.html: self-contained, and it renders in a real headless browser (Debian's chromium)."""

import re
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import CHROMIUM, chromium_flags
from helpers import CHROMIUM_REQUIRED as REQUIRED

from quantray.report.html import COLORS, render


def _synthetic():
    """A run's figures made up here: the page is a pure function of metrics, layers and manifest."""
    speed = {m: {"mean_ms": t, "p50_ms": t, "p90_ms": 1.2 * t, "throughput_per_s": 1000 / t}
             for m, t in (("fp32", 4.0), ("int8", 1.5), ("int8_torchscript", 1.0))}
    speed["conditions"] = {"threads": 1, "throughput_batch_size": 32, "where": "a node"}
    metrics = {"samples": 20, "agreement": 0.95, "logit_sqnr_db": 30.0, "speed": speed,
               "fp32": {"top1": 0.9, "top5": 1.0, "latency_ms": 4.0, "size_mb": 4.0},
               "int8": {"top1": 0.85, "top5": 1.0, "latency_ms": 1.5, "size_mb": 1.0},
               "per_class": [{"label": 0, "n": 10, "fp32_top1": 0.9, "int8_top1": 0.8, "change": -0.1},
                             {"label": 1, "n": 10, "fp32_top1": 0.9, "int8_top1": 0.9, "change": 0.0}],
               "confusion_int8": {"labels": [0, 1], "rows_true_cols_predicted": [[8, 2], [1, 9]]}}
    layers = [{"position": k, "layer": f"conv{k}", "module": f"conv{k}", "fp32_type": "Conv2d",
               "int8_type": "quantized Conv2d", "quantized": k != 2, "samples": 20, "signal": 1.0, "noise": 0.1,
               "sqnr_db": 40.0 - 5 * k} for k in range(4)]
    return metrics, layers, {"job": {"name": "synthetic"}, "created": "2026-11-27", "timings_s": {"calibrate": 1.5}}


def test_the_page_holds_every_section_and_marks_the_worst_quantized_layer():
    metrics, layers, manifest = _synthetic()
    page = render(metrics, layers, manifest)
    assert page.count("<svg class=plot") == 4 and "<title>synthetic: quantray report</title>" in page
    assert "<td>conv3</td><td>quantized Conv2d</td><td class=n>25.00 dB</td>" in page  # the worst quantized layer
    assert "conv2 (fp32)" in page  # kept in FP32: shown, not counted among the worst
    assert "85.00%" in page and "-5.00 pt" in page and "2.67x faster" in page and "stage calibrate" in page


@pytest.fixture(scope="module")
def run(demo_runs):
    from pathlib import Path

    return Path(demo_runs["2 workers"].location)


@pytest.mark.ray
def test_the_page_is_self_contained_and_names_the_worst_layers(run):
    page = (run / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg class=plot") == 4
    for fetch in ("src=", "href=", "url(", "@import", "<script", "<link", "http:", "https:"):
        assert fetch not in page, fetch
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    layers = pq.read_table(run / "layers.parquet").to_pylist()
    worst = min((r for r in layers if r["quantized"]), key=lambda r: r["sqnr_db"])
    assert f"<td>{worst['module'] or worst['layer']}</td>" in page and f"{worst['sqnr_db']:.2f} dB" in page


def test_text_from_the_run_is_escaped():
    metrics, layers, manifest = _synthetic()
    manifest["job"]["name"] = "<img src=x onerror=alert(1)>"
    page = render(metrics, layers, manifest)
    assert "<img" not in page and "&lt;img src=x" in page


@pytest.mark.ray
@pytest.mark.skipif(not CHROMIUM and not REQUIRED, reason="chromium is not installed (CI installs it: .ci/run)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    assert CHROMIUM, "QUANTRAY_REQUIRE_CHROMIUM=1 but no chromium on PATH"
    page = tmp_path / "report.html"
    shutil.copy(run / "report.html", page)
    flags = chromium_flags(tmp_path / "profile")
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The browser parsed the page into 4 SVG plots of bars, and the tables.
    assert len(re.findall(r"<svg class=\"plot\"", dom.stdout)) == 4
    assert dom.stdout.count("<rect") > 20 and "Per-layer SQNR" in dom.stdout and "top-1 accuracy" in dom.stdout

    shot = tmp_path / "shot.png"
    result = subprocess.run([*flags, "--window-size=1200,3200", f"--screenshot={shot}", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3200)
    pixels = list(image.getdata())
    # Every plot painted its bars: FP32 and INT8 latency bars, the TorchScript bar, INT8 layer bars
    # and the red of the worst layers / lost classes / off-diagonal confusion.
    for name in ("fp32", "int8", "script", "bad"):
        rgb = tuple(int(COLORS[name][i:i + 2], 16) for i in (1, 3, 5))
        assert sum(p == rgb for p in pixels) > 300, f"no {name} bars painted"
