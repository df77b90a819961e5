"""Range methods, each against an independent computation on a known distribution; and the job
keys that choose them (`activation_range`, `percentile`), end to end through the exact merge."""

import numpy as np
import pytest
import scipy.stats
import torch
from helpers import serial_calibration

from quantray.core import flow, merge, ranges, sites
from quantray.core.evaluation import state_dict_bytes
from quantray.spec import QuantSpec

BINS = 2048


def _histogram(sample: np.ndarray):
    """What the exact merge hands an observer: the histogram over the exact range, float32 counts."""
    x = torch.from_numpy(sample).float()
    lo, hi = float(x.min()), float(x.max())
    return torch.histc(x, BINS, lo, hi), lo, hi


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
@pytest.mark.parametrize("dist", ["normal", "laplace", "half-normal"])
def test_percentile_is_numpys_percentile_at_bin_resolution(p, dist):
    rng = np.random.default_rng(0)
    sample = {"normal": rng.normal(1.0, 2.0, 200_000), "laplace": rng.laplace(0, 1, 200_000),
              "half-normal": np.abs(rng.normal(0, 1, 200_000))}[dist]
    hist, lo, hi = _histogram(sample)
    width = (hi - lo) / BINS
    a, b = ranges.percentile_range(hist, lo, hi, p)
    low, high = np.percentile(sample.astype(np.float32), [100 - p, p])
    assert a <= low and high <= b
    # numpy interpolates between two sorted values; a and b are the outer edges of their bins.
    ordered = np.sort(sample.astype(np.float32))
    n, tolerance = len(ordered), 1e-5 * width
    below, above = ordered[int(np.floor((n - 1) * (1 - p / 100)))], ordered[int(np.ceil((n - 1) * p / 100))]
    assert a - tolerance <= below < a + width + tolerance
    assert b - width - tolerance < above <= b + tolerance


def _fake_quant_mse(sample: np.ndarray, a: float, b: float, levels: int) -> float:
    """The squared error of quantizing `sample` with torch's affine qparams for [a, b], in numpy."""
    lo, hi = min(a, 0.0), max(b, 0.0)
    scale = (hi - lo) / (levels - 1)
    zero_point = np.clip(0 - np.round(lo / scale), 0, levels - 1)
    q = np.clip(np.round(sample / scale) + zero_point, 0, levels - 1)
    return float(np.mean((sample - (q - zero_point) * scale) ** 2))


@pytest.mark.parametrize("dist", ["laplace", "normal", "half-laplace", "uniform"])
def test_mse_range_is_as_good_as_a_brute_force_search_on_the_sample(dist):
    """The range chosen from the histogram alone, scored on the raw sample, is within 2% of the best
    of a 60x60 grid of ranges scored the same way; from a uniform sample it clips less than a step."""
    rng = np.random.default_rng(1)
    sample = {"laplace": rng.laplace(0.3, 1, 100_000), "normal": rng.normal(0, 1, 100_000),
              "half-laplace": np.abs(rng.laplace(0, 1, 100_000)), "uniform": rng.uniform(-1, 3, 100_000)}[dist]
    hist, lo, hi = _histogram(sample)
    a, b = ranges.mse_range(hist, lo, hi, 0, 127)
    chosen = _fake_quant_mse(sample, a, b, 128)
    lows = np.quantile(sample, np.linspace(0, 0.02, 60)) if lo < 0 else [lo]
    highs = np.quantile(sample, np.linspace(0.98, 1, 60))
    best = min(_fake_quant_mse(sample, x, y, 128) for x in lows for y in highs)
    assert chosen <= best * 1.02
    if dist == "uniform":
        step = (hi - lo) / 127  # clipping a little narrows every step: the optimum is not quite (lo, hi)
        assert lo <= a < lo + step and hi - step < b <= hi
    else:
        assert chosen < 0.9 * _fake_quant_mse(sample, lo, hi, 128)  # clipping the tails pays


