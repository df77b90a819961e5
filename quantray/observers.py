"""Observer statistics: record on workers, merge on the driver, load back. Pure torch, no Ray.

Accumulate, merge, derive, as three steps. A worker replaces each observer of its prepared model
by a `_Probe`. Pass 1 logs, per batch and per call, the exact (min, max) each observer saw; every
mode starts from these logs. Then, by merge mode:

- exact: pass 2 counts each histogram observer's inputs into bins over the *global* range (float64
  counts, exact); the driver sums them. Same result for any worker count, shard or batch order;
  for one batch it equals torch's own HistogramObserver.
- replay: from the logs the driver plans, for every call in canonical (batch id, call) order, the
  running range torch's HistogramObserver would have; pass 2 computes each call's update histogram
  with torch's own `histc`, and the driver replays torch's reset/add/combine steps in that order:
  bit-identical to torch's single-process calibration over the same batches.
- fast: one pass; each worker's own torch HistogramObserver runs over its shard and the driver
  re-bins the shard histograms onto their union range. Approximate; depends on the worker count.

Min/max observers (and the moving-average ones, whose EMA depends on order) never need pass 2:
the driver replays their per-call log through the observer itself, in canonical order, which is
exactly what torch's single-process calibration computes.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
from torch import nn
from torch.ao.quantization.observer import (
    FixedQParamsObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    NoopObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    ReuseInputObserver,
)

from .errors import CalibrationError, DataError

__all__ = ["MODES", "find_observers", "observer_aliases", "observer_signature", "attach_probes",
           "global_ranges", "replay_plan", "merge_counts", "load_merged", "qparam_rows", "state_digest"]

MODES = ("exact", "replay", "fast")
HISTOGRAM, MINMAX, STATELESS = "histogram", "minmax", "stateless"
# Exact types, not isinstance: MovingAverageMinMaxObserver subclasses MinMaxObserver, and a
# subclass we have not checked could hold state that our merge would silently get wrong.
_KINDS = {HistogramObserver: HISTOGRAM, MinMaxObserver: MINMAX, PerChannelMinMaxObserver: MINMAX,
          MovingAverageMinMaxObserver: MINMAX, MovingAveragePerChannelMinMaxObserver: MINMAX,
          FixedQParamsObserver: STATELESS, PlaceholderObserver: STATELESS, NoopObserver: STATELESS,
          ReuseInputObserver: STATELESS}
HISTC_CHUNK = 1 << 24  # float32 histc counts stop being exact above 2**24 elements (DESIGN.md)

Range = tuple[torch.Tensor, torch.Tensor]
BatchLog = dict[str, list[Range]]          # observer -> (min, max) of each call, in call order
Counts = dict[str, tuple[torch.Tensor, int]]  # observer -> float64 bin counts, values counted


def find_observers(model: nn.Module) -> dict[str, ObserverBase]:
    """Each observer instance once, under the first name it has (pooling reuses its input's observer)."""
    found, seen = {}, set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, ObserverBase) and id(module) not in seen:
            seen.add(id(module))
            found[name] = module
    return found


def observer_aliases(model: nn.Module) -> dict[str, list[str]]:
    """For each observer's first name, the other names the same instance is reachable by."""
    first, aliases = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, ObserverBase):
            if id(module) in first:
                aliases[first[id(module)]].append(name)
            else:
                first[id(module)] = name
                aliases[name] = []
    return aliases


