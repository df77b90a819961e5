"""The evaluation stage: FP32 and INT8 on the pool's workers, test batches handed out round-robin,
per-layer SQNR and the engine check on the first batches, then speed (`speed.measure`).

    evaluation = evaluate(ctx, job, quantized, pool)   # merged scores, layer rows, speed, plan

The FP32 logits of each test batch are asked of the FP32 memo first and kept there: nightly runs
and evaluations of an unchanged model on the same images compute only the INT8 side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..cluster.names import Names
from ..cluster.worker import Worker
from ..core.calls import Call
from ..core.engine import engine_rows, engine_verdict, merge_engine
from ..core.evaluation import ShardResult
from ..core.metrics import TaskScores
from ..core.layers import layer_rows, merge_layers
from ..digest import sha256_bytes
from ..inputs.data import batch_identities, make_batches
from . import speed
from .calibrate import Quantized
from .fp32 import Fp32Memo
from .load import Job, open_stats, warn_unwritable

if TYPE_CHECKING:
    from ..cluster.runner import WorkerPool

__all__ = ["Evaluation", "evaluate", "first_batches"]


@dataclass
class Evaluation:
    """What the evaluation stage found: merged predictions, per-layer rows, speed, and the plan
    (batches, workers) and sample identities for the manifest."""

    merged: ShardResult | TaskScores  # merged in batch order (`Scorer.merge`)
    layers: list[dict]
    speed: dict
    plan: dict
    identities: list[str]
    data_read: dict | None = None  # Parquet shards: what each worker read (`_data_read`)
    engine: dict | None = None     # the engine check's verdict (`engine.engine_verdict`)


def evaluate(ctx, job: Job, quantized: Quantized, pool: WorkerPool, use_cache: bool = True) -> Evaluation:
    """Accuracy and per-layer SQNR on the pool's workers, then speed on one of them alone on its node."""
    spec = job.spec
    run, test = spec.run, spec.test
    test_batches = make_batches(job.test_idx, test.batch_size)
    identities = batch_identities(job.test_ds, test, test_batches)
    memo = Fp32Memo(open_stats(job, use_cache))
    with ctx.stage("evaluate"):
        stored = memo.logits(identities)
        n = min(pool.size, len(test_batches))
        layer_batches = first_batches(test_batches, run.layer_samples)  # the first k test batches
        layer_groups = [layer_batches[w::n] for w in range(n)]  # as handed out below: batch b to worker b % n
        fx = quantized.flow == "fx"  # per-layer SQNR (Numeric Suite) and the engine check read FX's INT8 modules
        if not fx:
            layer_batches, layer_groups = [], [[] for _ in range(n)]
        load = (sha256_bytes(quantized.deployed), pool.share(quantized.deployed), pool.share(quantized.state),
                quantized.model if pool.in_process else None)
        calls = {w: [Call("int8", Worker.load_int8, (*load, bool(layer_groups[w])))] for w in range(n)}
        for b, batch in enumerate(test_batches):  # round-robin: every worker gets a share of every region
            upcoming = test_batches[b + n] if b + n < len(test_batches) else None  # the worker's next batch
            calls[b % n].append(Call(("batch", b), Worker.evaluate, (batch, stored[b], b < len(layer_batches), upcoming,
                                                                     fx and b == 0)))  # the engine check: batch 0
        weight = {("batch", b): len(batch) for b, batch in enumerate(test_batches)}
        bar = ctx.progress.add_task("evaluate", total=sum(weight.values())) if ctx.progress is not None else None

        def advance(call: Call, delta: int):
            if bar is not None and call.key in weight:
                ctx.progress.advance(bar, delta * weight[call.key])

        names = Names(worker=lambda w: f"evaluation worker {w}",
                      call=lambda w, key: (f"evaluate: test batch {key[1]} of {len(test_batches)}"
                                           if isinstance(key, tuple) else f"evaluate: worker {w}"))
        results = pool.run(calls, advance, names=names)
        scored = [results[("batch", b)] for b in range(len(test_batches))]
        merged = job.scorer.merge(s.scores for s in scored)
        for identity, s in zip(identities, scored):
            if s.fp32_logits is not None:
                memo.keep_logits(identity, s.fp32_logits)
        reused = sum(t is not None for t in stored)
        if reused:
            ctx.console.print(f"reused stored FP32 outputs: {reused} of {len(test_batches)} test batches "
                              f"(from {memo.store.location})")
        layers = layer_rows(merge_layers(s.layers for s in scored if s.layers is not None))
        engine = None
        if fx:
            merged_engine = merge_engine(s.engine for s in scored)
            engine = engine_verdict(merged_engine, spec.quantization.backend)
            _join_engine(layers, engine_rows(merged_engine))
            if engine["ok"] is False:
                ctx.console.print(f"[bold red]{engine['message']}[/]")
        data_read = _data_read(job, pool)
    with ctx.stage("speed"):
        figures = speed.measure(ctx, job, quantized, pool, memo, scored, n)
        warn_unwritable(ctx.console, memo.store)
    plan = {"samples": len(job.test_idx), "batches": test_batches, "workers": {w: [b for b in range(len(test_batches))
                                                                                   if b % n == w] for w in range(n)},
            "fp32_batches_reused": reused, "layer_samples": sum(map(len, layer_batches)), "layer_workers": layer_groups}
    if fx:
        plan["engine_samples"] = engine["samples"]
        plan["engine_check_s"] = round(sum(s.engine_s for s in scored), 4)  # on the workers
    else:
        plan["compile_s"] = round(sum(s.compile_s for s in scored), 4)  # the INT8 runtime, on every worker
        plan["not_measured"] = {"layers": _NO_LAYERS, "engine_check": _NO_ENGINE}
    return Evaluation(merged, layers, figures, plan, identities, data_read, engine)