def _tensorrt_entropy_bins(hist: np.ndarray, levels: int) -> int:
    """TensorRT's pytorch-quantization `_compute_amax_entropy` (stride 1, start at `levels`),
    written out with numpy's digitize and scipy's entropy: the number of bins kept."""
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    divergences = []
    for i in range(levels, len(bins) + 1):
        space = np.linspace(0, i, num=levels + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        density = np.zeros(levels)
        for idx, d in enumerate(digitized):
            if d != -1:
                density[d] += bins[idx]
        counts = np.bincount(digitized[digitized != -1], minlength=levels)
        density = np.divide(density, counts, out=np.zeros(levels), where=counts > 0)
        new = np.array([density[d] if d != -1 else 0.0 for d in digitized])
        reference = bins[:i].copy()
        reference[-1] += bins[i:].sum()
        divergences.append(scipy.stats.entropy(reference, new))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return levels + last_argmin


@pytest.mark.parametrize("dist", ["relu-normal", "half-laplace"])
def test_entropy_on_a_one_sided_range_is_tensorrts_search(dist):
    rng = np.random.default_rng(2)
    sample = {"relu-normal": np.maximum(rng.normal(0.2, 1, 50_000), 0),
              "half-laplace": np.abs(rng.laplace(0, 1, 50_000))}[dist]
    sample[0] = 0.0  # the range starts at zero, as after a ReLU
    x = torch.from_numpy(sample).float()
    lo, hi = 0.0, float(x.max())
    hist = torch.histc(x, 512, lo, hi)  # 512 bins keep the reference loop quick
    expected = _tensorrt_entropy_bins(hist.numpy(), 128)
    a, b = ranges.entropy_range(hist, lo, hi, 0, 127)
    assert a == 0.0 and b == pytest.approx(expected * hi / 512, rel=1e-12)
    assert 128 <= expected < 512  # it clipped something


def test_entropy_on_a_two_sided_range_clips_each_end_within_the_data():
    rng = np.random.default_rng(3)
    hist, lo, hi = _histogram(rng.laplace(0, 1, 50_000))
    a, b = ranges.entropy_range(hist, lo, hi, 0, 127)
    assert lo <= a < 0 < b <= hi and (a, b) != (lo, hi)


def _observer(method, sample, **kwargs):
    obs = ranges.RangeObserver(method=method, reduce_range=True, **kwargs) if method != "l2" else \
        torch.ao.quantization.HistogramObserver(reduce_range=True)
    obs(torch.from_numpy(sample).float())
    return obs


def test_range_observer_gives_torchs_qparams_for_its_range():
    sample = np.random.default_rng(4).laplace(0, 1, 20_000)
    obs = _observer("percentile", sample, percentile=99.9)
    a, b = ranges.percentile_range(obs.histogram, float(obs.min_val), float(obs.max_val), 99.9)
    reference = torch.ao.quantization.MinMaxObserver(reduce_range=True)
    reference(torch.tensor([a, b]))
    assert obs.calculate_qparams() == reference.calculate_qparams()
    assert obs.range_method == "percentile 99.9" and merge.range_method(obs) == "percentile 99.9"


def test_spec_keys_choose_the_observer_and_l2_is_todays_default(tiny_model, digits_plan):
    """l2 is torch's own search, bit for bit; minmax is MinMaxObserver; the others are RangeObservers
    whose qparams come from the same merged histograms (one calibration serves all of them)."""
    spec, _, batches, example = digits_plan
    shards = [list(range(len(batches)))]
    digests = {}
    for activation_range in (None, "l2", "minmax", "percentile", "mse", "entropy"):
        quant = QuantSpec(activation_range=activation_range, percentile=99.9)
        prepared, _ = serial_calibration(tiny_model, example, quant, spec, batches, shards)
        observers = sites.find_observers(prepared)
        kinds = {type(o).__name__ for n, o in observers.items() if n.startswith("activation_post_process")}
        rows = merge.qparam_rows(prepared)
        methods = {r["range_method"] for r in rows}
        expected = {None: "l2", "percentile": "percentile 99.9"}.get(activation_range, activation_range)
        assert methods == {expected}, methods
        assert kinds == {{"l2": "HistogramObserver", None: "HistogramObserver",
                          "minmax": "MinMaxObserver"}.get(activation_range, "RangeObserver")}
        digests[activation_range] = merge.state_digest(prepared)
    assert digests[None] == digests["l2"]
    assert len(set(digests.values())) == 5


def test_a_module_table_takes_its_own_range_method(tiny_model, digits_plan):
    example = digits_plan[3]
    quant = QuantSpec(module_names={"fc": {"activation_range": "mse"}})
    prepared = flow.prepare(tiny_model, quant, example)
    rows = {r["name"]: r["range_method"] for r in merge.qparam_rows(prepared)}
    assert sorted(set(rows.values())) == ["l2", "mse"]
    assert rows[next(n for n, o in sites.observed_values(prepared).items()
                     if any("layer fc" in v.label for v in o.values))] == "mse"


@pytest.mark.parametrize("quantization, message", [
    ('activation = "minmax"\nactivation_range = "mse"',
     "[quantization] activation_range = 'mse' contradicts activation = 'minmax': mse needs activation = \"histogram\" "
     "(or leave activation out)"),
    ('activation = "histogram"\nactivation_range = "minmax"',
     "[quantization] activation_range = 'minmax' contradicts activation = 'histogram': minmax needs "
     "activation = \"minmax\" (or leave activation out)"),
    ('activation_range = "entropie"', "[quantization] activation_range = 'entropie': unknown activation_range "
                                      "(did you mean 'entropy'?); valid: l2, minmax, percentile, mse, entropy"),
    ('percentile = 40', "[quantization] percentile = 40.0: a percentile above 50 and at most 100"),
    ('module_names = { fc = { activation = "moving_average", activation_range = "l2" } }',
     "[quantization] module_names.fc.activation_range = 'l2' contradicts module_names.fc.activation = 'moving_average'"),
])
def test_contradicting_or_unknown_range_keys_fail_with_one_line(tmp_path, quantization, message):
    from helpers import DEMO_JOB

    from quantray.errors import SpecError
    from quantray.spec import load_spec

    job = tmp_path / "job.toml"
    job.write_text(DEMO_JOB.read_text().replace('backend = "x86"', f'backend = "x86"\n{quantization}'))
    with pytest.raises(SpecError) as e:
        load_spec(job)
    assert str(e.value).startswith(f"{job}: {message}"), str(e.value)


def test_a_remembered_l2_search_gives_torchs_qparams_and_is_not_searched_again(tiny_model, monkeypatch):
    """`l2_remembered` (convert's): the same scales and zero points as torch's own search, and a second
    convert of the same statistics searches nothing; a changed histogram is searched afresh."""
    prepared = flow.prepare(tiny_model, QuantSpec(), torch.zeros(1, 1, 8, 8))
    with torch.inference_mode():
        prepared(torch.randn(64, 1, 8, 8))
    observers = [m for m in prepared.modules() if type(m) is torch.ao.quantization.HistogramObserver]
    expected = [o.calculate_qparams() for o in observers]  # torch's own, no memory involved
    searched = []
    search = ranges._L2_SEARCH
    monkeypatch.setattr(ranges, "_L2_SEARCH", lambda obs: searched.append(obs) or search(obs))
    own = torch.ao.quantization.HistogramObserver._non_linear_param_search
    ranges._L2.clear()
    with ranges.l2_remembered():
        first = [o.calculate_qparams() for o in observers]
        again = [o.calculate_qparams() for o in observers]
        assert len(searched) == len(observers) > 0
        observers[0].histogram[0] += 1
        observers[0].calculate_qparams()
        assert len(searched) == len(observers) + 1
    for (s, z), (s1, z1), (s2, z2) in zip(expected, first, again):
        assert torch.equal(s, s1) and torch.equal(z, z1) and torch.equal(s, s2) and torch.equal(z, z2)
    assert torch.ao.quantization.HistogramObserver._non_linear_param_search is own  # put back


@pytest.mark.parametrize("method", ["l2", "mse", "entropy", "percentile"])
def test_settled_ranges_leave_convert_nothing_to_search_and_the_same_model(tiny_model, monkeypatch, method):
    """`settle` (run before convert's turn, beside other worker threads) computes every histogram
    observer's range; convert then searches nothing, and its INT8 model is the one a convert
    without it makes, byte for byte."""
    prepared = flow.prepare(tiny_model, QuantSpec(activation_range=method), torch.zeros(1, 1, 8, 8))
    with torch.inference_mode():
        prepared(torch.randn(64, 1, 8, 8))
    monkeypatch.setattr(flow, "settle", lambda model: None)
    ranges._L2.clear()
    ranges._RANGES.clear()
    plain = state_dict_bytes(flow.convert(prepared))  # no settle: every search inside convert
    ranges._L2.clear()
    ranges._RANGES.clear()
    searches = []
    l2 = ranges._L2_SEARCH
    monkeypatch.setattr(ranges, "_L2_SEARCH", lambda obs: searches.append(obs) or l2(obs))
    ranges.settle(prepared)
    settled = len(searches) + len(ranges._RANGES)
    assert settled > 0
    monkeypatch.setattr(ranges, "_remember", lambda table, key, compute: table[key])  # a search now fails
    int8 = state_dict_bytes(flow.convert(prepared))
    assert len(searches) + len(ranges._RANGES) == settled
    assert plain == int8
