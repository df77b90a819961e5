"""Exactness of the observer merges, without Ray: the promise quantray is built on."""

import copy

import pytest
import torch
from torch.ao.quantization import MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
from torch.ao.quantization import default_per_channel_weight_observer
from torch.ao.quantization.observer import HistogramObserver, ObserverBase
from torch.ao.quantization.quantize_fx import prepare_fx

from quantray import calibration, data, observers
from quantray.errors import CalibrationError, DataError
from quantray.spec import QuantSpec


def _calibrated(model, example, quant, spec, batches, shards, order=None):
    """The driver's prepared model after a serial run of the protocol with `shards`."""
    quant = QuantSpec(backend=quant) if isinstance(quant, str) else quant
    logs, pass2 = calibration.calibrate_serial(model, example, quant, spec, batches, shards, order=order)
    prepared = calibration.prepare(model, quant, example)
    observers.load_merged(prepared, quant.mode, logs, pass2)
    return prepared


def _torch_single_process(model, example, quant, dataset, batches):
    """What the seed's loop computes: torch's own observers, batches in canonical order."""
    prepared = calibration.prepare(model, quant, example)
    for batch in batches:
        prepared(data.load_batch(dataset, batch)[0])
    return prepared


def _layouts(n):
    return [[list(range(n))], data.assign_shards(n, 2), data.assign_shards(n, 3),
            [list(reversed(range(n)))],                       # one worker, batches backwards
            [[b for b in range(n) if b % 3 == k] for k in range(3)]]  # interleaved shards


def test_exact_state_is_bit_identical_for_any_worker_count_shard_and_batch_order(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    digests = set()
    for shards in _layouts(len(batches)):
        for order in (None, list(reversed(range(len(shards))))):
            digests.add(observers.state_digest(_calibrated(tiny_model, example, "x86", spec, batches, shards, order)))
    assert len(digests) == 1


def test_exact_histogram_is_the_histogram_of_all_activations(tiny_model, digits_plan):
    """The ground truth: histc over every value each observer saw, at the global min/max."""
    spec, dataset, batches, example = digits_plan
    merged = _calibrated(tiny_model, example, "x86", spec, batches, data.assign_shards(len(batches), 3))
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


def test_exact_one_batch_gives_exactly_torchs_own_histogram_observer(tiny_model, digits_plan):
    spec, dataset, batches, example = digits_plan
    ours = _calibrated(tiny_model, example, "x86", spec, batches[:1], [[0]])
    theirs = _torch_single_process(tiny_model, example, "x86", dataset, batches[:1])
    assert observers.state_digest(ours) == observers.state_digest(theirs)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_replay_is_bit_identical_to_torchs_single_process_calibration(tiny_model, digits_plan, backend):
    spec, dataset, batches, example = digits_plan
    quant = QuantSpec(backend=backend, mode="replay")
    theirs = observers.state_digest(_torch_single_process(tiny_model, example, quant, dataset, batches))
    for shards in _layouts(len(batches))[:3]:
        for order in (None, list(reversed(range(len(shards))))):
            assert observers.state_digest(_calibrated(tiny_model, example, quant, spec, batches, shards, order)) == theirs
    exact = _calibrated(tiny_model, example, QuantSpec(backend=backend), spec, batches, [list(range(len(batches)))])
    assert observers.state_digest(exact) != theirs  # torch's running re-binning is approximate


def test_fast_is_torch_for_one_worker_and_close_for_three(tiny_model, digits_plan):
    spec, dataset, batches, example = digits_plan
    quant = QuantSpec(mode="fast")
    theirs = _torch_single_process(tiny_model, example, quant, dataset, batches)
    one = _calibrated(tiny_model, example, quant, spec, batches, [list(range(len(batches)))])
    assert observers.state_digest(one) == observers.state_digest(theirs)
    three = _calibrated(tiny_model, example, quant, spec, batches, data.assign_shards(len(batches), 3))
    for a, b in zip(observers.qparam_rows(three), observers.qparam_rows(theirs)):
        assert (a["min"], a["max"]) == (b["min"], b["max"])  # ranges are exact in every mode
        assert a["scale"] == pytest.approx(b["scale"], rel=0.05)


@pytest.mark.parametrize("activation", ["minmax", "moving_average"])
def test_minmax_and_moving_average_equal_torch_in_any_layout(tiny_model, digits_plan, activation):
    """The moving average depends on order: the driver replays the per-call log in canonical order."""
    spec, dataset, batches, example = digits_plan
    quant = QuantSpec(activation=activation, weight="per_tensor")
    theirs = observers.state_digest(_torch_single_process(tiny_model, example, quant, dataset, batches))
    for shards in _layouts(len(batches)):
        ours = _calibrated(tiny_model, example, quant, spec, batches, shards, list(reversed(range(len(shards)))))
        assert observers.state_digest(ours) == theirs


@pytest.mark.parametrize("observer", [PerChannelMinMaxObserver, MovingAveragePerChannelMinMaxObserver])
def test_per_channel_observers_replay_to_torchs_state(tiny_model, digits_plan, observer):
    _, dataset, batches, example = digits_plan
    qconfig = QConfig(activation=observer.with_args(ch_axis=1), weight=default_per_channel_weight_observer)

    def fresh():
        return prepare_fx(copy.deepcopy(tiny_model), QConfigMapping().set_global(qconfig), (example,))

    inputs = [data.load_batch(dataset, b)[0] for b in batches]
    theirs = fresh()
    for x in inputs:
        theirs(x)
    logs = {}
    for shard in (range(1, len(inputs), 2), range(0, len(inputs), 2)):  # two workers, odd shard first
        worker = fresh()
        probes = observers.attach_probes(worker)
        for b in shard:
            observers.start_log(probes)
            worker(inputs[b])
            logs[b] = observers.batch_log(probes)
    merged = fresh()
    observers.load_merged(merged, "exact", logs, {})
    assert any(o.min_val.numel() > 1 for o in observers.find_observers(merged).values())
    assert observers.state_digest(merged) == observers.state_digest(theirs)


def test_fixed_qparams_observers_and_fp32_modules(digits_plan):
    spec, _, batches, example = digits_plan
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Sigmoid(),
                                torch.nn.Linear(32, 10)).eval()
    quant = QuantSpec(mapping="default", module_names={"3": "fp32"})
    prepared = _calibrated(model, example, quant, spec, batches[:3], [[0], [1, 2]])
    kinds = {type(o).__name__ for o in observers.find_observers(prepared).values()}
    assert "FixedQParamsObserver" in kinds and "HistogramObserver" in kinds
    int8 = calibration.convert(prepared)
    assert type(int8.get_submodule("1")).__module__.startswith("torch.ao.nn.quantized")
    assert type(int8.get_submodule("3")) is torch.nn.Linear  # kept in FP32
    assert int8(example).shape == (1, 10)


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
    logs, counts = calibration.calibrate_serial(tiny_model, example, "x86", spec, batches[:2], [[0, 1]])
    skipped = next(iter(counts))
    for log in logs.values():
        del log[skipped]
    del counts[skipped]
    prepared = calibration.prepare(tiny_model, "x86", example)
    observers.load_merged(prepared, "exact", logs, counts)
    row = next(r for r in observers.qparam_rows(prepared, counts) if r["name"] == skipped)
    assert row["min"] is None and row["count"] is None and row["scale"] == 1.0
    assert observers.find_observers(prepared)[skipped].min_val == float("inf")


