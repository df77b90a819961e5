"""Scaling curve: exact calibration and FP32+INT8 evaluation at 1, 2, 4, ... workers against the seed loops.

    python -m benchmarks.scaling [--workers 1 2 4 8 16] [--calibration-images 640] [--test-images 1020]

Meant for a many-core machine (CPU only), in one call. One local Ray cluster of all the machine's
CPUs; each point starts its own pool of one-thread workers, and its wall includes their start-up.
Calibration: resnet18 (untrained) on random 224x224 images in batches of 10, exact mode, against
the seed loop (prepare_fx, forward, convert_fx) at torch's default thread count, as
`benchmarks.calibration` does. Evaluation: Flowers102-layout test JPEGs (500x375) decoded with the
imagenet_eval transform, FP32 and INT8 (TorchScript) top-1 as `quantray run` evaluates them, against
the article's two `test_accuracy` loops (DataLoader, batch 32, default threads), as
`benchmarks.evaluation` does. Efficiency at N workers: (1-worker wall) / (N x N-worker wall).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch


def _row(label: str, w: int, wall: float, base: float, one: float | None) -> str:
    efficiency = f"{one / (w * wall):5.2f}" if one else "  -  "
    return f"  {label} {w:>3} workers: {wall:7.2f} s   {base / wall:5.2f}x the seed loop   efficiency {efficiency}"


def _calibration(cluster, workers: list[int], images: int) -> None:
    from benchmarks.calibration import _quantray, _seed_loop, _setup
    from quantray.inputs.data import make_batches

    model, spec, dataset = _setup("resnet18", images)
    batches = make_batches(list(range(images)), 10)
    threads = torch.get_num_threads()
    _seed_loop(model, dataset, batches[:1], threads)  # warm-up
    base = _seed_loop(model, dataset, batches, threads)
    print(f"calibration, exact, resnet18, {images} images: seed loop at {threads} threads {base:.2f} s")
    one = None
    for w in workers:
        wall, info = _quantray(cluster, model, spec, dataset, batches, w, "exact", cluster.memory_per_worker(w) / 2 ** 30)
        one = one or (wall if w == 1 else None)
        kept = info["pass2_batches"]
        print(_row("calibration", w, wall, base, one)
              + f"   (workers ready {info['ready_s']:.1f} s; pass 2 memory/disk/forward {kept['memory']}/"
                f"{kept['disk']}/{kept['forward']})", flush=True)


def _evaluation(cluster, workers: list[int], images: int) -> None:
    import dataclasses

    from rich.console import Console

    from benchmarks.evaluation import _models, _seed_test_accuracy
    from quantray import pipeline
    from quantray.core.evaluation import state_dict_bytes
    from quantray.inputs.data import build_dataset, load_batch
    from quantray.spec import DataSpec, JobSpec, ModelSpec, RunSpec
    from quantray.testing import write_flowers102

    with tempfile.TemporaryDirectory() as tmp:
        root = write_flowers102(Path(tmp), classes=range(1, 103), train=1, val=0, test=math.ceil(images / 102))
        spec = DataSpec(source="torchvision", dataset="Flowers102", root=root, split="test", transform="imagenet_eval",
                        verify=False, batch_size=32)
        dataset = build_dataset(spec)
        n = len(dataset)
        calib = load_batch(dataset, list(range(10)))[0]
        fp32, quant, int8, script = _models(calib)

        loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=False)
        t = time.perf_counter()
        _seed_test_accuracy(fp32, loader)
        _seed_test_accuracy(int8, loader)
        base = time.perf_counter() - t
        print(f"evaluation, FP32 + INT8, {n} JPEGs: seed loops at {torch.get_num_threads()} threads {base:.2f} s")
        job = JobSpec(name="bench", path=Path(tmp) / "bench.toml", model=ModelSpec(arch="resnet18", num_classes=102),
                      calibration=spec, test=spec, quantization=quant,
                      run=RunSpec(cache_dir=str(Path(tmp) / "stats"), layer_samples=0, latency_warmup=0,
                                  latency_iters=1, throughput_batch=1))
        one = None
        for w in workers:
            ctx = pipeline.Context(console=Console(stderr=True, quiet=True), cluster=cluster)
            loaded = pipeline.Job(dataclasses.replace(job, run=dataclasses.replace(job.run, workers=w)), fp32,
                                state_dict_bytes(fp32), dataset, list(range(n)), calib[:1])
            t = time.perf_counter()
            with pipeline.start_workers(ctx, loaded) as pool:  # their start-up counted
                pipeline.evaluate(ctx, loaded, pipeline.Quantized(state_dict_bytes(int8), script.getvalue()), pool, False)
                wall = time.perf_counter() - t - ctx.timings["speed"]
            one = one or (wall if w == 1 else None)
            print(_row("evaluation ", w, wall, base, one), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--calibration-images", type=int, default=640)
    parser.add_argument("--test-images", type=int, default=1020)
    args = parser.parse_args()

    from quantray.cluster.runner import Cluster
    from quantray.core.evaluation import processor
    from quantray.core.flow import quiet_torch_warnings

    quiet_torch_warnings()
    with Cluster() as cluster:
        print(f"{processor()}; {cluster.cpus} Ray CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads")
        _calibration(cluster, args.workers, args.calibration_images)
        _evaluation(cluster, args.workers, args.test_images)


if __name__ == "__main__":
    main()
