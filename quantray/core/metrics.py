"""Metrics as objects that merge: a state from one batch, a merge of two states, a value from a state.

    scorer = Scorer(task="regression")                     # or metric=UserMetric(), see below
    scores = [scorer.score(batch, target, fp32_out, int8_out) for each test batch]
    merged = scorer.merge(scores)                          # in batch order
    metrics = scorer.metrics(merged)                       # what metrics.json holds

The promise is the histograms': the merged value does not depend on how many workers scored the
batches or in what order they finished. Built-in states hold integer counts (confusion matrices,
true/false positives) or exact sums (`fractions.Fraction` of float64 per-sample sums: adding them
is exact, so any grouping gives the same bits); the pipeline also merges in batch order, so a user's
metric whose merge is not associative is still deterministic.

A user's metric (`[test] metric = "package.module:Factory"`) is an object with
    headline: str                     # the key of value() that the gate and tune read
    higher_is_better: bool            # optional, default True
    state(output, target) -> S        # one batch of one model: its output as the model returns it
    merge(a: S, b: S) -> S
    value(state: S) -> dict           # figures by name (numbers, lists, dicts: JSON-ready)
and is scored for FP32 and INT8 alike. Label-free agreement figures (output SQNR, cosine, argmax
agreement) come with every task but classification, whose figures and bytes are the old ones.
(torchmetrics' states merge too, but by float sums in rank order, not exactly; these counts are a
few lines each and add no import to every worker.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from ..errors import SpecError
from .evaluation import accuracy_metrics, merge_results, score_batch, t95
from .outputs import flatten, primary

__all__ = ["TASKS", "HEADLINES", "Scorer", "build_scorer", "TaskScores", "TargetError", "headline", "worsening", "Regression",
           "Segmentation", "Multilabel", "agreement_state", "merge_agreement", "agreement_value"]

TASKS = ("classification", "regression", "segmentation", "multilabel", "agreement")  # spec.TASKS pins them


@dataclass(frozen=True)
class Headline:
    key: str
    label: str
    unit: str              # "fraction" (shown in %, limits in fractions), "dB", or "" (the target's unit)
    higher_is_better: bool


HEADLINES = {"classification": Headline("top1", "top-1 accuracy", "fraction", True),
             "regression": Headline("rmse", "RMSE", "", False),
             "segmentation": Headline("miou", "mIoU", "fraction", True),
             "multilabel": Headline("micro_f1", "micro F1", "fraction", True),
             "agreement": Headline("sqnr_db", "INT8 vs FP32 output SQNR", "dB", True)}


class TargetError(SpecError):
    """A batch's targets do not fit the task (shape, dtype, absent)."""


def _exact(values: torch.Tensor) -> Fraction:
    """The exact sum of per-sample float64 sums (rows of `values`): the same for any grouping."""
    rows = values.double().reshape(len(values), -1).sum(dim=1).tolist() if len(values) else []
    return sum(map(Fraction, rows), Fraction(0))


def _ci(mean: float, second: float, n: int) -> list[float] | None:
    """95% interval of a mean from n values' mean and mean square (Student t); None below 2 values."""
    if n < 2:
        return None
    variance = max(0.0, (second - mean * mean) * n / (n - 1))
    half = t95(n - 1) * math.sqrt(variance / n)
    return [mean - half, mean + half]


class Regression:
    """MAE, RMSE and R² over every target element, with 95% intervals on MAE and RMSE (normal
    approximation; RMSE's is the square root of MSE's bounds). R² uses the test set's own mean."""

    headline, higher_is_better = "rmse", False

    def state(self, output: torch.Tensor, target: torch.Tensor) -> dict:
        if output.numel() != target.numel():
            raise TargetError(f"targets of shape {tuple(target.shape)} do not fit outputs of shape {tuple(output.shape)}; "
                              "task = \"regression\" expects one target value per output value")
        y = target.double().reshape(len(target), -1)
        e = output.double().reshape(len(output), -1) - y
        return {"n": e.numel(), "abs": _exact(e.abs()), "sq": _exact(e ** 2), "quad": _exact(e ** 4),
                "y": _exact(y), "y2": _exact(y ** 2)}

    def merge(self, a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}

    def value(self, s: dict) -> dict:
        n = s["n"]
        mae, mse = s["abs"] / n, s["sq"] / n
        total = s["y2"] - s["y"] * s["y"] / n
        mae_ci = _ci(float(mae), float(mse), n)
        mse_ci = _ci(float(mse), float(s["quad"] / n), n)
        return {"values": n, "mae": float(mae), "rmse": math.sqrt(mse), "r2": float(1 - s["sq"] / total) if total else None,
                "mae_ci95": mae_ci, "rmse_ci95": [math.sqrt(max(0.0, b)) for b in mse_ci] if mse_ci else None}


