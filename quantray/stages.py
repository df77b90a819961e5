"""The stages of a run, typed, sharing one context (console, clock, timings, cluster, progress).

    ctx = Context(console)
    job = load(spec)                                  # FP32 model, datasets, samples, example input
    prepared = prepare(job)                           # prepare_fx: spec errors surface before Ray starts
    calibrated = calibrate(ctx, job, prepared, ...)   # merged statistics loaded into `prepared`
    quantized = quantize(calibrated)                  # INT8 state_dict, TorchScript, qparams rows
    evaluation = evaluate(ctx, job, quantized)        # accuracy, per-layer SQNR, speed
    write_results(run, evaluation, ...); manifest(...)

Data flows one way: each stage takes the previous stages' results and returns a small dataclass.
`api.run` and `api.evaluate` put them together; only `runner` (through ctx.cluster) touches Ray.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from rich.console import Console
from torch import nn

from . import __version__, flow, merge, runner
from .artifacts import LAYERS_SCHEMA, PREDICTIONS_SCHEMA, QPARAMS_SCHEMA, software_versions
from .calibration import calibrate as run_protocol
from .data import assign_shards, build_dataset, load_batch, make_batches, sample_indices
from .digest import sha256_bytes
from .errors import QuantrayError, SpecError
from .evaluation import ShardResult, accuracy_metrics, evaluate_batches, measure_models, merge_results, state_dict_bytes
from .layers import layer_rows, layer_task, merge_layers
from .models import build_model
from .modes import MODES, Plan
from .sites import observed_values, signature
from .spec import DataSpec, JobSpec
from .stats import StatsStore, batch_identities, default_location
from .store import StagedDir, Store

__all__ = ["Context", "Timings", "Job", "Calibrated", "Quantized", "Evaluation", "load", "prepare", "calibrate",
           "quantize", "evaluate", "load_for_evaluation", "check_stats_location", "write_qparams", "write_results", "write_html", "manifest", "draw_indices"]


class Timings(dict):
    """Seconds per stage, in the order the stages ran."""


@dataclass
class Context:
    """What every stage shares: where progress goes, the clocks, the timings, the cluster once started."""

    console: Console = field(default_factory=lambda: Console(stderr=True))
    clock: Callable[[], float] = time.perf_counter
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc)
    timings: Timings = field(default_factory=Timings)
    cluster: runner.Cluster | None = None
    progress: object = None

    @contextlib.contextmanager
    def stage(self, name: str):
        """`with ctx.stage("load"): ...` records ctx.timings["load"] in seconds."""
        t = self.clock()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + self.clock() - t, 4)


@dataclass
class Job:
    """A job made concrete: its spec, the FP32 model (and its saved bytes), both datasets, the
    drawn samples and the example input. `calibration` parts are None when only evaluating."""

    spec: JobSpec
    fp32: nn.Module
    fp32_bytes: bytes
    test_ds: object
    test_idx: list[int]
    example: torch.Tensor
    calib_ds: object = None
    calib_idx: list[int] | None = None
    stats: StatsStore | None = field(default=None, repr=False)  # opened once, by the first stage that needs it

    @property
    def where(self) -> str:
        return str(self.spec.path)


def load(spec: JobSpec) -> Job:
    """Build the FP32 model and both datasets and draw the samples: every user error here is a SpecError."""
    fp32 = build_model(spec.model, spec.path)
    calib_ds = build_dataset(spec.calibration, f"{spec.path}: [calibration]")
    test_ds = build_dataset(spec.test, f"{spec.path}: [test]")
    calib_idx = draw_indices(calib_ds, spec.calibration, f"{spec.path}: [calibration]",
                             "the calibration split is empty: nothing to calibrate on")
    test_idx = draw_indices(test_ds, spec.test, f"{spec.path}: [test]", "the test split is empty: nothing to evaluate on")
    example = load_batch(calib_ds, calib_idx[:1])[0]
    return Job(spec, fp32, state_dict_bytes(fp32), test_ds, test_idx, example, calib_ds, calib_idx)


def load_for_evaluation(spec: JobSpec, manifest: dict, where: str) -> Job:
    """The FP32 model a run quantized (checked against its manifest) and the test data to evaluate on."""
    fp32 = build_model(spec.model, spec.path)
    fp32_bytes = state_dict_bytes(fp32)
    if sha256_bytes(fp32_bytes) != manifest["fp32_state_sha256"]:
        raise SpecError(f"{spec.path}: [model] the FP32 model is not the one this run quantized (its state_dict's "
                        "sha256 differs from the run's manifest); restore its checkpoint or run the job again")
    test_ds = build_dataset(spec.test, where)
    test_idx = draw_indices(test_ds, spec.test, where, "the test split is empty: nothing to evaluate on")
    return Job(spec, fp32, fp32_bytes, test_ds, test_idx, torch.zeros(manifest["input_shape"]))


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


def prepare(job: Job) -> nn.Module:
    """prepare_fx with the job's qconfig; a model prepare_fx cannot take is the user's to fix (exit 2)."""
    try:
        return flow.prepare(job.fp32, job.spec.quantization, job.example)
    except SpecError as e:
        raise SpecError(f"{job.where}: {e}") from None
    except QuantrayError:
        raise
    except Exception as e:  # most often: the model is not symbolically traceable
        raise SpecError(f"{job.where}: [model] prepare_fx failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None


@dataclass
class Calibrated:
    """The driver's prepared model with the merged statistics loaded, and how they were gathered."""

    prepared: nn.Module
    counts: dict[str, int]  # values each histogram observer counted (exact mode)
    plan: Plan
    info: dict


