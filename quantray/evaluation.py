"""Evaluation: test batches -> counts and predictions; exact merge; latency; size.

No Ray here: `evaluate_batches` and `measure_models` are the bodies of the tasks `runner` fans out
(`evaluate_shard` is the same in one process). `merge_results` sums integer counts and orders
per-sample rows by sample index, so the merged metrics (float sums included) are the same whatever
the shard count or completion order.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import data as data_mod

__all__ = ["ShardResult", "evaluate_shard", "evaluate_batches", "score_batch", "merge_results", "accuracy_metrics",
           "wilson", "measure_latency", "measure_throughput", "measure_speed", "measure_models", "state_dict_bytes"]

COUNT_KEYS = ("n", "fp32_top1", "fp32_top5", "int8_top1", "int8_top5", "agree")
COLUMNS = ("index", "label", "fp32_pred", "int8_pred", "fp32_top5", "int8_top5", "fp32_margin", "int8_margin",
           "signal", "noise")
Z95 = 1.959963984540054


@dataclass
class ShardResult:
    """What one evaluation task sends back: integer counts, plus one row per sample (`rows`
    holds a list per column of COLUMNS; `signal`/`noise` are the sample's FP32 logit energy and
    the energy of INT8 minus FP32 logits, in float64)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    rows: dict[str, list] = field(default_factory=lambda: {c: [] for c in COLUMNS})

    @property
    def index(self) -> list[int]:
        return self.rows["index"]


def evaluate_shard(fp32: nn.Module, int8: nn.Module, dataset, indices: list[int], batch_size: int) -> ShardResult:
    """Run both models over `indices` of `dataset` in batches; counts and per-sample rows."""
    results = []
    with torch.inference_mode():
        for batch in data_mod.make_batches(indices, batch_size):
            x, y = data_mod.load_batch(dataset, batch)
            results.append(score_batch(batch, y, fp32(x), int8(x)))
    return merge_results(results)


def evaluate_batches(fp32: nn.Module, int8_script: bytes, backend: str, data, batches: list[list[int]],
                     stored: list, threads: int) -> tuple[ShardResult, dict[int, torch.Tensor]]:
    """A task's share of the test split: FP32 (or its logits stored by an earlier run, `stored[k]`)
    and the INT8 TorchScript artifact on each batch. Returns the merged result and the FP32 logits
    it computed, by position in `batches`."""
    from .flow import quiet_torch_warnings, set_engine

    quiet_torch_warnings()
    torch.set_num_threads(threads)
    set_engine(backend)
    int8 = torch.jit.load(io.BytesIO(int8_script))
    dataset = data_mod.build_dataset(data, where="[test]")
    results, computed = [], {}
    with torch.inference_mode():
        for k, (batch, logits) in enumerate(zip(batches, stored)):
            x, y = data_mod.load_batch(dataset, batch)
            if logits is None:
                logits = computed[k] = fp32(x)
            results.append(score_batch(batch, y, logits, int8(x)))
    return merge_results(results), computed


def score_batch(indices: list[int], labels: torch.Tensor, fp32_logits: torch.Tensor, int8_logits: torch.Tensor) -> ShardResult:
    """Counts and per-sample rows of one batch, from both models' logits."""
    result = ShardResult()
    # Top-1 is argmax, the first of tied maxima, as the seed's torch.max: dequantized INT8
    # logits tie often, and topk may order ties differently.
    fp32_pred, int8_pred = fp32_logits.argmax(dim=1), int8_logits.argmax(dim=1)
    k = min(5, fp32_logits.shape[1])
    fp32_top, int8_top = fp32_logits.topk(k, dim=1), int8_logits.topk(k, dim=1)
    y = labels
    c = result.counts
    c["n"] += len(indices)
    c["fp32_top1"] += int((fp32_pred == y).sum())
    c["int8_top1"] += int((int8_pred == y).sum())
    c["fp32_top5"] += int((fp32_top.indices == y[:, None]).any(dim=1).sum())
    c["int8_top5"] += int((int8_top.indices == y[:, None]).any(dim=1).sum())
    c["agree"] += int((fp32_pred == int8_pred).sum())
    f64, i64 = fp32_logits.double(), int8_logits.double()
    r = result.rows
    r["index"] += list(indices)
    r["label"] += y.tolist()
    r["fp32_pred"] += fp32_pred.tolist()
    r["int8_pred"] += int8_pred.tolist()
    r["fp32_top5"] += fp32_top.indices.tolist()
    r["int8_top5"] += int8_top.indices.tolist()
    r["fp32_margin"] += _margin(fp32_top.values)
    r["int8_margin"] += _margin(int8_top.values)
    r["signal"] += (f64 ** 2).sum(dim=1).tolist()
    r["noise"] += ((i64 - f64) ** 2).sum(dim=1).tolist()
    return result


def _margin(top_values: torch.Tensor) -> list[float]:
    """Top-1 logit minus top-2 logit: how close the decision was (0 for a one-class model)."""
    if top_values.shape[1] < 2:
        return [0.0] * len(top_values)
    return (top_values[:, 0] - top_values[:, 1]).double().tolist()


