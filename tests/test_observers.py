"""Exactness of the observer merge, without Ray: the promise quantray is built on."""

import copy

import pytest
import torch
from torch.ao.quantization import MinMaxObserver, MovingAverageMinMaxObserver, QConfig, QConfigMapping
from torch.ao.quantization.observer import HistogramObserver, ObserverBase
from torch.ao.quantization.quantize_fx import prepare_fx

from quantray import calibration, data, observers
from quantray.errors import CalibrationError, DataError


def _digest(model, example, spec, batches, shards, order=None):
    ranges, hists = calibration.calibrate_serial(model, example, "x86", spec, batches, shards, order=order)
    prepared = calibration.prepare(model, "x86", example)
    observers.load_merged(prepared, ranges, hists)
    return observers.state_digest(prepared), prepared


def test_merged_state_is_bit_identical_for_any_worker_count_shard_and_batch_order(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    reference, _ = _digest(tiny_model, example, spec, batches, [list(range(len(batches)))])
    n = len(batches)
    layouts = [data.assign_shards(n, 2), data.assign_shards(n, 3), data.assign_shards(n, 4),
               [list(reversed(range(n)))],                      # one worker, batches backwards
               [[b for b in range(n) if b % 3 == k] for k in range(3)]]  # interleaved shards
    for shards in layouts:
        for order in (None, list(reversed(range(len(shards))))):
            assert _digest(tiny_model, example, spec, batches, shards, order)[0] == reference


def test_merged_histogram_is_the_histogram_of_all_activations(tiny_model, digits_plan):
    """The ground truth: histc over every value each observer saw, at the global min/max."""
    spec, dataset, batches, example = digits_plan
    _, merged = _digest(tiny_model, example, spec, batches, data.assign_shards(len(batches), 3))

    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def forward(self, x):
            seen.setdefault(self.key, []).append(x.detach().reshape(-1).clone())
            return x

    recording = calibration.prepare(tiny_model, "x86", example)
    by_id = {}
    for name, module in list(recording.named_modules(remove_duplicate=False)):
        if isinstance(module, ObserverBase):
            by_id.setdefault(id(module), Recorder(name))
            setattr(recording, name, by_id[id(module)])
    for batch in batches:
        recording(data.load_batch(dataset, batch)[0])

    for name, obs in observers.find_observers(merged).items():
        values = torch.cat(seen[name])
        lo, hi = torch.aminmax(values)
        assert torch.equal(obs.min_val, lo) and torch.equal(obs.max_val, hi), name
        assert torch.equal(obs.histogram, torch.histc(values, obs.bins, min=lo, max=hi)), name


def test_one_batch_gives_exactly_torchs_own_histogram_observer(tiny_model, digits_plan):
    spec, dataset, batches, example = digits_plan
    torch_prepared = calibration.prepare(tiny_model, "x86", example)
    torch_prepared(data.load_batch(dataset, batches[0])[0])
    ours, _ = _digest(tiny_model, example, spec, batches[:1], [[0]])
    assert ours == observers.state_digest(torch_prepared)


def test_shared_observers_are_merged_once_and_reported_with_aliases(tiny_model, digits_plan):
    _, _, _, example = digits_plan
    prepared = calibration.prepare(tiny_model, "x86", example)
    names = [n for n, m in prepared.named_modules(remove_duplicate=False) if isinstance(m, ObserverBase)]
    found = observers.find_observers(prepared)
    assert len(found) < len(names)  # max-pool and flatten reuse their input's observer
    aliases = observers.observer_aliases(prepared)
    assert sorted(list(found) + [a for v in aliases.values() for a in v]) == sorted(names)
    probes = observers.attach_probes(prepared)
    assert len({id(p) for p in probes.values()}) == len(found)


def test_observer_that_saw_no_data_is_left_unset_and_reported_empty(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    ranges, hists = calibration.calibrate_serial(tiny_model, example, "x86", spec, batches[:2], [[0, 1]])
    skipped = next(iter(ranges))
    del ranges[skipped], hists[skipped]
    prepared = calibration.prepare(tiny_model, "x86", example)
    observers.load_merged(prepared, ranges, hists)
    row = next(r for r in observers.qparam_rows(prepared, hists) if r["name"] == skipped)
    assert row["min"] is None and row["count"] is None and row["scale"] == 1.0
    assert observers.find_observers(prepared)[skipped].min_val == float("inf")


def _prepared_with(observer_cls, model, example):
    qconfig = QConfig(activation=observer_cls.with_args(reduce_range=True),
                      weight=torch.ao.quantization.default_per_channel_weight_observer)
    return prepare_fx(copy.deepcopy(model), QConfigMapping().set_global(qconfig), (example,))


def test_minmax_observers_merge_to_torchs_own_single_process_state(tiny_model, digits_plan):
    _, dataset, batches, example = digits_plan
    inputs = [data.load_batch(dataset, b)[0] for b in batches]
    torch_prepared = _prepared_with(MinMaxObserver, tiny_model, example)
    for x in inputs:
        torch_prepared(x)
    parts = []
    for shard in (inputs[1::2], inputs[0::2]):  # two workers, interleaved, odd shard first
        worker = _prepared_with(MinMaxObserver, tiny_model, example)
        probes = observers.attach_probes(worker)
        for x in shard:
            observers.start_batch(probes)
            worker(x)
            parts.append(observers.batch_ranges(probes))
    merged = _prepared_with(MinMaxObserver, tiny_model, example)
    observers.load_merged(merged, observers.merge_ranges(parts), {})
    assert observers.state_digest(merged) == observers.state_digest(torch_prepared)


def test_order_dependent_observer_is_refused_by_name(tiny_model, digits_plan):
    _, _, _, example = digits_plan
    prepared = _prepared_with(MovingAverageMinMaxObserver, tiny_model, example)
    with pytest.raises(CalibrationError, match="MovingAverageMinMaxObserver, which quantray cannot merge"):
        observers.attach_probes(prepared)


def test_inf_activation_names_the_layer_and_shard(digits_plan):
    spec, _, batches, example = digits_plan
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)).eval()
    with torch.no_grad():
        model[1].weight.fill_(3e38)  # overflows to inf on the first non-zero pixel
    with pytest.raises(DataError, match=r"observed by activation_post_process_1 \(shard 1, batch 2, samples"):
        calibration.calibrate_serial(model, example, "x86", spec, batches[:4], [[0, 1], [2, 3]], order=[1, 0])


def test_histogram_count_check_catches_values_outside_the_range():
    obs = HistogramObserver(bins=16)
    probe = observers._Probe("act", obs)
    observers.begin_histograms({"act": probe}, {"act": (torch.tensor(0.0), torch.tensor(1.0))})
    probe(torch.tensor([0.5, 2.0]))  # 2.0 lies outside: histc drops it silently
    with pytest.raises(CalibrationError, match="1 of 2 values fell outside"):
        observers.collect_histograms({"act": probe})