def calibrate(ctx: Context, job: Job, prepared: nn.Module, *, workers: int | None = None, use_cache: bool = True,
              shard_order=None) -> Calibrated:
    """Calibrate on one Ray actor per shard with the job's merge mode, reusing stored statistics."""
    spec = job.spec
    batches = make_batches(job.calib_idx, spec.calibration.batch_size)
    wanted = workers or spec.run.workers or ctx.cluster.cpus
    shards = assign_shards(len(batches), wanted)
    if len(shards) < wanted:
        ctx.console.print(f"[yellow]{len(batches)} calibration batches: using {len(shards)} workers, not {wanted}[/]")
    observed = observed_values(prepared)
    plan = Plan(batches, shards, observed, batch_identities(job.calib_ds, spec.calibration, batches))
    store = _stats_store(job, use_cache)
    args = (job.fp32, job.example, spec.quantization, spec.calibration, spec.run.threads, signature(observed))
    with runner.ActorExecutor(ctx.cluster, args, len(shards), max_attempts=spec.run.max_attempts,
                              console=ctx.console, order=shard_order) as executor:
        result = run_protocol(MODES[spec.quantization.mode], executor, plan, store=store, progress=ctx.progress,
                              clock=ctx.clock)
    reused = {k: v for k, v in result.info["cached"].items() if v[0]}
    if reused:
        ctx.console.print("reused stored statistics: " + ", ".join(f"{k} {hit} of {total}" for k, (hit, total) in
                                                                    reused.items()) + f" (from {store.location})")
    _warn_unwritable(ctx, store)
    counts = result.stats.load(prepared)
    return Calibrated(prepared, counts, plan, result.info)


def check_stats_location(spec: JobSpec, use_cache: bool) -> None:
    """A cache_dir that cannot be opened is the job file's error, found before any work is done."""
    if use_cache and spec.run.cache:
        try:
            Store(spec.run.cache_dir or default_location(), "[run] cache_dir")
        except SpecError as e:
            raise SpecError(f"{spec.path}: {e}") from None


def _warn_unwritable(ctx: Context, store: StatsStore | None) -> None:
    if store is not None and store.unwritable:
        ctx.console.print(f"[yellow]could not store statistics in {store.location} ({store.unwritable}); "
                          "the run goes on without storing them[/]")


