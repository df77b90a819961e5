"""The worker side of calibration, a plain class, and the executor that runs it in this process.

    worker = CalibrationWorker(fp32, example, quant, data_spec, threads, signature, memory_bytes)
    worker.log(batch_id, indices)       # pass 1 on one batch: exact (min, max) per value, or a Failure
    worker.start_counts(requests); worker.count(batch_id, indices); worker.collect_counts()   # exact pass 2

Each worker prepares its own copy of the FP32 model (prepared GraphModules do not pickle), checks
that its observers observe what the driver's do, and keeps its batches, and pass 1's values for
pass 2, between passes. `protocol.calibrate` drives it through an executor: `SerialExecutor` here,
`runner.WorkerPool` on Ray (through `worker.Worker`, which holds one). No Ray here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from ..errors import CalibrationError, DataError, QuantrayError
from ..inputs.decoded import DecodedBatches
from . import flow, sites
from .bias import InputSums
from .calls import Call
from .merge import sites_key
from .probes import attach_probes

__all__ = ["CalibrationWorker", "SerialExecutor", "Failure", "KeptValues"]


@dataclass(frozen=True)
class Failure:
    """A batch a worker could not use (a sample that fails to load, NaN or Inf), returned as data so
    that the driver reports the first such batch in sample order, the same on every run."""

    batch_id: int
    message: str


class CalibrationWorker:
    """One shard's worker (see the module docstring). `memory_bytes` bounds what it keeps of pass 1's
    values for pass 2 (`KeptValues`); 0 keeps none."""

    def __init__(self, model, example_inputs: torch.Tensor, quant, data, threads: int,
                 signature: list | None = None, memory_bytes: int = 0, decoded=None, kept_only: bool = False):
        flow.quiet_torch_warnings()
        # Same intra-op thread count for every worker count: reduction order may depend on it.
        torch.set_num_threads(threads)
        self._fp32, self._example = model, example_inputs
        self.prepare_for(quant, signature)
        self._data = DecodedBatches(data, "[calibration]", decoded)  # decoded: where decoded images are kept, or None
        self.dataset = self._data.dataset
        self._batches: dict[int, torch.Tensor] = {}
        self._kept = KeptValues(memory_bytes, kept_only)

    def prepare_for(self, quant, signature: list | None = None) -> None:
        """This worker's prepared copy for `quant` (tune calibrates an equalized model on the same
        pool); its observers must be the driver's (`signature`)."""
        self._model = flow.prepare(self._fp32, quant, self._example)
        self._observed = sites.observed_values(self._model)
        if signature is not None and [tuple(s) for s in signature] != sites.signature(self._observed):
            raise CalibrationError("this worker's prepare_fx gave other observers than the driver's; workers "
                                   "and driver need the same torch version")
        self._observers = sites.find_observers(self._model)  # the instances the probes will hold
        self._recorder = attach_probes(self._model)
        self._sums: InputSums | None = None

    def log(self, batch_id: int, indices: list[int], fast: bool = False):
        """Pass 1 on one batch: the exact (min, max) of each observed value, or a `Failure`.
        `fast`: torch's own histogram observers run too (fast mode). Not in fast mode, the
        histogram-observed values are kept for pass 2 where the memory budget (or disk) allows."""
        self._recorder.start_log(fast)
        if not fast and self._kept.keeping:
            self._recorder.keep()
        try:
            forward_s = self._forward(batch_id, indices)
        except DataError as e:
            return Failure(batch_id, str(e))
        finally:
            kept, self._recorder.kept = self._recorder.kept, None
        if kept and self._kept.add(batch_id, list(kept.values()), *forward_s):
            self._batches.pop(batch_id, None)  # pass 2 needs no input for a kept batch
        return self._recorder.batch_log()

    def input_sums(self, batch_id: int, indices: list[int]):
        """Bias correction's pass on one batch: each layer's input patch sums (`core.bias`), or a `Failure`."""
        if self._sums is None:
            self._sums = InputSums(self._model)
        self._recorder.start_log()  # the probes see the batch as in pass 1; their log is not used
        try:
            with self._sums.recording() as sums:
                self._forward(batch_id, indices)
        except DataError as e:
            return Failure(batch_id, str(e))
        return sums

    def start_counts(self, requests: dict) -> None:
        self._recorder.start_counts(requests)

    def count(self, batch_id: int, indices: list[int]) -> None:
        """Exact pass 2 on one batch: counts over the requested ranges, kept on the worker."""
        self._pass2(batch_id, indices)

    def _pass2(self, batch_id: int, indices: list[int]) -> None:
        """Pass 2 on one batch: its values as pass 1 kept them, else from a second forward."""
        kept = self._kept.take(batch_id)
        if kept is None:
            self._kept.sources["forward"] += 1
            self._forward(batch_id, indices)
            return
        self._recorder.start_batch()
        for value, x in kept:
            self._recorder.observe(value, x, owned=True)  # kept for this pass alone

    def pass2_sources(self) -> dict:
        """How many pass-2 batches came from memory, from disk and from a second forward; frees
        what pass 1 kept (and the calibration inputs): calibration is over."""
        self._batches.clear()
        return self._kept.close()

    def collect_counts(self) -> dict:
        return self._recorder.collect_counts()

    def replay(self, batch_id: int, indices: list[int], requests: dict) -> dict:
        """Replay pass 2 on one batch: torch's update histogram of each value over its planned ranges."""
        self._recorder.start_replay(requests)
        self._pass2(batch_id, indices)
        return self._recorder.batch_updates()

    def observer_states(self) -> dict:
        """Fast mode: each histogram observer's own (min, max, histogram) after this shard (None if unseen)."""
        out = {}
        for o in self._observed.values():
            if o.kind == sites.HISTOGRAM:
                obs = self._observers[o.name]
                seen = bool(torch.isfinite(obs.min_val).all())
                out[sites_key(o)] = (obs.min_val.clone(), obs.max_val.clone(), obs.histogram.clone()) if seen else None
        return out

    def _forward(self, batch_id: int, indices: list[int]) -> tuple[float, float]:
        """The model on one batch (loaded on first use); returns the CPU seconds the model took in
        user and in system mode (page faults: memory that keeping values took from the allocator)."""
        x = self._batches.get(batch_id)
        where = f"calibration batch {batch_id}, samples {indices[0]}..{indices[-1]}"
        try:
            if x is None:
                x = self._batches[batch_id] = self._data.load(indices)[0]
            if not torch.isfinite(x).all():
                raise DataError("NaN or Inf in the calibration input")
            self._recorder.start_batch()
            start = _thread_times()
            with torch.inference_mode():
                self._model(x)
            end = _thread_times()
            return end[0] - start[0], end[1] - start[1]
        except QuantrayError as e:  # the batch, not the shard: the same line for any worker count
            raise type(e)(f"{e} ({where})") from None


