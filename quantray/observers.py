"""Observer statistics: record, merge exactly, load back. Pure torch, no Ray.

Accumulate, merge, derive, as three steps:
- a worker replaces each observer of its prepared model by a `_Probe` that records, per batch,
  the exact (min, max) its input reached (pass 1), then a histogram over the *global* range
  fixed after pass 1 (pass 2), counted in float64;
- `merge_ranges` (elementwise min/max) and `merge_histograms` (sums of integer counts) are
  associative and commutative, so the result is the same for any worker count, shard order or
  batch order: bit for bit;
- `load_merged` writes the merged state into the driver's observers, which derive the qparams
  once, in `convert_fx` (or `qparam_rows`).

For a single batch the result equals torch's own HistogramObserver; for many it is the histogram
torch would get if it saw all activations at once (torch's running re-binning is order-dependent).
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
    NoopObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    ReuseInputObserver,
)

from .errors import CalibrationError, DataError

__all__ = ["find_observers", "observer_aliases", "observer_signature", "attach_probes", "start_batch",
           "batch_ranges", "begin_histograms", "collect_histograms", "merge_ranges", "merge_histograms",
           "load_merged", "qparam_rows", "state_digest"]

HISTOGRAM, MINMAX, STATELESS = "histogram", "minmax", "stateless"
# Exact types, not isinstance: MovingAverageMinMaxObserver subclasses MinMaxObserver but its state
# is an order-dependent EMA, which an elementwise min/max would silently get wrong.
_KINDS = {HistogramObserver: HISTOGRAM, MinMaxObserver: MINMAX, PerChannelMinMaxObserver: MINMAX,
          FixedQParamsObserver: STATELESS, PlaceholderObserver: STATELESS, NoopObserver: STATELESS,
          ReuseInputObserver: STATELESS}
HISTC_CHUNK = 1 << 24  # float32 histc counts stop being exact above 2**24 elements (DESIGN.md)

Ranges = dict[str, tuple[torch.Tensor, torch.Tensor]]
Histograms = dict[str, tuple[torch.Tensor, int]]  # float64 counts, number of values counted


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
                               f"exactly yet; supported: {supported}")
    return kind


class _Probe(nn.Module):
    """Stands in for one observer on a worker: pass 1 records exact ranges, pass 2 fixed-range counts."""

    def __init__(self, name: str, observer: ObserverBase):
        super().__init__()
        self.name, self.kind = name, _kind(name, observer)
        self.observer = observer  # min/max observers compute per-batch state with torch's own code
        self.batch_min = self.batch_max = None
        self.phase = 1
        self.range = self.hist = None
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == STATELESS or x.numel() == 0:
            return x
        x_ = x.detach()
        if self.phase == 1:
            self._record_range(x_)
        elif self.kind == HISTOGRAM:
            if self.hist is None:
                raise CalibrationError(f"{self.name} saw data in pass 2 but none in pass 1: "
                                       "the forward pass is not deterministic here")
            self._count(x_)
        return x

    def _record_range(self, x: torch.Tensor) -> None:
        if self.kind == HISTOGRAM:
            lo, hi = torch.aminmax(x)
        else:
            self.observer.reset_min_max_vals()
            self.observer(x)
            lo, hi = self.observer.min_val.clone(), self.observer.max_val.clone()
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise DataError(f"NaN or Inf in the activation observed by {self.name}")
        if self.batch_min is None:
            self.batch_min, self.batch_max = lo, hi
        else:  # an observer shared by several nodes sees several tensors per batch
            self.batch_min, self.batch_max = torch.minimum(self.batch_min, lo), torch.maximum(self.batch_max, hi)

    def _count(self, x: torch.Tensor) -> None:
        lo, hi = self.range
        flat = x.reshape(-1)
        for start in range(0, flat.numel(), HISTC_CHUNK):
            chunk = flat[start:start + HISTC_CHUNK]
            # Same call as HistogramObserver.reset_histogram; counts are integers, exact in float64.
            self.hist += torch.histc(chunk, self.observer.bins, min=lo, max=hi).double()
            self.count += chunk.numel()


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


def start_batch(probes: dict[str, _Probe]) -> None:
    for probe in probes.values():
        probe.batch_min = probe.batch_max = None


def batch_ranges(probes: dict[str, _Probe]) -> Ranges:
    """The exact (min, max) each data-carrying observer saw in the current batch."""
    return {n: (p.batch_min, p.batch_max) for n, p in probes.items() if p.batch_min is not None}


def begin_histograms(probes: dict[str, _Probe], ranges: Ranges) -> None:
    """Switch to pass 2: histogram probes count into bins over the merged global range."""
    for name, probe in probes.items():
        probe.phase = 2  # min/max observers are final after pass 1; pass 2 only counts histograms
        if probe.kind == HISTOGRAM and name in ranges:
            probe.range = ranges[name]
            probe.hist = torch.zeros(probe.observer.bins, dtype=torch.float64)
            probe.count = 0


def collect_histograms(probes: dict[str, _Probe]) -> Histograms:
    """Each histogram probe's counts; checks that no value fell outside the range (histc drops them)."""
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


