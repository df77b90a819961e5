"""The calibrate and convert stages: the job's merge mode over its pool, reusing stored
statistics, then the INT8 model as files.

    calibrated = calibrate(ctx, job, prepared, pool)   # merged statistics loaded into `prepared`
    quantized = quantize(calibrated)                    # INT8 state_dict, TorchScript, qparams rows
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..cluster.names import Names
from ..cluster.worker import calibration_of
from ..core import flow, merge
from ..core.bias import correct_biases
from ..core.calibration import CalibrationWorker
from ..core.calls import Call
from ..core.evaluation import state_dict_bytes
from ..core.modes import MODES, MergedStats, Plan
from ..core.protocol import calibrate as run_protocol
from ..core.ranges import l2_remembered
from ..core.sites import observed_values, signature
from ..core.tracing import TURNS
from ..errors import CalibrationError
from ..inputs.data import assign_shards, batch_identities, make_batches
from .load import Job, open_stats, warn_unwritable
from .workers import mixed_cpus

if TYPE_CHECKING:
    from ..cluster.runner import WorkerPool

__all__ = ["Calibrated", "calibrate", "recalibrate", "calibration_executor", "Quantized", "quantize", "CALIBRATION_NAMES"]

# A calibrating worker's share is its shard: lines name the shard (its calls name their batches).
CALIBRATION_NAMES = Names(worker=lambda w: f"the worker of calibration shard {w}",
                          call=lambda w, key: f"calibration shard {w}", error=CalibrationError)


class _Calibrators:
    """The pool's workers as calibration's executor: each call is made on a worker's calibration part."""

    def __init__(self, pool: WorkerPool):
        self.pool, self.share = pool, pool.share

    def run(self, calls: dict[int, list[Call]], on_result=None) -> dict:
        return self.pool.run(calls, on_result, names=CALIBRATION_NAMES, on=calibration_of)


def calibration_executor(pool: WorkerPool) -> _Calibrators:
    """The pool, seen by `protocol.calibrate` as an executor of `CalibrationWorker` calls."""
    return _Calibrators(pool)


@dataclass
class Calibrated:
    """The driver's prepared model with the merged statistics loaded, and how they were gathered."""

    prepared: nn.Module
    counts: dict[str, int]  # values each histogram observer counted (exact mode)
    plan: Plan
    info: dict
    stats: MergedStats      # they load into any config over the same FP32 model (tune's trials)
    bias_correction: bool = False  # the INT8 model gets its biases corrected from `stats.bias`


def calibrate(ctx, job: Job, prepared: nn.Module, pool: WorkerPool, *, use_cache: bool = True,
              bias_sums: bool | None = None) -> Calibrated:
    """Calibrate on the pool (one shard per worker) with the job's merge mode, reusing stored statistics.
    `bias_sums`: gather bias correction's input sums too (default: where the job corrects biases)."""
    spec = job.spec
    batches = make_batches(job.calib_idx, spec.calibration.batch_size)
    shards = assign_shards(len(batches), pool.wanted)
    if len(shards) < pool.wanted:
        ctx.console.print(f"[yellow]{len(batches)} calibration batches: using {len(shards)} workers, not {pool.wanted}[/]")
    plan = Plan(batches, shards, observed_values(prepared), batch_identities(job.calib_ds, spec.calibration, batches))
    store = open_stats(job, use_cache)
    started, received = ctx.clock(), pool.bytes_received
    correct = spec.quantization.bias_correction
    result = run_protocol(MODES[spec.quantization.mode], calibration_executor(pool), plan, store=store,
                          progress=ctx.progress, clock=ctx.clock, bias=correct if bias_sums is None else bias_sums)
    result.info.update(bytes_from_workers=pool.bytes_received - received, attempts=dict(pool.attempts),
                       actors_ready_s=round(max(0.0, pool.ready_at - started), 4) if pool.ready_at else 0.0)
    reused = {k: v for k, v in result.info["cached"].items() if v[0]}
    if reused:
        ctx.console.print("reused stored statistics: " + ", ".join(f"{k} {hit} of {total}" for k, (hit, total) in
                                                                    reused.items()) + f" (from {store.location})")
    warn_unwritable(ctx.console, store)
    mixed = mixed_cpus(pool)
    if mixed:
        ctx.console.print(f"[yellow]{mixed}[/]")
    counts = result.stats.load(prepared)
    return Calibrated(prepared, counts, plan, result.info, result.stats, correct)


def recalibrate(ctx, job: Job, pool: WorkerPool, quant) -> Calibrated:
    """A second calibration on the same pool, for a config whose prepared model observes other values
    (an equalized model: tune's `equalize` trials): the driver and each worker prepare for `quant`,
    then `calibrate` as usual (stored statistics reused; bias correction's sums gathered too)."""
    import dataclasses

    spec = dataclasses.replace(job.spec, quantization=quant)
    other = dataclasses.replace(job, spec=spec)
    prepared = flow.prepare(job.fp32, quant, job.example)
    shared = signature(observed_values(prepared))
    pool.run({w: [Call(w, CalibrationWorker.prepare_for, (quant, shared))] for w in range(pool.size)},
             names=CALIBRATION_NAMES, on=calibration_of)
    return calibrate(ctx, other, prepared, pool, bias_sums=quant.flow == "fx")  # bias correction is FX-only


@dataclass
class Quantized:
    """The INT8 model as files, its qparams rows and their digest. FX: `state` is the INT8
    state_dict (model_int8.pth), `deployed` its TorchScript (model_int8.pt). PT2E: `deployed` is the
    exported INT8 program (model_int8.pt2), which holds its weights; there is no state_dict file."""

    state: bytes
    deployed: bytes
    rows: list[dict] = field(default_factory=list)
    digest: str = ""
    bias_correction: dict | None = None  # what `bias.correct_biases` did, where it ran
    flow: str = "fx"
    export: str | None = None  # PT2E: "strict" or "non-strict", the torch.export call that worked
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # FX: the INT8 model itself, for
                                               # a pool in this process (a converted GraphModule does not pickle)

    @property
    def files(self) -> dict[str, bytes]:
        """The INT8 model's files in the run directory, by name."""
        if self.flow == "pt2e":
            return {"model_int8.pt2": self.deployed}
        return {"model_int8.pth": self.state, "model_int8.pt": self.deployed}

    @property
    def runtime(self) -> str:
        return flow.runtime_name(self.flow)

    @classmethod
    def from_run(cls, flow_name: str, read) -> Quantized:
        """A finished run's INT8 files, read by name with `read` (`RunFiles.read`: sha256 checked)."""
        if flow_name == "pt2e":
            return cls(b"", read("model_int8.pt2"), flow="pt2e")
        return cls(read("model_int8.pth"), read("model_int8.pt"))


def quantize(calibrated: Calibrated, example: torch.Tensor) -> Quantized:
    int8 = flow.convert(calibrated.prepared)
    with TURNS.alone(), l2_remembered():  # the l2 searches convert just made, asked for again
        rows = merge.qparam_rows(calibrated.prepared, calibrated.counts)
    digest = merge.state_digest(calibrated.prepared)
    if flow.flow_of(int8) == "pt2e":
        from ..core import pt2e

        return Quantized(b"", pt2e.save_program(int8, example), rows, digest, None, "pt2e", pt2e.export_how(int8))
    corrected = correct_biases(int8, calibrated.prepared, calibrated.stats.bias) if calibrated.bias_correction else None
    script = io.BytesIO()
    torch.jit.save(torch.jit.script(int8), script)
    return Quantized(state_dict_bytes(int8), script.getvalue(), rows, digest, corrected, model=int8)
