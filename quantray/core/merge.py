"""Driver side of calibration: pure merges of per-value statistics into observer states. No Ray.

Workers record statistics per FP32 value (`probes`); an observer's state is derived here from the
values it observes (`sites.Observed.values`), in canonical order: batch id, then call order. So
statistics gathered under one quantization config load into the observers of any other config over
the same FP32 graph; a value the statistics do not hold raises `MissingStatistics`.

- Pass-1 logs give every call's exact (min, max): global ranges, replay plans, and the min/max
  observers' states (replayed through the observer itself, which is exact for EMAs too).
- Exact: float64 bin counts over the global range, summed (integers: the same in any order).
- Replay: torch's reset/add/combine steps, replayed from each call's update histogram.
- Fast: shard histograms re-binned onto their union range with torch's own re-binning.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
from torch import nn
from torch.ao.quantization.observer import HistogramObserver, ObserverBase

from ..digest import update_tensor
from ..errors import CalibrationError
from .probes import count_key
from .ranges import RangeMethod
from .sites import HISTOGRAM, MINMAX, STATELESS, Observed, find_observers, kind_of, observer_aliases, weight_observers

__all__ = ["MissingStatistics", "needed_values", "calls_of", "global_range", "count_requests", "replay_requests",
           "sum_counts", "load_minmax", "load_exact", "load_replay", "load_fast", "sites_key", "qparam_rows", "range_method",
           "state_digest"]

Range = tuple[torch.Tensor, torch.Tensor]


class MissingStatistics(CalibrationError):
    """The statistics hold no record of a value this config observes: it needs calibrating."""


def needed_values(observed: dict[str, Observed]) -> set[tuple[str, str]]:
    """(value key, reduction) of every value a config's data observers watch: what pass 1 must log."""
    return {(v.key, o.reduction) for o in observed.values() if o.kind != STATELESS for v in o.values}


def calls_of(o: Observed, logs: dict[int, dict]) -> list[tuple[int, str, Range]]:
    """Every non-empty call of observer `o` in canonical order: (batch id, value key, (min, max))."""
    out = []
    for batch_id in sorted(logs):
        for value in o.values:
            entry = logs[batch_id].get(value.key)
            if entry is None or o.reduction not in entry:
                raise MissingStatistics(f"the statistics hold no record of {value.label} (observed by {o.name}) "
                                        f"for batch {batch_id}; calibrate this configuration")
            if entry[o.reduction] is not None:
                out.append((batch_id, value.key, entry[o.reduction]))
    return out


def global_range(calls) -> Range:
    """Elementwise min of mins and max of maxes: exact, in any order."""
    lo, hi = calls[0][2]
    for _, _, (call_lo, call_hi) in calls[1:]:
        lo, hi = torch.minimum(lo, call_lo), torch.maximum(hi, call_hi)
    return lo, hi


def _histograms(observed: dict[str, Observed]):
    return [o for o in observed.values() if o.kind == HISTOGRAM]


def count_requests(observed: dict[str, Observed], logs: dict[int, dict]) -> dict[str, list[tuple]]:
    """Exact pass 2: for each value a histogram observer watches, the observer's global range and bins."""
    requests: dict[str, list[tuple]] = {}
    for o in _histograms(observed):
        calls = calls_of(o, logs)
        if calls:
            lo, hi = global_range(calls)
            for value in o.values:
                wanted = requests.setdefault(value.key, [])
                if all(count_key(value.key, *w) != count_key(value.key, lo, hi, o.bins) for w in wanted):
                    wanted.append((lo, hi, o.bins))
    return requests


def _running(o: Observed, logs: dict[int, dict]) -> list[tuple[int, str, Range]]:
    """The range each call's update histogram is taken over in torch's forward: the call's own range
    for the observer's first call (reset_histogram), else the running min/max including this call."""
    plan, running = [], None
    for batch_id, value, (lo, hi) in calls_of(o, logs):
        running = (lo, hi) if running is None else (torch.min(running[0], lo), torch.max(running[1], hi))
        plan.append((batch_id, value, running))
    return plan


