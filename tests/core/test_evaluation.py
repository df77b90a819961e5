"""Evaluation shards merge exactly into what one pass over the whole split gives."""

import time

import torch
from helpers import serial_calibration

from quantray.core import evaluation, flow
from quantray.inputs import data


def test_sharded_evaluation_merges_to_the_single_pass_result(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    prepared, _ = serial_calibration(tiny_model, example, "x86", spec, batches, [list(range(len(batches)))])
    int8 = flow.convert(prepared)
    test = data.digits("test")
    test_batches = data.make_batches(list(range(len(test))), 50)
    whole = evaluation.merge_results([evaluation.evaluate_shard(tiny_model, int8, test, sum(test_batches, []), 50)])
    shards = [evaluation.evaluate_shard(tiny_model, int8, test, b, 50) for b in reversed(test_batches)]
    merged = evaluation.merge_results(shards)
    assert merged == whole and merged.counts["n"] == len(test) and merged.index == list(range(len(test)))
    with torch.inference_mode():
        logits = tiny_model(test.tensors[0])
    assert merged.counts["fp32_top1"] == int((logits.argmax(1) == test.tensors[1]).sum())
    metrics = evaluation.accuracy_metrics(merged)
    assert metrics == evaluation.accuracy_metrics(whole)
    assert 0 <= metrics["int8"]["top1"] <= metrics["int8"]["top5"] <= 1
    low, high = metrics["int8"]["top1_ci95"]
    assert low < metrics["int8"]["top1"] < high
    assert sum(row["n"] for row in metrics["per_class"]) == len(test)
    confusion = metrics["confusion_int8"]["rows_true_cols_predicted"]
    assert sum(map(sum, confusion)) == len(test)
    diagonal = sum(confusion[k][k] for k in range(len(confusion)))
    assert diagonal == merged.counts["int8_top1"]
    with torch.inference_mode():
        noise = ((int8(test.tensors[0]).double() - logits.double()) ** 2).sum()
    expected_sqnr = 10 * torch.log10((logits.double() ** 2).sum() / noise)
    assert abs(metrics["logit_sqnr_db"] - float(expected_sqnr)) < 1e-6


def test_wilson_interval_matches_the_textbook_values():
    low, high = evaluation.wilson(8, 10)  # Wilson 95% for 8/10: 0.490 to 0.943
    assert round(low, 3) == 0.490 and round(high, 3) == 0.943
    assert evaluation.wilson(0, 20)[0] == 0.0 and evaluation.wilson(20, 20)[1] == 1.0


def test_latency_and_throughput_are_measured_in_their_units(tiny_model):
    stats = evaluation.measure_latency(tiny_model, torch.zeros(1, 1, 8, 8), warmup=2, iters=20)
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] < 1000 and 0 < stats["mean_ms"] < 1000
    assert evaluation.quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and evaluation.quantile([5.0], 0.9) == 5.0
    assert evaluation.measure_throughput(tiny_model, torch.zeros(16, 1, 8, 8), warmup=1, iters=3)["throughput_per_s"] > 16


def test_latency_stops_at_its_precision_or_its_cap():
    """Calls are timed until the 95% interval of the mean is within +-precision of it (Student's
    t, checked against the table), never fewer than 10, never more than `iters`; precision 0
    times exactly `iters` calls (the seed's method)."""
    steady = evaluation.measure_latency(lambda x: time.sleep(0.002), torch.zeros(1), warmup=1, iters=200, precision=0.05)
    assert 10 <= steady["iters"] < 200 and steady["ci95_ms"] <= 0.05 * steady["mean_ms"]
    calls = iter(range(10 ** 6))
    noisy = evaluation.measure_latency(lambda x: time.sleep(0.004 * (next(calls) % 2)), torch.zeros(1), warmup=0,
                                       iters=30, precision=0.01)
    assert noisy["iters"] == 30 and noisy["ci95_ms"] > 0.01 * noisy["mean_ms"]
    assert evaluation.measure_latency(lambda x: x, torch.zeros(1), warmup=0, iters=7, precision=0)["iters"] == 7
    for df, table in ((5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert abs(evaluation.t95(df) / table - 1) < 0.002
