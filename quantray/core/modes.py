"""Merge modes, one object each: their passes, the unit each pass computes and stores, a typed merged
result, and how that result is loaded into a prepared model.

    mode = MODES["exact"]
    stats = protocol.calibrate(mode, executor, plan).stats       # runs mode.passes: a MergedStats
    counts = stats.load(prepared)                                 # any config over the same FP32 graph

| mode   | pass 1 (unit)                      | pass 2 (unit)                                  | result       |
| exact  | exact (min, max) per value (batch) | float64 counts over global ranges (shard)      | ExactStats   |
| replay | exact (min, max) per value (batch) | torch's update histograms, planned (batch)     | ReplayStats  |
| fast   | the same, and torch's observers (shard) | none                                      | FastStats    |

A pass is a `Pass`: which units it has, what a unit's stored entry is keyed by, the worker calls
that compute a unit, how their returns make the entry, whether a stored entry covers what this
config needs, and how a stored entry and a new one join. `protocol.calibrate` runs passes over
any executor; nothing here knows about Ray or storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from . import merge
from .bias import merge_sums
from .calibration import CalibrationWorker
from .probes import count_key
from .sites import HISTOGRAM, Observed, observed_values

__all__ = ["Plan", "Pass", "Mode", "MergedStats", "ExactStats", "ReplayStats", "FastStats", "MODES", "bias_pass",
           "merge_bias"]


@dataclass(frozen=True)
class Plan:
    """What to calibrate: batches (sample indices, canonical order), shards (batch ids per worker),
    the driver's observers and what they observe, and one identity per batch for stored statistics."""

    batches: list[list[int]]
    shards: list[list[int]]
    observed: dict[str, Observed]
    identities: list[str] | None = None

    def shard_of(self, batch_id: int) -> int:
        return next(s for s, shard in enumerate(self.shards) if batch_id in shard)


@dataclass(frozen=True)
class Pass:
    """One pass of a mode over a plan (see the module docstring)."""

    name: str                                        # "pass1" | "pass2": manifests, stored-entry kinds
    unit: str                                        # "batch" | "shard": computed, stored and redone as one
    units: list[int]
    key: Callable[[int], list]                       # a unit's stored entry is keyed by these (and the store's base)
    calls: Callable[[int], list[tuple[Callable, tuple]]]  # CalibrationWorker (function, args) that compute a unit, in order
    collect: Callable[[int, list], Any]              # a unit's entry from its calls' return values
    covers: Callable[[int, Any], bool]               # a stored entry holds all this config needs of the unit
    combine: Callable[[Any, Any], Any]               # a stored entry joined with a new one


@dataclass
class MergedStats:
    """A calibration's merged statistics, what every mode returns: they load into any config over
    the same FP32 graph. Pass-1 logs ({batch: {value: {reduction: (min, max) | None}}}), which every
    mode has, load the min/max observers; histogram observers load from the mode's own result."""

    logs: dict[int, dict]
    # bias correction's input sums {layer: (S, count)}, merged in batch order (`core.bias`); None: not gathered
    bias: dict | None = field(default=None, kw_only=True)

    def load(self, prepared) -> dict[str, int]:
        """Write the statistics into `prepared`'s observers (any config over the same FP32 graph);
        returns the values each histogram observer counted, where the mode knows it."""
        observed = observed_values(prepared)
        merge.load_minmax(prepared, observed, self.logs)
        return self._histograms(prepared, observed) or {}

    def _histograms(self, prepared, observed) -> dict[str, int] | None:
        raise NotImplementedError


@dataclass
class ExactStats(MergedStats):
    """And float64 counts per (value, range, bins)."""

    counts: dict[tuple, tuple]

    def _histograms(self, prepared, observed):
        return merge.load_exact(prepared, observed, self.logs, self.counts)


@dataclass
class ReplayStats(MergedStats):
    """And, per batch, torch's update histogram per (value, planned range, bins)."""

    updates: dict[int, dict]

    def _histograms(self, prepared, observed):
        merge.load_replay(prepared, observed, self.logs, self.updates)


@dataclass
class FastStats(MergedStats):
    """And each shard's torch histogram states (shard order), keyed by `merge.sites_key`."""

    states: list[dict]

    def _histograms(self, prepared, observed):
        merge.load_fast(prepared, observed, self.states)


class Mode:
    name: str
    passes: tuple[Callable, ...]  # each: (plan, done passes {name: {unit: entry}}, share) -> Pass

    def merge(self, plan: Plan, done: dict) -> MergedStats:
        raise NotImplementedError


def _log_pass(plan: Plan, done: dict, share) -> Pass:
    """Pass 1, per batch: the exact (min, max) of every observed value."""
    need = merge.needed_values(plan.observed)
    return Pass("pass1", "batch", list(range(len(plan.batches))),
                key=lambda b: ["log", plan.identities[b]],
                calls=lambda b: [(CalibrationWorker.log, (b, plan.batches[b]))],
                collect=lambda b, returned: returned[0],
                covers=lambda b, entry: _covers(entry, need),
                combine=_union_logs)


