"""Worker side of calibration: probes stand in for observers and record statistics per FP32 value.

    recorder = attach_probes(prepared)        # every observer call site now calls a probe
    recorder.start_log(fast=False)            # pass 1: the exact (min, max) of every value
    prepared(x)
    recorder.batch_log()                      # {value key: {reduction: (min, max) or None if empty}}

Pass 2, by mode: `start_counts(requests)` counts each value into float64 bins over fixed ranges
across a shard (exact); `start_replay(requests)` takes torch's own update histogram of each value
over its planned running range (replay). With `fast`, histogram probes also feed torch's own
observer during pass 1 (fast mode). After `keep()`, pass 1 also keeps each histogram-observed
tensor, so that pass 2 can `observe` it again without a forward. Values a graph computes twice
under two observers are recorded once. Pure torch: no Ray, no driver-side merging (`merge`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import CalibrationError, DataError
from . import sites
from .histc import HISTC_CHUNK, histc_bins, release_scratch

__all__ = ["Recorder", "attach_probes", "count_key", "Zeroless", "keep_copy"]


def count_key(value: str, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> tuple:
    """How a histogram of `value` over [lo, hi] in `bins` bins is named, on workers and driver alike."""
    return value, float(lo), float(hi), int(bins)


class Recorder:
    """One worker's statistics, per value, for the pass in flight."""

    def __init__(self):
        self.phase, self.fast = "log", False
        self.log: dict[str, dict] = {}
        self.requests: dict[str, list[tuple]] = {}  # value -> [(lo, hi, bins)] (count and replay phases)
        self.counts: dict[tuple, list] = {}         # count key -> [float64 bins, values counted]
        self.updates: dict[tuple, torch.Tensor] = {}
        self.kept: dict | None = None
        self._done: set = set()

    def start_log(self, fast: bool = False) -> None:
        self.phase, self.fast, self.log, self._done = "log", fast, {}, set()

    def batch_log(self) -> dict:
        return self.log

    def start_counts(self, requests: dict) -> None:
        self.phase, self.requests, self.counts = "count", requests, {}
        for value, wanted in requests.items():
            for lo, hi, bins in wanted:
                self.counts[count_key(value, lo, hi, bins)] = [torch.zeros(bins, dtype=torch.float64), 0]
        self._bins = {(float(lo), float(hi), bins): histc_bins(lo, hi, bins)
                      for wanted in requests.values() for lo, hi, bins in wanted}

    def start_batch(self) -> None:
        self._done = set()

    def collect_counts(self) -> dict:
        """Each requested histogram; checks no value fell outside its range (histc drops them)."""
        release_scratch()
        out = {}
        for key, (hist, n) in self.counts.items():
            counted = int(hist.sum().item())
            if counted != n:
                raise CalibrationError(f"{key[0]}: {n - counted} of {n} values fell outside the pass-1 range "
                                       f"[{key[1]}, {key[2]}]: the forward pass is not deterministic here")
            out[key] = (hist.clone(), n)
        return out

    def start_replay(self, requests: dict) -> None:
        self.phase, self.requests, self.updates, self._done = "replay", requests, {}, set()

    def batch_updates(self) -> dict:
        missing = [key for key in self.requests if not any(k[0] == key for k in self.updates)]
        if missing:
            raise CalibrationError(f"{missing[0]} was planned for pass 2 but not computed: "
                                   "the forward pass is not deterministic here")
        return self.updates

    def see(self, probe: "_Probe", x: torch.Tensor) -> None:
        if self.phase == "log":
            self._log(probe, x)
            if self.kept is not None and probe.kind == sites.HISTOGRAM and probe.value.key not in self.kept:
                self.kept[probe.value.key] = (probe.value, keep_copy(x))
        else:
            self.observe(probe.value, x)

    def keep(self) -> None:
        """From now on, pass 1 also keeps each histogram-observed value (float32, unchanged) in
        `kept` ({value key: (value, tensor)}), for pass 2 to count without a second forward."""
        self.kept = {}

    def observe(self, value: sites.Value, x: torch.Tensor, owned: bool = False) -> None:
        """Pass 2's handling of one observed value (from a forward, or kept from pass 1: then
        `owned`, and counting may overwrite it)."""
        if (value.key, self.phase) in self._done:
            return
        elif self.phase == "count":
            self._count(value, x, owned)
        elif self.phase == "replay":
            for lo, hi, bins in self.requests.get(value.key, ()):
                # Exactly HistogramObserver.forward's call, on the whole tensor, over the running range.
                self.updates[count_key(value.key, lo, hi, bins)] = self._histc(x, lo, hi, bins)
        self._done.add((value.key, self.phase))

    def _log(self, probe: "_Probe", x: torch.Tensor) -> None:
        entry = self.log.setdefault(probe.value.key, {})
        if probe.kind == sites.HISTOGRAM and self.fast:
            probe.observer(x)
        if probe.reduction in entry:
            return
        if x.numel() == 0:  # torch's observers skip empty tensors too
            entry[probe.reduction] = None
            return
        if probe.reduction == sites.TENSOR:
            lo, hi = torch.aminmax(x)
        else:  # per channel, exactly as this observer class reduces its input
            probe.observer.reset_min_max_vals()
            probe.observer(x)
            lo, hi = probe.observer.min_val.clone(), probe.observer.max_val.clone()
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise DataError(f"NaN or Inf in the output of {probe.value.label}")
        entry[probe.reduction] = (lo, hi)

    def _count(self, value: sites.Value, x, owned: bool) -> None:
        wanted = self.requests.get(value.key, ())
        if not wanted or x.numel() == 0:
            return
        for i, (lo, hi, bins) in enumerate(wanted):
            slot = self.counts[count_key(value.key, lo, hi, bins)]
            # The bins of HistogramObserver.reset_histogram's histc call; integer counts, exact in float64.
            last = i == len(wanted) - 1  # x is given up only for its last range
            counter = self._bins[float(lo), float(hi), bins]
            if isinstance(x, Zeroless):
                slot[0] += counter.count(x.nonzero, owned=owned and last) + x.zeros * counter.count(_ZERO)
            else:
                slot[0] += counter.count(x, owned=owned and last)
            slot[1] += x.numel()

    @staticmethod
    def _histc(x, lo, hi, bins) -> torch.Tensor:
        if isinstance(x, Zeroless):  # float32 counts, all below 2**24 here: exact, so the sum is histc's
            return torch.histc(x.nonzero, bins, min=lo, max=hi) + x.zeros * torch.histc(_ZERO, bins, min=lo, max=hi)
        return torch.histc(x, bins, min=lo, max=hi)