def merge_ranges(parts) -> Ranges:
    """Elementwise min of mins and max of maxes: exact, in any order."""
    merged: Ranges = {}
    for part in parts:
        for name, (lo, hi) in part.items():
            if name in merged:
                lo, hi = torch.minimum(merged[name][0], lo), torch.maximum(merged[name][1], hi)
            merged[name] = (lo, hi)
    return merged


def merge_histograms(parts) -> Histograms:
    """Sums of integer counts held in float64 (exact below 2**53): the same in any order."""
    merged: Histograms = {}
    for part in parts:
        for name, (hist, count) in part.items():
            if name in merged:
                hist, count = merged[name][0] + hist, merged[name][1] + count
            merged[name] = (hist, count)
    return merged


def load_merged(model: nn.Module, ranges: Ranges, histograms: Histograms) -> None:
    """Write merged statistics into the observers of the driver's prepared model (unseen ones are left)."""
    for name, obs in find_observers(model).items():
        kind = _kind(name, obs)
        if kind == STATELESS or name not in ranges:
            continue
        lo, hi = ranges[name]
        # Assigning through the buffer names keeps eps, bins and reduce_range untouched, and clones
        # avoid aliasing tensors that other observers or callers hold.
        obs.min_val, obs.max_val = lo.clone(), hi.clone()
        if kind == HISTOGRAM:
            if name not in histograms:
                raise CalibrationError(f"{name}: a range but no histogram was gathered")
            obs.histogram = histograms[name][0].to(torch.float32)


def qparam_rows(model: nn.Module, histograms: Histograms | None = None) -> list[dict]:
    """One row per observer with data state: name, aliases, class, min, max, scale, zero_point, count."""
    rows, aliases = [], observer_aliases(model)
    for name, obs in find_observers(model).items():
        if _kind(name, obs) == STATELESS:
            continue
        seen = bool(torch.isfinite(obs.min_val).all()) and obs.min_val.numel() > 0
        with warnings.catch_warnings():  # an unseen observer warns and returns the default qparams
            warnings.simplefilter("ignore")
            scale, zero_point = obs.calculate_qparams()
        if scale.numel() != 1:
            raise CalibrationError(f"{name}: per-channel activation observers are not supported yet")
        rows.append({
            "name": name, "aliases": aliases.get(name, []), "observer": type(obs).__name__,
            "dtype": str(obs.dtype).removeprefix("torch."), "min": float(obs.min_val) if seen else None,
            "max": float(obs.max_val) if seen else None, "scale": float(scale.item()),
            "zero_point": int(zero_point.item()),
            "count": int(histograms[name][1]) if histograms and name in histograms else None,
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