def _stats_store(job: Job, use_cache: bool) -> StatsStore | None:
    run = job.spec.run
    if not (use_cache and run.cache):
        return None
    if job.stats is None:  # its key base digests the FP32 weights: once per job
        job.stats = StatsStore(run.cache_dir or default_location(), job.fp32, run.threads)
    return job.stats


@dataclass
class Quantized:
    """The INT8 model as files (state_dict, TorchScript), its qparams rows and their digest."""

    state: bytes
    script: bytes
    rows: list[dict] = field(default_factory=list)
    digest: str = ""


def quantize(calibrated: Calibrated) -> Quantized:
    int8 = flow.convert(calibrated.prepared)
    script = io.BytesIO()
    torch.jit.save(torch.jit.script(int8), script)
    return Quantized(state_dict_bytes(int8), script.getvalue(), merge.qparam_rows(calibrated.prepared, calibrated.counts),
                     merge.state_digest(calibrated.prepared))


@dataclass
class Evaluation:
    """What the evaluation stage found: merged predictions, per-layer rows, speed, and the plan
    (batches, tasks) and sample identities for the manifest."""

    merged: ShardResult
    layers: list[dict]
    speed: dict
    plan: dict
    identities: list[str]


def evaluate(ctx: Context, job: Job, quantized: Quantized, use_cache: bool = True) -> Evaluation:
    """Accuracy and per-layer SQNR in parallel Ray tasks, then speed in a task that holds a node.

    The FP32 logits of each test batch are stored (with the calibration statistics, keyed by the
    FP32 weights, threads, torch version and the batch's sample identities) and reused by later runs
    and evaluations of the same model on the same images: nightly runs then compute only INT8."""
    spec, cluster = job.spec, ctx.cluster
    run, test = spec.run, spec.test
    test_batches = make_batches(job.test_idx, test.batch_size)
    identities = batch_identities(job.test_ds, test, test_batches)
    with ctx.stage("evaluate"):
        n_tasks = min(len(test_batches), 2 * cluster.cpus)
        task_batches = [list(range(i, len(test_batches), n_tasks)) for i in range(n_tasks)]
        store = _stats_store(job, use_cache)
        keys = [[store.key("fp32-logits", identities[b]) for b in ids] for ids in task_batches] if store else None
        stored = [[store.get(k) for k in group] for group in keys] if store else [[None] * len(ids) for ids in task_batches]
        layer_batches = _first_batches(test_batches, run.layer_samples)
        n_layer = min(len(layer_batches), cluster.cpus)
        layer_groups = [layer_batches[i::n_layer] for i in range(n_layer)]
        fp32, script, state = cluster.put(job.fp32), cluster.put(quantized.script), cluster.put(quantized.state)
        arg_lists = [(fp32, script, spec.quantization.backend, test, [test_batches[b] for b in ids], cluster.put(known),
                      run.threads) for ids, known in zip(task_batches, stored)]
        arg_lists += [(fp32, state, spec.quantization, job.example, test, group, run.threads) for group in layer_groups]
        describe = [f"test batches {_ids(ids)} of {len(test_batches)}" for ids in task_batches]
        describe += [f"per-layer SQNR on the test batches from samples {_ids([g[0] for g in group])}"
                     for group in layer_groups]
        weights = [sum(len(test_batches[b]) for b in ids) for ids in task_batches] + [sum(map(len, g)) for g in layer_groups]
        results = runner.map_tasks(_evaluation_task, [(i < len(task_batches), *a) for i, a in enumerate(arg_lists)],
                                   stage="evaluate", describe=describe, progress=ctx.progress, weights=weights)
        shards = results[:len(task_batches)]
        merged = merge_results(s for s, _ in shards)
        reused = sum(t is not None for group in stored for t in group)
        if store:
            for g, (_, computed) in enumerate(shards):
                for k, tensor in computed.items():
                    store.put(keys[g][k], tensor)
            if reused:
                ctx.console.print(f"reused stored FP32 outputs: {reused} of {len(test_batches)} test batches "
                                  f"(from {store.location})")
            _warn_unwritable(ctx, store)
        layers = layer_rows(merge_layers(results[len(task_batches):]))
    with ctx.stage("speed"):
        # The throughput batch repeats test samples as needed: speed does not depend on which.
        batch = load_batch(job.test_ds, (job.test_idx * run.throughput_batch)[:run.throughput_batch])[0]
        speed, node = runner.on_whole_node(measure_models, job.fp32, quantized.script, quantized.state,
                                           spec.quantization, job.example[:1], batch[:1], batch, run.threads,
                                           run.latency_warmup, run.latency_iters)
        speed["conditions"]["node"] = node
    plan = {"samples": len(job.test_idx), "batches": test_batches, "tasks": task_batches, "fp32_batches_reused": reused,
            "layer_samples": sum(map(len, layer_batches)), "layer_tasks": layer_groups}
    return Evaluation(merged, layers, speed, plan, identities)


