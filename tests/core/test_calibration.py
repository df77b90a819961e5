"""The calibration protocol without Ray: exactness of every merge mode, statistics keyed by what
they observe (one calibration, many configs), stored entries, and deterministic data errors."""

import copy

import pytest
import torch
from helpers import serial_calibration
from torch.ao.quantization import (
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    default_per_channel_weight_observer,
)
from torch.ao.quantization.observer import HistogramObserver, ObserverBase
from torch.ao.quantization.quantize_fx import prepare_fx

from quantray.core import flow, merge, sites
from quantray.core.probes import Recorder, attach_probes
from quantray.errors import CalibrationError, DataError
from quantray.inputs import data
from quantray.spec import QuantSpec
from quantray.storage.stats import StatsStore


def _digest(model, example, quant, spec, batches, shards, order=None):
    return merge.state_digest(serial_calibration(model, example, quant, spec, batches, shards, order=order)[0])


def _torch_single_process(model, example, quant, dataset, batches):
    """What the seed's loop computes: torch's own observers, batches in canonical order."""
    prepared = flow.prepare(model, quant, example)
    for batch in batches:
        prepared(data.load_batch(dataset, batch)[0])
    return prepared


def _layouts(n):
    return [[list(range(n))], data.assign_shards(n, 2), data.assign_shards(n, 3),
            [list(reversed(range(n)))],                       # one worker, batches backwards
            [[b for b in range(n) if b % 3 == k] for k in range(3)]]  # interleaved shards


def test_exact_state_is_bit_identical_for_any_worker_count_shard_and_batch_order(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    digests = {_digest(tiny_model, example, "x86", spec, batches, shards, order)
               for shards in _layouts(len(batches)) for order in (None, list(reversed(range(len(shards)))))}
    assert len(digests) == 1


def test_exact_histogram_is_the_histogram_of_all_activations(tiny_model, digits_plan):
    """The ground truth: histc over every value each observer saw, at the global min/max."""
    spec, dataset, batches, example = digits_plan
    merged, _ = serial_calibration(tiny_model, example, "x86", spec, batches, data.assign_shards(len(batches), 3))
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def forward(self, x):
            seen.setdefault(self.key, []).append(x.detach().reshape(-1).clone())
            return x

    recording = flow.prepare(tiny_model, "x86", example)
    by_id = {}
    for name, module in list(recording.named_modules(remove_duplicate=False)):
        if isinstance(module, ObserverBase):
            by_id.setdefault(id(module), Recorder(name))
            setattr(recording, name, by_id[id(module)])
    for batch in batches:
        recording(data.load_batch(dataset, batch)[0])
    for name, obs in sites.find_observers(merged).items():
        values = torch.cat(seen[name])
        lo, hi = torch.aminmax(values)
        assert torch.equal(obs.min_val, lo) and torch.equal(obs.max_val, hi), name
        assert torch.equal(obs.histogram, torch.histc(values, obs.bins, min=lo, max=hi)), name


def test_exact_one_batch_gives_exactly_torchs_own_histogram_observer(tiny_model, digits_plan):
    spec, dataset, batches, example = digits_plan
    ours = _digest(tiny_model, example, "x86", spec, batches[:1], [[0]])
    assert ours == merge.state_digest(_torch_single_process(tiny_model, example, "x86", dataset, batches[:1]))


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_replay_is_bit_identical_to_torchs_single_process_calibration(tiny_model, digits_plan, backend):
    spec, dataset, batches, example = digits_plan
    quant = QuantSpec(backend=backend, mode="replay")
    theirs = merge.state_digest(_torch_single_process(tiny_model, example, quant, dataset, batches))
    for shards in _layouts(len(batches))[:3]:
        for order in (None, list(reversed(range(len(shards))))):
            assert _digest(tiny_model, example, quant, spec, batches, shards, order) == theirs
    exact = _digest(tiny_model, example, QuantSpec(backend=backend), spec, batches, [list(range(len(batches)))])
    assert exact != theirs  # torch's running re-binning is approximate


def test_fast_is_torch_for_one_worker_and_close_for_three(tiny_model, digits_plan):
    spec, dataset, batches, example = digits_plan
    quant = QuantSpec(mode="fast")
    theirs = _torch_single_process(tiny_model, example, quant, dataset, batches)
    one, _ = serial_calibration(tiny_model, example, quant, spec, batches, [list(range(len(batches)))])
    assert merge.state_digest(one) == merge.state_digest(theirs)
    three, _ = serial_calibration(tiny_model, example, quant, spec, batches, data.assign_shards(len(batches), 3))
    assert merge.state_digest(three) != merge.state_digest(theirs)
    for a, b in zip(merge.qparam_rows(three), merge.qparam_rows(theirs)):
        assert (a["min"], a["max"]) == (b["min"], b["max"])  # ranges are exact in every mode
        assert a["scale"] == pytest.approx(b["scale"], rel=0.05)


@pytest.mark.parametrize("activation", ["minmax", "moving_average"])
def test_minmax_and_moving_average_equal_torch_in_any_layout(tiny_model, digits_plan, activation):
    """The moving average depends on order: the driver replays the per-call log in canonical order."""
    spec, dataset, batches, example = digits_plan
    quant = QuantSpec(activation=activation, weight="per_tensor")
    theirs = merge.state_digest(_torch_single_process(tiny_model, example, quant, dataset, batches))
    for shards in _layouts(len(batches)):
        assert _digest(tiny_model, example, quant, spec, batches, shards, list(reversed(range(len(shards))))) == theirs


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
        recorder = attach_probes(worker)
        for b in shard:
            recorder.start_log()
            worker(inputs[b])
            logs[b] = dict(recorder.batch_log())
    merged = fresh()
    merge.load_minmax(merged, sites.observed_values(merged), logs)
    assert any(o.min_val.numel() > 1 for o in sites.find_observers(merged).values())
    assert merge.state_digest(merged) == merge.state_digest(theirs)


def test_fixed_qparams_observers_and_fp32_modules(digits_plan):
    spec, _, batches, example = digits_plan
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Sigmoid(),
                                torch.nn.Linear(32, 10)).eval()
    quant = QuantSpec(mapping="default", module_names={"3": "fp32"})
    prepared, _ = serial_calibration(model, example, quant, spec, batches[:3], [[0], [1, 2]])
    kinds = {type(o).__name__ for o in sites.find_observers(prepared).values()}
    assert "FixedQParamsObserver" in kinds and "HistogramObserver" in kinds
    int8 = flow.convert(prepared)
    assert type(int8.get_submodule("1")).__module__.startswith("torch.ao.nn.quantized")
    assert type(int8.get_submodule("3")) is torch.nn.Linear  # kept in FP32
    assert int8(example).shape == (1, 10)


