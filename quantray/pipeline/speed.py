"""Speed: batch-1 latency of FP32, INT8 eager and the deployed INT8 model (FX: TorchScript; PT2E:
the compiled program, its compile time apart) with nothing else running on the node, and throughput.

Latency is measured to [run] latency_precision on worker 0 when the pool holds its whole node (the
other workers idle), else in a Ray task holding every CPU of a node. FP32 figures measured on the
same host under the same conditions are asked of the FP32 memo and reused (marked so). Throughput
is measured there at [run] throughput_batch, or taken from the evaluation's own forward timings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..cluster.names import Names
from ..cluster.worker import BatchScores, Worker, WorkerSetup, measure_alone
from ..core.calls import Call
from ..core.metrics import TaskScores
from ..inputs.data import load_batch
from .calibrate import Quantized
from .fp32 import Fp32Memo
from .load import Job

if TYPE_CHECKING:
    from ..cluster.runner import WorkerPool

__all__ = ["measure"]

_NAMES = Names(worker=lambda w: f"speed worker {w}", call=lambda w, key: f"speed: worker {w}")


def measure(ctx, job: Job, quantized: Quantized, pool: WorkerPool, memo: Fp32Memo, scored: list[BatchScores],
            n: int) -> dict:
    """`metrics.json`'s speed: per model mean, p50, p90 (and throughput), with the conditions.
    `scored`: the evaluation's batches (their forward times), over `n` workers."""
    run = job.spec.run
    x = load_batch(job.test_ds, job.test_idx[:1])[0]
    batch = None
    if run.throughput_batch:  # the batch repeats test samples as needed: speed does not depend on which
        batch = load_batch(job.test_ds, (job.test_idx * run.throughput_batch)[:run.throughput_batch])[0]
    args = (x, batch, run.latency_warmup, run.latency_iters, run.latency_precision)
    conditions = (list(x.shape), None if batch is None else list(batch.shape), run.latency_warmup, run.latency_iters,
                  run.latency_precision)
    host = known = None
    node = pool.node_alone(0)
    if node is not None:
        if memo.keeps:  # FP32 figures measured on this host, under these conditions, are reused
            host = pool.run({0: [Call("host", Worker.host_facts)]}, names=_NAMES)["host"]
            known = memo.speed(host, conditions)
        speed = pool.run({0: [Call("speed", Worker.speed, (*args, ("fp32",) if known else ()))]}, names=_NAMES)["speed"]
        speed["conditions"].update(node=node,
                                   where="worker 0 of the job's pool, whose workers hold all CPUs of its node; the others idle")
    else:  # the pool's work is done: its CPUs go to the task
        from ..cluster.runner import on_whole_node  # a Ray pool's case: the driver's pool is alone (node_alone)

        pool.stop()
        setup = WorkerSetup(job.fp32, job.example, job.spec.quantization, run.threads)
        speed, node = on_whole_node(measure_alone, setup, quantized.deployed, quantized.state, args, ())
        speed["conditions"].update(node=node, where=f"one Ray task holding all {speed.pop('cpus')} CPUs of its node, "
                                                    "nothing else scheduled there")
    if known:
        speed["fp32"] = {**known, "reused": True}
    elif host:
        memo.keep_speed(host, conditions, {**speed["fp32"], "measured": ctx.now().isoformat()})
    if batch is None:  # throughput from the evaluation's own forward timings
        seconds = {"fp32": 0.0, quantized.runtime: 0.0}
        samples = dict.fromkeys(seconds, 0)
        for s in scored:
            for model, t in s.seconds.items():
                seconds[model] += t
                samples[model] += s.scores.n if isinstance(s.scores, TaskScores) else s.scores.counts["n"]
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
