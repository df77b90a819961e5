"""torch.histc's bins over a fixed range, counted in about half its time, and checked to be the same.

    bins = histc_bins(lo, hi, 2048)     # lo < hi: 0-dim float32 tensors
    counts = bins.count(x)               # int64: torch.histc(x, 2048, lo, hi), exactly, for x in [lo, hi]
    counts = bins.count(x, owned=True)   # the same, reusing x's memory (x is overwritten)

torch.histc on CPU puts each element in bin int((x - lo) * bins / (hi - lo)) (the last bin takes
x == hi), one element at a time in float32: 5.4 to 7.4 ns an element here (one thread, 8M
post-ReLU values). The same three float32 operations run vectorized, then a truncation and a
bincount, took 3.3 to 3.5 ns on a tensor that may be overwritten and 4.2 ns on one that may not.
They give the same bins wherever torch's kernels round as histc's loop does (IEEE float32, one
rounding per operation), and that is checked for each range rather than assumed:

Both maps from a float32 in [lo, hi] to a bin are monotone (each rounded operation is), so they are
equal on all of [lo, hi] when they are equal at lo, at hi, and at each float where the vectorized
map steps up, and at the float just below it. `histc_bins` finds those steps by bisection over the
float32 bit patterns and asks histc itself about every one (one call on ~4,100 values). Where they
differ anywhere, or hi - lo is not a usable divisor, `count` calls histc (in chunks of 2**24
elements: float32 counts stop being exact above that). The check runs every point through the
kernels' vector loops and, on a strided copy, through their scalar loops (a vector loop's tail), so
a kernel that rounds otherwise (a division by a reciprocal, a fused multiply-add) is caught.
"""

from __future__ import annotations

import functools
import threading

import torch

__all__ = ["HISTC_CHUNK", "Bins", "histc_bins", "release_scratch"]

HISTC_CHUNK = 1 << 24


