"""Batch-1 latency of the article's job at 224x224, measured the article's way: FP32 vs INT8.

    python -m benchmarks.article_latency [--threads 1 2] [--iters 100]

Writes a small Flowers102 folder and an untrained resnet18 checkpoint (latency does not depend on
the weights' values), runs jobs/flowers102_resnet18.toml through `quantray run` once per thread
count, and prints each run's metrics.json latencies (batch 1, mean of `iters` runs after 10
warm-up runs, as the article measures) beside the article's reported 3.6x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from quantray.testing import article_job

ARTICLE_SPEEDUP = 3.6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("quantray"))
    print(f"{'threads':>7} {'fp32 ms':>9} {'int8 ms':>9} {'script ms':>9} {'int8 x':>7} {'script x':>8}  (article: {ARTICLE_SPEEDUP}x)")
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            base = Path(tmp) / f"t{threads}"
            job = article_job(base, samples=20, latency_iters=args.iters, threads=threads)
            done = subprocess.run([exe, "run", str(job), "--out", str(base / "run")], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"quantray run failed:\n{done.stderr[-3000:]}")
            m = json.loads((base / "run" / "metrics.json").read_text())
            fp32, int8, script = m["fp32"]["latency_ms"], m["int8"]["latency_ms"], m["int8"]["torchscript_latency_ms"]
            print(f"{threads:>7} {fp32:>9.2f} {int8:>9.2f} {script:>9.2f} {fp32 / int8:>6.2f}x {fp32 / script:>7.2f}x")
            print(f"        size: fp32 {m['fp32']['size_mb']:.2f} MB, int8 {m['int8']['size_mb']:.2f} MB "
                  f"({m['fp32']['size_mb'] / m['int8']['size_mb']:.2f}x smaller)")


if __name__ == "__main__":
    main()
