"""Stored calibration statistics and FP32 outputs: a rerun reuses them, a change recomputes only what it must."""

import io
import json
from pathlib import Path

import torch
import torchvision
from PIL import Image
from rich.console import Console

from quantray.job import run_job
from quantray.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def _run(job: Path, out: Path, **kwargs):
    log = io.StringIO()
    run_dir = run_job(load_spec(job), workers=2, out=out, console=Console(file=log, width=300), **kwargs)
    return json.loads((run_dir / "manifest.json").read_text()), log.getvalue()


def test_rerun_reuses_everything_and_a_new_mode_keeps_pass_1(ray_cluster, tmp_path):
    text = (ROOT / "jobs" / "digits.toml").read_text()
    job = tmp_path / "digits.toml"
    job.write_text(text.replace("threads = 1 ", f'cache_dir = "{tmp_path / "stats"}"\nthreads = 1 '))
    cold, _ = _run(job, tmp_path / "cold")
    warm, said = _run(job, tmp_path / "warm")
    assert cold["calibration_stats"]["cached"] == {"pass1": [0, 10], "pass2": [0, 2]}
    assert warm["calibration_stats"]["cached"] == {"pass1": [10, 10], "pass2": [2, 2]}
    assert "reused stored statistics: pass1 10 of 10, pass2 2 of 2" in said
    assert warm["qparams_digest"] == cold["qparams_digest"]
    assert warm["files"]["qparams.parquet"] == cold["files"]["qparams.parquet"]
    # The FP32 outputs of every test batch were stored by the cold run and reused: same predictions.
    batches = len(cold["evaluation"]["batches"])
    assert (cold["evaluation"]["fp32_batches_reused"], warm["evaluation"]["fp32_batches_reused"]) == (0, batches)
    assert f"reused stored FP32 outputs: {batches} of {batches} test batches" in said
    for name in ("predictions.parquet", "layers.parquet"):
        assert warm["files"][name] == cold["files"][name], name

    forced, said = _run(job, tmp_path / "forced", use_cache=False)
    assert forced["calibration_stats"]["cached"] == {"pass1": [0, 10], "pass2": [0, 2]} and "reused" not in said
    assert forced["evaluation"]["fp32_batches_reused"] == 0
    assert forced["files"]["predictions.parquet"] == cold["files"]["predictions.parquet"]
    assert forced["qparams_digest"] == cold["qparams_digest"]

    job.write_text(job.read_text().replace('backend = "x86"', 'backend = "x86"\nmode = "replay"'))
    replay, _ = _run(job, tmp_path / "replay")
    assert replay["calibration_stats"]["cached"] == {"pass1": [10, 10], "pass2": [0, 10]}
    assert replay["evaluation"]["fp32_batches_reused"] == batches  # FP32 outputs do not depend on the qconfig


def _image(path: Path, seed: int):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


def test_a_changed_image_recomputes_only_its_batch_in_pass_1(ray_cluster, tmp_path):
    images = tmp_path / "images"
    for k, name in enumerate(["a", "b", "c"]):
        (images / name).mkdir(parents=True)
        for i in range(8):
            _image(images / name / f"{i}.png", 100 * k + i)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "resnet18.pth")
    job = tmp_path / "images.toml"
    job.write_text("""
[model]
arch = "resnet18"
num_classes = 3
checkpoint = "resnet18.pth"
[calibration]
source = "imagefolder"
root = "images"
transform = "to_tensor"
batch_size = 4
[test]
source = "imagefolder"
root = "images"
transform = "to_tensor"
[run]
cache_dir = "stats"
latency_iters = 5
""")
    first, _ = _run(job, tmp_path / "first")
    _image(images / "b" / "3.png", 999)  # new pixels in one file: one batch of six changes
    second, said = _run(job, tmp_path / "second")
    assert first["calibration_stats"]["cached"]["pass1"] == [0, 6]
    assert second["calibration_stats"]["cached"]["pass1"] == [5, 6]
    assert "reused stored statistics: pass1 5 of 6" in said
    third, _ = _run(job, tmp_path / "third")
    assert third["calibration_stats"]["cached"] == {"pass1": [6, 6], "pass2": [2, 2]}
    assert third["qparams_digest"] == second["qparams_digest"] != first["qparams_digest"]