class Bins:
    """Counts into `n` bins over [lo, hi] exactly as torch.histc does; `fast` says whether the
    vectorized map was found equal to histc's over this range."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, n: int):
        self.lo, self.hi, self.n = lo.to(torch.float32).reshape(()), hi.to(torch.float32).reshape(()), int(n)
        self.width = self.hi - self.lo  # float32, as histc's (rightmost - leftmost)
        usable = bool(self.lo < self.hi) and bool(torch.isfinite(self.width * self.n))
        self.fast = usable and _agrees_with_histc(self)

    def count(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """int64 counts of x's elements in each bin; elements outside [lo, hi] (and NaN) are not
        counted, as histc drops them. `owned`: x's memory may be overwritten."""
        flat = x.reshape(-1)
        if not self.fast or flat.numel() == 0:
            return self._histc(flat)
        if not owned:  # a tensor the caller still uses: check its range (values outside are histc's case)
            low, high = torch.aminmax(flat)
            if not (bool(low >= self.lo) and bool(high <= self.hi)):
                return self._histc(flat)
        t = flat if owned and flat.is_contiguous() and flat.dtype == torch.float32 else None
        with torch.inference_mode():  # pass 1 kept its values in inference mode: only there may they change
            index = _buffer("index", flat.numel(), torch.int32)
            _positions(flat, self, index, scaled=t)
            counts = torch.bincount(index, minlength=self.n + 1)
            counts[self.n - 1] += counts[self.n]  # x == hi: histc's last bin includes its right edge
        return counts[:self.n]

    def _histc(self, flat: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(self.n, dtype=torch.int64)
        for start in range(0, flat.numel(), HISTC_CHUNK):
            counts += torch.histc(flat[start:start + HISTC_CHUNK], self.n, min=float(self.lo), max=float(self.hi)).long()
        return counts


_SCRATCH = threading.local()  # per thread: the workers of one process count at once


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's reused buffer: fresh memory for every value would cost its page faults again."""
    held = getattr(_SCRATCH, name, None)
    if held is None or held.numel() < numel:
        with torch.inference_mode():  # used only there
            held = torch.empty(numel, dtype=dtype)
        setattr(_SCRATCH, name, held)
    return held[:numel]


def release_scratch() -> None:
    """Free this thread's buffers (a calibration's counting is over)."""
    _SCRATCH.__dict__.clear()


def _positions(x: torch.Tensor, bins: Bins, out: torch.Tensor, scaled: torch.Tensor | None = None) -> None:
    """The vectorized map: int((x - lo) * n / (hi - lo)) into int32 `out`, in histc's operation order
    (no fused or reordered arithmetic). `scaled`: where the float32 steps may be written (x itself,
    if the caller gave it up), else a scratch buffer."""
    if scaled is None:
        scaled = _buffer("scaled", x.numel(), torch.float32)
        torch.sub(x, bins.lo, out=scaled)
    else:
        scaled.sub_(bins.lo)
    scaled.mul_(bins.n).div_(bins.width)
    out.copy_(scaled)  # float -> int32 truncates toward zero, as histc's static_cast


@torch.inference_mode()  # as `count`: the scratch buffers are inference tensors
def _agrees_with_histc(bins: Bins) -> bool:
    """Whether `count`'s map equals histc's bin at lo, hi, and at and just below each float where
    the map steps up: by monotonicity, everywhere on [lo, hi]."""
    first, last = _key(bins.lo), _key(bins.hi)
    wanted = torch.arange(1, bins.n, dtype=torch.int64)
    low = torch.full_like(wanted, int(first))
    high = torch.full_like(wanted, int(last) + 1)  # the least key in [low, high) whose bin is >= wanted
    while bool((low < high).any()):
        mid = (low + high) // 2
        reached = _map(_float(mid), bins) >= wanted
        high, low = torch.where(reached, mid, high), torch.where(reached, low, mid + 1)
    steps = low[low <= last]
    keys = torch.unique(torch.cat([first.reshape(1), last.reshape(1), steps, steps - 1]))
    keys = keys[(keys >= first) & (keys <= last)]
    points = _float(keys)  # ascending
    truth = _histc_positions(points, bins)
    return all(torch.equal(_map(points, bins, layout), truth) for layout in ("scratch", "owned", "strided"))


def _map(points: torch.Tensor, bins: Bins, layout: str = "scratch") -> torch.Tensor:
    """`count`'s bins for these points, by the same code: into a scratch buffer, in place on a copy
    (`owned`), or in place on a strided copy (`strided`: torch's scalar loops, not its vector ones)."""
    out = torch.empty(points.numel(), dtype=torch.int32)
    scaled = None
    if layout == "owned":
        scaled = points.clone()
    elif layout == "strided":
        scaled = torch.empty(2 * points.numel())[::2]
        scaled.copy_(points)
    _positions(points, bins, out, scaled=scaled)
    positions = out.long()
    positions[positions == bins.n] = bins.n - 1  # as `count` folds bin n; anything above n stays a mismatch
    return positions


def _histc_positions(ascending: torch.Tensor, bins: Bins) -> torch.Tensor:
    """The bin histc puts each of these ascending values in: element i is in the first bin whose
    cumulative count exceeds i."""
    cumulative = torch.histc(ascending, bins.n, min=float(bins.lo), max=float(bins.hi)).long().cumsum(0)
    if int(cumulative[-1]) != ascending.numel():
        return torch.full((ascending.numel(),), -1, dtype=torch.int64)  # histc dropped one: not equal
    return torch.searchsorted(cumulative, torch.arange(ascending.numel()), right=True)


def _key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 that orders as the floats do (-0.0 just below +0.0)."""
    bits = x.reshape(-1).view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1).reshape(x.shape)


def _float(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key >= 0, key, -key - 1 - (1 << 31))
    return bits.to(torch.int32).view(torch.float32)


@functools.lru_cache(maxsize=256)
def _cached(lo: float, hi: float, n: int) -> Bins:
    return Bins(torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32), n)


def histc_bins(lo: torch.Tensor, hi: torch.Tensor, n: int) -> Bins:
    """The `Bins` of a range, checked once per process (workers of one process share it)."""
    return _cached(float(lo), float(hi), int(n))
