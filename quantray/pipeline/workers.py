"""The job's pool of workers: how many, what each is built from, the memory each may keep, and
whether they compute alike (one kind of CPU).

    pool = start_workers(ctx, job, prepared)   # calibration and evaluation (prepared: a calibrating pool)
    pool = start_workers(ctx, job)             # evaluation only
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

from torch import nn

from ..cluster.worker import WorkerSetup
from ..core.sites import observed_values, signature

if TYPE_CHECKING:
    from ..cluster.runner import WorkerPool

__all__ = ["start_workers", "cpu_kinds", "mixed_cpus"]


def start_workers(ctx, job, prepared: nn.Module | None = None, *, workers: int | None = None,
                  shard_order=None, decoded: str | None = None) -> WorkerPool:
    """The job's pool, started now: the workers build the FP32 model's prepared copy (when
    `prepared` is given: calibration) and the datasets while the driver goes on. Its size is
    `workers`, else the job's, else the cluster's CPUs, and no more than there are batches to share
    (in the driver's process: as many threads, `cluster.driver`).
    `decoded`: where the workers keep decoded images (`inputs.decoded`), None for nowhere."""
    spec = job.spec
    wanted = workers or spec.run.workers or ctx.cluster.cpus
    n_test = -(-len(job.test_idx) // spec.test.batch_size)
    n_calib = -(-len(job.calib_idx) // spec.calibration.batch_size) if prepared is not None else 0
    size = max(1, min(wanted, max(n_test, n_calib)))
    setup = WorkerSetup(job.fp32, job.example, spec.quantization, spec.run.threads, test=spec.test, decoded=decoded)
    memory = None
    if prepared is not None:
        if spec.run.memory_gb is not None:
            memory = {"memory_gb": spec.run.memory_gb, "from": "[run] memory_gb"}
        else:
            memory = {"memory_gb": round(ctx.cluster.memory_per_worker(size) / 2 ** 30, 3),
                      "from": ctx.cluster.memory_rule}
        setup = dataclasses.replace(setup, calibration=spec.calibration, signature=signature(observed_values(prepared)),
                                    memory_bytes=int(memory["memory_gb"] * 2 ** 30))
    pool = ctx.cluster.pool(setup, size, wanted=wanted, memory=memory, max_attempts=spec.run.max_attempts,
                            console=ctx.console, order=shard_order)
    pool.start()
    return pool


def cpu_kinds(pool: WorkerPool) -> list[dict]:
    """The kinds of CPU the pool's workers ran on, each once, in worker order."""
    seen = {}
    for w in sorted(pool.cpus):
        seen.setdefault(json.dumps(pool.cpus[w], sort_keys=True), pool.cpus[w])
    return list(seen.values())


def mixed_cpus(pool: WorkerPool) -> str | None:
    """One line when the pool's workers ran on more than one kind of CPU, else None: FP32 kernels
    differ by CPU in the last bits, so which worker computes which shard then decides the result."""
    kinds = cpu_kinds(pool)
    if len(kinds) < 2:
        return None
    return (f"the workers ran on {len(kinds)} kinds of CPU ("
            + "; ".join(f"{k['model']} {k['id']} {k['torch_capability']}" for k in kinds)
            + "): FP32 kernels differ by CPU in the last bits, so what these workers computed (calibration statistics, "
              "FP32 outputs) depends on which worker computed what: not bit-identical to a run with another worker "
              "count or shard layout (the manifest's pool.cpu says which worker ran where); pin the job to one kind "
              "of node for that")