_NO_LAYERS = ("per-layer SQNR is FX-only: Numeric Suite pairs FX's INT8 modules with their FP32 ones; a PT2E "
              "program has no such modules (torchao's numeric debugger is the PT2E way, not wired in yet)")
_NO_ENGINE = ("the engine check compares each FX INT8 node with its reference; the compiled PT2E program runs "
              "fused kernels with no per-node outputs")


def _join_engine(layers: list[dict], checked: list[dict]) -> None:
    """Each per-layer row gains its node's engine-vs-reference SQNR (None where not checked or equal)
    and whether the check called it a fault."""
    by_node = {r["layer"]: r for r in checked}
    by_module = {r["module"]: r for r in checked if r["module"]}
    for row in layers:
        found = by_module.get(row["module"]) if row["module"] else None
        found = found or by_node.get(row["layer"])
        row["engine_sqnr_db"] = found["sqnr_db"] if found else None
        row["engine_fault"] = found["fault"] if found else None


def _data_read(job: Job, pool: WorkerPool) -> dict | None:
    """Bytes of Parquet shards each worker (and the driver) read, against the shards' total: with
    sharded data a worker reads only the row groups of its own batches."""
    datasets = {"calibration": job.calib_ds, "test": job.test_ds}
    sharded = {split: ds for split, ds in datasets.items() if hasattr(ds, "groups_read")}
    if not sharded:
        return None
    workers = pool.run({w: [Call(w, Worker.data_read)] for w in pool.actors},
                       names=Names(lambda w: f"evaluation worker {w}", lambda w, key: f"evaluate: worker {w}"))
    return {"workers": {str(w): workers[w] for w in sorted(workers)},
            "driver": {split: {"bytes": ds.bytes_read, "row_groups": ds.groups_read} for split, ds in sharded.items()},
            "shards": {split: {"bytes": sum(s["bytes"] for s in ds.manifest["shards"]), "rows": len(ds),
                               "location": ds.location} for split, ds in sharded.items()}}


def first_batches(batches: list[list[int]], samples: int) -> list[list[int]]:
    """Whole batches from the first, until `samples` are covered (per-layer SQNR's share)."""
    out, covered = [], 0
    for batch in batches:
        if covered >= samples:
            break
        out.append(batch)
        covered += len(batch)
    return out
