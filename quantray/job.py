"""One quantization job, end to end: spec -> model, data -> Ray calibration -> INT8 -> evaluation -> files.

    run_dir = run_job(load_spec("jobs/digits.toml"), workers=2)

Everything that can be wrong with the input is checked before Ray starts and before the run
directory exists; the run directory appears, whole, only when the job succeeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import time
from pathlib import Path

import torch
from rich.console import Console

from . import __version__, observers, runner
from .artifacts import LAYERS_SCHEMA, PREDICTIONS_SCHEMA, QPARAMS_SCHEMA, RunDir, sha256_bytes, software_versions
from .cache import StatsCache, batch_identities, cache_dir
from .calibration import convert, prepare
from .data import assign_shards, build_dataset, load_batch, make_batches, sample_indices
from .errors import QuantrayError, SpecError
from .evaluation import ShardResult, accuracy_metrics, merge_results, state_dict_bytes
from .layers import layer_rows, merge_layers
from .models import build_model
from .report import make_progress, print_summary
from .spec import DataSpec, JobSpec, QuantSpec

__all__ = ["run_job", "draw_indices", "evaluate_stage", "write_results", "write_html", "Evaluation", "Timings"]


def run_job(spec: JobSpec, *, workers: int | None = None, out: str | Path | None = None,
            address: str | None = None, console: Console | None = None, shard_order=None,
            use_cache: bool = True, before_commit=None) -> Path | str:
    """Run `spec`; returns the committed run directory. `shard_order` is for equivalence tests;
    `use_cache=False` (--no-cache) recomputes every statistic instead of reusing stored ones;
    `before_commit(run, manifest)` may add files to the staged run (refresh adds its drift report)."""
    console = console or Console(stderr=True)
    timings, started = Timings(), time.perf_counter()
    stage = timings.stage

    with stage("load"):
        fp32 = build_model(spec.model, spec.path)
        calib_ds = build_dataset(spec.calibration, f"{spec.path}: [calibration]")
        test_ds = build_dataset(spec.test, f"{spec.path}: [test]")
        calib_idx = draw_indices(calib_ds, spec.calibration, f"{spec.path}: [calibration]",
                                 "the calibration split is empty: nothing to calibrate on")
        test_idx = draw_indices(test_ds, spec.test, f"{spec.path}: [test]", "the test split is empty: nothing to evaluate on")
        example = load_batch(calib_ds, calib_idx[:1])[0]
        fp32_bytes = state_dict_bytes(fp32)
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
                int8_state = state_dict_bytes(int8)
                outcome = evaluate_stage(cluster, spec, spec.test, fp32, test_ds, test_idx, example, int8_state,
                                         script.getvalue(), progress, stage, use_cache, console)
        with stage("write"):
            run.write_bytes("model_int8.pth", int8_state)
            run.write_bytes("model_int8.pt", script.getvalue())
            run.write_bytes("job.toml", spec.path.read_bytes())
            counts = pass2 if spec.quantization.mode == "exact" else None
            run.write_parquet("qparams.parquet", observers.qparam_rows(prepared, counts), QPARAMS_SCHEMA)
            metrics = write_results(run, outcome, len(fp32_bytes), len(int8_state), len(script.getvalue()))
        manifest = {
            "quantray": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "job": {"name": spec.name, "path": str(spec.path), "base_dir": str(spec.path.resolve().parent)},
            "spec": spec.to_dict(), "versions": software_versions(), "backend": spec.quantization.backend,
            "input_shape": list(example.shape), "workers": len(shards), "threads": threads,
            "speed_conditions": outcome.speed["conditions"],
            "calibration": {"samples": len(calib_idx), "batches": batches, "shards": shards},
            "evaluation": outcome.plan,
            "qparams_digest": observers.state_digest(prepared),
            "data_digest": sha256_bytes("\n".join(calib_ids + outcome.identities).encode()),
            "fp32_state_sha256": sha256_bytes(fp32_bytes),
            "timings_s": timings, "calibration_stats": calibrate_stats,
            "wall_s": round(time.perf_counter() - started, 4),
        }
        if before_commit is not None:
            before_commit(run, manifest)
        write_html(run, metrics, outcome.layers, manifest)
        run_dir = run.commit(manifest)
    print_summary(Console(), metrics, manifest, run_dir)
    return run_dir


def draw_indices(dataset, d: DataSpec, where: str, empty: str) -> list[int]:
    """The samples `d` draws from `dataset`; a SpecError naming `where` if it asks for too many or
    draws none (`empty`: what to say then)."""
    try:
        indices = sample_indices(len(dataset), d.samples, d.seed)
    except ValueError as e:
        raise SpecError(f"{where} samples = {d.samples}: {e}") from None
    if not indices:
        raise SpecError(f"{where} {empty}")
    return indices


class Timings(dict):
    """Seconds per stage: `with timings.stage("load"): ...` records timings["load"]."""

    @contextlib.contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        yield
        self[name] = round(time.perf_counter() - t, 4)


@dataclasses.dataclass
class Evaluation:
    """What the evaluation stage found: merged predictions, per-layer rows, speed, and the plan
    (batches, tasks) and sample identities for the manifest."""

    merged: ShardResult
    layers: list[dict]
    speed: dict
    plan: dict
    identities: list[str]


def evaluate_stage(cluster, spec: JobSpec, test: DataSpec, fp32, test_ds, test_idx, example, int8_state: bytes,
                   script: bytes, progress, stage, use_cache: bool = True, console=None) -> Evaluation:
    """Accuracy and per-layer SQNR in parallel Ray tasks, then speed in a task that holds a node.

    The FP32 logits of each test batch are stored (with the calibration statistics, keyed by the
    FP32 weights, threads, torch version and the batch's sample identities) and reused by later runs
    and evaluations of the same model on the same images: nightly runs then compute only INT8."""
    run = spec.run
    test_batches = make_batches(test_idx, test.batch_size)
    identities = batch_identities(test_ds, test, test_batches)
    with stage("evaluate"):
        n_tasks = min(len(test_batches), 2 * cluster.cpus)
        task_batches = [list(range(i, len(test_batches), n_tasks)) for i in range(n_tasks)]
        groups = [[test_batches[b] for b in ids] for ids in task_batches]
        cache = keys = None
        if use_cache and run.cache:  # FP32 outputs do not depend on the qconfig: key them with the default one
            cache = StatsCache(run.cache_dir or cache_dir() / "stats", fp32, QuantSpec(), run.threads)
            keys = [[cache.key("fp32-logits", identities[b]) for b in ids] for ids in task_batches]
        stored = [[cache.get(k) for k in group] for group in keys] if cache else None
        layer_batches, covered = [], 0  # whole batches from the first, until layer_samples are covered
        for b in test_batches:
            if covered >= run.layer_samples:
                break
            layer_batches.append(b)
            covered += len(b)
        n_layer = min(len(layer_batches), cluster.cpus)
        layer_groups = [layer_batches[i::n_layer] for i in range(n_layer)]
        shards, layer_results, computed = runner.evaluate(fp32, script, int8_state, spec.quantization, example,
                                                          test, groups, layer_groups, run.threads, progress, stored)
        merged = merge_results(shards)
        reused = sum(t is not None for group in stored for t in group) if stored else 0
        if cache:
            for g, logits in enumerate(computed):
                for k, tensor in logits.items():
                    cache.put(keys[g][k], tensor)
            if reused and console is not None:
                console.print(f"reused stored FP32 outputs: {reused} of {len(test_batches)} test batches (from {cache.root})")
        layers = layer_rows(merge_layers(layer_results))
    with stage("speed"):
        # The throughput batch repeats test samples as needed: speed does not depend on which.
        batch = load_batch(test_ds, (test_idx * run.throughput_batch)[:run.throughput_batch])[0]
        speed = runner.measure_speed(fp32, script, int8_state, spec.quantization, example[:1], batch[:1], batch,
                                     run.threads, run.latency_warmup, run.latency_iters)
    plan = {"samples": len(test_idx), "batches": test_batches, "tasks": task_batches, "fp32_batches_reused": reused,
            "layer_samples": sum(map(len, layer_batches)), "layer_tasks": layer_groups}
    return Evaluation(merged, layers, speed, plan, identities)


def write_results(run: RunDir, outcome: Evaluation, fp32_size: int, int8_size: int, script_size: int) -> dict:
    """predictions.parquet, layers.parquet and metrics.json into the staged run; returns the metrics."""
    columns = PREDICTIONS_SCHEMA.names
    merged, speed = outcome.merged, outcome.speed
    run.write_parquet("predictions.parquet",
                      [dict(zip(columns, row)) for row in zip(*(merged.rows[c] for c in columns))], PREDICTIONS_SCHEMA)
    run.write_parquet("layers.parquet", outcome.layers, LAYERS_SCHEMA)
    metrics = accuracy_metrics(merged)
    metrics["fp32"].update(latency_ms=speed["fp32"]["mean_ms"], size_mb=fp32_size / 1e6)
    metrics["int8"].update(latency_ms=speed["int8"]["mean_ms"], size_mb=int8_size / 1e6,
                           torchscript_latency_ms=speed["int8_torchscript"]["mean_ms"],
                           torchscript_size_mb=script_size / 1e6)
    metrics["speed"] = speed
    sqnr = [r for r in outcome.layers if r["sqnr_db"] is not None and r["quantized"]]
    metrics["layers"] = {"count": sum(r["quantized"] for r in outcome.layers), "samples": outcome.plan["layer_samples"],
                         "worst": sorted(sqnr, key=lambda r: r["sqnr_db"])[:5]}
    run.write_json("metrics.json", metrics)
    return metrics


def write_html(run: RunDir, metrics: dict, layers: list[dict], manifest: dict) -> None:
    from .html import render

    run.write_bytes("report.html", render(metrics, layers, manifest).encode())
