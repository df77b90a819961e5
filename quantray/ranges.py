"""Activation range methods: an observer's clipping range, computed from its histogram and exact
min/max alone, so a merged calibration serves every method with no forward pass.

    [quantization]
    activation_range = "mse"     # "l2" (default) | "minmax" | "percentile" | "mse" | "entropy"
    percentile = 99.99           # for "percentile": two-sided, (100 - p) and p

| method     | range [a, b] (then torch's `_calculate_qparams(a, b)`: zero kept in range, reduce_range)  |
| ---------- | ----------------------------------------------------------------------------------------- |
| l2         | torch's own HistogramObserver search (a greedy approximation of L2 minimisation): today's |
| minmax     | the exact min and max (torch's MinMaxObserver: no histogram, no pass 2)                   |
| percentile | (100 - p)th and pth percentiles (numpy's) at bin resolution: the outer edges of their bins |
| mse        | the global minimum, over every pair of bin edges, of the expected squared error:          |
|            | N_in * step^2 / 12 (uniform rounding) + each clipped value's squared distance to the edge |
|            | (values uniform within their bin)                                                         |
| entropy    | TensorRT's KL-divergence search: the threshold t whose [0, t] histogram, with the values  |
|            | above t folded into its last bin, loses least information (KL) when merged into as many   |
|            | bins as the quantizer has levels (bin 0 takes bin 1's count first, as in TensorRT, so a   |
|            | ReLU's zeros do not decide). Exact (TensorRT's algorithm on its own terms) where the      |
|            | range is one-sided from zero, as after a ReLU (min = 0). A range that starts above zero is |
|            | searched from its minimum; one below zero is mirrored. For a two-sided range, TensorRT     |
|            | defines nothing (it is symmetric): the upper end is searched with the lower end at the min, |
|            | then the lower end (on the mirrored histogram) with the upper end fixed: a heuristic.      |

`RangeObserver` is torch's HistogramObserver with another `calculate_qparams`: the same buffers,
filled by the same exact merge; only the range it derives differs.
"""

from __future__ import annotations

import math

import torch
from torch.ao.quantization.observer import HistogramObserver

__all__ = ["METHODS", "RangeObserver", "percentile_range", "mse_range", "entropy_range"]

METHODS = ("l2", "minmax", "percentile", "mse", "entropy")


def percentile_range(hist: torch.Tensor, lo: float, hi: float, p: float) -> tuple[float, float]:
    """[a, b] at bin resolution: numpy's linear-interpolation percentile of N values at q lies between
    the sorted values floor((N - 1) q) and ceil((N - 1) q); a is the lower edge of the bin holding the
    first for q = 1 - p/100, b the upper edge of the bin holding the second for q = p/100."""
    counts = hist.double()
    cumulative, n = counts.cumsum(0), int(counts.sum())
    width = (hi - lo) / len(counts)

    def bin_of(rank: int) -> int:  # the bin of the sorted value at 0-based `rank`
        return min(int(torch.searchsorted(cumulative, torch.tensor([float(rank)], dtype=torch.float64), right=True)),
                   len(counts) - 1)

    lower = bin_of(math.floor((n - 1) * (1 - p / 100)))
    upper = bin_of(math.ceil((n - 1) * p / 100))
    return lo + lower * width, lo + (upper + 1) * width