def replay_requests(observed: dict[str, Observed], logs: dict[int, dict]) -> dict[int, dict[str, list[tuple]]]:
    """Replay pass 2: per batch, per value, the planned ranges (and bins) of its update histograms."""
    requests: dict[int, dict[str, list[tuple]]] = {b: {} for b in logs}
    for o in _histograms(observed):
        for batch_id, value, (lo, hi) in _running(o, logs):
            requests[batch_id].setdefault(value, []).append((lo, hi, o.bins))
    return requests


def sum_counts(parts) -> dict[tuple, tuple[torch.Tensor, int]]:
    """Sums of integer counts held in float64 (exact below 2**53): the same in any order."""
    merged: dict[tuple, tuple[torch.Tensor, int]] = {}
    for part in parts:
        for key, (hist, n) in part.items():
            if key in merged:
                hist, n = merged[key][0] + hist, merged[key][1] + n
            merged[key] = (hist, n)
    return merged


def load_minmax(model: nn.Module, observed: dict[str, Observed], logs: dict[int, dict]) -> None:
    """Feed each logged call through each min/max observer as a tensor whose min and max are the
    call's: the observer then does exactly the arithmetic it did in one process (for an EMA, too)."""
    observers = find_observers(model)
    for o in observed.values():
        if o.kind == MINMAX:
            obs = observers[o.name]
            for _, _, (lo, hi) in calls_of(o, logs):
                obs(_two_point_input(obs, lo, hi))