_ZERO = torch.zeros(1)


@dataclass(frozen=True)
class Zeroless:
    """A kept value without its zeros (a ReLU's output is often half zeros): its other elements in
    order, and how many zeros. Counts over any range are those of the whole tensor: every zero
    (either sign: x - lo is then -lo, or a zero if lo is) lands in one bin."""

    nonzero: torch.Tensor
    zeros: int

    def numel(self) -> int:
        return self.nonzero.numel() + self.zeros

    @property
    def nbytes(self) -> int:
        return self.nonzero.numel() * self.nonzero.element_size()


def keep_copy(x: torch.Tensor):
    """Pass 1's copy of a value for pass 2 (a later in-place op may change x): a `Zeroless` where at
    least a quarter of it is zero (judged on every 16th element), else a clone. Fresh memory is
    dear (page faults), and counting skips the zeros too. Tensors of 2**24 elements or more stay
    whole: histc's float32 counts are exact below that, so replay's sum of two histc calls is one's."""
    if x.dtype != torch.float32 or x.numel() >= HISTC_CHUNK:
        return x.clone()
    a = x.detach().reshape(-1).numpy()
    sample = a[::16]  # which form is cheaper; either gives the same counts
    if np.count_nonzero(sample) > 0.75 * sample.size:
        return x.clone()
    nonzero = np.extract(a != 0, a)
    return Zeroless(torch.from_numpy(nonzero), a.size - nonzero.size)


class _Probe(nn.Module):
    """Stands in for one observer call site; the observer (shared by its sites) is this worker's
    copy: it reduces per-channel inputs with torch's code and, in fast mode, runs as torch's own."""

    def __init__(self, recorder: Recorder, value: sites.Value, observer, kind: str):
        super().__init__()
        self.recorder, self.value, self.kind = recorder, value, kind
        self.observer, self.reduction = observer, sites.reduction_of(observer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != sites.STATELESS:
            self.recorder.see(self, x.detach())
        return x


def attach_probes(model: torch.fx.GraphModule) -> Recorder:
    """Point every observer call of `model`'s graph, in place, at a probe of its own (the observer
    it replaces stays with the probe); return the recorder the probes report to."""
    recorder = Recorder()
    for node, value in sites.observer_calls(model):
        observer = model.get_submodule(node.target)
        if isinstance(observer, _Probe):
            raise CalibrationError(f"observer {node.target} is called at two places in the graph; "
                                   "quantray needs one call site per observer attribute")
        # kind_of also refuses observer classes quantray cannot merge exactly, by name
        probe = _Probe(recorder, value, observer, sites.kind_of(node.target, observer))
        parent, _, leaf = node.target.rpartition(".")
        setattr(model.get_submodule(parent), leaf, probe)
    return recorder