def test_each_observer_knows_the_fp32_values_it_observes(tiny_model, digits_plan):
    _, _, _, example = digits_plan
    observed = sites.observed_values(flow.prepare(tiny_model, "x86", example))
    labels = {name: [v.label for v in o.values] for name, o in observed.items()}
    assert labels["activation_post_process_0"] == ["the model input x"]
    assert labels["activation_post_process_1"] == ["layer conv1 (ConvReLU2d)"]
    # Max pooling reuses its input's observer: one observer, two values, an alias for the second call.
    assert labels["activation_post_process_2"] == ["layer conv2 (ConvReLU2d)", "layer pool (MaxPool2d)"]
    assert observed["activation_post_process_2"].aliases == ("activation_post_process_3",)
    assert labels["activation_post_process_7"] == ["layer fc (Linear)"]


def test_one_calibration_serves_configs_that_keep_modules_in_fp32_or_change_weights(tiny_model, digits_plan):
    """Statistics are keyed by the FP32 value observed: another config over the same FP32 model loads
    them and gets exactly what calibrating it would give."""
    spec, _, batches, example = digits_plan
    shards = data.assign_shards(len(batches), 2)
    _, once = serial_calibration(tiny_model, example, "x86", spec, batches, shards)
    for other in (QuantSpec(module_names={"conv2": "fp32"}, module_types={"Linear": {"weight": "per_tensor"}}),
                  QuantSpec(module_names={"fc": "fp32"}), QuantSpec(backend="qnnpack"), QuantSpec(activation="minmax")):
        prepared = flow.prepare(tiny_model, other, example)
        once.stats.load(prepared)
        direct, _ = serial_calibration(tiny_model, example, other, spec, batches, shards)
        assert merge.state_digest(prepared) == merge.state_digest(direct), other
        assert merge.qparam_rows(prepared) == merge.qparam_rows(direct)


def _without_conv_relu_fusion():
    """The native backend config minus its conv+relu fusion patterns: prepare_fx then computes conv1
    and relu as two graph nodes, so the value observed after conv1 is another one."""
    from torch.ao.quantization.backend_config import BackendConfig, get_native_backend_config

    native = get_native_backend_config()
    kept = [c for c in native.configs if not (isinstance(c.pattern, tuple) and torch.nn.ReLU in c.pattern
                                              and torch.nn.Conv2d in c.pattern)]
    return BackendConfig(native.name).set_backend_pattern_configs(kept)