def observer_signature(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class) of each observer: workers and driver must agree on it exactly."""
    return [(name, type(obs).__name__) for name, obs in find_observers(model).items()]


def _kind(name: str, observer: ObserverBase) -> str:
    kind = _KINDS.get(type(observer))
    if kind is None:
        supported = ", ".join(sorted(t.__name__ for t in _KINDS))
        raise CalibrationError(f"observer {name} is a {type(observer).__name__}, which quantray cannot merge "
                               f"exactly; supported: {supported}")
    return kind


class _Probe(nn.Module):
    """Stands in for one observer on a worker. Phases: "log" (pass 1), "count" (exact pass 2),
    "replay" (replay pass 2); with `run_observer`, histogram probes also feed torch's own observer
    during "log" (fast mode)."""

    def __init__(self, name: str, observer: ObserverBase):
        super().__init__()
        self.name, self.kind = name, _kind(name, observer)
        self.observer = observer  # this worker's copy: computes per-call min/max with torch's code
        self.phase, self.run_observer = "log", False
        self.calls: list[Range] = []
        self.range, self.hist, self.count = None, None, 0
        self.plan: list[Range] = []
        self.updates: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == STATELESS or x.numel() == 0:  # torch's observers skip empty tensors too
            return x
        x_ = x.detach()
        if self.phase == "log":
            self._log(x_)
        elif self.kind == HISTOGRAM and self.phase == "count":
            self._count(x_)
        elif self.kind == HISTOGRAM and self.phase == "replay":
            self._update(x_)
        return x

    def _log(self, x: torch.Tensor) -> None:
        if self.kind == HISTOGRAM:
            lo, hi = torch.aminmax(x)
        else:  # per-tensor or per-channel, exactly as this observer class reduces its input
            self.observer.reset_min_max_vals()
            self.observer(x)
            lo, hi = self.observer.min_val.clone(), self.observer.max_val.clone()
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise DataError(f"NaN or Inf in the activation observed by {self.name}")
        self.calls.append((lo, hi))
        if self.kind == HISTOGRAM and self.run_observer:
            self.observer(x)

    def _count(self, x: torch.Tensor) -> None:
        if self.hist is None:
            raise CalibrationError(f"{self.name} saw data in pass 2 but none in pass 1: "
                                   "the forward pass is not deterministic here")
        lo, hi = self.range
        flat = x.reshape(-1)
        for start in range(0, flat.numel(), HISTC_CHUNK):
            chunk = flat[start:start + HISTC_CHUNK]
            # The call HistogramObserver.reset_histogram makes; integer counts, exact in float64.
            self.hist += torch.histc(chunk, self.observer.bins, min=lo, max=hi).double()
            self.count += chunk.numel()

    def _update(self, x: torch.Tensor) -> None:
        if len(self.updates) >= len(self.plan):
            raise CalibrationError(f"{self.name} was called more often in pass 2 than in pass 1")
        lo, hi = self.plan[len(self.updates)]
        # Exactly HistogramObserver.forward's call, on the whole tensor, over the running range.
        self.updates.append(torch.histc(x, self.observer.bins, min=lo, max=hi))


def attach_probes(model: nn.Module) -> dict[str, _Probe]:
    """Replace every observer of `model`, in place, by a probe; names sharing an instance share a probe."""
    probes, by_id = {}, {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, ObserverBase):
            continue
        if id(module) not in by_id:
            by_id[id(module)] = probes[name] = _Probe(name, module)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, by_id[id(module)])
    return probes


# --- worker side: one batch at a time ----------------------------------------------------------

def start_log(probes: dict[str, _Probe], run_observer: bool = False) -> None:
    for probe in probes.values():
        probe.phase, probe.run_observer, probe.calls = "log", run_observer, []


def batch_log(probes: dict[str, _Probe]) -> BatchLog:
    return {n: p.calls for n, p in probes.items() if p.calls}


def start_counts(probes: dict[str, _Probe], ranges: dict[str, Range]) -> None:
    """Exact pass 2: histogram probes count into bins over the merged global range."""
    for name, probe in probes.items():
        probe.phase = "count"
        if probe.kind == HISTOGRAM and name in ranges:
            probe.range = ranges[name]
            probe.hist, probe.count = torch.zeros(probe.observer.bins, dtype=torch.float64), 0


def collect_counts(probes: dict[str, _Probe]) -> Counts:
    """Each histogram probe's counts; checks no value fell outside the range (histc drops them)."""
    out = {}
    for name, probe in probes.items():
        if probe.kind != HISTOGRAM or probe.hist is None:
            continue
        counted = int(probe.hist.sum().item())
        if counted != probe.count:
            raise CalibrationError(
                f"{name}: {probe.count - counted} of {probe.count} values fell outside the pass-1 range "
                f"[{probe.range[0].item()}, {probe.range[1].item()}]: the forward pass is not deterministic here")
        out[name] = (probe.hist.clone(), probe.count)
    return out


def start_replay(probes: dict[str, _Probe], plan: BatchLog) -> None:
    """Replay pass 2 for one batch: each histogram probe gets the running range of each of its calls."""
    for name, probe in probes.items():
        probe.phase, probe.updates = "replay", []
        probe.plan = plan.get(name, []) if probe.kind == HISTOGRAM else []


def batch_updates(probes: dict[str, _Probe]) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, probe in probes.items():
        if len(probe.updates) != len(probe.plan):
            raise CalibrationError(f"{name} was called {len(probe.updates)} times in pass 2, {len(probe.plan)} in pass 1")
        if probe.updates:
            out[name] = probe.updates
    return out


