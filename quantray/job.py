"""One quantization job, end to end: spec -> model, data -> Ray calibration -> INT8 -> evaluation -> files.

    run_dir = run_job(load_spec("jobs/digits.toml"), workers=2)

Everything that can be wrong with the input is checked before Ray starts and before the run
directory exists; the run directory appears, whole, only when the job succeeds.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import platform
import time
from pathlib import Path

import torch
from rich.console import Console

from . import __version__, observers, runner
from .artifacts import PREDICTIONS_SCHEMA, QPARAMS_SCHEMA, RunDir
from .cache import StatsCache, batch_identities, cache_dir
from .calibration import convert, prepare, set_engine
from .data import assign_shards, build_dataset, load_batch, make_batches, sample_indices
from .errors import QuantrayError, SpecError
from .evaluation import accuracy_metrics, measure_latency, measure_throughput, merge_results, state_dict_bytes
from .models import build_model
from .report import make_progress, print_summary
from .spec import JobSpec

__all__ = ["run_job"]


def run_job(spec: JobSpec, *, workers: int | None = None, out: str | Path | None = None,
            address: str | None = None, console: Console | None = None, shard_order=None,
            use_cache: bool = True, before_commit=None) -> Path | str:
    """Run `spec`; returns the committed run directory. `shard_order` is for equivalence tests;
    `use_cache=False` (--no-cache) recomputes every statistic instead of reusing stored ones;
    `before_commit(run, manifest)` may add files to the staged run (refresh adds its drift report)."""
    console = console or Console(stderr=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    @contextlib.contextmanager
    def stage(name):
        t = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t, 4)

    with stage("load"):
        fp32 = build_model(spec.model, spec.path)
        calib_ds = build_dataset(spec.calibration, f"{spec.path}: [calibration]")
        test_ds = build_dataset(spec.test, f"{spec.path}: [test]")
        calib_idx = _indices(calib_ds, spec, "calibration")
        if not calib_idx:
            raise SpecError(f"{spec.path}: [calibration] the calibration split is empty: nothing to calibrate on")
        test_idx = _indices(test_ds, spec, "test")
        if not test_idx:
            raise SpecError(f"{spec.path}: [test] the test split is empty: nothing to evaluate on")
        example = load_batch(calib_ds, calib_idx[:1])[0]
    with stage("prepare"):
        try:
            prepared = prepare(fp32, spec.quantization, example)
        except SpecError as e:
            raise SpecError(f"{spec.path}: {e}") from None
        except QuantrayError:
            raise
        except Exception as e:  # most often: the model is not symbolically traceable
            raise SpecError(f"{spec.path}: [model] prepare_fx failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        signature = observers.observer_signature(prepared)
    requested = workers or spec.run.workers
    if not out:
        out = Path("runs") / f"{spec.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    elif "://" not in str(out):  # a URI (s3://...) stays a string: Path would fold its '//'
        out = Path(out)
    threads = spec.run.threads
    batches = make_batches(calib_idx, spec.calibration.batch_size)
    test_batches = make_batches(test_idx, spec.test.batch_size)

    with RunDir(out) as run:
        with contextlib.ExitStack() as ray_scope:
            with stage("ray_start"):  # timed apart: a fixed cost, not calibration
                cluster = ray_scope.enter_context(runner.Cluster(address))
            n = requested or cluster.cpus
            shards = assign_shards(len(batches), n)
            if len(shards) < n:
                console.print(f"[yellow]{len(batches)} calibration batches: using {len(shards)} workers, not {n}[/]")
            with make_progress(console) as progress:
                with stage("calibrate"):
                    calib_ids = batch_identities(calib_ds, spec.calibration, batches)
                    cache = None
                    if use_cache and spec.run.cache:
                        cache = StatsCache(spec.run.cache_dir or cache_dir() / "stats", fp32, spec.quantization, threads)
                    logs, pass2, calibrate_stats = runner.calibrate(
                        cluster, fp32, example, spec.quantization, spec.calibration, batches, shards, threads,
                        signature, max_attempts=spec.run.max_attempts, progress=progress, order=shard_order,
                        cache=cache, identities=calib_ids)
                    reused = {k: v for k, v in calibrate_stats.get("cached", {}).items() if v[0]}
                    if reused:
                        console.print("reused stored statistics: " + ", ".join(
                            f"{k} {hit} of {total}" for k, (hit, total) in reused.items()) + f" (from {cache.root})")
                with stage("convert"):
                    observers.load_merged(prepared, spec.quantization.mode, logs, pass2)
                    int8 = convert(prepared)
                    scripted = torch.jit.script(int8)
                    script = io.BytesIO()
                    torch.jit.save(scripted, script)
                with stage("evaluate"):
                    n_tasks = min(len(test_batches), 2 * cluster.cpus)
                    task_batches = [list(range(i, len(test_batches), n_tasks)) for i in range(n_tasks)]
                    groups = [[test_batches[b] for b in ids] for ids in task_batches]
                    merged = merge_results(runner.evaluate(fp32, script.getvalue(), spec.quantization.backend,
                                                           spec.test, groups, threads, progress))
        with stage("latency"):
            speed = _speed(fp32, int8, scripted, example, calib_ds, calib_idx, spec)
        with stage("write"):
            int8_bytes, fp32_bytes = state_dict_bytes(int8), state_dict_bytes(fp32)
            run.write_bytes("model_int8.pth", int8_bytes)
            run.write_bytes("model_int8.pt", script.getvalue())
            run.write_bytes("job.toml", spec.path.read_bytes())
            counts = pass2 if spec.quantization.mode == "exact" else None
            run.write_parquet("qparams.parquet", observers.qparam_rows(prepared, counts), QPARAMS_SCHEMA)
            columns = PREDICTIONS_SCHEMA.names
            run.write_parquet("predictions.parquet",
                              [dict(zip(columns, row)) for row in zip(*(merged.rows[c] for c in columns))],
                              PREDICTIONS_SCHEMA)
            metrics = accuracy_metrics(merged)
            metrics["fp32"].update(latency_ms=speed["fp32"]["mean_ms"], size_mb=len(fp32_bytes) / 1e6)
            metrics["int8"].update(latency_ms=speed["int8"]["mean_ms"], size_mb=len(int8_bytes) / 1e6,
                                   torchscript_latency_ms=speed["int8_torchscript"]["mean_ms"])
            metrics["speed"] = speed
            run.write_json("metrics.json", metrics)
        manifest = {
            "quantray": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "job": {"name": spec.name, "path": str(spec.path), "base_dir": str(spec.path.resolve().parent)},
            "spec": spec.to_dict(), "versions": _versions(), "backend": spec.quantization.backend,
            "input_shape": list(example.shape), "workers": len(shards), "threads": threads,
            "speed_conditions": speed["conditions"],
            "calibration": {"samples": len(calib_idx), "batches": batches, "shards": shards},
            "evaluation": {"samples": len(test_idx), "batches": test_batches,
                           "tasks": task_batches},
            "qparams_digest": observers.state_digest(prepared),
            "data_digest": _sha256("\n".join(calib_ids + batch_identities(test_ds, spec.test, test_batches)).encode()),
            "fp32_state_sha256": _sha256(fp32_bytes),
            "timings_s": timings, "calibration_stats": calibrate_stats,
            "wall_s": round(time.perf_counter() - started, 4),
        }
        if before_commit is not None:
            before_commit(run, manifest)
        run_dir = run.commit(manifest)
    print_summary(Console(), metrics, manifest, run_dir)
    return run_dir


def _indices(dataset, spec: JobSpec, section: str) -> list[int]:
    d = getattr(spec, section)
    try:
        return sample_indices(len(dataset), d.samples, d.seed)
    except ValueError as e:
        raise SpecError(f"{spec.path}: [{section}] samples = {d.samples}: {e}") from None


def _speed(fp32, int8, scripted, example, calib_ds, calib_idx, spec: JobSpec) -> dict:
    """Batch-1 latency (mean, p50, p90) and throughput for FP32, INT8 eager and the INT8 TorchScript
    artifact, on the driver after Ray's work is done, with the spec's thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(spec.run.threads)
    try:
        set_engine(spec.quantization.backend)
        x = example[:1]
        # The throughput batch repeats calibration samples: speed does not depend on which.
        batch = load_batch(calib_ds, (calib_idx * spec.run.throughput_batch)[:spec.run.throughput_batch])[0]
        warmup, iters = spec.run.latency_warmup, spec.run.latency_iters
        speed = {}
        for name, model in (("fp32", fp32), ("int8", int8), ("int8_torchscript", scripted)):
            speed[name] = measure_latency(model, x, warmup, iters)
            speed[name]["throughput_per_s"] = measure_throughput(model, batch, max(1, warmup // 5), max(1, iters // 10))
        speed["conditions"] = {"where": "driver, after the Ray stages", "threads": spec.run.threads,
                               "latency_batch_size": 1, "warmup": warmup, "iters": iters,
                               "throughput_batch_size": len(batch), "throughput_iters": max(1, iters // 10)}
        return speed
    finally:
        torch.set_num_threads(previous)


def _versions() -> dict:
    import pyarrow
    import ray
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__,
            "quantray": __version__, "machine": platform.machine()}


def _sha256(payload: bytes) -> str:
    import hashlib

    return hashlib.sha256(payload).hexdigest()