def test_unknown_observer_class_is_refused_by_name(tiny_model, digits_plan):
    _, _, _, example = digits_plan

    class MyObserver(HistogramObserver):
        pass

    qconfig = QConfig(activation=MyObserver, weight=default_per_channel_weight_observer)
    prepared = prepare_fx(copy.deepcopy(tiny_model), QConfigMapping().set_global(qconfig), (example,))
    with pytest.raises(CalibrationError, match="is a MyObserver, which quantray cannot merge exactly"):
        observers.attach_probes(prepared)


def test_inf_activation_names_the_layer_and_shard(digits_plan):
    spec, _, batches, example = digits_plan
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)).eval()
    with torch.no_grad():
        model[1].weight.fill_(3e38)  # overflows to inf on the first non-zero pixel
    with pytest.raises(DataError, match=r"observed by activation_post_process_1 \(shard 1, batch 2, samples"):
        calibration.calibrate_serial(model, example, "x86", spec, batches[:4], [[0, 1], [2, 3]], order=[1, 0])


def test_histogram_count_check_catches_values_outside_the_range():
    probe = observers._Probe("act", HistogramObserver(bins=16))
    observers.start_counts({"act": probe}, {"act": (torch.tensor(0.0), torch.tensor(1.0))})
    probe(torch.tensor([0.5, 2.0]))  # 2.0 lies outside: histc drops it silently
    with pytest.raises(CalibrationError, match="1 of 2 values fell outside"):
        observers.collect_counts({"act": probe})


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_spec_qconfig_choices_convert_and_keep_fp32_types(digits_plan, backend):
    spec, dataset, batches, example = digits_plan
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(288, 10)).eval()
    quant = QuantSpec(backend=backend, activation="minmax", weight="per_tensor", module_types={"Linear": "fp32"})
    ours = _calibrated(model, example, quant, spec, batches[:4], [[0, 2], [1, 3]])
    assert {type(o).__name__ for o in observers.find_observers(ours).values()} == {"MinMaxObserver"}
    theirs = _torch_single_process(model, example, quant, dataset, batches[:4])
    assert observers.state_digest(ours) == observers.state_digest(theirs)
    int8 = calibration.convert(ours)
    assert type(int8.get_submodule("3")) is torch.nn.Linear
    x = data.load_batch(dataset, batches[0])[0]
    assert torch.allclose(int8(x), model(x), atol=0.5)
