"""Calibration's one protocol: a merge mode's passes, run unit by unit over any executor.

    plan = Plan(batches, shards, observed_values(prepared), identities)
    with SerialExecutor(fp32, example, quant, data_spec, threads=1) as executor:   # or the job's pool
        result = calibrate(MODES["exact"], executor, plan, store=stats_store)
    counts = result.stats.load(prepared)
    int8 = flow.convert(prepared)

Stored entries that cover what the config needs are reused, the rest are computed by the workers
(one per shard) and stored. A sample that fails to load or NaN in an activation ends the run with
the first such batch in sample order, whichever worker found it first. No Ray here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import DataError
from .calibration import CalibrationWorker, Failure
from .calls import Call
from .modes import MergedStats, Mode, Pass, Plan, bias_pass, merge_bias

__all__ = ["calibrate", "Calibration"]

# Worker calls a progress bar counts: one per batch.
_PER_BATCH = (CalibrationWorker.log, CalibrationWorker.count, CalibrationWorker.replay, CalibrationWorker.input_sums)


@dataclass
class Calibration:
    """The merged statistics (a mode's typed result) and what it took: seconds per pass, stored
    entries reused per pass, where pass 2's batches came from."""

    stats: MergedStats
    info: dict = field(default_factory=dict)


def calibrate(mode: Mode, executor, plan: Plan, *, store=None, progress=None, clock=time.perf_counter,
              bias: bool = False) -> Calibration:
    """Run `mode`'s passes over `plan` on `executor`, reusing and filling `store` (a `stats.StatsStore`);
    with `bias`, bias correction's pass too (`core.bias`: the result's `stats.bias`)."""
    info: dict = {"mode": mode.name, "cached": {}}
    done: dict = {}
    ran: set = set()
    for make_pass in (*mode.passes, *((bias_pass,) if bias else ())):
        t = clock()
        step = make_pass(plan, done, executor.share)
        done[step.name], info["cached"][step.name] = _run_pass(step, plan, executor, store, progress, ran)
        info[f"{step.name}_s"] = round(clock() - t, 4)
    if ran:  # where pass 2's batches came from; the workers free what pass 1 kept
        sources = executor.run({s: [Call(s, CalibrationWorker.pass2_sources)] for s in sorted(ran)})
        info["pass2_batches"] = {k: sum(v[k] for v in sources.values()) for k in ("memory", "disk", "forward")}
        info["peak_kept_bytes"] = {s: v["peak_kept_bytes"] for s, v in sorted(sources.items())}
    stats = mode.merge(plan, done)
    if bias:
        stats.bias = merge_bias(done["bias"])
    return Calibration(stats, info)


def _run_pass(step: Pass, plan: Plan, executor, store, progress, ran: set) -> tuple[dict, list[int]]:
    found, stale, keys = {}, {}, {}
    if store is not None:
        for unit in step.units:
            keys[unit] = store.key(*step.key(unit))
            entry = store.get(keys[unit])
            if entry is not None and step.covers(unit, entry):
                found[unit] = entry
            elif entry is not None:
                stale[unit] = entry
    todo = [u for u in step.units if u not in found]
    calls, by_shard = {u: step.calls(u) for u in todo}, {}
    for unit in todo:
        shard = unit if step.unit == "shard" else plan.shard_of(unit)
        by_shard.setdefault(shard, []).extend(Call((unit, i), fn, args) for i, (fn, args) in enumerate(calls[unit]))
    total = sum(1 for u in todo for fn, _ in calls[u] if fn in _PER_BATCH)
    bar = progress.add_task(f"calibrate: {step.name.replace('pass', 'pass ')}", total=total) if progress else None

    def advance(call: Call, delta: int):
        if bar is not None and call.fn in _PER_BATCH:
            progress.advance(bar, delta)

    results = executor.run(by_shard, advance) if by_shard else {}
    ran.update(by_shard)
    failures = [v for v in results.values() if isinstance(v, Failure)]
    if failures:
        first = min(failures, key=lambda f: f.batch_id)
        raise DataError(first.message)
    fresh = {u: step.collect(u, [results[(u, i)] for i in range(len(calls[u]))]) for u in todo}
    if store is not None:
        for unit, entry in fresh.items():
            store.put(keys[unit], step.combine(stale[unit], entry) if unit in stale else entry)
    return {**found, **fresh}, [len(found), len(step.units)]