def _covers(log: dict, need: set) -> bool:
    return all(value in log and reduction in log[value] for value, reduction in need)


def _union_logs(old: dict, new: dict) -> dict:
    return {v: {**old.get(v, {}), **new.get(v, {})} for v in {*old, *new}}


def _union(old: dict, new: dict) -> dict:
    return {**old, **new}


class Exact(Mode):
    """Histograms over the global range: bit-identical for any worker count, shard or batch order."""

    name = "exact"

    def _count_pass(self, plan: Plan, done: dict, share) -> Pass:
        requests = merge.count_requests(plan.observed, done["pass1"])
        want = {count_key(v, *r) for v, wanted in requests.items() for r in wanted}
        shared = share(requests)
        return Pass("pass2", "shard", list(range(len(plan.shards))) if requests else [],  # no histograms: no pass 2
                    # counts accumulate on the worker: a shard is one unit, redone whole after a lost worker
                    key=lambda s: ["count", [plan.identities[b] for b in plan.shards[s]]],
                    calls=lambda s: [(CalibrationWorker.start_counts, (shared,)),
                                     *[(CalibrationWorker.count, (b, plan.batches[b])) for b in plan.shards[s]],
                                     (CalibrationWorker.collect_counts, ())],
                    collect=lambda s, returned: returned[-1],
                    covers=lambda s, entry: want <= entry.keys(),
                    combine=_union)

    @property
    def passes(self):
        return (_log_pass, self._count_pass)

    def merge(self, plan: Plan, done: dict) -> ExactStats:
        return ExactStats(done["pass1"], merge.sum_counts(done["pass2"][s] for s in sorted(done["pass2"])))


class Replay(Mode):
    """torch's own single-process calibration, replayed on the driver in sample-index order."""

    name = "replay"

    def _replay_pass(self, plan: Plan, done: dict, share) -> Pass:
        requests = merge.replay_requests(plan.observed, done["pass1"])
        want = {b: {count_key(v, *r) for v, wanted in requests[b].items() for r in wanted} for b in requests}
        return Pass("pass2", "batch", list(range(len(plan.batches))),
                    key=lambda b: ["replay", plan.identities[b]],
                    calls=lambda b: [(CalibrationWorker.replay, (b, plan.batches[b], requests[b]))],
                    collect=lambda b, returned: returned[0],
                    covers=lambda b, entry: want[b] <= entry.keys(),
                    combine=_union)

    @property
    def passes(self):
        return (_log_pass, self._replay_pass)

    def merge(self, plan: Plan, done: dict) -> ReplayStats:
        return ReplayStats(done["pass1"], done["pass2"])


class Fast(Mode):
    """One pass; each worker's torch observers over its shard, re-binned on the driver (approximate)."""

    name = "fast"

    def _fast_pass(self, plan: Plan, done: dict, share) -> Pass:
        need = merge.needed_values(plan.observed)
        states = {merge.sites_key(o) for o in plan.observed.values() if o.kind == HISTOGRAM}
        return Pass("pass1", "shard", list(range(len(plan.shards))),
                    key=lambda s: ["fast", [plan.identities[b] for b in plan.shards[s]]],
                    calls=lambda s: [*[(CalibrationWorker.log, (b, plan.batches[b], True)) for b in plan.shards[s]],
                                     (CalibrationWorker.observer_states, ())],
                    collect=lambda s, returned: {"logs": dict(zip(plan.shards[s], returned)), "states": returned[-1]},
                    covers=lambda s, entry: (states <= entry["states"].keys()
                                             and all(_covers(entry["logs"].get(b, {}), need) for b in plan.shards[s])),
                    combine=lambda old, new: {"logs": {b: _union_logs(old["logs"].get(b, {}), log)
                                                       for b, log in new["logs"].items()},
                                              "states": _union(old["states"], new["states"])})

    @property
    def passes(self):
        return (self._fast_pass,)

    def merge(self, plan: Plan, done: dict) -> FastStats:
        shards = done["pass1"]
        logs = {b: shards[s]["logs"][b] for s in sorted(shards) for b in plan.shards[s]}
        return FastStats(logs, [shards[s]["states"] for s in sorted(shards)])


MODES: dict[str, Mode] = {m.name: m for m in (Exact(), Replay(), Fast())}


def bias_pass(plan: Plan, done: dict, share) -> Pass:
    """Bias correction's pass, after any mode's, per batch: each layer's input patch sums (`core.bias`).
    Its stored entries are keyed by the batch and the graph's observed values (which the FP32
    weights' transform, equalization, changes)."""
    graph = sorted(v.key for o in plan.observed.values() for v in o.values)
    return Pass("bias", "batch", list(range(len(plan.batches))),
                key=lambda b: ["bias", plan.identities[b], graph],
                calls=lambda b: [(CalibrationWorker.input_sums, (b, plan.batches[b]))],
                collect=lambda b, returned: returned[0],
                covers=lambda b, entry: True,
                combine=lambda old, new: new)


def merge_bias(done: dict) -> dict:
    """The bias pass's per-batch sums, added in batch order: the same bits for any layout."""
    return merge_sums(done[b] for b in sorted(done))
