"""The article's job end to end: its script as written against `quantray run`, on the same data.

    python -m benchmarks.article_job [--dir DIR] [--rounds 1] [--workers 2] [--classes 100] [--test 10] [--s3] [--pt2e]

Data: a Flowers102-layout folder of real-size (500x375) JPEGs, 100 classes with 1 training and 10
test images each (100 calibration images in batches of 10, 1,000 test images), and an untrained
resnet18 checkpoint (seed 0); written once under --dir and kept. Each round runs, in turn, as
separate processes timed from launch to exit (the results written):

- the article's script (`ARTICLE`): one process, torch's default threads, its DataLoaders,
  `calibrate`, `test_accuracy` of both models and `test_speed` of both (batch 1, 10 warm-up and
  100 timed runs), then it writes the INT8 state_dict and a results file;
- `quantray run` cold: exact mode, --workers N, an empty statistics store;
- `quantray run` warm: the same command again, with the statistics and FP32 outputs stored;
- with `--s3`, `quantray run` cold on the same job packed (`quantray pack`) to Parquet shards on an
  S3 endpoint (moto's server on loopback, reached through the environment; its own empty store).
- with `--pt2e`, `quantray run` cold on the same job with `flow = "pt2e"` (torch.export, torchao,
  the INT8 program compiled; its own empty store).

Ratios are the script's wall over quantray's (above 1: quantray is faster), per round, and their
median. The FP32 top-1 of both sides is printed too: they decode the same images the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARTICLE = r'''
# The article's script, as written, with three edits for this machine (marked EDIT).
import json, os, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, models, transforms
from torch.ao.quantization import QConfigMapping, get_default_qconfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

ROOT, CHECKPOINT, OUT = sys.argv[1:4]  # EDIT: paths from the command line
# EDIT: the written .mat files are not the real ones, so skip torchvision's md5 check (quantray's verify = false)
datasets.Flowers102._check_integrity = lambda self: True

# EDIT: the standard ImageNet mean (the article's 0.465 is a typo), so that both sides see the same tensors
transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
train_dataset = datasets.Flowers102(root=ROOT, split="train", transform=transform, download=False)
test_dataset = datasets.Flowers102(root=ROOT, split="test", transform=transform, download=False)
train_loader = DataLoader(train_dataset, batch_size=10, shuffle=True)
test_loader = DataLoader(test_dataset, batch_size=32, shuffle=False)

model = models.resnet18()
model.fc = nn.Linear(model.fc.in_features, 102)
model.load_state_dict(torch.load(CHECKPOINT))
model.eval()

qconfig_mapping = QConfigMapping().set_global(get_default_qconfig("x86"))
example_inputs = torch.randn(1, 3, 224, 224)
prepared_model = prepare_fx(model, qconfig_mapping, example_inputs)


def calibrate(model, data_loader, num_batches=10):
    with torch.no_grad():
        for i, (images, _) in enumerate(data_loader):
            if i >= num_batches:
                break
            model(images)


calibrate(prepared_model, train_loader)
quantized_model = convert_fx(prepared_model)
torch.save(quantized_model.state_dict(), os.path.join(OUT, "resnet18_int8.pth"))
torch.save(model.state_dict(), os.path.join(OUT, "resnet18_fp32.pth"))


def test_accuracy(model, data_loader):
    correct, total = 0, 0
    with torch.no_grad():
        for images, labels in data_loader:
            outputs = model(images)
            _, predicted = torch.max(outputs, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return 100 * correct / total


def test_speed(model, iterations=100):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for _ in range(10):
            model(x)
        start = time.time()
        for _ in range(iterations):
            model(x)
    return (time.time() - start) / iterations * 1000


fp32_accuracy = test_accuracy(model, test_loader)
int8_accuracy = test_accuracy(quantized_model, test_loader)
fp32_ms, int8_ms = test_speed(model), test_speed(quantized_model)
fp32_mb = os.path.getsize(os.path.join(OUT, "resnet18_fp32.pth")) / 1e6
int8_mb = os.path.getsize(os.path.join(OUT, "resnet18_int8.pth")) / 1e6
print(f"FP32 accuracy {fp32_accuracy:.2f}%, INT8 accuracy {int8_accuracy:.2f}%")
print(f"FP32 {fp32_ms:.1f} ms, INT8 {int8_ms:.1f} ms: {fp32_ms / int8_ms:.2f}x faster")
print(f"FP32 {fp32_mb:.1f} MB, INT8 {int8_mb:.1f} MB: {fp32_mb / int8_mb:.2f}x smaller")
with open(os.path.join(OUT, "results.json"), "w") as f:
    json.dump({"fp32_top1": fp32_accuracy, "int8_top1": int8_accuracy, "fp32_ms": fp32_ms, "int8_ms": int8_ms}, f)
'''


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return wall, done.stdout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(Path.home() / ".cache" / "quantray-bench" / "article_job"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--classes", type=int, default=100, help="classes (one calibration image and --test test images each)")
    parser.add_argument("--test", type=int, default=10, help="test images per class (default 10: 1,000 images)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--s3", action="store_true", help="also run the job packed to shards on a loopback S3 endpoint")
    parser.add_argument("--pt2e", action="store_true", help="also run the job cold with flow = \"pt2e\"")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        _rounds(args, stack)


def _rounds(args, stack: contextlib.ExitStack) -> None:

    from quantray.testing import article_job

    base = Path(args.dir)
    if (args.classes, args.test) != (100, 10):  # other data: its own folder beside the default's
        base = base / f"{args.classes}x{args.test}"
    t = time.perf_counter()
    job = article_job(base, samples=100, classes=range(1, args.classes + 1), train=1, val=0, test=args.test)
    print(f"{args.classes} classes, {args.classes * args.test} test images")
    print(f"data and checkpoint in {base} ({time.perf_counter() - t:.1f} s to write or find)")
    script = base / "article.py"
    script.write_text(ARTICLE)
    packed = _packed_to_s3(job, base, stack) if args.s3 else None
    pt2e = None
    if args.pt2e:
        pt2e = base / "flowers102_resnet18_pt2e.toml"
        pt2e.write_text(job.read_text().replace('backend = "x86"', 'backend = "x86"\nflow = "pt2e"', 1))
    rows, s3_rows, pt2e_rows = [], [], []
    for r in range(args.rounds):
        work = base / "work"
        shutil.rmtree(work, ignore_errors=True)
        (work / "script").mkdir(parents=True)
        env = {**os.environ, "QUANTRAY_CACHE": str(work / "cache")}
        script_s, script_out = _timed([sys.executable, str(script), str(base / "data"),
                                       str(base / "checkpoints" / "resnet18.pth"), str(work / "script")])
        quantray = _run_command(job, args.workers)
        cold_s, _ = _timed(quantray + ["--out", str(work / "cold")], env)
        warm_s, _ = _timed(quantray + ["--out", str(work / "warm")], env)
        if packed is not None:
            s3_s, _ = _timed(_run_command(packed, args.workers) + ["--out", str(work / "s3")],
                             {**env, "QUANTRAY_CACHE": str(work / "cache-s3")})
            s3_rows.append((script_s, s3_s))
        if pt2e is not None:
            pt2e_s, _ = _timed(_run_command(pt2e, args.workers) + ["--out", str(work / "pt2e")],
                               {**env, "QUANTRAY_CACHE": str(work / "cache-pt2e")})
            pt2e_rows.append((script_s, pt2e_s))
        article = json.loads((work / "script" / "results.json").read_text())
        timings = {k: json.loads((work / k / "manifest.json").read_text())["timings_s"] for k in ("cold", "warm")}
        metrics = json.loads((work / "cold" / "metrics.json").read_text())
        rows.append((script_s, cold_s, warm_s))
        print(f"round {r + 1}: script {script_s:.1f} s | quantray cold {cold_s:.1f} s ({script_s / cold_s:.2f}x) | "
              f"warm {warm_s:.1f} s ({script_s / warm_s:.2f}x)")
        print(f"  FP32 top-1: script {article['fp32_top1']:.2f}%, quantray {100 * metrics['fp32']['top1']:.2f}%")
        if packed is not None:
            timings["cold on S3 shards"] = json.loads((work / "s3" / "manifest.json").read_text())["timings_s"]
            print(f"  quantray cold on S3 shards {s3_s:.1f} s ({script_s / s3_s:.2f}x)")
        if pt2e is not None:
            timings["pt2e cold"] = json.loads((work / "pt2e" / "manifest.json").read_text())["timings_s"]
            pm = json.loads((work / "pt2e" / "metrics.json").read_text())
            print(f"  quantray cold, flow = pt2e: {pt2e_s:.1f} s ({script_s / pt2e_s:.2f}x); INT8 latency "
                  f"{pm['int8']['latency_ms']:.2f} ms compiled (FX run: {metrics['int8']['torchscript_latency_ms']:.2f} ms "
                  f"TorchScript, script's INT8 {article.get('int8_ms', float('nan')):.2f} ms), "
                  f"agreement {100 * pm['agreement']:.1f}% (FX {100 * metrics['agreement']:.1f}%)")
        for k, v in timings.items():
            print(f"  quantray {k} stages (s): " + ", ".join(f"{s} {x:.1f}" for s, x in v.items()))
    if len(rows) > 1:
        script_s, cold_s, warm_s = (statistics.median(c) for c in zip(*rows))
        print(f"median of {len(rows)}: script {script_s:.1f} s, cold {cold_s:.1f} s "
              f"({statistics.median(a / b for a, b, _ in rows):.2f}x), warm {warm_s:.1f} s "
              f"({statistics.median(a / c for a, _, c in rows):.2f}x)")
        if pt2e_rows:
            print(f"  cold with flow = pt2e {statistics.median(b for _, b in pt2e_rows):.1f} s "
                  f"({statistics.median(a / b for a, b in pt2e_rows):.2f}x)")
        if s3_rows:
            print(f"  cold on S3 shards {statistics.median(b for _, b in s3_rows):.1f} s "
                  f"({statistics.median(a / b for a, b in s3_rows):.2f}x)")


def _run_command(job: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "quantray.cli", "run", str(job), "--workers", str(workers)]


def _packed_to_s3(job: Path, base: Path, stack: contextlib.ExitStack) -> Path:
    """`job` packed to shards on moto's S3 server (started here, on loopback, for the whole benchmark)."""
    from rich.console import Console

    from benchmarks.shards import _bucket
    from quantray.commands.pack import pack
    from quantray.testing import loopback_s3

    endpoint = stack.enter_context(loopback_s3())
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    t = time.perf_counter()
    packed = pack(job, f"{_bucket(endpoint, f'article-{os.getpid()}')}/flowers", job_out=base / "packed-s3.toml",
                  console=Console(file=io.StringIO())).job_file
    print(f"packed to S3 shards in {time.perf_counter() - t:.1f} s: {packed}")
    return packed


if __name__ == "__main__":
    main()