def mse_range(hist: torch.Tensor, lo: float, hi: float, quant_min: int, quant_max: int,
              symmetric: bool = False) -> tuple[float, float]:
    """[a, b] at bin edges minimising the expected squared quantization error (module docstring).
    Computed in bin units (x = lo + u * width) with prefix sums: every pair in one vectorised step.
    The quantizer's step is its range, with zero in it (symmetric: twice the larger side), over its levels."""
    c = hist.double()
    n = len(c)
    centers = torch.arange(n, dtype=torch.float64) + 0.5
    zero = -lo / (hi - lo) * n  # where 0 falls, in bin units: the quantizer's range always holds it
    prefix = [torch.cat([torch.zeros(1, dtype=torch.float64), (c * centers ** k).cumsum(0)]) for k in range(3)]
    a = torch.arange(n, dtype=torch.float64)[:, None]          # candidate lower edges: bin j's lower edge, j = a
    b = torch.arange(1, n + 1, dtype=torch.float64)[None, :]   # candidate upper edges: bin k's upper edge, k = b - 1
    j, k1 = torch.arange(n)[:, None], torch.arange(1, n + 1)[None, :]
    below = prefix[2][j] - 2 * a * prefix[1][j] + a ** 2 * prefix[0][j] + prefix[0][j] / 12
    c_above, m1_above, m2_above = (prefix[i][n] - prefix[i][k1] for i in range(3))
    above = m2_above - 2 * b * m1_above + b ** 2 * c_above + c_above / 12
    if symmetric:
        step = 2 * torch.maximum(b - zero, zero - a).clamp(min=0) / (quant_max - quant_min)
    else:
        step = (torch.clamp(b, min=zero) - torch.clamp(a, max=zero)) / (quant_max - quant_min)
    inside = prefix[0][k1] - prefix[0][j]
    error = inside * step ** 2 / 12 + below + above
    error = torch.where(k1 > j, error, torch.inf)  # a below b
    best = int(torch.argmin(error))  # the first minimum in row-major order: deterministic
    width = (hi - lo) / n
    return lo + (best // n) * width, lo + (best % n + 1) * width


def _kl_threshold(c: torch.Tensor, levels: int) -> int:
    """TensorRT's search on a one-sided histogram `c` (bin 0 starts at the range's fixed end): the
    number of bins i (levels <= i <= len(c)) to keep, by the least KL(P || Q), the last on ties.
    As TensorRT does, bin 0 first takes bin 1's count, so a ReLU's many exact zeros do not decide."""
    n = len(c)
    if n <= levels:
        return n
    c = c.clone()
    c[0] = c[1]
    best, best_kl = n, float("inf")
    for i in range(levels, n + 1):
        kept = c[:i]
        nonzero = kept != 0
        p = kept.clone()
        p[i - 1] += c[i:].sum()  # the clipped values land on the last level
        # Q: the i bins merged into `levels` groups (bin idx -> idx * levels // i, TensorRT's
        # linspace split), each group's count spread evenly over its non-empty bins.
        group = torch.arange(i) * levels // i
        totals = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, kept)
        occupied = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, nonzero.double())
        q = torch.where(nonzero, totals[group] / occupied[group].clamp(min=1), 0.0)
        p, q = p / p.sum(), q / q.sum()
        support = p > 0
        if bool((q[support] == 0).any()):
            continue  # infinite divergence
        kl = float((p[support] * (p[support] / q[support]).log()).sum())
        if kl <= best_kl:
            best, best_kl = i, kl
    return best


def entropy_range(hist: torch.Tensor, lo: float, hi: float, quant_min: int, quant_max: int) -> tuple[float, float]:
    """[a, b] by the KL-divergence search (module docstring for where it is exact)."""
    c = hist.double()
    n, levels = len(c), quant_max - quant_min + 1
    width = (hi - lo) / n
    if lo >= 0:
        return lo, lo + _kl_threshold(c, levels) * width
    if hi <= 0:
        return hi - _kl_threshold(c.flip(0), levels) * width, hi
    upper = _kl_threshold(c, levels)
    lower = _kl_threshold(c[:upper].flip(0), levels)
    return lo + (upper - lower) * width, lo + upper * width


class RangeObserver(HistogramObserver):
    """torch's HistogramObserver (the same buffers and merge) whose range comes from `method`."""

    def __init__(self, method: str = "mse", percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS[2:]:
            raise ValueError(f"RangeObserver method {method!r}: one of {', '.join(METHODS[2:])} "
                             "(l2 is HistogramObserver itself, minmax MinMaxObserver)")
        self.method, self.percentile = method, percentile

    @property
    def range_method(self) -> str:
        return f"percentile {self.percentile:g}" if self.method == "percentile" else self.method

    def calculate_qparams(self):
        if self.min_val == float("inf") and self.max_val == float("-inf"):
            return super().calculate_qparams()  # unseen: torch's warning and default qparams
        lo, hi = float(self.min_val), float(self.max_val)
        if lo == hi:
            a, b = lo, hi
        elif self.method == "percentile":
            a, b = percentile_range(self.histogram, lo, hi, self.percentile)
        elif self.method == "mse":
            symmetric = self.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
            a, b = mse_range(self.histogram, lo, hi, self.quant_min, self.quant_max, symmetric)
        else:
            a, b = entropy_range(self.histogram, lo, hi, self.quant_min, self.quant_max)
        return self._calculate_qparams(torch.tensor(a, dtype=self.min_val.dtype),
                                       torch.tensor(b, dtype=self.max_val.dtype))

    def extra_repr(self) -> str:
        return f"method={self.range_method}"