class Segmentation:
    """Per-class IoU, mIoU (over classes present in targets or predictions) and pixel accuracy from
    one confusion matrix of integer counts; pixels whose target is `ignore_index` are left out."""

    headline, higher_is_better = "miou", True

    def __init__(self, ignore_index: int = 255):
        self.ignore_index = ignore_index

    def state(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.dim() != 4 or target.dim() != 3 or target.shape != output.shape[:1] + output.shape[2:] \
                or target.dtype.is_floating_point:
            raise TargetError(f"targets of shape {tuple(target.shape)} ({target.dtype}) do not fit outputs of shape "
                              f"{tuple(output.shape)}; task = \"segmentation\" expects outputs (N, C, H, W) and integer "
                              "class masks (N, H, W)")
        classes = output.shape[1]
        keep = target != self.ignore_index
        y, p = target[keep].long(), output.argmax(dim=1)[keep]
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise TargetError(f"a mask holds class {int(y.max()) if int(y.max()) >= classes else int(y.min())}, outside "
                              f"the model's {classes} classes (ignore_index = {self.ignore_index} is left out)")
        return torch.bincount(y * classes + p, minlength=classes * classes).reshape(classes, classes)

    def merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def value(self, confusion: torch.Tensor) -> dict:
        c = confusion.long()
        hit, truth, predicted = c.diag(), c.sum(dim=1), c.sum(dim=0)
        union = truth + predicted - hit
        iou = [int(h) / int(u) if u else None for h, u in zip(hit, union)]
        present = [v for v in iou if v is not None]
        pixels = int(c.sum())
        return {"pixels": pixels, "miou": sum(present) / len(present) if present else None,
                "pixel_accuracy": int(hit.sum()) / pixels if pixels else None,
                "per_class_iou": iou}


class Multilabel:
    """Per-label precision, recall and F1, micro and macro F1, a label on where sigmoid(output) is
    at least `threshold`."""

    headline, higher_is_better = "micro_f1", True

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def state(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.dim() != 2 or target.shape != output.shape or not bool(((target == 0) | (target == 1)).all()):
            raise TargetError(f"targets of shape {tuple(target.shape)} do not fit outputs of shape {tuple(output.shape)}; "
                              "task = \"multilabel\" expects outputs (N, L) and targets (N, L) of 0s and 1s")
        p, y = torch.sigmoid(output.double()) >= self.threshold, target.bool()
        return torch.stack([(p & y).sum(0), (p & ~y).sum(0), (~p & y).sum(0)]).long()  # tp, fp, fn per label

    def merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def value(self, counts: torch.Tensor) -> dict:
        def f1(tp, fp, fn):
            return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None

        rows = [[int(v) for v in counts[:, k]] for k in range(counts.shape[1])]
        per_label = [f1(*r) for r in rows]
        defined = [v for v in per_label if v is not None]
        tp, fp, fn = (int(v) for v in counts.sum(dim=1))
        return {"labels": len(rows), "micro_f1": f1(tp, fp, fn), "macro_f1": sum(defined) / len(defined) if defined else None,
                "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
                "per_label_f1": per_label}


def agreement_state(fp32: dict[str, torch.Tensor], int8: dict[str, torch.Tensor], name: str | None = None,
                    class_dims: tuple[int, ...] = (2,)) -> dict:
    """Label-free: per output, FP32 energy and the energy of INT8 minus FP32; per sample, the cosine
    of the scored output's INT8 and FP32 values; where it holds class scores (dim 1 of an output of
    `class_dims` dimensions: (N, C) logits, and (N, C, H, W) for segmentation), argmax agreement."""
    outputs = {}
    for key, a in fp32.items():
        b = int8[key]
        outputs[key] = [_exact(a.double() ** 2), _exact((b.double() - a.double()) ** 2)]
    a, b = primary(fp32, name).double(), primary(int8, name).double()
    a2, b2 = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cosine = torch.nn.functional.cosine_similarity(a2, b2, dim=1, eps=1e-300)
    argmax = None
    if a.dim() in class_dims and a.shape[1] > 1:
        agree = a.argmax(dim=1) == b.argmax(dim=1)
        argmax = [int(agree.sum()), agree.numel()]
    return {"n": len(a), "outputs": outputs, "cosine": sum(map(Fraction, cosine.tolist()), Fraction(0)), "argmax": argmax}


def merge_agreement(a: dict, b: dict) -> dict:
    return {"n": a["n"] + b["n"], "outputs": {k: [a["outputs"][k][0] + b["outputs"][k][0],
                                                  a["outputs"][k][1] + b["outputs"][k][1]] for k in a["outputs"]},
            "cosine": a["cosine"] + b["cosine"],
            "argmax": [a["argmax"][0] + b["argmax"][0], a["argmax"][1] + b["argmax"][1]] if a["argmax"] else None}


def _sqnr(signal: Fraction, noise: Fraction) -> float | None:
    """10 log10(signal / noise) in dB; None where INT8 equals FP32 exactly."""
    return 10 * math.log10(signal / noise) if noise else None


def agreement_value(s: dict) -> dict:
    signal = sum((v[0] for v in s["outputs"].values()), Fraction(0))
    noise = sum((v[1] for v in s["outputs"].values()), Fraction(0))
    return {"sqnr_db": _sqnr(signal, noise), "cosine": float(s["cosine"] / s["n"]),
            "argmax_agreement": s["argmax"][0] / s["argmax"][1] if s["argmax"] else None,
            "outputs_sqnr_db": {k: _sqnr(*v) for k, v in s["outputs"].items()}}


@dataclass
class TaskScores:
    """One batch (or a merge of batches) of a task other than classification."""

    n: int
    fp32: object            # the metric's state of the FP32 outputs (None: agreement only)
    int8: object
    agreement: dict
    index: list[int] = field(default_factory=list)


class Scorer:
    """A [test] section's task (or user metric) made concrete: what each batch is scored into,
    how scores merge, and the figures they give."""

    def __init__(self, task: str = "classification", metric=None, output: str | None = None,
                 threshold: float = 0.5, ignore_index: int = 255, label: str = ""):
        self.task, self.output, self.label = task, output, label
        self.metric = metric
        if metric is None:
            self.metric = {"regression": Regression, "segmentation": lambda: Segmentation(ignore_index),
                           "multilabel": lambda: Multilabel(threshold)}.get(task, lambda: None)()
        self.user = metric is not None
        # outputs whose argmax is a class: logits (N, C); per-pixel logits where the task is segmentation
        self.class_dims = {"segmentation": (2, 4), "regression": (), "multilabel": ()}.get(task, (2,))

    def score(self, indices: list[int], target, fp32_out, int8_out):
        """One batch's scores from both models' outputs (any structure) and its targets (None: label-free)."""
        fp32, int8 = flatten(fp32_out), flatten(int8_out)
        if self.task == "classification":
            if target is None or target.dim() != 1 or target.dtype.is_floating_point:
                raise TargetError(_needs(self.task, target, "one integer class label per sample"))
            return score_batch(indices, target, primary(fp32, self.output), primary(int8, self.output))
        scores = TaskScores(len(indices), None, None, agreement_state(fp32, int8, self.output, self.class_dims), list(indices))
        if self.metric is not None:
            if target is None and not self.user:
                raise TargetError(_needs(self.task, target, "targets"))
            pick = (lambda out, flat: out) if self.user else (lambda out, flat: primary(flat, self.output))
            scores.fp32 = self.metric.state(pick(fp32_out, fp32), target)
            scores.int8 = self.metric.state(pick(int8_out, int8), target)
        return scores

    def merge(self, scores: list):
        """Scores of batches, merged in the order given (the pipeline gives batch order)."""
        scores = list(scores)
        if self.task == "classification":
            return merge_results(scores)
        merged = scores[0]
        for s in scores[1:]:
            merged = TaskScores(merged.n + s.n, self._merge(merged.fp32, s.fp32), self._merge(merged.int8, s.int8),
                                merge_agreement(merged.agreement, s.agreement), merged.index + s.index)
        return merged

    def _merge(self, a, b):
        return None if a is None else self.metric.merge(a, b)

    def metrics(self, merged) -> dict:
        """metrics.json's figures (classification: `evaluation.accuracy_metrics`, unchanged)."""
        if self.task == "classification":
            return accuracy_metrics(merged)
        agreement = agreement_value(merged.agreement)
        head = self.headline()
        out = {"task": self.task, "samples": merged.n, "fp32": {}, "int8": {}}
        if self.metric is not None:
            out["fp32"], out["int8"] = dict(self.metric.value(merged.fp32)), dict(self.metric.value(merged.int8))
            fp32, int8 = out["fp32"].get(head.key), out["int8"].get(head.key)
            for v in (fp32, int8):
                if not (v is None or isinstance(v, (int, float)) and not isinstance(v, bool)):
                    raise TargetError(f"the metric's value() gives {head.key} = {v!r}: expected a number")
        else:
            fp32, int8 = None, agreement["sqnr_db"]
        out["headline"] = {"key": head.key, "label": head.label, "unit": head.unit,
                           "higher_is_better": head.higher_is_better, "fp32": fp32, "int8": int8}
        out["output_agreement"] = agreement
        return out

    def headline(self) -> Headline:
        if self.user:
            key = self.metric.headline
            return Headline(key, self.label or key, "", bool(getattr(self.metric, "higher_is_better", True)))
        return HEADLINES[self.task]


def build_scorer(test, where: str = "[test]") -> Scorer:
    """The Scorer a [test] section (spec.DataSpec) names; a user's metric factory is resolved and
    called here, and what it returns checked: a SpecError naming the key where it is wrong."""
    if test.metric is None:
        return Scorer(test.task_name, output=test.output, threshold=test.threshold, ignore_index=test.ignore_index)
    from ..inputs.models import call_user, resolve_callable

    key = f"{where} metric"
    made = call_user(resolve_callable(test.metric, key), dict(test.metric_kwargs), f"{key} = {test.metric!r}")
    missing = [m for m in ("state", "merge", "value") if not callable(getattr(made, m, None))]
    if missing or not isinstance(getattr(made, "headline", None), str):
        lacks = ", ".join(f"{m}()" for m in missing) + (", " if missing else "") \
            + ("" if isinstance(getattr(made, "headline", None), str) else "headline (a str: the key of value() to gate on)")
        raise SpecError(f"{key} = {test.metric!r} returned {type(made).__name__}, which lacks {lacks.rstrip(', ')}; "
                        "expected an object with state(output, target), merge(a, b), value(state) and headline")
    return Scorer("custom", metric=made, output=test.output, label=made.headline)


def _needs(task: str, target, what: str) -> str:
    found = "no targets (label-free data)" if target is None else f"targets of shape {tuple(target.shape)} ({target.dtype})"
    hint = "; for label-free data use task = \"agreement\"" if target is None else ""
    return f"task = {task!r} expects {what}, the data gives {found}{hint}"


def headline(metrics: dict) -> dict:
    """A run's headline figure, whatever its task: key, label, unit, direction, FP32 and INT8 values."""
    if "headline" in metrics:
        return metrics["headline"]
    h = HEADLINES["classification"]
    return {"key": h.key, "label": h.label, "unit": h.unit, "higher_is_better": True,
            "fp32": metrics["fp32"]["top1"], "int8": metrics["int8"]["top1"]}


def worsening(h: dict, better, worse) -> float | None:
    """How much `worse` is below `better` in the headline's direction (negative: it is better)."""
    if better is None or worse is None:
        return None
    return better - worse if h["higher_is_better"] else worse - better