def merge_results(results) -> ShardResult:
    """Sum the counts and gather the rows in sample-index order."""
    merged = ShardResult()
    gathered = []
    for r in results:
        for key in COUNT_KEYS:
            merged.counts[key] += r.counts[key]
        gathered += zip(*(r.rows[c] for c in COLUMNS))
    gathered.sort(key=lambda row: row[0])
    if len({row[0] for row in gathered}) != len(gathered):
        raise ValueError("a test sample was evaluated by more than one shard")
    for row in gathered:
        for column, value in zip(COLUMNS, row):
            merged.rows[column].append(value)
    return merged


def accuracy_metrics(merged: ShardResult) -> dict:
    """Accuracies with 95% Wilson intervals, agreement, logit SQNR, per-class accuracy and change,
    and the INT8 confusion matrix. Sums run in sample-index order: the same for any sharding."""
    c, r = merged.counts, merged.rows
    n = c["n"]
    labels = sorted(set(r["label"]) | set(r["fp32_pred"]) | set(r["int8_pred"]))
    per_class = []
    for label in sorted(set(r["label"])):
        rows = [i for i, y in enumerate(r["label"]) if y == label]
        fp32_ok = sum(r["fp32_pred"][i] == label for i in rows)
        int8_ok = sum(r["int8_pred"][i] == label for i in rows)
        per_class.append({"label": label, "n": len(rows), "fp32_top1": fp32_ok / len(rows),
                          "int8_top1": int8_ok / len(rows), "change": (int8_ok - fp32_ok) / len(rows)})
    position = {label: k for k, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for y, p in zip(r["label"], r["int8_pred"]):
        confusion[position[y]][position[p]] += 1
    signal, noise = sum(r["signal"]), sum(r["noise"])
    return {"samples": n,
            "fp32": {"top1": c["fp32_top1"] / n, "top5": c["fp32_top5"] / n,
                     "top1_ci95": wilson(c["fp32_top1"], n), "top5_ci95": wilson(c["fp32_top5"], n)},
            "int8": {"top1": c["int8_top1"] / n, "top5": c["int8_top5"] / n,
                     "top1_ci95": wilson(c["int8_top1"], n), "top5_ci95": wilson(c["int8_top5"], n)},
            "agreement": c["agree"] / n,
            "logit_sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else None,  # None: identical logits
            "per_class": per_class,
            "confusion_int8": {"labels": labels, "rows_true_cols_predicted": confusion}}


def wilson(successes: int, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval for a proportion: sound near 0 and 1, unlike the normal one."""
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return [max(0.0, centre - half), min(1.0, centre + half)]


def measure_latency(model, example: torch.Tensor, warmup: int, iters: int) -> dict[str, float]:
    """Milliseconds per call at the example's batch size after `warmup` calls: the mean over
    `iters` calls (the seed's method), and the median and 90th percentile of the single calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(example)
        times = []
        start = time.perf_counter()
        for _ in range(iters):
            t = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - t)
        mean = (time.perf_counter() - start) / iters
    times.sort()
    return {"mean_ms": mean * 1e3, "p50_ms": _quantile(times, 0.5) * 1e3, "p90_ms": _quantile(times, 0.9) * 1e3}


def measure_throughput(model, batch: torch.Tensor, warmup: int, iters: int) -> float:
    """Samples per second at the batch's size, after `warmup` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(batch)
        start = time.perf_counter()
        for _ in range(iters):
            model(batch)
        return len(batch) * iters / (time.perf_counter() - start)


def measure_speed(models: dict, example: torch.Tensor, batch: torch.Tensor, warmup: int, iters: int) -> dict:
    """For each named model, in turn: batch-1 latency (mean, p50, p90 after `warmup` calls, over
    `iters` calls) and throughput at the batch's size (a tenth of the calls)."""
    x = example[:1]
    speed = {}
    for name, model in models.items():
        speed[name] = measure_latency(model, x, warmup, iters)
        speed[name]["throughput_per_s"] = measure_throughput(model, batch, max(1, warmup // 5), max(1, iters // 10))
    speed["conditions"] = {"latency_batch_size": 1, "warmup": warmup, "iters": iters,
                           "throughput_batch_size": len(batch), "throughput_iters": max(1, iters // 10)}
    return speed


def measure_models(fp32: nn.Module, int8_script: bytes, int8_state: bytes, quant, example: torch.Tensor,
                   x: torch.Tensor, batch: torch.Tensor, threads: int, warmup: int, iters: int, cpus: int) -> dict:
    """Latency (on `x`) and throughput (on `batch`) of FP32, INT8 eager and the INT8 TorchScript
    artifact, in a task that holds all `cpus` CPUs of its node. `example` has the input shape the
    INT8 model was prepared with."""
    import platform

    from .flow import quiet_torch_warnings, rebuild_int8

    quiet_torch_warnings()
    torch.set_num_threads(threads)
    int8 = rebuild_int8(fp32, quant, example, torch.load(io.BytesIO(int8_state), weights_only=True))
    scripted = torch.jit.load(io.BytesIO(int8_script))
    speed = measure_speed({"fp32": fp32, "int8": int8, "int8_torchscript": scripted}, x, batch, warmup, iters)
    speed["conditions"].update(
        where=f"one Ray task holding all {cpus} CPUs of its node, nothing else scheduled there",
        host=platform.node(), processor=_processor(), threads=threads, torch_threads=torch.get_num_threads(),
        engine=torch.backends.quantized.engine)
    return speed


def _processor() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(sorted_values) - 1) * q
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def state_dict_bytes(model: nn.Module) -> bytes:
    """`torch.save(model.state_dict())` as bytes: what the seed writes, and measures the size of."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()
