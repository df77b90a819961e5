"""Evaluation: test batches -> counts and predictions; exact merge; latency; size.

No Ray here: `worker.Worker` runs these on each test batch and measures speed with them
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

from ..inputs import data as data_mod

__all__ = ["ShardResult", "evaluate_shard", "score_batch", "merge_results", "accuracy_metrics",
           "wilson", "measure_latency", "measure_throughput", "measure_speed", "quantile", "t95", "processor", "cpu_kind",
           "state_dict_bytes"]

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


def measure_latency(model, example: torch.Tensor, warmup: int, iters: int, precision: float = 0.0,
                    least: int = 10) -> dict:
    """Milliseconds per call at the example's batch size after `warmup` calls. Calls are timed one
    by one until the 95% interval of their mean is within +-`precision` of it (at least `least`
    calls), or `iters` calls (always `iters` with precision 0: the seed's method). Returns the mean,
    median, 90th percentile, the interval's half-width and the calls timed."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(example)
        times, total, squares = [], 0.0, 0.0
        while len(times) < iters:
            t = time.perf_counter()
            model(example)
            dt = time.perf_counter() - t
            times.append(dt)
            total, squares = total + dt, squares + dt * dt
            n = len(times)
            if precision > 0 and n >= min(least, iters) and _half_width(total, squares, n) <= precision * total / n:
                break
    n = len(times)
    mean = total / n
    half = _half_width(total, squares, n)
    times.sort()
    return {"mean_ms": mean * 1e3, "p50_ms": quantile(times, 0.5) * 1e3, "p90_ms": quantile(times, 0.9) * 1e3,
            "ci95_ms": half * 1e3 if math.isfinite(half) else None, "iters": n}


def _half_width(total: float, squares: float, n: int) -> float:
    """Half-width of the 95% interval of a mean from n samples' sum and sum of squares (Student t)."""
    if n < 2:
        return math.inf
    variance = max(0.0, (squares - total * total / n) / (n - 1))
    return t95(n - 1) * math.sqrt(variance / n)


def t95(df: int) -> float:
    """Student's t quantile for a two-sided 95% interval (Cornish-Fisher expansion: within 0.2% of
    the table from 5 degrees of freedom on, within 3.1% at 2)."""
    z = Z95
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2) \
        + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3)


def measure_throughput(model, batch: torch.Tensor, warmup: int, iters: int, precision: float = 0.0) -> dict:
    """Samples per second at the batch's size: calls timed as in `measure_latency`."""
    timed = measure_latency(model, batch, warmup, iters, precision, least=5)
    return {"throughput_per_s": len(batch) * 1e3 / timed["mean_ms"], "throughput_iters": timed["iters"]}


def measure_speed(models: dict, example: torch.Tensor, batch: torch.Tensor | None, warmup: int, iters: int,
                  precision: float = 0.0) -> dict:
    """For each named model, in turn: batch-1 latency (see `measure_latency`) and, given a batch,
    throughput at its size (a fifth of the warm-up and a tenth of the calls, at most)."""
    x = example[:1]
    speed = {}
    for name, model in models.items():
        speed[name] = measure_latency(model, x, warmup, iters, precision)
        if batch is not None:
            speed[name].update(measure_throughput(model, batch, max(1, warmup // 5), max(1, iters // 10), precision))
    speed["conditions"] = {"latency_batch_size": 1, "warmup": warmup, "iters": iters, "precision": precision}
    if batch is not None:
        speed["conditions"]["throughput_batch_size"] = len(batch)
    return speed


def processor() -> str:
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


# CPU features that decide which FP32 kernels run (oneDNN and torch's own dispatch choose by them).
_KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")


def cpu_kind() -> dict:
    """What decides this CPU's FP32 results to the last bit: its model (vendor, family/model/stepping:
    a VM may show only "AMD EPYC"), its caches (oneDNN blocks its loops by them), the instruction set
    torch dispatches its kernels on and the CPU features oneDNN chooses kernels by. Workers of
    different kinds may observe activations that differ in the last bits."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    return {"model": processor(), "id": "/".join(info.get(k, "?") for k in ("vendor_id", "cpu family", "model", "stepping")),
            "caches": _caches(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in _KERNEL_FLAGS if f in flags]}


def _caches() -> str:
    """CPU 0's cache sizes by level, e.g. "L1d 32K L1i 32K L2 512K L3 32768K" (Linux; else "")."""
    import glob

    sizes = []
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{index}/level") as a, open(f"{index}/type") as b, open(f"{index}/size") as c:
                level, kind, size = a.read().strip(), b.read().strip(), c.read().strip()
        except OSError:
            continue
        sizes.append(f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''} {size}")
    return " ".join(sizes)


def quantile(sorted_values: list[float], q: float) -> float:
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