def _two_point_input(obs: ObserverBase, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    if lo.dim() == 0:
        return torch.stack([lo, hi])
    pair = torch.stack([lo, hi])  # (2, C): channels on dim 1
    axis = obs.ch_axis
    if axis == 0:
        return pair.T.contiguous()
    if axis in (1, -1):
        return pair
    return pair.reshape(2, *([1] * (axis - 1)), lo.numel())


def load_exact(model: nn.Module, observed: dict[str, Observed], logs: dict[int, dict], counts: dict) -> dict[str, int]:
    """Each histogram observer gets its global range and the sum of its values' counts over it.
    Returns the number of values each observer histogrammed."""
    observers, totals = find_observers(model), {}
    for o in _histograms(observed):
        calls = calls_of(o, logs)
        if not calls:
            continue  # saw no data: keeps torch's defaults
        lo, hi = global_range(calls)
        hist, n = torch.zeros(o.bins, dtype=torch.float64), 0
        for value in o.values:
            key = count_key(value.key, lo, hi, o.bins)
            if key not in counts:
                raise MissingStatistics(f"the statistics hold no histogram of {value.label} over the range "
                                        f"[{float(lo)}, {float(hi)}] that {o.name} needs; calibrate this configuration")
            hist, n = hist + counts[key][0], n + counts[key][1]
        # Assigning through the buffer names keeps eps, bins and reduce_range; clones avoid aliasing
        # tensors that callers still hold.
        obs = observers[o.name]
        obs.min_val, obs.max_val, obs.histogram = lo.clone(), hi.clone(), hist.to(torch.float32)
        totals[o.name] = n
    return totals


def load_replay(model: nn.Module, observed: dict[str, Observed], logs: dict[int, dict], updates: dict) -> None:
    """HistogramObserver.forward's state updates, replayed from each call's planned range and update."""
    observers = find_observers(model)
    for o in _histograms(observed):
        obs = observers[o.name]
        for i, (batch_id, value, (lo, hi)) in enumerate(_running(o, logs)):
            update = updates.get(batch_id, {}).get(count_key(value, lo, hi, o.bins))
            if update is None:
                raise MissingStatistics(f"the statistics hold no replay step of {o.name} for batch {batch_id}; "
                                        "calibrate this configuration")
            if i == 0:  # reset_histogram
                obs.min_val, obs.max_val, obs.histogram = lo.clone(), hi.clone(), update.clone()
            elif torch.equal(lo, obs.min_val) and torch.equal(hi, obs.max_val):
                obs.histogram = obs.histogram + update
            else:
                obs.histogram = obs._combine_histograms(obs.histogram, obs.min_val, obs.max_val, update, lo, hi)
                obs.min_val, obs.max_val = lo.clone(), hi.clone()


def sites_key(o: Observed) -> tuple:
    """What a fast-mode shard state is stored under: the observer's class, bins and observed values."""
    return o.cls, o.bins, tuple(v.key for v in o.values)


def load_fast(model: nn.Module, observed: dict[str, Observed], shard_states: list[dict]) -> None:
    """Re-bin each shard's torch histogram onto the union range with torch's own re-binning."""
    observers = find_observers(model)
    for o in _histograms(observed):
        states = []
        for shard in shard_states:
            if sites_key(o) not in shard:
                raise MissingStatistics(f"the statistics hold no fast-mode state of {o.name}; calibrate this configuration")
            if shard[sites_key(o)] is not None:
                states.append(shard[sites_key(o)])
        if states:
            _combine_shards(observers[o.name], states)


def _combine_shards(obs: HistogramObserver, states) -> None:
    lo = torch.stack([s[0] for s in states]).min()
    hi = torch.stack([s[1] for s in states]).max()
    combined = torch.zeros(obs.bins)
    for s_lo, s_hi, hist in states:
        combined = obs._combine_histograms(hist, s_lo, s_hi, combined, lo, hi)
    obs.min_val, obs.max_val, obs.histogram = lo.clone(), hi.clone(), combined


def qparam_rows(model: nn.Module, counts: dict[str, int] | None = None) -> list[dict]:
    """One row per activation observer with data state: name, aliases, class, min, max, scale,
    zero_point, count (PT2E's weight observers, in the graph, are left out as FX's are)."""
    rows, aliases, weights = [], observer_aliases(model), weight_observers(model)
    for name, obs in find_observers(model).items():
        if kind_of(name, obs) == STATELESS or name in weights:
            continue
        seen = obs.min_val.numel() > 0 and bool(torch.isfinite(obs.min_val).all())
        with warnings.catch_warnings():  # an unseen observer warns and returns the default qparams
            warnings.simplefilter("ignore")
            scale, zero_point = obs.calculate_qparams()
        if scale.numel() != 1:
            raise CalibrationError(f"{name}: per-channel activation observers are not supported in qparams.parquet")
        rows.append({
            "name": name, "aliases": aliases.get(name, []), "observer": type(obs).__name__,
            "dtype": str(obs.dtype).removeprefix("torch."), "min": float(obs.min_val) if seen else None,
            "max": float(obs.max_val) if seen else None, "range_method": range_method(obs),
            "scale": float(scale.item()),
            "zero_point": int(zero_point.item()),
            "count": int(counts[name]) if counts and name in counts else None,
        })
    return rows


def range_method(obs: ObserverBase) -> str:
    """How an activation observer chooses its range (`quantray.core.ranges`); torch's observer
    classes and torchao's twins (PT2E) alike."""
    if isinstance(obs, RangeMethod):
        return obs.range_method
    names = {"HistogramObserver": "l2", "MovingAverageMinMaxObserver": "moving_average", "MinMaxObserver": "minmax"}
    return names.get(type(obs).__name__, type(obs).__name__)


def state_digest(model: nn.Module) -> str:
    """sha256 of every observer's name, class (and range method, where it has a choice) and state
    buffers: equal digests, equal INT8 qparams."""
    h = hashlib.sha256()
    for name, obs in sorted(find_observers(model).items()):
        method = f"({obs.range_method})" if isinstance(obs, RangeMethod) else ""  # l2's digests stay as they were
        h.update(f"{name}:{type(obs).__name__}{method};".encode())
        for key, buf in sorted(obs.state_dict().items()):
            h.update(f"{key}:".encode())
            update_tensor(h, buf)
    return h.hexdigest()