def test_statistics_are_refused_where_the_fp32_graph_computes_something_else(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    _, once = serial_calibration(tiny_model, example, "x86", spec, batches, [list(range(len(batches)))])
    fused = sites.observed_values(flow.prepare(tiny_model, "x86", example))
    unfused_model = prepare_fx(copy.deepcopy(tiny_model), flow.qconfig_mapping("x86"), (example,),
                               backend_config=_without_conv_relu_fusion())
    unfused = sites.observed_values(unfused_model)
    keys = lambda observed: {v.key for o in observed.values() for v in o.values}  # noqa: E731
    assert "the model input x" in {v.label for o in unfused.values() for v in o.values}
    assert keys(fused) & keys(unfused) == {v.key for v in fused["activation_post_process_0"].values}  # only the input
    with pytest.raises(merge.MissingStatistics, match=r"no record of layer conv1 \(Conv2d\).*calibrate this configuration"):
        once.stats.load(unfused_model)


def test_stored_entries_are_reused_and_joined_across_configs(tiny_model, digits_plan, tmp_path):
    spec, _, batches, example = digits_plan
    shards = data.assign_shards(len(batches), 2)
    store = StatsStore(tmp_path / "stats", tiny_model, threads=1)
    first, cold = serial_calibration(tiny_model, example, "x86", spec, batches, shards, store=store)
    again, warm = serial_calibration(tiny_model, example, "x86", spec, batches, shards, store=store)
    assert cold.info["cached"] == {"pass1": [0, 7], "pass2": [0, 2]}
    assert warm.info["cached"] == {"pass1": [7, 7], "pass2": [2, 2]}
    assert merge.state_digest(first) == merge.state_digest(again)
    # A config that keeps conv2 in FP32 observes a subset of the values: everything is reused.
    fp32_conv2 = QuantSpec(module_names={"conv2": "fp32"})
    _, subset = serial_calibration(tiny_model, example, fp32_conv2, spec, batches, shards, store=store)
    assert subset.info["cached"] == {"pass1": [7, 7], "pass2": [2, 2]}
    # Another merge mode keeps every pass-1 log; min/max observers need nothing else.
    _, replay = serial_calibration(tiny_model, example, QuantSpec(mode="replay"), spec, batches, shards, store=store)
    assert replay.info["cached"] == {"pass1": [7, 7], "pass2": [0, 7]}
    _, minmax = serial_calibration(tiny_model, example, QuantSpec(activation="minmax"), spec, batches, shards, store=store)
    assert minmax.info["cached"] == {"pass1": [7, 7], "pass2": [0, 0]}  # no histogram: nothing to count


def test_shared_observers_are_merged_once_and_reported_with_aliases(tiny_model, digits_plan):
    _, _, _, example = digits_plan
    prepared = flow.prepare(tiny_model, "x86", example)
    names = [n for n, m in prepared.named_modules(remove_duplicate=False) if isinstance(m, ObserverBase)]
    found = sites.find_observers(prepared)
    assert len(found) < len(names)  # max-pool and flatten reuse their input's observer
    aliases = sites.observer_aliases(prepared)
    assert sorted(list(found) + [a for v in aliases.values() for a in v]) == sorted(names)
    rows = merge.qparam_rows(prepared)
    assert [r["name"] for r in rows] == list(found) and rows[2]["aliases"] == ["activation_post_process_3"]


def test_observer_that_saw_no_data_is_left_unset_and_reported_empty(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    _, result = serial_calibration(tiny_model, example, "x86", spec, batches[:2], [[0, 1]])
    stats = result.stats
    value = sites.observed_values(flow.prepare(tiny_model, "x86", example))["activation_post_process_7"].values[0].key
    for log in stats.logs.values():
        log[value] = {"tensor": None}  # the value was computed, but empty
    prepared = flow.prepare(tiny_model, "x86", example)
    counts = stats.load(prepared)
    row = next(r for r in merge.qparam_rows(prepared, counts) if r["name"] == "activation_post_process_7")
    assert row["min"] is None and row["count"] is None and row["scale"] == 1.0
    assert sites.find_observers(prepared)["activation_post_process_7"].min_val == float("inf")


def test_unknown_observer_class_is_refused_by_name(tiny_model, digits_plan):
    _, _, _, example = digits_plan

    class MyObserver(HistogramObserver):
        pass

    qconfig = QConfig(activation=MyObserver, weight=default_per_channel_weight_observer)
    prepared = prepare_fx(copy.deepcopy(tiny_model), QConfigMapping().set_global(qconfig), (example,))
    with pytest.raises(CalibrationError, match="is a MyObserver, which quantray cannot merge exactly"):
        attach_probes(prepared)


def test_nan_names_the_layer_and_the_first_batch_in_sample_order_whatever_the_layout(digits_plan):
    spec, _, batches, example = digits_plan
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)).eval()
    with torch.no_grad():
        model[1].weight.fill_(3e38)  # overflows to inf on the first non-zero pixel
    messages = set()
    for shards, order in (([[0, 1], [2, 3]], [1, 0]), ([[0], [1], [2], [3]], [3, 2, 1, 0]), ([[3, 2, 1, 0]], None)):
        with pytest.raises(DataError) as info:
            serial_calibration(model, example, "x86", spec, batches[:4], shards, order=order)
        messages.add(str(info.value))
    first = batches[0]
    assert messages == {f"NaN or Inf in the output of layer 1 (Linear) (calibration batch 0, samples {first[0]}..{first[-1]})"}


