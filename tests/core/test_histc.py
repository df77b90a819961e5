"""`core.histc`: exact calibration's counts equal torch.histc's bins, element for element, on the
fast path and off it; a vectorized map that rounds differently is caught by the per-range check."""

import pytest
import torch

from quantray.core import histc
from quantray.core.histc import Bins


def _torch(x, lo, hi, n):
    return torch.histc(x, n, min=float(lo), max=float(hi)).long()


def _around_edges(lo, hi, n):
    """Every linspace edge of the range and the floats either side of it: where a bin can go wrong."""
    edges = torch.linspace(float(lo), float(hi), n + 1)
    near = torch.cat([edges, torch.nextafter(edges, torch.tensor(float("inf"))),
                      torch.nextafter(edges, torch.tensor(float("-inf")))])
    return near[(near >= lo) & (near <= hi)]


CASES = {
    "post-ReLU activations": lambda g: torch.randn(60_000, generator=g).relu(),
    "tiny magnitudes": lambda g: torch.randn(60_000, generator=g) * 1e-6,
    "large magnitudes": lambda g: torch.randn(60_000, generator=g) * 1e5,
    "all negative": lambda g: -torch.rand(60_000, generator=g) * 3 - 1,
    "few distinct values": lambda g: torch.randint(-5, 6, (5_000,), generator=g).float() / 7,
    "a range of few floats": lambda g: 1 + torch.randint(0, 300, (5_000,), generator=g).float() * 2 ** -23,
}


@pytest.mark.parametrize("n", [2048, 100, 7])
@pytest.mark.parametrize("case", CASES)
def test_counts_equal_histc_on_the_fast_path_owned_or_not(case, n):
    g = torch.Generator().manual_seed(len(case) * n)
    x = CASES[case](g)
    lo, hi = torch.aminmax(x)
    bins = Bins(lo, hi, n)
    assert bins.fast  # these ranges are the vectorized path's: this test is about it
    for values in (x, _around_edges(lo, hi, n)):
        want = _torch(values, lo, hi, n)
        assert torch.equal(bins.count(values), want)
        assert torch.equal(bins.count(values.clone(), owned=True), want)


def test_a_degenerate_range_and_values_outside_it_are_histcs_cases():
    x = torch.tensor([0.5, 2.0, -1.0, 1.0, 0.0])
    inside = Bins(torch.tensor(0.0), torch.tensor(1.0), 16)
    assert inside.fast and torch.equal(inside.count(x), _torch(x, 0.0, 1.0, 16))  # 2.0 and -1.0 dropped, as histc
    assert int(inside.count(x).sum()) == 3
    flat = Bins(torch.tensor(3.0), torch.tensor(3.0), 16)  # histc widens it by 1 either side
    assert not flat.fast and torch.equal(flat.count(torch.full((4,), 3.0)), _torch(torch.full((4,), 3.0), 3.0, 3.0, 16))
    huge = Bins(torch.tensor(-3e38), torch.tensor(3e38), 2048)  # (hi - lo) * bins overflows
    assert not huge.fast


def test_a_map_that_rounds_otherwise_is_refused_and_counts_fall_back_to_histc(monkeypatch):
    """Multiplying by a reciprocal instead of dividing moves some elements across a bin edge: the
    check must see it, and counting must then still be histc's."""
    def reciprocal(x, bins, out, scaled=None):
        out.copy_(((x - bins.lo) * (bins.n / bins.width)))

    monkeypatch.setattr(histc, "_positions", reciprocal)
    g = torch.Generator().manual_seed(3)
    refused = 0
    for _ in range(20):
        x = torch.randn(20_000, generator=g).relu() * float(torch.rand((), generator=g) * 10)
        lo, hi = torch.aminmax(x)
        bins = Bins(lo, hi, 2048)
        refused += not bins.fast
        probe = torch.cat([x, _around_edges(lo, hi, 2048)])
        assert torch.equal(bins.count(probe), _torch(probe, lo, hi, 2048))
    assert refused >= 15  # all 20 here; a few widths might happen to agree


def test_a_scalar_loop_that_rounds_otherwise_is_refused_too(monkeypatch):
    """A vector loop's tail runs torch's scalar code: the check runs every point through it."""
    vectorized = histc._positions

    def scalar_differs(x, bins, out, scaled=None):
        if scaled is not None and not scaled.is_contiguous():  # what a scalar loop would see
            out.copy_(((x - bins.lo) * (bins.n / bins.width)))
        else:
            vectorized(x, bins, out, scaled)

    monkeypatch.setattr(histc, "_positions", scalar_differs)
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(4)).relu() * 3
    assert not Bins(*torch.aminmax(x), 2048).fast

