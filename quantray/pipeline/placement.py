"""Where a job's work runs: on a pool of Ray workers, or in the driver's own process.

    choice = place(job, executor="auto", address=None, workers=None)   # before Ray is started
    choice.kind     # "ray" or "driver"; choice.why: the reason, as the manifest records it

`executor = "auto"` (the default) keeps Ray wherever a cluster is named (`--address`, RAY_ADDRESS,
Ray already initialised in this process) or more than one worker is asked for. Otherwise it times
the FP32 model on a few test samples here (loading included, at the job's thread count) and runs
the job in this process when spreading that work over the CPUs would save less than a pool costs
to start. The figures are rough (an estimate of the forwards, not of the run); they decide only
where the work runs, never what it computes: a run in the driver and one on Ray give the same bits.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..cluster import local
from ..errors import SpecError
from ..inputs.data import load_batch

__all__ = ["Placement", "place", "RAY_START_S", "WORKERS_START_S"]

# What a Ray pool costs before it computes (DESIGN.md, "Ray facts", this 2-core machine): a new
# local cluster 2-3 s, two workers that import torch about 2 s; both were 6-7 s on slow days. The
# lower figures: a job near the line goes to Ray.
RAY_START_S = 2.0
WORKERS_START_S = 2.0


@dataclass(frozen=True)
class Placement:
    kind: str                   # "ray" or "driver"
    executor: str               # what was asked: "auto", "ray" or "driver"
    why: str                    # the reason, one phrase
    estimate: dict | None = None  # auto's figures (seconds): the forwards on one core, what N workers save, a pool's cost

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def place(job, *, executor: str, address: str | None, workers: int | None, test_passes: int = 2,
          pools: int = 1) -> Placement:
    """Where `job` runs (module docstring). `workers`: the count given on the command line (the
    job's [run] workers otherwise); `test_passes`: how many forwards each test sample gets (tune's
    trials add theirs); `pools`: how many pools of workers the command starts on Ray (tune: its
    own, then the best trial's run)."""
    if executor == "driver":
        if address is not None:
            raise SpecError(f"--address {address} with executor 'driver': the driver runs the job in this process; "
                            "drop one of them")
        if workers is not None and workers > 1:
            raise SpecError(f"--workers {workers} with executor 'driver': the driver is one worker; drop one of them")
        return Placement("driver", executor, "asked for")
    if executor == "ray":
        return Placement("ray", executor, "asked for")
    wanted = workers or job.spec.run.workers
    # What the user typed is named before the state of this process (a test's or a notebook's Ray).
    named = "--address" if address is not None else "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else None
    if named:
        return Placement("ray", executor, f"a cluster is named ({named})")
    if wanted is not None and wanted > 1:
        return Placement("ray", executor, f"{wanted} workers asked for")
    if _ray_initialised():
        return Placement("ray", executor, "a cluster is named (Ray initialised in this process)")
    up = local.running()
    cpus = int(up.get("cpus") or os.cpu_count() or 1) if up else os.cpu_count() or 1
    spec = job.spec
    batches = max(-(-len(job.calib_idx or []) // spec.calibration.batch_size), -(-len(job.test_idx) // spec.test.batch_size))
    n = max(1, min(wanted or cpus, batches))
    forwards = 2 * len(job.calib_idx or []) + test_passes * len(job.test_idx)
    cost = (0.0 if up else RAY_START_S) + pools * WORKERS_START_S
    # A slow call (another process's moment on a shared core) only overstates the work: one measure
    # decides a job on the driver's side of the line, or one far past it; near it, the best of 3.
    per_sample = _seconds_per_sample(job, decided=lambda s: not cost <= s * forwards * (1 - 1 / n) < 3 * cost)
    work = per_sample * forwards
    saved = work * (1 - 1 / n)
    estimate = {"forwards_s": round(work, 3), "saved_by_workers_s": round(saved, 3), "workers": n,
                "pool_cost_s": cost, "per_sample_s": round(per_sample, 6)}
    if saved < cost:
        return Placement("driver", executor, f"{n} workers would save about {saved:.1f} s of about {work:.1f} s of "
                                             f"forwards; a pool costs about {cost:.0f} s to start", estimate)
    return Placement("ray", executor, f"{n} workers save about {saved:.0f} s of about {work:.0f} s of forwards", estimate)


def _ray_initialised() -> bool:
    ray = sys.modules.get("ray")  # not imported: not initialised (and the driver's path never imports it)
    return ray is not None and ray.is_initialized()


def _seconds_per_sample(job, decided=lambda seconds: False, repeats: int = 3) -> float:
    """A few test samples loaded and through the FP32 model (after one warm-up call on the example
    input), at the job's thread count: seconds per sample, the best of up to `repeats` tries, fewer
    once `decided(best so far)` (one slow call would otherwise send a small job to Ray)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(job.spec.run.threads)
    indices = job.test_idx[:max(1, min(4, job.spec.test.batch_size))]
    try:
        with torch.inference_mode():
            job.fp32(job.example)
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                job.fp32(load_batch(job.test_ds, indices)[0])
                best = min(best, (time.perf_counter() - started) / len(indices))
                if decided(best):
                    break
            return best
    finally:
        torch.set_num_threads(threads)