def test_histogram_count_check_catches_values_outside_the_range():
    recorder = Recorder()
    recorder.start_counts({"act@0": [(torch.tensor(0.0), torch.tensor(1.0), 16)]})
    recorder.start_batch()
    recorder.observe(sites.Value("act@0", "layer act (Identity)"), torch.tensor([0.5, 2.0]))  # 2.0 lies outside:
    # histc drops it silently
    with pytest.raises(CalibrationError, match="1 of 2 values fell outside"):
        recorder.collect_counts()


@pytest.mark.parametrize("lo_hi", [(0.0, 3.0), (-0.0, 3.0), (-2.0, 3.0), (-2.0, -0.0)])
def test_a_kept_value_without_its_zeros_counts_and_replays_as_the_whole_tensor(lo_hi, monkeypatch):
    """Pass 1 keeps a mostly-zero value as its nonzero elements and a count of zeros (of either
    sign): pass 2's counts and replay's histc must be the whole tensor's."""
    from quantray.core import probes
    from quantray.core.probes import Zeroless, keep_copy

    lo, hi = lo_hi
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(30_000, generator=g) * (hi - lo) + lo).clamp(lo, hi)
    x[torch.rand(30_000, generator=g) < 0.6] = 0.0
    x[:50] = -0.0
    x[50], x[51] = lo, hi
    want = torch.histc(x, 2048, min=lo, max=hi)
    kept = keep_copy(x)
    assert isinstance(kept, Zeroless) and kept.numel() == x.numel() and kept.zeros > 0.5 * x.numel()
    value, range_ = sites.Value("act@0", "act"), (torch.tensor(lo), torch.tensor(hi), 2048)
    key = probes.count_key("act@0", *range_)
    recorder = Recorder()
    recorder.start_counts({"act@0": [range_]})
    recorder.start_batch()
    recorder.observe(value, kept, owned=True)
    assert torch.equal(recorder.collect_counts()[key][0], want.double())
    recorder.start_replay({"act@0": [range_]})
    recorder.observe(value, keep_copy(x))
    assert torch.equal(recorder.batch_updates()[key], want)
    assert not isinstance(keep_copy(torch.rand(1000) + 1), Zeroless)  # few zeros: a plain copy
    monkeypatch.setattr(probes, "HISTC_CHUNK", 1000)
    assert not isinstance(keep_copy(x), Zeroless)  # too large for float32 histc counts to stay exact


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_spec_qconfig_choices_convert_and_keep_fp32_types(digits_plan, backend):
    spec, dataset, batches, example = digits_plan
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(288, 10)).eval()
    quant = QuantSpec(backend=backend, activation="minmax", weight="per_tensor", module_types={"Linear": "fp32"})
    ours, _ = serial_calibration(model, example, quant, spec, batches[:4], [[0, 2], [1, 3]])
    assert {type(o).__name__ for o in sites.find_observers(ours).values()} == {"MinMaxObserver"}
    theirs = _torch_single_process(model, example, quant, dataset, batches[:4])
    assert merge.state_digest(ours) == merge.state_digest(theirs)
    int8 = flow.convert(ours)
    assert type(int8.get_submodule("3")) is torch.nn.Linear
    x = data.load_batch(dataset, batches[0])[0]
    assert torch.allclose(int8(x), model(x), atol=0.5)


