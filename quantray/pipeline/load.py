"""The load stage: a job made concrete (FP32 model, datasets, drawn samples, example input), the
checks a spec needs torch for, prepare_fx, and the job's stored statistics.

    check(spec)                     # before any work: what the spec could not check without torch
    job = load(spec)                # every user error here is a SpecError (exit 2)
    prepared = prepare(job)         # prepare_fx: a model it cannot take is the user's to fix
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Console
from torch import nn

from ..core import flow
from ..core.evaluation import state_dict_bytes
from ..core.metrics import Scorer, build_scorer
from ..digest import sha256_bytes
from ..errors import DataError, QuantrayError, SpecError
from ..inputs.data import build_dataset, check_data, draw_indices, load_batch
from ..inputs.models import build_model, check_model
from ..spec import JobSpec
from ..storage.stats import StatsStore, default_location
from ..storage.store import Store

__all__ = ["Job", "check", "load", "load_for_evaluation", "check_scoring", "prepare", "check_stats_location", "open_stats",
           "decoded_location", "warn_unwritable"]


@dataclass
class Job:
    """A job made concrete: its spec, the FP32 model (and its saved bytes), both datasets, the
    drawn samples and the example input. `calibration` parts are None when only evaluating."""

    spec: JobSpec
    fp32: nn.Module
    fp32_bytes: bytes
    test_ds: object
    test_idx: list[int]
    example: torch.Tensor
    calib_ds: object = None
    calib_idx: list[int] | None = None
    stats: StatsStore | None = field(default=None, repr=False)  # opened once, by the first stage that needs it
    transforms: dict = field(default_factory=dict)  # what was done to the FP32 weights before prepare_fx
    scorer: Scorer | None = None  # what the test outputs are scored as ([test] task or metric)

    @property
    def where(self) -> str:
        return str(self.spec.path)


def check(spec: JobSpec) -> None:
    """What a spec cannot check without torch (a torchvision architecture or dataset class, a
    torch.nn class in module_types), as one SpecError naming the job file: before any work."""
    check_model(spec.model, f"{spec.path}: [model]")
    for section in ("calibration", "test"):
        check_data(getattr(spec, section), f"{spec.path}: [{section}]")
    try:
        flow.check_quant(spec.quantization)
    except SpecError as e:
        raise SpecError(f"{spec.path}: {e}") from None


def load(spec: JobSpec, like: Job | None = None) -> Job:
    """Build the FP32 model and both datasets and draw the samples: every user error here is a SpecError.
    `like`: a Job loaded from a spec with the same [model], [calibration] and [test] (paths absolute,
    as loaded), whose model, data and samples are taken as they are: tune's best run, whose prepare
    then finds the template its trials made (`flow.prepare`). Another Job is not used."""
    if like is not None and (like.spec.model, like.spec.calibration, like.spec.test) == (spec.model, spec.calibration, spec.test):
        return Job(spec, like.fp32, like.fp32_bytes, like.test_ds, like.test_idx, like.example, like.calib_ds,
                   like.calib_idx, scorer=like.scorer)
    fp32 = build_model(spec.model, spec.path)
    calib_ds = build_dataset(spec.calibration, f"{spec.path}: [calibration]")
    test_ds = build_dataset(spec.test, f"{spec.path}: [test]")
    calib_idx = draw_indices(calib_ds, spec.calibration, f"{spec.path}: [calibration]",
                             "the calibration split is empty: nothing to calibrate on")
    test_idx = draw_indices(test_ds, spec.test, f"{spec.path}: [test]", "the test split is empty: nothing to evaluate on")
    example = load_batch(calib_ds, calib_idx[:1])[0]
    job = Job(spec, fp32, state_dict_bytes(fp32), test_ds, test_idx, example, calib_ds, calib_idx)
    job.scorer = check_scoring(job, f"{spec.path}: [test]")
    return job


def load_for_evaluation(spec: JobSpec, manifest: dict, where: str) -> Job:
    """The FP32 model a run quantized (checked against its manifest) and the test data to evaluate on."""
    fp32 = build_model(spec.model, spec.path)
    fp32_bytes = state_dict_bytes(fp32)
    if sha256_bytes(fp32_bytes) != manifest["fp32_state_sha256"]:
        raise SpecError(f"{spec.path}: [model] the FP32 model is not the one this run quantized (its state_dict's "
                        "sha256 differs from the run's manifest); restore its checkpoint or run the job again")
    test_ds = build_dataset(spec.test, where)
    test_idx = draw_indices(test_ds, spec.test, where, "the test split is empty: nothing to evaluate on")
    job = Job(spec, fp32, fp32_bytes, test_ds, test_idx, torch.zeros(manifest["input_shape"]))
    job.scorer = check_scoring(job, where)
    return job


def check_scoring(job: Job, where: str) -> Scorer:
    """The job's Scorer, tried on the FP32 model's outputs for the first two test samples before
    any work: a target that does not fit the task, or a user's metric that raises or gives no
    number for its headline, is one SpecError naming the key (exit 2), with nothing written."""
    test = job.spec.test
    key = f"metric = {test.metric!r}" if test.metric else f"task = {test.task_name!r}"
    scorer = build_scorer(test, where)
    indices = job.test_idx[:2]
    try:
        x, y = load_batch(job.test_ds, indices)
    except DataError as e:  # found here, before calibrating, rather than by the first test batch
        raise DataError(f"{where} {e}") from None
    try:
        with torch.inference_mode():
            out = job.fp32(x)
        scorer.metrics(scorer.merge([scorer.score(indices, y, out, out)]))
    except SpecError as e:  # a message that names its key already is not prefixed with the task again
        raise SpecError(f"{where} {e}" if str(e).startswith(("task = ", "output = ")) else f"{where} {key}: {e}") from None
    except Exception as e:  # the user's metric code
        if not scorer.user:
            raise
        raise SpecError(f"{where} {key}: scoring the first test samples raised {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}; fix the metric") from None
    return scorer


def prepare(job: Job, console: Console | None = None) -> nn.Module:
    """prepare_fx (or PT2E's export and prepare_pt2e) with the job's config (after equalization,
    where it asks for it, recorded in `job.transforms`); a model the flow cannot take is the user's
    to fix (exit 2)."""
    try:
        if job.spec.quantization.equalize:
            _equalization(job, console)
        if job.spec.quantization.flow == "fx" and console is not None:  # once per run, not per worker process
            console.print("[dim]note: torch deprecates FX quantization (flow = \"fx\"); see flow = \"pt2e\"[/]")
        return flow.prepare(job.fp32, job.spec.quantization, job.example)
    except SpecError as e:
        raise SpecError(f"{job.where}: {e}") from None
    except QuantrayError:
        raise
    except Exception as e:  # most often: the model is not symbolically traceable
        step = "prepare_pt2e" if job.spec.quantization.flow == "pt2e" else "prepare_fx"
        raise SpecError(f"{job.where}: [model] {step} failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _equalization(job: Job, console: Console | None) -> None:
    from ..core.equalize import equalize

    done = job.transforms["equalization"] = equalize(job.fp32)[1]
    if not done["pairs"] and console is not None:
        why = f" ({'; '.join(done['skipped'])})" if done["skipped"] else ""
        console.print(f"[yellow]{job.where}: [quantization] equalize = true: the model has no pair of conv/linear "
                      f"layers joined through ReLU-like steps{why}; nothing was equalized[/]")


def check_stats_location(spec: JobSpec, use_cache: bool) -> None:
    """A cache_dir that cannot be opened is the job file's error, found before any work is done."""
    if use_cache and spec.run.cache:
        try:
            Store(spec.run.cache_dir or default_location(), "[run] cache_dir")
        except SpecError as e:
            raise SpecError(f"{spec.path}: {e}") from None


def decoded_location(spec: JobSpec, use_cache: bool) -> str | None:
    """Where workers keep decoded images (`inputs.decoded`): beside the stored statistics, in the
    same folder or URI; None when the job keeps nothing (`--no-cache`, `[run] cache = false`)."""
    if not (use_cache and spec.run.cache):
        return None
    return str(spec.run.cache_dir or default_location())


def open_stats(job: Job, use_cache: bool) -> StatsStore | None:
    """The job's stored statistics (None when it keeps none), opened once: its key base digests the
    FP32 weights."""
    run = job.spec.run
    if not (use_cache and run.cache):
        return None
    if job.stats is None:
        job.stats = StatsStore(run.cache_dir or default_location(), job.fp32, run.threads)
    return job.stats


def warn_unwritable(console: Console, store: StatsStore | None) -> None:
    if store is not None and store.unwritable:
        console.print(f"[yellow]could not store statistics in {store.location} ({store.unwritable}); "
                      "the run goes on without storing them[/]")
