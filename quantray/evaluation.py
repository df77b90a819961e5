"""Evaluation: one shard of the test split -> counts and predictions; exact merge; latency; size.

No Ray here: `runner` fans `evaluate_shard` out as tasks, and `merge_results` sums integer counts,
so the merged metrics are the same whatever the shard count or completion order.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import data as data_mod

__all__ = ["ShardResult", "evaluate_shard", "merge_results", "measure_latency", "state_dict_bytes"]

COUNT_KEYS = ("n", "fp32_top1", "fp32_top5", "int8_top1", "int8_top5", "agree")


@dataclass
class ShardResult:
    """What one evaluation task sends back: counts, plus one prediction row per sample."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    index: list[int] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    fp32_pred: list[int] = field(default_factory=list)
    int8_pred: list[int] = field(default_factory=list)


def evaluate_shard(fp32: nn.Module, int8: nn.Module, dataset, indices: list[int], batch_size: int) -> ShardResult:
    """Run both models over `indices` of `dataset` in batches; top-1, top-5 and agreement counts."""
    result = ShardResult()
    with torch.inference_mode():
        for batch in data_mod.make_batches(indices, batch_size):
            x, y = data_mod.load_batch(dataset, batch)
            fp32_logits, int8_logits = fp32(x), int8(x)
            # Top-1 is argmax, the first of tied maxima, as the seed's torch.max: dequantized INT8
            # logits tie often, and topk may order ties differently.
            fp32_pred, int8_pred = fp32_logits.argmax(dim=1), int8_logits.argmax(dim=1)
            k = min(5, fp32_logits.shape[1])
            fp32_top, int8_top = fp32_logits.topk(k, dim=1).indices, int8_logits.topk(k, dim=1).indices
            c = result.counts
            c["n"] += len(batch)
            c["fp32_top1"] += int((fp32_pred == y).sum())
            c["int8_top1"] += int((int8_pred == y).sum())
            c["fp32_top5"] += int((fp32_top == y[:, None]).any(dim=1).sum())
            c["int8_top5"] += int((int8_top == y[:, None]).any(dim=1).sum())
            c["agree"] += int((fp32_pred == int8_pred).sum())
            result.index += batch
            result.label += y.tolist()
            result.fp32_pred += fp32_pred.tolist()
            result.int8_pred += int8_pred.tolist()
    return result


def merge_results(results) -> ShardResult:
    """Sum the counts and gather the predictions in sample-index order."""
    merged = ShardResult()
    rows = []
    for r in results:
        for key in COUNT_KEYS:
            merged.counts[key] += r.counts[key]
        rows += zip(r.index, r.label, r.fp32_pred, r.int8_pred)
    rows.sort()
    if len({row[0] for row in rows}) != len(rows):
        raise ValueError("a test sample was evaluated by more than one shard")
    for row in rows:
        merged.index.append(row[0])
        merged.label.append(row[1])
        merged.fp32_pred.append(row[2])
        merged.int8_pred.append(row[3])
    return merged


def accuracy_metrics(counts: dict[str, int]) -> dict:
    n = counts["n"]
    return {"samples": n,
            "fp32": {"top1": counts["fp32_top1"] / n, "top5": counts["fp32_top5"] / n},
            "int8": {"top1": counts["int8_top1"] / n, "top5": counts["int8_top5"] / n},
            "agreement": counts["agree"] / n}


def measure_latency(model, example: torch.Tensor, warmup: int, iters: int) -> float:
    """Mean milliseconds per call at the example's batch size, after `warmup` calls (the seed's method)."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(example)
        start = time.perf_counter()
        for _ in range(iters):
            model(example)
        return (time.perf_counter() - start) / iters * 1e3


def state_dict_bytes(model: nn.Module) -> bytes:
    """`torch.save(model.state_dict())` as bytes: what the seed writes, and measures the size of."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()