def test_a_constant_the_graph_reads_is_part_of_the_key_of_every_value_after_it(digits_plan):
    """A tensor attribute that is not in the state_dict still decides what the graph computes."""
    _, _, _, example = digits_plan

    class Shifted(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.fc = torch.nn.Linear(64, 4)
            self.shift = torch.tensor(shift)  # a plain attribute: FX reads it with get_attr

        def forward(self, x):
            return self.fc(torch.flatten(x, 1) + self.shift)

    keys = []
    for shift in (0.0, 1.0):
        torch.manual_seed(0)
        observed = sites.observed_values(flow.prepare(Shifted(shift).eval(), "x86", example))
        keys.append([v.key for o in observed.values() for v in o.values])
    assert keys[0][0] == keys[1][0] and keys[0][1:] != keys[1][1:]  # the input is the same; what follows is not


@pytest.mark.parametrize("mode", ["exact", "replay"])
def test_pass_2_from_kept_values_memory_or_disk_equals_a_second_forward(tiny_model, digits_plan, mode, monkeypatch):
    """Pass 2 counts what pass 1 kept (in memory up to the budget, then on disk) or runs a second
    forward: the statistics are bit-identical either way, and the sources are counted."""
    from quantray.core import calibration

    spec, _, batches, example = digits_plan
    shards = data.assign_shards(len(batches), 2)
    quant = QuantSpec(mode=mode)
    forward, info = serial_calibration(tiny_model, example, quant, spec, batches, shards)
    assert info.info["pass2_batches"] == {"memory": 0, "disk": 0, "forward": len(batches)}
    every, info = serial_calibration(tiny_model, example, quant, spec, batches, shards, memory_bytes=2 ** 40)
    assert info.info["pass2_batches"] == {"memory": len(batches), "disk": 0, "forward": 0}
    shard_0 = info.info["peak_kept_bytes"][0]  # all of shard 0's 4 batches of 32
    monkeypatch.setattr(calibration, "resident_bytes", lambda: 0)  # the budget is then all for kept values
    some, info = serial_calibration(tiny_model, example, quant, spec, batches, shards, memory_bytes=shard_0 * 3 // 2)
    sources = info.info["pass2_batches"]
    assert sum(sources.values()) == len(batches) and sources["memory"] >= 1 and sources["disk"] + sources["forward"] >= 1
    assert merge.state_digest(forward) == merge.state_digest(every) == merge.state_digest(some)


def test_keeping_stops_once_the_kept_forwards_spent_more_in_the_system_than_computing():
    """Copies take memory the next forward would have reused: where faulting fresh memory in costs
    more than the compute a second forward repeats, recomputing wins, and keeping stops."""
    from quantray.core.calibration import KeptValues

    kept, values = KeptValues(2 ** 40, kept_only=True), [("x", torch.zeros(16))]
    assert kept.add(0, values, 0.001, 0.004) and kept.keeping  # a tiny model's forwards: below a second, noise
    kept.close()
    assert kept.keeping and kept.add(0, values, 1.0, 0.4)
    assert kept.keeping and kept.add(1, values, 1.0, 1.5)  # 1.9 s in the system against 2.0 s computing
    assert kept.keeping and kept.add(2, values, 1.0, 1.2)  # 3.1 s against 3.0 s: the copies are kept,
    assert not kept.keeping                                  # but the next batch is not copied
    assert kept.take(2) is values
    kept.close()
    assert kept.keeping and kept._kept_only  # the next calibration measures anew, on the same terms


def test_a_worker_thread_budget_bounds_what_it_keeps_not_the_shared_process():
    """A Ray worker's budget bounds its process's resident memory; a worker thread of the driver
    shares its process (its budget is a share of the memory free when the pool started), so only
    what it keeps counts: the same budget keeps a batch there that a process would not."""
    from quantray.core.calibration import KeptValues, resident_bytes

    values = [("x", torch.zeros(1 << 20))]  # 4 MiB
    budget = resident_bytes() // 2 + 5 * values[0][1].nbytes  # room for the batch and 4x its size, not the process
    process, thread = KeptValues(budget), KeptValues(budget, kept_only=True)
    process._spill_ok = False  # no disk: only memory counts here
    assert thread.add(0, values, 1.0) and thread.sources == {"memory": 0, "disk": 0, "forward": 0}
    assert thread.take(0) is values
    assert not process.add(0, values, 1.0)
