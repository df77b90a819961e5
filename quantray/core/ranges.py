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

import contextlib
import functools
import hashlib
import math

import torch
from torch.ao.quantization.observer import HistogramObserver

__all__ = ["METHODS", "RangeMethod", "RangeObserver", "percentile_range", "mse_range", "entropy_range", "l2_remembered",
           "settle"]

METHODS = ("l2", "minmax", "percentile", "mse", "entropy")
_RANGES: dict[tuple, tuple[float, float]] = {}  # an observer state's range, by method: see clipping_range
_L2: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # torch's l2 search, by observer state: l2_remembered
_L2_SEARCH = HistogramObserver._non_linear_param_search  # torch's own, whether or not l2_remembered is in force


def _state_key(obs) -> tuple:
    return (float(obs.min_val), float(obs.max_val), str(obs.histogram.dtype),
            hashlib.sha256(obs.histogram.detach().double().numpy().tobytes()).hexdigest())


def _remember(table: dict, key: tuple, compute):
    found = table.get(key)
    if found is None:
        found = compute()
        if len(table) >= 4096:
            table.pop(next(iter(table), None), None)  # another thread may have taken it first
        table[key] = found
    return found


def _l2_key(obs) -> tuple:
    return (obs.bins, obs.dst_nbins, *_state_key(obs))


def settle(model: torch.nn.Module) -> None:
    """Compute every histogram observer's range in `model` (its method's, or torch's l2 search) into
    the tables `clipping_range` and `l2_remembered` read, before convert asks for them. convert runs
    alone among worker threads (`tracing.TURNS`); this part need not: its searches are large tensor
    operations that run beside another thread's forwards and searches (the GIL is let go inside
    them). The same functions of the same state: the same bits."""
    for obs in model.modules():
        if not (isinstance(obs, RangeMethod) or type(obs) is HistogramObserver):
            continue
        if obs.min_val == float("inf") and obs.max_val == float("-inf"):
            continue  # unseen: torch's default qparams, nothing to search
        if isinstance(obs, RangeMethod):
            obs.clipping_range()
        else:
            _remember(_L2, _l2_key(obs), lambda: _L2_SEARCH(obs))


