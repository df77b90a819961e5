"""Evaluation shards merge exactly into what one pass over the whole split gives."""

import torch

from quantray import calibration, data, evaluation


def test_sharded_evaluation_merges_to_the_single_pass_result(tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    logs, counts = calibration.calibrate_serial(tiny_model, example, "x86", spec, batches, [list(range(len(batches)))])
    prepared = calibration.prepare(tiny_model, "x86", example)
    calibration.observers.load_merged(prepared, "exact", logs, counts)
    int8 = calibration.convert(prepared)
    test = data.digits("test")
    test_batches = data.make_batches(list(range(len(test))), 50)
    whole = evaluation.merge_results([evaluation.evaluate_shard(tiny_model, int8, test, sum(test_batches, []), 50)])
    shards = [evaluation.evaluate_shard(tiny_model, int8, test, b, 50) for b in reversed(test_batches)]
    merged = evaluation.merge_results(shards)
    assert merged == whole and merged.counts["n"] == len(test) and merged.index == list(range(len(test)))
    logits = tiny_model(test.tensors[0])
    assert merged.counts["fp32_top1"] == int((logits.argmax(1) == test.tensors[1]).sum())
    metrics = evaluation.accuracy_metrics(merged.counts)
    assert 0 <= metrics["int8"]["top1"] <= metrics["int8"]["top5"] <= 1


def test_latency_is_a_positive_mean_in_milliseconds(tiny_model):
    assert 0 < evaluation.measure_latency(tiny_model, torch.zeros(1, 1, 8, 8), warmup=2, iters=5) < 1000