def observer_states(probes: dict[str, _Probe]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fast mode: each histogram observer's own (min, max, histogram) after this worker's shard."""
    return {n: (p.observer.min_val.clone(), p.observer.max_val.clone(), p.observer.histogram.clone())
            for n, p in probes.items() if p.kind == HISTOGRAM and torch.isfinite(p.observer.min_val).all()}


# --- driver side: pure merges --------------------------------------------------------------------

def _canonical(logs: dict[int, BatchLog]):
    """Every (observer, (min, max)) call in canonical order: batch id, then call order."""
    for batch_id in sorted(logs):
        for name, calls in logs[batch_id].items():
            for call in calls:
                yield batch_id, name, call


def global_ranges(logs: dict[int, BatchLog]) -> dict[str, Range]:
    """Elementwise min of mins and max of maxes over every call: exact, in any order."""
    ranges: dict[str, Range] = {}
    for _, name, (lo, hi) in _canonical(logs):
        if name in ranges:
            lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
        ranges[name] = (lo, hi)
    return ranges


def replay_plan(logs: dict[int, BatchLog]) -> dict[int, BatchLog]:
    """For each batch, the range each call's update histogram is taken over in torch's forward:
    the call's own range for an observer's first call (reset_histogram), else the running
    min/max including this call."""
    running: dict[str, Range] = {}
    plan: dict[int, BatchLog] = {b: {} for b in logs}
    for batch_id, name, (lo, hi) in _canonical(logs):
        if name in running:
            lo, hi = torch.min(running[name][0], lo), torch.max(running[name][1], hi)
        running[name] = (lo, hi)
        plan[batch_id].setdefault(name, []).append((lo, hi))
    return plan


def merge_counts(parts) -> Counts:
    """Sums of integer counts held in float64 (exact below 2**53): the same in any order."""
    merged: Counts = {}
    for part in parts:
        for name, (hist, count) in part.items():
            if name in merged:
                hist, count = merged[name][0] + hist, merged[name][1] + count
            merged[name] = (hist, count)
    return merged


def load_merged(model: nn.Module, mode: str, logs: dict[int, BatchLog], pass2=None) -> None:
    """Write the merged statistics into the observers of the driver's prepared (uncalibrated) model.

    `pass2` is, by mode: exact, the merged `Counts`; replay, {batch_id: {name: [update, ...]}};
    fast, the list of per-shard `observer_states` in shard order. Unseen observers are left as is.
    """
    observers = find_observers(model)
    calls: dict[str, list[Range]] = {}
    for _, name, call in _canonical(logs):  # one walk over the log, in canonical order
        calls.setdefault(name, []).append(call)
    for name, obs in observers.items():
        if _kind(name, obs) == MINMAX:
            _replay_minmax(obs, calls.get(name, []))
    histograms = [n for n, o in observers.items() if _kind(n, o) == HISTOGRAM]
    if mode == "exact":
        ranges = global_ranges(logs)
        for name in histograms:
            if name in ranges:
                if name not in pass2:
                    raise CalibrationError(f"{name}: a range but no histogram was gathered")
                # Assigning through the buffer names keeps eps, bins and reduce_range; clones avoid
                # aliasing tensors that callers still hold.
                obs = observers[name]
                obs.min_val, obs.max_val = ranges[name][0].clone(), ranges[name][1].clone()
                obs.histogram = pass2[name][0].to(torch.float32)
    elif mode == "replay":
        plan = replay_plan(logs)
        for name in histograms:
            steps = [(plan[b][name][i], pass2[b][name][i]) for b in sorted(plan) if name in plan[b]
                     for i in range(len(plan[b][name]))]
            _replay_histogram(observers[name], steps)
    elif mode == "fast":
        for name in histograms:
            states = [s[name] for s in pass2 if name in s]
            if states:
                _combine_shards(observers[name], states)
    else:
        raise ValueError(f"unknown merge mode {mode!r}; valid: {', '.join(MODES)}")


def _replay_minmax(obs: ObserverBase, calls: list[Range]) -> None:
    """Feed each logged call through the observer as a tensor whose min and max are the call's:
    the observer then does exactly the arithmetic it did in one process (for an EMA, too)."""
    for lo, hi in calls:
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


def _replay_histogram(obs: HistogramObserver, steps) -> None:
    """HistogramObserver.forward's state updates, given each call's range and update histogram."""
    for i, ((lo, hi), update) in enumerate(steps):
        if i == 0:  # reset_histogram
            obs.min_val, obs.max_val, obs.histogram = lo.clone(), hi.clone(), update.clone()
        elif torch.equal(lo, obs.min_val) and torch.equal(hi, obs.max_val):
            obs.histogram = obs.histogram + update
        else:
            obs.histogram = obs._combine_histograms(obs.histogram, obs.min_val, obs.max_val, update, lo, hi)
            obs.min_val, obs.max_val = lo.clone(), hi.clone()


def _combine_shards(obs: HistogramObserver, states) -> None:
    """Fast mode: re-bin each shard's histogram onto the union range with torch's own re-binning."""
    lo = torch.stack([s[0] for s in states]).min()
    hi = torch.stack([s[1] for s in states]).max()
    combined = torch.zeros(obs.bins)
    for s_lo, s_hi, hist in states:
        combined = obs._combine_histograms(hist, s_lo, s_hi, combined, lo, hi)
    obs.min_val, obs.max_val, obs.histogram = lo.clone(), hi.clone(), combined


def qparam_rows(model: nn.Module, counts: Counts | None = None) -> list[dict]:
    """One row per observer with data state: name, aliases, class, min, max, scale, zero_point, count."""
    rows, aliases = [], observer_aliases(model)
    for name, obs in find_observers(model).items():
        if _kind(name, obs) == STATELESS:
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
            "max": float(obs.max_val) if seen else None, "scale": float(scale.item()),
            "zero_point": int(zero_point.item()),
            "count": int(counts[name][1]) if counts and name in counts else None,
        })
    return rows


def state_digest(model: nn.Module) -> str:
    """sha256 of every observer's name, class and state buffers: equal digests, equal INT8 qparams."""
    h = hashlib.sha256()
    for name, obs in sorted(find_observers(model).items()):
        h.update(f"{name}:{type(obs).__name__};".encode())
        for key, buf in sorted(obs.state_dict().items()):
            t = buf.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()