class KeptValues:
    """Pass 1's histogram-observed values, per batch, for pass 2. `budget` bounds the worker's whole
    resident memory: what it already holds (its model, data and the run-time) is measured at the
    first batch, and room for a forward pass and the allocator's slack (four times the first batch's
    values) is left free. `kept_only`: the worker shares its process with others (the driver's worker
    threads, whose budgets are shares of the memory free when the pool started): the process's
    memory is not counted against it, only what it keeps and that room. Past that, batches go to
    local disk while writing and reading one back costs less than the forward that would recompute
    it (timed on the first one spilled), else they are not kept. Batches are kept whole or not at all.

    Keeping stops, whatever the room, once the forwards that kept values have spent more time in the
    system (faulting in fresh memory: the copies take memory the next forward would have reused)
    than in computing, the work a second forward would repeat (the worker thread's CPU times, summed
    over the batches so far, once the system time passes a second). Measured on this project's
    2-core VM: 1 to 12 us a page, varying by the hour; at the high end a second forward costs less
    than keeping. Where a hypervisor backs the fresh memory, part of that cost is counted as the
    guest's user time, which this rule cannot tell from computing."""

    def __init__(self, budget: int, kept_only: bool = False):
        self.budget, self.used, self.peak, self._kept_only = budget, 0, 0, kept_only
        self.sources = {"memory": 0, "disk": 0, "forward": 0}
        self._room: int | None = None  # bytes kept values may take, set at the first batch
        self._memory: dict[int, tuple[list, int]] = {}  # batch -> (values, bytes)
        self._disk: dict[int, str] = {}
        self._dir = None
        self._disk_left = 0
        self._spill_ok = True
        self._user_s = self._system_s = 0.0

    @property
    def keeping(self) -> bool:
        """Whether the next batch's values should be copied for keeping."""
        # Below a second of system time the split is noise (CPU times are sampled at the clock tick).
        return self.budget > 0 and (self._system_s <= self._user_s or self._system_s < 1.0)

    def add(self, batch_id: int, values: list, forward_s: float, system_s: float = 0.0) -> bool:
        """Keep a batch's values if there is room; returns whether they were kept. `forward_s`: the
        forward's CPU time computing (what recomputing them would take); `system_s`: in the system."""
        self._user_s, self._system_s = self._user_s + forward_s, self._system_s + system_s
        size = sum(x.nbytes for _, x in values)
        if self._room is None:
            self._room = self.budget - (0 if self._kept_only else resident_bytes()) - 4 * size
        if self.used + size <= self._room:
            self._memory[batch_id] = (values, size)
            self.used += size
            self.peak = max(self.peak, self.used)
            return True
        return self._spill(batch_id, values, size, forward_s)

    def _spill(self, batch_id: int, values: list, size: int, forward_s: float) -> bool:
        import shutil
        import tempfile

        if not self._spill_ok:
            return False
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="quantray-kept-")
            self._disk_left = shutil.disk_usage(self._dir.name).free // 4
        if size > self._disk_left:
            return False
        path = f"{self._dir.name}/{batch_id}.pt"
        t = time.perf_counter()
        torch.save(values, path)
        written = time.perf_counter() - t
        # Reading back costs about as much as writing here: worth it only if both beat a forward.
        self._spill_ok = 2 * written < forward_s
        self._disk[batch_id], self._disk_left = path, self._disk_left - size
        return True

    def take(self, batch_id: int) -> list | None:
        """The batch's kept values (and forget them), or None."""
        if batch_id in self._memory:
            values, size = self._memory.pop(batch_id)
            self.used -= size
            self.sources["memory"] += 1
            return values
        if batch_id in self._disk:
            path = self._disk.pop(batch_id)
            values = torch.load(path, weights_only=False)
            os.remove(path)
            self.sources["disk"] += 1
            return values
        return None

    def close(self) -> dict:
        """Where pass 2's batches came from and the most bytes kept at once; then forget them all
        (the next calibration starts counting anew)."""
        summary = {**self.sources, "peak_kept_bytes": self.peak}
        if self._dir is not None:
            self._dir.cleanup()
        self.__init__(self.budget, self._kept_only)
        return summary


