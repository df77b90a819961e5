"""Metrics that merge (core.metrics) and outputs of any structure (core.outputs): per task, the merged
figures equal one computation over the whole test set, whatever the worker count and batch order."""

import math
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from quantray.core.metrics import Scorer, TargetError, build_scorer, worsening
from quantray.core.outputs import OutputError, flatten, primary
from quantray.errors import SpecError
from quantray.spec import DataSpec

N, BATCH = 103, 8   # a last batch shorter than the rest, as real test sets have


def _data(task: str, seed: int = 0):
    """(inputs to the two models' outputs, targets) for N samples of `task`, INT8 a noisy FP32."""
    g = torch.Generator().manual_seed(seed)
    if task == "regression":
        fp32 = torch.randn(N, 3, generator=g) * 50 + 150
        target = fp32 + torch.randn(N, 3, generator=g) * 20
    elif task == "segmentation":
        fp32 = torch.randn(N, 5, 6, 7, generator=g)
        target = torch.randint(0, 5, (N, 6, 7), generator=g)
        target[torch.rand(N, 6, 7, generator=g) < 0.1] = 255
    elif task == "multilabel":
        fp32 = torch.randn(N, 6, generator=g) * 2
        target = (torch.rand(N, 6, generator=g) < 0.4).long()
    else:
        fp32 = torch.randn(N, 10, generator=g)
        target = None
    int8 = fp32 + torch.randn(fp32.shape, generator=g) * 0.3
    return fp32, int8, target


def _batches(n: int) -> list[list[int]]:
    return [list(range(s, min(s + BATCH, n))) for s in range(0, n, BATCH)]


def _scores(scorer, fp32, int8, target, batches):
    return [scorer.score(b, None if target is None else target[b], fp32[b], int8[b]) for b in batches]


def _grouped(scorer, scores: list, workers: int, seed: int):
    """What `workers` workers give: each a shuffled share of the batches, merged in the order it
    scored them, then the workers' merges merged (in a shuffled order too)."""
    rng = random.Random(seed)
    order = list(range(len(scores)))
    rng.shuffle(order)
    shares = [[scores[i] for i in order[w::workers]] for w in range(workers)]
    partial = [scorer.merge(share) for share in shares if share]
    rng.shuffle(partial)
    return scorer.merge(partial)


