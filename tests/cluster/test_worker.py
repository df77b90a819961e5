"""The worker class without Ray: what an actor of the job's pool does, driven here call by call
with the same `Call`s the pool sends, and compared with the serial protocol and plain torch."""

import io

import pytest
import torch
from helpers import serial_calibration

from quantray.cluster.worker import BatchScores, TrialScores, Worker, WorkerSetup, calibration_of
from quantray.core import flow, merge, sites
from quantray.core.calls import Call
from quantray.core.evaluation import merge_results, score_batch, state_dict_bytes
from quantray.core.modes import MODES, Plan
from quantray.core.protocol import calibrate
from quantray.inputs import data
from quantray.spec import DataSpec, QuantSpec

TEST = DataSpec(source="digits", split="test", batch_size=50)


class _Workers:
    """Workers in this process, as the pool runs them: one per shard, calls made on their calibration part."""

    def __init__(self, setup: WorkerSetup, n: int):
        self.workers = [Worker(setup) for _ in range(n)]

    def share(self, obj):
        return obj

    def run(self, calls, on_result=None):
        return {call.key: call.on(calibration_of(self.workers[w])) for w in sorted(calls) for call in calls[w]}


@pytest.fixture
def calibrated(tiny_model, digits_plan):
    """Two workers calibrated through the protocol, the driver's prepared model with their statistics,
    and the INT8 model's files."""
    spec, _, batches, example = digits_plan
    prepared = flow.prepare(tiny_model, "x86", example)
    observed = sites.observed_values(prepared)
    setup = WorkerSetup(tiny_model, example, QuantSpec(), 1, calibration=spec, test=TEST,
                        signature=sites.signature(observed), memory_bytes=2 ** 30)
    workers = _Workers(setup, 2)
    result = calibrate(MODES["exact"], workers, Plan(batches, data.assign_shards(len(batches), 2), observed))
    result.stats.load(prepared)
    int8 = flow.convert(prepared)
    script = io.BytesIO()
    torch.jit.save(torch.jit.script(int8), script)
    return workers.workers, prepared, result.stats, int8, state_dict_bytes(int8), script.getvalue()


def test_workers_calibrate_to_the_serial_protocol_s_statistics(calibrated, tiny_model, digits_plan):
    workers, prepared, _, _, _, _ = calibrated
    spec, _, batches, example = digits_plan
    reference, _ = serial_calibration(tiny_model, example, "x86", spec, batches, data.assign_shards(len(batches), 2))
    assert merge.state_digest(prepared) == merge.state_digest(reference)
    assert workers[0].calibration is not None and workers[0].build_s > 0
    assert Worker(WorkerSetup(tiny_model, example, QuantSpec(), 1, test=TEST)).calibration is None  # evaluation only


def test_a_test_batch_scores_both_models_and_returns_the_fp32_logits_it_computed(calibrated, tiny_model):
    workers, _, _, int8, state, script = calibrated
    worker = workers[1]
    Call("int8", Worker.load_int8, ("key", script, state)).on(worker)
    batch = list(range(50))
    scored = Call(("batch", 0), Worker.evaluate, (batch, None, True)).on(worker)
    assert isinstance(scored, BatchScores) and scored.scores.index == batch
    x, y = data.load_batch(data.digits("test"), batch)
    with torch.inference_mode():
        assert torch.equal(scored.fp32_logits, tiny_model(x))
        int8_pred = int8(x).argmax(1)
    assert scored.scores.counts["int8_top1"] == int((int8_pred == y).sum())
    assert scored.layers is not None and scored.layers.samples == [50] and scored.seconds.keys() == {"int8_torchscript"}
    again = worker.evaluate(batch, scored.fp32_logits)  # the stored FP32 logits: nothing to return
    assert again.fp32_logits is None and again.layers is None and again.scores == scored.scores
    assert "fp32" in worker.evaluate(list(range(50, 100)), None).seconds


def test_a_trial_builds_its_int8_model_from_the_merged_statistics(calibrated, tiny_model, digits_plan):
    workers, _, stats, _, _, _ = calibrated
    _, _, _, example = digits_plan
    quant = QuantSpec(activation_range="minmax", module_names={"fc": "fp32"})
    batches = [list(range(0, 50)), list(range(50, 100))]
    logits = [workers[0].fp32_logits(b) for b in batches]
    scored = workers[0].trial(quant, stats, batches, logits)
    expected = flow.prepare(tiny_model, quant, example)
    stats.load(expected)
    assert isinstance(scored, TrialScores) and scored.qparams_digest == merge.state_digest(expected)
    assert scored.int8_bytes == len(state_dict_bytes(flow.convert(expected)))
    int8 = flow.convert(expected)
    test = data.digits("test")
    with torch.inference_mode():
        direct = merge_results(score_batch(b, test.tensors[1][b], tiny_model(test.tensors[0][b]), int8(test.tensors[0][b]))
                               for b in batches)
    assert scored.scores == direct


def test_a_config_said_in_other_words_is_built_once_for_the_engine_check_and_its_trial(calibrated, monkeypatch):
    """tune's engine check of the job's config and its trial of the same config (activation_range "l2"
    is the default histogram) build one model; another config, other statistics, or the layer ranking
    (which runs the prepared model) build their own, and the kept one's result is the fresh one's."""
    workers, _, stats, _, _, _ = calibrated
    worker = workers[0]
    builds = []
    convert = flow.convert
    monkeypatch.setattr(flow, "convert", lambda prepared: builds.append(1) or convert(prepared))
    batches = [list(range(0, 50))]
    logits = [worker.fp32_logits(b) for b in batches]
    job, trial = QuantSpec(), QuantSpec(activation_range="l2")
    worker.engine_check(job, stats, batches)
    kept = worker.trial(trial, stats, batches, logits)
    assert len(builds) == 1
    worker.trial(QuantSpec(activation_range="minmax"), stats, batches, logits)
    assert len(builds) == 2
    other = type(stats).__new__(type(stats))
    other.__dict__.update(stats.__dict__)  # the same values, another calibration's object
    fresh = worker.trial(trial, other, batches, logits)
    assert len(builds) == 3 and fresh == kept
    worker.isolated_errors(trial, other, batches)
    ranked = len(builds)
    assert ranked > 3
    worker.trial(trial, other, batches, logits)  # kept from before the ranking: the ranking's build is its own
    assert len(builds) == ranked


def test_speed_and_what_a_worker_says_about_its_host(calibrated):
    workers, _, _, _, state, script = calibrated
    worker = workers[0]
    worker.load_int8("key", script, state)
    x = data.load_batch(data.digits("test"), [0])[0]
    speed = worker.speed(x, None, 1, 3, 0.0, skip=("fp32",))
    assert set(speed) == {"int8", "int8_torchscript", "conditions"} and speed["int8"]["iters"] == 3
    assert speed["conditions"]["threads"] == 1 and speed["conditions"]["engine"] == "x86"
    cpu = worker.cpu()
    assert cpu["model"] and cpu["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert worker.data_read() == {}  # digits: nothing read from Parquet shards
    assert len(worker.host_facts()) == 4