def _thread_times() -> tuple[float, float]:
    """This thread's CPU time in user and system mode (Linux); elsewhere wall time and no system time."""
    try:
        import resource

        usage = resource.getrusage(resource.RUSAGE_THREAD)
    except (ImportError, AttributeError, ValueError, OSError):
        return time.perf_counter(), 0.0
    return usage.ru_utime, usage.ru_stime


def resident_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SerialExecutor:
    """Every shard's calls in this process, one `CalibrationWorker` per shard (made on first use).
    `order` permutes the order in which shards run (the result must not change)."""

    def __init__(self, model, example_inputs, quant, data, threads: int = 1, signature=None, order=None,
                 memory_bytes: int = 0):
        self._args = (model, example_inputs, quant, data, threads, signature, memory_bytes)
        self._order, self._workers = order, {}

    def __enter__(self) -> "SerialExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self._workers.clear()

    def share(self, obj):
        return obj

    def run(self, calls: dict[int, list[Call]], on_result=None) -> dict:
        results = {}
        for shard in [s for s in (self._order or sorted(calls)) if s in calls]:
            if shard not in self._workers:
                self._workers[shard] = CalibrationWorker(*self._args)
            for call in calls[shard]:
                results[call.key] = call.on(self._workers[shard])
                if on_result is not None:
                    on_result(call, 1)
        return results