def _whole(task: str, fp32, int8, target) -> dict:
    """The figures computed once over the whole set, in float64, by plain formulas (no states)."""
    out = {}
    for model, y_hat in (("fp32", fp32), ("int8", int8)):
        if task == "regression":
            e = (y_hat.double() - target.double()).numpy().ravel()
            y = target.double().numpy().ravel()
            out[model] = {"mae": np.abs(e).mean(), "rmse": math.sqrt((e ** 2).mean()),
                          "r2": 1 - (e ** 2).sum() / ((y - y.mean()) ** 2).sum()}
        elif task == "segmentation":
            keep = target != 255
            p, t = y_hat.argmax(1)[keep].numpy(), target[keep].numpy()
            iou = [((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum() for c in range(5)]
            out[model] = {"miou": float(np.mean(iou)), "pixel_accuracy": (p == t).mean(), "per_class_iou": iou}
        elif task == "multilabel":
            p = (torch.sigmoid(y_hat.double()) >= 0.5).long().numpy()
            out[model] = {"micro_f1": f1_score(target.numpy(), p, average="micro"),
                          "macro_f1": f1_score(target.numpy(), p, average="macro")}
    a, b = fp32.double().numpy(), int8.double().numpy()
    out["output_agreement"] = {
        "sqnr_db": 10 * math.log10((a ** 2).sum() / ((b - a) ** 2).sum()),
        "cosine": float(np.mean([x @ y / np.linalg.norm(x) / np.linalg.norm(y)
                                 for x, y in zip(a.reshape(N, -1), b.reshape(N, -1))])),
    }
    return out


@pytest.mark.parametrize("task", ["regression", "segmentation", "multilabel", "agreement"])
def test_merged_figures_are_the_whole_sets_for_any_workers_and_batch_order(task):
    fp32, int8, target = _data(task)
    scorer = Scorer(task)
    scores = _scores(scorer, fp32, int8, target, _batches(N))
    one_batch = scorer.metrics(scorer.merge(_scores(scorer, fp32, int8, target, [list(range(N))])))
    in_order = scorer.metrics(scorer.merge(scores))
    assert in_order == one_batch  # the states are exact: one batch or 13 give the same bits
    for workers in (1, 2, 3):
        for seed in range(3):
            assert scorer.metrics(_grouped(scorer, scores, workers, seed)) == in_order, (workers, seed)
    whole = _whole(task, fp32, int8, target)
    for model in ("fp32", "int8"):
        for key, expected in whole.get(model, {}).items():
            assert in_order[model][key] == pytest.approx(expected, rel=1e-12, abs=1e-15), (model, key)
    for key, expected in whole["output_agreement"].items():
        assert in_order["output_agreement"][key] == pytest.approx(expected, rel=1e-12), key
    head = in_order["headline"]
    assert head["key"] == {"regression": "rmse", "segmentation": "miou", "multilabel": "micro_f1",
                           "agreement": "sqnr_db"}[task]
    assert head["int8"] == (in_order["output_agreement"] if task == "agreement" else in_order["int8"])[head["key"]]


def test_integer_states_give_the_exact_counts():
    fp32, int8, target = _data("segmentation")
    scorer = Scorer("segmentation")
    merged = scorer.merge(_scores(scorer, fp32, int8, target, _batches(N)))
    keep = target != 255
    assert int(merged.fp32.sum()) == int(keep.sum()) == scorer.metrics(merged)["fp32"]["pixels"]
    assert torch.equal(merged.fp32.diag(), torch.bincount(target[keep][fp32.argmax(1)[keep] == target[keep]], minlength=5))
    scorer = Scorer("multilabel")
    fp32, int8, target = _data("multilabel")
    merged = scorer.merge(_scores(scorer, fp32, int8, target, _batches(N)))
    p = torch.sigmoid(fp32.double()) >= 0.5
    assert merged.fp32[0].tolist() == (p & target.bool()).sum(0).tolist()  # true positives per label


def test_regression_intervals_hold_the_estimate():
    fp32, int8, target = _data("regression")
    scorer = Scorer("regression")
    figures = scorer.metrics(scorer.merge(_scores(scorer, fp32, int8, target, _batches(N))))["int8"]
    assert figures["values"] == N * 3
    assert figures["mae_ci95"][0] < figures["mae"] < figures["mae_ci95"][1]
    assert figures["rmse_ci95"][0] < figures["rmse"] < figures["rmse_ci95"][1]
    assert figures["rmse_ci95"][1] - figures["rmse_ci95"][0] < figures["rmse"] / 4


def test_agreement_gives_argmax_agreement_for_class_scores_only():
    fp32, int8, _ = _data("agreement")
    scorer = Scorer("agreement")
    figures = scorer.metrics(scorer.merge(_scores(scorer, fp32, int8, None, _batches(N))))["output_agreement"]
    assert figures["argmax_agreement"] == (fp32.argmax(1) == int8.argmax(1)).double().mean().item()
    images = {"image": fp32.reshape(N, 1, 2, 5), "code": fp32[:, :3]}   # not logits: no argmax figure
    noisy = {"image": int8.reshape(N, 1, 2, 5), "code": int8[:, :3]}
    scores = [scorer.score(b, None, {k: v[b] for k, v in images.items()}, {k: v[b] for k, v in noisy.items()})
              for b in _batches(N)]
    figures = scorer.metrics(scorer.merge(scores))
    assert figures["output_agreement"]["argmax_agreement"] is None
    assert set(figures["output_agreement"]["outputs_sqnr_db"]) == {"image", "code"}
    assert figures["headline"]["int8"] == figures["output_agreement"]["sqnr_db"]


class MeanAbs:
    """A user's metric: mean absolute error, merged by exact integer-free sums."""

    headline, higher_is_better = "mean_abs", False

    def state(self, output, target):
        return [float((output["out"] - target).abs().sum()), target.numel()]

    def merge(self, a, b):
        return [a[0] + b[0], a[1] + b[1]]

    def value(self, s):
        return {"mean_abs": s[0] / s[1]}


def test_a_users_metric_scores_the_output_as_the_model_returns_it():
    fp32, int8, target = _data("regression")
    scorer = Scorer("custom", metric=MeanAbs(), label="mean_abs")
    scores = [scorer.score(b, target[b], {"out": fp32[b], "aux": None}, {"out": int8[b]}) for b in _batches(N)]
    figures = scorer.metrics(scorer.merge(scores))
    assert figures["task"] == "custom" and figures["fp32"]["mean_abs"] == pytest.approx((fp32 - target).abs().mean().item())
    assert figures["headline"] == {"key": "mean_abs", "label": "mean_abs", "unit": "", "higher_is_better": False,
                                   "fp32": figures["fp32"]["mean_abs"], "int8": figures["int8"]["mean_abs"]}
    assert worsening(figures["headline"], 1.0, 1.5) == 0.5   # lower is better: a rise is a worsening


@pytest.mark.parametrize("task, output, target, expected", [
    ("regression", torch.zeros(4, 2), torch.zeros(4, 3), "task = \"regression\" expects one target value per output value"),
    ("segmentation", torch.zeros(4, 3, 5, 5), torch.zeros(4, 5, 5), "integer class masks (N, H, W)"),
    ("segmentation", torch.zeros(4, 3, 5, 5), torch.full((4, 5, 5), 7), "a mask holds class 7, outside the model's 3"),
    ("multilabel", torch.zeros(4, 3), torch.full((4, 3), 2), "targets (N, L) of 0s and 1s"),
    ("classification", torch.zeros(4, 3), None, "no targets (label-free data); for label-free data use task = \"agreement\""),
    ("regression", torch.zeros(4, 1), None, "task = 'regression' expects targets, the data gives no targets"),
])
def test_targets_that_do_not_fit_the_task_say_what_was_expected(task, output, target, expected):
    with pytest.raises(TargetError) as e:
        Scorer(task).score(list(range(4)), target, output, output)
    assert expected in str(e.value)


def test_flatten_names_every_tensor_of_any_structure():
    t = torch.ones(2, 3)
    q = torch.quantize_per_tensor(t, 0.5, 0, torch.quint8)
    flat = flatten({"out": t, "aux": None, "extra": (t, [q, {"deep": t}])})
    assert list(flat) == ["out", "extra.0", "extra.1.0", "extra.1.1.deep"]
    assert not flat["extra.1.0"].is_quantized and torch.equal(flat["extra.1.0"], t)
    assert list(flatten(t)) == ["output"] and list(flatten((t, t))) == ["0", "1"]
    assert primary(flat) is flat["out"] and primary(flat, "extra.0") is flat["extra.0"]
    with pytest.raises(OutputError, match=r"^output = 'aux': the model has no such output; it returns 'out', "):
        primary(flat, "aux")
    with pytest.raises(OutputError, match="the model's output extra.1 is str; expected a tensor"):
        flatten({"out": t, "extra": (t, "label")})
    with pytest.raises(OutputError, match="returned NoneType with no tensor in it"):
        flatten(None)


def test_build_scorer_checks_what_a_metric_factory_returns():
    spec = DataSpec(source="digits", split="test", metric="quantray.testing:returns_list")
    with pytest.raises(SpecError, match=r"^\[test\] metric = 'quantray.testing:returns_list' returned list, which lacks "
                                        r"state\(\), merge\(\), value\(\), headline"):
        build_scorer(spec)
    ok = build_scorer(DataSpec(source="digits", split="test", metric="quantray.testing:mean_abs_metric",
                               metric_kwargs={"output": "out"}))
    assert ok.headline().key == "mean_abs" and not ok.headline().higher_is_better and ok.metric.output == "out"
