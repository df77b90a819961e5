"""The article's job with its images in Parquet shards, local and on an S3 endpoint, against the JPEG folder.

    python -m benchmarks.shards [--dir DIR] [--rounds 2] [--workers 2] [--rows-per-shard 1000]

Data: the article job's (see `article_job`): a Flowers102-layout folder of 500x375 JPEGs, 100
calibration images in batches of 10 and 1,000 test images, an untrained resnet18; written once
under --dir and kept. The S3 endpoint is moto's server (`pip install 'moto[server]'`), started here
on loopback and reached as a cluster reaches its store (endpoint and credentials in the environment).

1. `quantray pack` to a local folder and to s3://: images per second and shard bytes per split,
   against the JPEG files the split reads.
2. The data path alone: the test split read, decoded and transformed in this process, per source.
3. Rounds of `quantray run --workers N --no-cache` on the folder job, the job packed to the local
   folder and the job packed to S3, in turn (the order rotates per round): the calibrate and evaluate
   stages (Ray's start, speed and writing apart), their ratio folder / shards (above 1: the shards
   are faster), and the bytes each worker read of the shards against their total (1/N is the ideal).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import time
from pathlib import Path


def _bucket(endpoint: str, name: str) -> str:
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/quantray-bench-shards", help="data and outputs (kept between runs)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)

    from quantray.core.flow import quiet_torch_warnings
    from quantray.testing import loopback_s3

    quiet_torch_warnings()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback cluster (DESIGN.md)
    with loopback_s3() as endpoint:  # reached through the environment, here and in Ray's workers
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        _bench(Path(args.dir), args, endpoint)


def _bench(base: Path, args, endpoint: str) -> None:
    from rich.console import Console

    import quantray
    from quantray.commands.pack import pack
    from quantray.testing import article_job

    quiet = Console(file=io.StringIO())
    job = article_job(base, samples=100, classes=range(1, 101), train=1, val=0, test=10, latency_iters=10)
    shutil.rmtree(base / "shards", ignore_errors=True)
    bucket = _bucket(endpoint, f"bench-{os.getpid()}")
    print(f"pack, --rows-per-shard {args.rows_per_shard}:")
    jobs = {"folder": job}
    for where, out in (("local", base / "shards"), ("s3", f"{bucket}/flowers")):
        started = time.perf_counter()
        result = pack(job, out, rows_per_shard=args.rows_per_shard, job_out=base / f"packed-{where}.toml", console=quiet)
        wall = time.perf_counter() - started
        rows = sum(s.rows for s in result.splits)
        print(f"  to {where:5}: {rows} images in {wall:.2f} s = {rows / wall:.0f} images/s")
        for s in result.splits:
            print(f"    {s.section:11} {s.rows:5} images, {s.shards} shard(s): {s.shard_bytes / 1e6:7.2f} MB of shards "
                  f"for {s.source_bytes / 1e6:7.2f} MB of JPEGs ({s.shard_bytes / s.source_bytes:.4f}x); "
                  f"{s.rows / s.seconds:.0f} images/s")
        jobs[f"parquet-{where}"] = result.job_file

    _data_path(jobs, args.rounds)
    stages = {name: [] for name in jobs}
    reads = {}
    for r in range(args.rounds):
        names = list(jobs)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate: no side always runs first
        for name in names:
            out = base / "runs" / f"{name}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            result = quantray.run(jobs[name], workers=args.workers, out=out, use_cache=False, console=quiet)
            t = result.manifest["timings_s"]
            stages[name].append((t["calibrate"], t["evaluate"], result.manifest["wall_s"]))
            reads[name] = result.manifest.get("data_read")
            print(f"round {r + 1} {name:15}: calibrate {t['calibrate']:6.2f} s, evaluate {t['evaluate']:6.2f} s "
                  f"(wall {result.manifest['wall_s']:.1f} s, digest {result.manifest['qparams_digest'][:16]}, "
                  f"FP32 top-1 {result.metrics['fp32']['top1']:.2%})")
    folder = statistics.median(c + e for c, e, _ in stages["folder"])
    print(f"median of {args.rounds}, calibrate + evaluate:")
    for name, rows in stages.items():
        both = statistics.median(c + e for c, e, _ in rows)
        print(f"  {name:15} {both:6.2f} s   folder / this {folder / both:.2f}x")
    for name in ("parquet-local", "parquet-s3"):
        read = reads[name]
        print(f"bytes read, {name} (last round), against the shards' total:")
        for split, total in read["shards"].items():
            parts = [f"worker {w} {v[split]['bytes'] / 1e6:.2f} MB ({v[split]['bytes'] / total['bytes']:.3f})"
                     for w, v in read["workers"].items() if split in v]
            driver = read["driver"][split]["bytes"]
            print(f"  {split:11} total {total['bytes'] / 1e6:.2f} MB; " + ", ".join(parts)
                  + f"; driver {driver / 1e6:.2f} MB ({driver / total['bytes']:.3f}); 1/N = {1 / len(parts):.3f}")


def _data_path(jobs: dict, rounds: int) -> None:
    """The test split read, decoded and transformed in batches of 32 in this process, one thread:
    the data path alone, without Ray or the models (much less noisy than whole runs)."""
    import torch

    from quantray.inputs.data import build_dataset, load_batch, make_batches
    from quantray.spec import load_spec

    torch.set_num_threads(1)
    seconds = {name: [] for name in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            spec = load_spec(job).test
            started = time.perf_counter()
            dataset = build_dataset(spec)  # opening is part of the path (a fresh reader, as a worker has)
            batches = make_batches(list(range(len(dataset))), 32)
            for b, batch in enumerate(batches):  # as a worker loads them: the next batch announced
                load_batch(dataset, batch, batches[b + 1] if b + 1 < len(batches) else None)
            seconds[name].append((time.perf_counter() - started, len(dataset)))
    folder = statistics.median(s for s, _ in seconds["folder"])
    print(f"data path alone (test split, batches of 32, one process, one thread), median of {rounds}:")
    for name, rows in seconds.items():
        median = statistics.median(s for s, _ in rows)
        print(f"  {name:15} {median:6.2f} s = {median / rows[0][1] * 1e3:.2f} ms per image   folder / this "
              f"{folder / median:.2f}x")


if __name__ == "__main__":
    main()