def _first_batches(batches: list[list[int]], samples: int) -> list[list[int]]:
    """Whole batches from the first, until `samples` are covered (per-layer SQNR's share)."""
    out, covered = [], 0
    for batch in batches:
        if covered >= samples:
            break
        out.append(batch)
        covered += len(batch)
    return out


def _evaluation_task(accuracy: bool, *args):
    """One task body for both kinds of evaluation task, so that one map_tasks call runs them together.
    (Arguments stay top-level: Ray resolves object references only there.)"""
    return evaluate_batches(*args) if accuracy else layer_task(*args)


def _ids(ids: list[int], most: int = 6) -> str:
    return ", ".join(map(str, ids[:most])) + (f" and {len(ids) - most} more" if len(ids) > most else "")


def write_results(run: StagedDir, outcome: Evaluation, fp32_size: int, int8_size: int, script_size: int) -> dict:
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


def write_qparams(run: StagedDir, quantized: Quantized) -> None:
    run.write_bytes("model_int8.pth", quantized.state)
    run.write_bytes("model_int8.pt", quantized.script)
    run.write_parquet("qparams.parquet", quantized.rows, QPARAMS_SCHEMA)


def write_html(run: StagedDir, metrics: dict, layers: list[dict], manifest: dict) -> None:
    from .html import render

    run.write_bytes("report.html", render(metrics, layers, manifest).encode())


def manifest(ctx: Context, job: Job, evaluation: Evaluation, *, qparams_digest: str, input_shape: list[int],
             calibrated: Calibrated | None = None, evaluates: dict | None = None, started: float) -> dict:
    """manifest.json for a run (`calibrated`) or an evaluation of one (`evaluates`)."""
    spec = job.spec
    out = {"quantray": __version__, "created": ctx.now().isoformat(),
           "job": {"name": spec.name, "path": str(spec.path), "base_dir": str(spec.path.resolve().parent)},
           "spec": spec.to_dict(), "versions": software_versions(), "backend": spec.quantization.backend,
           "input_shape": input_shape, "threads": spec.run.threads,
           "speed_conditions": evaluation.speed["conditions"], "evaluation": evaluation.plan,
           "qparams_digest": qparams_digest, "fp32_state_sha256": sha256_bytes(job.fp32_bytes)}
    if spec.model.checkpoint is None:  # the model's weights are what it was built with, under this seed
        out["model_init_seed"] = spec.model.seed
    if calibrated is not None:
        plan = calibrated.plan
        out.update(workers=len(plan.shards),
                   calibration={"samples": len(job.calib_idx), "batches": plan.batches, "shards": plan.shards},
                   data_digest=sha256_bytes("\n".join(plan.identities + evaluation.identities).encode()),
                   calibration_stats=calibrated.info)
    if evaluates is not None:
        out.update(evaluates=evaluates, workers=len(evaluation.plan["tasks"]),
                   data_digest=sha256_bytes("\n".join(evaluation.identities).encode()))
    out.update(timings_s=ctx.timings, wall_s=round(ctx.clock() - started, 4))
    return out