@contextlib.contextmanager
def l2_remembered():
    """While the block runs, torch's HistogramObserver l2 search (`_non_linear_param_search`: 5-7 ms
    per observer, 0.5 s of mobilenet_v3's convert_fx here) is remembered per observer state (its
    inputs: bins, dst_nbins, min, max, histogram) and given back as copies: every trial of
    `quantray tune` converts the same merged statistics again. A pure function of its inputs, so
    the result is the same bits. For blocks that no other thread computes beside (`tracing.TURNS`'s
    alone: convert)."""
    search = HistogramObserver._non_linear_param_search

    def remembered(obs):
        found = _remember(_L2, _l2_key(obs), lambda: _L2_SEARCH(obs))
        return tuple(t.clone() for t in found)

    HistogramObserver._non_linear_param_search = remembered
    try:
        yield
    finally:
        HistogramObserver._non_linear_param_search = search


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
    The quantizer always holds zero (torch's `_calculate_qparams`), so only a lower edge at or below
    zero and an upper edge at or above it clip anything: a one-sided range searches one end.
    Computed in bin units (x = lo + u * width) with prefix sums, every candidate pair in one
    vectorised step; the quantizer's step is its range over its levels (symmetric: twice the
    larger side)."""
    c = hist.double()
    n = len(c)
    centers = torch.arange(n, dtype=torch.float64) + 0.5
    zero = -lo / (hi - lo) * n  # where 0 falls, in bin units
    prefix = [torch.cat([torch.zeros(1, dtype=torch.float64), (c * centers ** k).cumsum(0)]) for k in range(3)]
    j = torch.arange(0, min(n - 1, math.floor(zero)) + 1) if lo < 0 else torch.tensor([0])
    k1 = torch.arange(max(1, math.ceil(zero)), n + 1) if hi > 0 else torch.tensor([n])
    a, b = j.double(), k1.double()
    # values below a (bins 0..j-1) clip to a, above b (bins k1..n-1) to b; each uniform in its bin
    below = prefix[2][j] - 2 * a * prefix[1][j] + a ** 2 * prefix[0][j] + prefix[0][j] / 12
    c_above, m1_above, m2_above = (prefix[i][n] - prefix[i][k1] for i in range(3))
    above = m2_above - 2 * b * m1_above + b ** 2 * c_above + c_above / 12
    if symmetric:
        step = 2 * torch.maximum(b[None, :] - zero, zero - a[:, None]) / (quant_max - quant_min)
    else:
        step = (b[None, :].clamp(min=zero) - a[:, None].clamp(max=zero)) / (quant_max - quant_min)
    inside = prefix[0][k1][None, :] - prefix[0][j][:, None]
    error = inside * step ** 2 / 12 + below[:, None] + above[None, :]
    error = torch.where(k1[None, :] > j[:, None], error, torch.inf)
    best = int(torch.argmin(error))  # the first minimum in row-major order: deterministic
    width = (hi - lo) / n
    return lo + int(j[best // len(k1)]) * width, lo + int(k1[best % len(k1)]) * width


def _kl_threshold(c: torch.Tensor, levels: int) -> int:
    """TensorRT's search on a one-sided histogram `c` (bin 0 starts at the range's fixed end): the
    number of bins i (levels <= i <= len(c)) to keep, by the least KL(P || Q), the last on ties.
    As TensorRT does, bin 0 first takes bin 1's count, so a ReLU's many exact zeros do not decide.
    P: the first i bins, the clipped rest added to the last; Q: those i bins merged into `levels`
    groups (bin j -> j * levels // i, TensorRT's linspace split), each group's count spread evenly
    over its non-empty bins.

    Evaluated per group, not per bin, for every candidate at once: with N the total, S_i the count
    in the first i bins, and T_g, O_g a group's count and non-empty bins, q_j = T_g / (O_g S_i) on a
    non-empty bin, so KL = sum_j p_j log p_j - sum_g (T_g / N) log(T_g / (O_g S_i)) - (the clipped
    count / N) log q_(i-1), where the first sum comes from prefix sums of c log c."""
    n = len(c)
    if n <= levels:
        return n
    c = c.double().clone()
    c[0] = c[1]
    total = float(c.sum())
    zero = torch.zeros(1, dtype=torch.float64)
    counts = torch.cat([zero, c.cumsum(0)])                                                  # S
    filled = torch.cat([zero, (c != 0).double().cumsum(0)])                                  # non-empty bins
    entropy = torch.cat([zero, torch.where(c > 0, c * c.clamp(min=1e-300).log(), 0.0).cumsum(0)])
    i, edges = _kl_groups(n, levels)
    at_edges = counts[edges]
    group_counts = at_edges[:, 1:] - at_edges[:, :-1]                                        # T_g
    at_edges = filled[edges]
    group_filled = at_edges[:, 1:] - at_edges[:, :-1]                                        # O_g
    s_i, last, clipped = counts[i], c[i - 1], total - counts[i]
    p_last = (last + clipped) / total
    p_log_p = ((entropy[i - 1] - counts[i - 1] * math.log(total)) / total
               + torch.where(p_last > 0, p_last * p_last.clamp(min=1e-300).log(), 0.0))
    ratio = torch.where(group_counts > 0, group_counts / (group_filled.clamp(min=1) * s_i[:, None]), 1.0)
    cross = (group_counts / total * ratio.log()).sum(1)
    q_last = ratio[:, -1]  # bin i - 1 is in the last group
    cross = cross + torch.where(last > 0, clipped / total * q_last.log(), 0.0)
    kl = torch.where((last == 0) & (clipped > 0), torch.inf, p_log_p - cross)
    return levels + int(torch.nonzero(kl == kl.min()).max())  # the last of the least


@functools.lru_cache(maxsize=8)
def _kl_groups(n: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates i (levels..n) and each one's group edges (group g of bins: [e_g, e_g+1)), the
    same for every observer with n bins and this many levels: made once."""
    i = torch.arange(levels, n + 1)
    return i, (torch.arange(levels + 1)[None, :] * i[:, None] + levels - 1) // levels


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


class RangeMethod:
    """A histogram observer's range from `method`: mixed into torch's HistogramObserver here
    (`RangeObserver`) and into torchao's for the PT2E flow (`pt2e.RangeObserverPT2E`), whose buffers
    and arithmetic are the same."""

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
        a, b = self.clipping_range()
        return self._calculate_qparams(torch.tensor(a, dtype=self.min_val.dtype),
                                       torch.tensor(b, dtype=self.max_val.dtype))

    def clipping_range(self) -> tuple[float, float]:
        """[a, b] by this observer's method. Remembered per state: convert_fx, qparams.parquet and
        every trial of `quantray tune` over the same statistics ask for it again."""
        lo, hi = float(self.min_val), float(self.max_val)
        symmetric = self.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)

        def compute() -> tuple[float, float]:
            if lo == hi:
                return lo, hi
            if self.method == "percentile":
                return percentile_range(self.histogram, lo, hi, self.percentile)
            if self.method == "mse":
                return mse_range(self.histogram, lo, hi, self.quant_min, self.quant_max, symmetric)
            return entropy_range(self.histogram, lo, hi, self.quant_min, self.quant_max)

        return _remember(_RANGES, (self.range_method, self.quant_min, self.quant_max, symmetric, *_state_key(self)), compute)

    def extra_repr(self) -> str:
        return f"method={self.range_method}"


class RangeObserver(RangeMethod, HistogramObserver):
    """torch's HistogramObserver (the same buffers and merge) whose range comes from `method`."""
