"""Evaluation wall time: quantray's parallel FP32+INT8 evaluation vs the seed's two test_accuracy loops.

    python -m benchmarks.evaluation [--images 2040] [--workers 2] [--batch 32]

Data: a Flowers102 folder written in torchvision's layout (`images` test JPEGs of 500x375 over
102 classes, loaded by torchvision's Flowers102 with the imagenet_eval transform), model: an
untrained torchvision resnet18 with 102 classes (speed does not depend on the weights), INT8 by
the x86 qconfig calibrated on 10 training images. Both sides evaluate the same images, in the same
batches, with the same models.

The seed: `test_accuracy(model_fp32)` then `test_accuracy(model_int8)`, each a DataLoader loop
(batch `--batch`, no loader workers, torch's default thread count), as the article runs them.
quantray: the evaluation stage of `quantray run` (`pipeline.evaluate`, its "evaluate" timing) on
a local Ray cluster of `--workers` CPUs: the job's pool of one-thread workers (their start-up
counted: a job starts them once), each image decoded once, INT8 run as the TorchScript artifact.
Timed twice, with the per-layer diagnostics a run adds by default (64 samples), storing the FP32 outputs,
and reusing them (what a nightly refresh or `quantray evaluate` of an unchanged FP32 model on the
same images does). Ray's own start-up is timed apart. Ratios are seed / quantray, measured in the
same run; predictions are checked to match the seed's.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import tempfile
import time
from pathlib import Path

import torch


def _seed_test_accuracy(model, loader) -> tuple[float, list[int]]:
    """The article's loop."""
    correct = total = 0
    predictions = []
    with torch.no_grad():
        for images, labels in loader:
            outputs = model(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
            predictions += predicted.tolist()
    return correct / total, predictions


def _models(calib: torch.Tensor):
    """The benchmarks' models: an untrained resnet18 (seed 0, 102 classes), the x86 QuantSpec, its
    INT8 model calibrated on `calib` in one batch, and that model's TorchScript bytes."""
    import torchvision

    from quantray.core.flow import convert, prepare
    from quantray.spec import QuantSpec

    torch.manual_seed(0)
    fp32 = torchvision.models.resnet18(num_classes=102).eval()
    quant = QuantSpec(backend="x86")
    prepared = prepare(fp32, quant, calib[:1])
    with torch.inference_mode():
        prepared(calib)
    int8 = convert(prepared)
    script = io.BytesIO()
    torch.jit.save(torch.jit.script(int8), script)
    return fp32, quant, int8, script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2040, help="test images (rounded up to a multiple of 102)")
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    import ray
    from rich.console import Console

    from quantray import pipeline
    from quantray.cluster import runner
    from quantray.core.evaluation import state_dict_bytes
    from quantray.core.flow import quiet_torch_warnings
    from quantray.inputs.data import build_dataset, load_batch
    from quantray.spec import DataSpec, JobSpec, ModelSpec, RunSpec
    from quantray.testing import write_flowers102

    quiet_torch_warnings()
    per_class = math.ceil(args.images / 102)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        root = write_flowers102(Path(tmp), classes=range(1, 103), train=1, val=0, test=per_class)
        spec = DataSpec(source="torchvision", dataset="Flowers102", root=root, split="test", transform="imagenet_eval",
                        verify=False, batch_size=args.batch)
        dataset = build_dataset(spec)
        n = len(dataset)
        print(f"wrote {n} test JPEGs (500x375, 102 classes) in {time.perf_counter() - t:.1f} s; "
              f"{torch.get_num_threads()} torch threads by default, {args.workers} Ray workers")

        train = build_dataset(DataSpec(source="torchvision", dataset="Flowers102", root=root, split="train",
                                       transform="imagenet_eval", verify=False))
        calib = load_batch(train, list(range(10)))[0]
        fp32, quant, int8, script = _models(calib)
        state = state_dict_bytes(int8)

        t = time.perf_counter()
        for i in range(n):
            dataset[i]
        decode = time.perf_counter() - t
        print(f"decode + transform alone, one process: {decode:.1f} s ({decode / n * 1e3:.1f} ms per image)")

        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=False)
        t = time.perf_counter()
        seed_fp32, seed_fp32_pred = _seed_test_accuracy(fp32, loader)
        seed_int8, seed_int8_pred = _seed_test_accuracy(int8, loader)
        seed = time.perf_counter() - t
        print(f"seed loops (FP32 then INT8):           {seed:7.1f} s   top-1 {seed_fp32:.4f} / {seed_int8:.4f}")

        t = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"TORCH_CPP_LOG_LEVEL": "ERROR"}})
        print(f"Ray start-up (apart):                  {time.perf_counter() - t:7.1f} s")
        job = JobSpec(name="bench", path=Path(tmp) / "bench.toml", model=ModelSpec(arch="resnet18", num_classes=102),
                      calibration=spec, test=spec, quantization=quant,
                      run=RunSpec(cache_dir=str(Path(tmp) / "stats"), latency_warmup=0, latency_iters=1, throughput_batch=1))
        runs = (("quantray", 0, False), ("quantray again", 0, False),
                ("quantray, + per-layer SQNR (64)", 64, False),
                ("quantray, storing FP32 outputs", 0, True),
                ("quantray, FP32 outputs stored", 0, True))
        with runner.Cluster() as cluster:
            for label, layer_samples, use_cache in runs:
                ctx = pipeline.Context(console=Console(stderr=True), cluster=cluster)
                one = dataclasses.replace(job, run=dataclasses.replace(job.run, layer_samples=layer_samples))
                loaded = pipeline.Job(one, fp32, state_dict_bytes(fp32), dataset, list(range(n)), calib[:1])
                t = time.perf_counter()
                with pipeline.start_workers(ctx, loaded) as pool:  # their start-up is counted
                    outcome = pipeline.evaluate(ctx, loaded, pipeline.Quantized(state, script.getvalue()), pool, use_cache)
                    wall, merged = time.perf_counter() - t - ctx.timings["speed"], outcome.merged
                fp32_acc = merged.counts["fp32_top1"] / n
                int8_acc = merged.counts["int8_top1"] / n
                same = (sum(a == b for a, b in zip(merged.rows["fp32_pred"], seed_fp32_pred)),
                        sum(a == b for a, b in zip(merged.rows["int8_pred"], seed_int8_pred)))
                print(f"{label + ':':<38} {wall:7.1f} s   top-1 {fp32_acc:.4f} / {int8_acc:.4f}   "
                      f"{seed / wall:.2f}x the seed   same top-1 as the seed: FP32 {same[0]}/{n}, INT8 {same[1]}/{n}")
                check = outcome.plan["engine_check_s"]
                print(f"{'':<38} engine check ({outcome.plan['engine_samples']} samples, on one worker): {check:.2f} s, "
                      f"{check / ctx.timings['evaluate'] * 100:.1f}% of the evaluation stage "
                      f"({ctx.timings['evaluate']:.1f} s)")


if __name__ == "__main__":
    main()
