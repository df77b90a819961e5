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
from .evaluation import ShardResult, accuracy_metrics, merge_results, state_dict_bytes
from .layers import layer_rows, merge_layers
from .models import build_model
from .modes import MODES, Plan
from .sites import observed_values, signature
from .spec import DataSpec, JobSpec
from .stats import StatsStore, batch_identities, default_location
from .store import StagedDir, Store

__all__ = ["Context", "Timings", "ray_cluster", "Job", "Calibrated", "Quantized", "Evaluation", "load", "prepare", "calibrate",
           "quantize", "evaluate", "first_batches", "stored_fp32_logits", "load_for_evaluation", "check_stats_location", "write_qparams", "write_results", "write_html", "manifest", "draw_indices"]


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
    stats: object = None    # the merged statistics (modes.*Stats): they load into any config over the same FP32 model


def start_workers(ctx: Context, job: Job, prepared: nn.Module | None = None, *, workers: int | None = None,
                  shard_order=None) -> runner.WorkerPool:
    """The job's pool of workers, started now: they build the FP32 model's prepared copy (when
    `prepared` is given: calibration) and the datasets while the driver goes on. Its size is
    `workers`, else the job's, else the CPUs Ray sees, and no more than there are batches to share."""
    spec = job.spec
    wanted = workers or spec.run.workers or ctx.cluster.cpus
    n_test = -(-len(job.test_idx) // spec.test.batch_size)
    n_calib = -(-len(job.calib_idx) // spec.calibration.batch_size) if prepared is not None else 0
    size = max(1, min(wanted, max(n_test, n_calib)))
    kwargs = {"test": spec.test}
    memory = None
    if prepared is not None:
        if spec.run.memory_gb is not None:
            memory = {"memory_gb": spec.run.memory_gb, "from": "[run] memory_gb"}
        else:
            memory = {"memory_gb": round(ctx.cluster.memory_per_worker(size) / 2 ** 30, 3),
                      "from": "3/4 of the smallest node's Ray memory, over the workers it runs"}
        kwargs.update(calibration=spec.calibration, signature=signature(observed_values(prepared)),
                      memory_bytes=int(memory["memory_gb"] * 2 ** 30))
    pool = runner.WorkerPool(ctx.cluster, (job.fp32, job.example, spec.quantization, spec.run.threads), kwargs, size,
                             max_attempts=spec.run.max_attempts, console=ctx.console, order=shard_order)
    pool.wanted, pool.memory = wanted, memory
    pool.start()
    return pool


def calibrate(ctx: Context, job: Job, prepared: nn.Module, pool: runner.WorkerPool, *, use_cache: bool = True) -> Calibrated:
    """Calibrate on the pool (one shard per worker) with the job's merge mode, reusing stored statistics."""
    spec = job.spec
    batches = make_batches(job.calib_idx, spec.calibration.batch_size)
    shards = assign_shards(len(batches), pool.wanted)
    if len(shards) < pool.wanted:
        ctx.console.print(f"[yellow]{len(batches)} calibration batches: using {len(shards)} workers, not {pool.wanted}[/]")
    plan = Plan(batches, shards, observed_values(prepared), batch_identities(job.calib_ds, spec.calibration, batches))
    store = _stats_store(job, use_cache)
    result = run_protocol(MODES[spec.quantization.mode], pool, plan, store=store, progress=ctx.progress,
                          clock=ctx.clock)
    reused = {k: v for k, v in result.info["cached"].items() if v[0]}
    if reused:
        ctx.console.print("reused stored statistics: " + ", ".join(f"{k} {hit} of {total}" for k, (hit, total) in
                                                                    reused.items()) + f" (from {store.location})")
    _warn_unwritable(ctx, store)
    counts = result.stats.load(prepared)
    return Calibrated(prepared, counts, plan, result.info, result.stats)


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
    data_read: dict | None = None  # Parquet shards: what each worker read (`_data_read`)


def evaluate(ctx: Context, job: Job, quantized: Quantized, pool: runner.WorkerPool, use_cache: bool = True) -> Evaluation:
    """Accuracy and per-layer SQNR on the pool's workers, then speed on one of them alone on its node.

    The FP32 logits of each test batch are stored (with the calibration statistics, keyed by the
    FP32 weights, threads, torch version and the batch's sample identities) and reused by later runs
    and evaluations of the same model on the same images: nightly runs then compute only INT8.
    FP32 speed figures are stored too, per host, and reused by reruns there (marked so)."""
    spec = job.spec
    run, test = spec.run, spec.test
    test_batches = make_batches(job.test_idx, test.batch_size)
    identities = batch_identities(job.test_ds, test, test_batches)
    with ctx.stage("evaluate"):
        store, keys, stored = stored_fp32_logits(job, identities, use_cache)
        n = min(pool.size, len(test_batches))
        layer_batches = first_batches(test_batches, run.layer_samples)  # the first k test batches
        layer_groups = [layer_batches[w::n] for w in range(n)]  # as handed out below: batch b to worker b % n
        load = ("int8", "load_int8", (sha256_bytes(quantized.state), pool.share(quantized.script),
                                      pool.share(quantized.state)))
        calls = {w: [load] for w in range(n)}
        for b, batch in enumerate(test_batches):  # round-robin: every worker gets a share of every region
            upcoming = test_batches[b + n] if b + n < len(test_batches) else None  # the worker's next batch
            calls[b % n].append((("batch", b), "evaluate", (batch, stored[b], b < len(layer_batches), upcoming)))
        weight = {("batch", b): len(batch) for b, batch in enumerate(test_batches)}
        bar = ctx.progress.add_task("evaluate", total=sum(weight.values())) if ctx.progress is not None else None

        def advance(key, method, delta):
            if bar is not None and key in weight:
                ctx.progress.advance(bar, delta * weight[key])

        results = pool.run(calls, advance, stage="evaluate",
                           describe=lambda key: None if key == "int8" else f"test batch {key[1]} of {len(test_batches)}")
        scored = [results[("batch", b)] for b in range(len(test_batches))]
        merged = merge_results(r for r, _, _, _ in scored)
        reused = sum(t is not None for t in stored)
        if store:
            for b, (_, logits, _, _) in enumerate(scored):
                if logits is not None:
                    store.put(keys[b], logits)
            if reused:
                ctx.console.print(f"reused stored FP32 outputs: {reused} of {len(test_batches)} test batches "
                                  f"(from {store.location})")
        layers = layer_rows(merge_layers(layer for _, _, _, layer in scored if layer is not None))
        data_read = _data_read(job, pool)
    with ctx.stage("speed"):
        speed = _speed(ctx, job, quantized, pool, store, scored, n)
        _warn_unwritable(ctx, store)
    plan = {"samples": len(job.test_idx), "batches": test_batches, "workers": {w: [b for b in range(len(test_batches))
                                                                                   if b % n == w] for w in range(n)},
            "fp32_batches_reused": reused, "layer_samples": sum(map(len, layer_batches)), "layer_workers": layer_groups}
    return Evaluation(merged, layers, speed, plan, identities, data_read)


def _data_read(job: Job, pool: runner.WorkerPool) -> dict | None:
    """Bytes of Parquet shards each worker (and the driver) read, against the shards' total: with
    sharded data a worker reads only the row groups of its own batches."""
    datasets = {"calibration": job.calib_ds, "test": job.test_ds}
    sharded = {split: ds for split, ds in datasets.items() if hasattr(ds, "groups_read")}
    if not sharded:
        return None
    workers = pool.run({w: [(w, "data_read", ())] for w in pool.actors}, stage="evaluate")
    return {"workers": {str(w): workers[w] for w in sorted(workers)},
            "driver": {split: {"bytes": ds.bytes_read, "row_groups": ds.groups_read} for split, ds in sharded.items()},
            "shards": {split: {"bytes": sum(s["bytes"] for s in ds.manifest["shards"]), "rows": len(ds),
                               "location": ds.location} for split, ds in sharded.items()}}


def stored_fp32_logits(job: Job, identities: list[str], use_cache: bool = True):
    """(store, one key per test batch, the FP32 logits stored under each or None); (None, None, [None, ...])
    without a store. Keyed by the FP32 weights, threads, torch version and the batch's sample identities."""
    store = _stats_store(job, use_cache)
    if store is None:
        return None, None, [None] * len(identities)
    keys = [store.key("fp32-logits", identity) for identity in identities]
    return store, keys, [store.get(k) for k in keys]


def _speed(ctx: Context, job: Job, quantized: Quantized, pool: runner.WorkerPool, store, scored: list, n: int) -> dict:
    """Latency (to [run] latency_precision) of FP32, INT8 and the TorchScript artifact on worker 0
    when the pool holds its whole node (the other workers idle), else in a task holding a node.
    Throughput: measured there at [run] throughput_batch, or taken from the evaluation's timings."""
    run = job.spec.run
    x = load_batch(job.test_ds, job.test_idx[:1])[0]
    batch = None
    if run.throughput_batch:  # the batch repeats test samples as needed: speed does not depend on which
        batch = load_batch(job.test_ds, (job.test_idx * run.throughput_batch)[:run.throughput_batch])[0]
    args = (x, batch, run.latency_warmup, run.latency_iters, run.latency_precision)
    host_key = known = None
    node = pool.node_alone(0)
    if node is not None:
        if store:  # FP32 figures measured on this host, under these conditions, are reused
            host = pool.run({0: [("host", "host_facts", ())]}, stage="speed")["host"]
            host_key = store.key("fp32-speed", host, list(x.shape), None if batch is None else list(batch.shape),
                                 run.latency_warmup, run.latency_iters, run.latency_precision)
            known = store.get(host_key)
        speed = pool.run({0: [("speed", "speed", (*args, ("fp32",) if known else ()))]}, stage="speed")["speed"]
        speed["conditions"].update(node=node,
                                   where="worker 0 of the job's pool, whose workers hold all CPUs of its node; the others idle")
    else:  # the pool's work is done: its CPUs go to the task
        pool.stop()
        speed, node = runner.on_whole_node(_speed_task, job.fp32, job.example, job.spec.quantization, run.threads,
                                           quantized.script, quantized.state, args, ())
        speed["conditions"].update(node=node, where=f"one Ray task holding all {speed.pop('cpus')} CPUs of its node, "
                                                    "nothing else scheduled there")
    if known:
        speed["fp32"] = {**known, "reused": True}
    elif host_key:
        store.put(host_key, {**speed["fp32"], "measured": ctx.now().isoformat()})
    if batch is None:  # throughput from the evaluation's own forward timings
        seconds = {"fp32": 0.0, "int8_torchscript": 0.0}
        samples = dict.fromkeys(seconds, 0)
        for (result, _, timed, _) in scored:
            for model, s in timed.items():
                seconds[model] += s
                samples[model] += result.counts["n"]
        for model in seconds:
            if seconds[model] > 0:
                speed[model]["throughput_per_s"] = samples[model] / seconds[model]
        speed["conditions"]["throughput"] = (
            f"from the evaluation: each test batch's forward time (batch size {job.spec.test.batch_size}) on "
            f"{n} workers running at once, {run.threads} thread(s) each; per worker")
        speed["conditions"]["throughput_batch_size"] = job.spec.test.batch_size
    else:
        speed["conditions"]["throughput"] = f"measured on the node at batch {run.throughput_batch}, after latency"
    return speed


def _speed_task(fp32, example, quant, threads, script, state, args, skip, cpus):
    from .worker import Worker

    worker = Worker(fp32, example, quant, threads)
    worker.load_int8("", script, state)
    return {**worker.speed(*args, skip), "cpus": cpus}


def first_batches(batches: list[list[int]], samples: int) -> list[list[int]]:
    """Whole batches from the first, until `samples` are covered (per-layer SQNR's share)."""
    out, covered = [], 0
    for batch in batches:
        if covered >= samples:
            break
        out.append(batch)
        covered += len(batch)
    return out


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
             calibrated: Calibrated | None = None, evaluates: dict | None = None, started: float,
             pool: runner.WorkerPool | None = None) -> dict:
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
        out.update(evaluates=evaluates, workers=len(evaluation.plan["workers"]),
                   data_digest=sha256_bytes("\n".join(evaluation.identities).encode()))
    if evaluation.data_read is not None:
        out["data_read"] = evaluation.data_read
    if pool is not None:  # the fixed cost of the job's workers, and the memory each may keep
        out["pool"] = {"workers": pool.size, "cpus_each": pool.num_cpus, "memory": pool.memory,
                       "ready_s": round(pool.ready_at - pool.started_at, 4) if pool.ready_at else None,
                       "startup_s": {str(w): v for w, v in sorted(pool.setup_s.items())},
                       "nodes": {str(w): v for w, v in sorted(pool.nodes.items())}}
    out.update(timings_s=ctx.timings, wall_s=round(ctx.clock() - started, 4))
    return out


class ray_cluster:
    """ctx.cluster for the duration of a block; its start-up is timed as the "ray_start" stage."""

    def __init__(self, ctx: Context, address: str | None):
        self.ctx, self.cluster = ctx, runner.Cluster(address)

    def __enter__(self):
        with self.ctx.stage("ray_start"):  # timed apart: a fixed cost, not calibration
            self.ctx.cluster = self.cluster.__enter__()
        return self.ctx.cluster

    def __exit__(self, *exc):
        self.ctx.cluster = None
        return self.cluster.__exit__(*exc)

