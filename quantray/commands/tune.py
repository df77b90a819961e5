"""`quantray tune`: win back the accuracy INT8 lost, from one calibration, with trials in parallel.

    result = tune("jobs/digits_mobile.toml", max_drop=0.003, validation="val.toml", trials=64, workers=2)
    result.met, result.best, result.location       # trials.parquet, best.toml, best-run/, report.html

One calibration (stored statistics reused) and FP32 evaluated once (its logits kept for every trial).
Before any trial, the engine check (`core.engine`) of the job's own config: where the INT8 kernels
disagree with the reference quantization, no range or FP32 layer can cure it, so tune says so and
stops (exit 3), unless `score_with="reference"` scores every trial with torch's reference model.
A trial is (activation range method, weight scheme, cures, modules kept in FP32); a worker of the
job's pool builds its INT8 model from the merged statistics (prepare_fx, load them, convert_fx: no
forward pass) and scores it against the kept FP32 logits, trials dealt out round-robin. The search:

1. every range method with each weight scheme (only the job's, where it names one: its target's
   constraint), on the whole selection set;
2. if the best still loses more than `max_drop`, the cures on it: bias correction (its sums come
   with the calibration), cross-layer equalization (one more calibration, of the equalized model,
   on the same pool: the values observed change), and both;
3. if still over budget: every quantized layer of the best trial so far ranked in one pass by its
   isolated error (its INT8 module on FP32 inputs against FP32, `layers.isolated_errors`), then the
   k worst in FP32, k = 1, 2, ... (one trial per worker at a time), with, after the first wave,
   whole groups of one kind (all depthwise convolutions, all Linear, ...) tried before longer
   prefixes: the fewest FP32 layers that meet the budget.

Under `flow = "pt2e"`: no engine check (the compiled program has no per-node outputs; trials score
the INT8 program uncompiled), equalization is the only cure (bias correction is FX-only), and phase
3 is not run (isolated errors read FX's INT8 modules): tune says so where it stops.

It stops when the budget is met or the trials run out, and says which. Choices are made on the
`--validation` file's [test] table; the best trial is then run as a job (`best.toml`) on the job's own
test split, so its reported accuracy is held out. Without a validation table the test split chooses,
and the summary says that its accuracy is then optimistic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from .. import api, pipeline
from ..core import flow
from ..core.equalize import equalize
from ..core.evaluation import wilson
from ..core.metrics import headline, worsening
from ..core.ranges import METHODS
from ..errors import EngineFault, SpecError
from ..inputs.data import make_batches
from ..report.html import render_tune
from ..spec import WEIGHTS, JobSpec, QuantSpec, load_spec, load_test_section, to_toml
from ..storage.store import join

__all__ = ["tune", "Trial", "TuneResult", "TRIALS_SCHEMA", "best_toml"]

TRIALS_SCHEMA = pa.schema([
    ("trial", pa.int64()), ("phase", pa.string()), ("range_method", pa.string()), ("fp32_modules", pa.list_(pa.string())),
    ("weight", pa.string()), ("equalize", pa.bool_()), ("bias_correction", pa.bool_()), ("samples", pa.int64()), ("top1", pa.float64()), ("top1_ci95_low", pa.float64()),
    ("top1_ci95_high", pa.float64()), ("fp32_top1", pa.float64()), ("drop", pa.float64()), ("agreement", pa.float64()),
    ("logit_sqnr_db", pa.float64()), ("int8_size_bytes", pa.int64()), ("latency_ms", pa.float64()),
    ("wall_s", pa.float64()), ("qparams_digest", pa.string()),
    # any task: its headline (top1, rmse, miou, micro_f1, a metric's), FP32's and INT8's; `drop` is in its unit
    ("headline", pa.string()), ("fp32_headline", pa.float64()), ("int8_headline", pa.float64()),
])


@dataclass(frozen=True)
class Trial:
    """One configuration: the job's quantization table with this range method and weight scheme,
    these cures (equalization, bias correction), and these modules kept in FP32."""

    method: str
    weight: str
    fp32: tuple[str, ...] = ()
    equalize: bool = False
    bias: bool = False

    def quant(self, base: QuantSpec) -> QuantSpec:
        return dataclasses.replace(base, activation=None, activation_range=self.method, weight=self.weight,
                                   equalize=self.equalize, bias_correction=self.bias,
                                   module_names={**base.module_names, **{m: "fp32" for m in self.fp32}})

    def cures(self) -> str:
        return "+".join(n for n, on in (("equalize", self.equalize), ("bias", self.bias)) if on) or "-"


@dataclass
class _Scored:
    trial: Trial
    phase: str
    row: dict
    sqnr: float | None = None
    merged: object = None  # the ShardResult its figures come from


@dataclass
class TuneResult:
    location: str | Path
    met: bool
    best: dict                       # the chosen trial's row (selection set)
    trials: list[dict]
    best_run: api.RunResult | None
    stopped: str                     # why the search stopped
    optimistic: bool                 # chosen on the test split itself
    sensitivity: list[dict] = field(default_factory=list)
    scored_with: str = "engine"      # "reference": the trials' figures are torch's reference model's
    engine_check: dict | None = None


def tune(job: str | Path | JobSpec, *, max_drop: float, validation: str | Path | None = None, trials: int = 64,
         workers: int | None = None, out: str | Path | None = None, address: str | None = None,
         use_cache: bool = True, rank_samples: int = 256, score_with: str = "engine", executor: str | None = None,
         console: Console | None = None, context: pipeline.Context | None = None) -> TuneResult:
    """Search for the configuration with the fewest FP32 layers whose headline drop on the selection
    set is within `max_drop`, in the headline's unit and direction (top-1, mIoU, F1: a fraction, 0.003
    is 0.3 pt; RMSE: a rise in the target's unit; a [test] metric: its own); write the tune directory
    (module docstring)."""
    spec = original = job if isinstance(job, JobSpec) else load_spec(job)
    if spec.test.headline_is_fraction and not 0 <= max_drop < 1:
        raise SpecError(f"--max-drop {max_drop * 100:g}: points of {spec.test.task_name}'s headline between 0 and 100")
    if not 0 <= max_drop < math.inf:
        raise SpecError(f"--max-drop {max_drop:g}: at least 0, in the headline's unit")
    if trials < 1:
        raise SpecError(f"--trials {trials}: at least 1")
    if score_with not in ("engine", "reference"):
        raise SpecError(f"--score-with {score_with}: engine or reference")
    selection = load_test_section(validation) if validation is not None else spec.test
    if spec.test.task_name == "agreement":
        raise SpecError(f"{spec.path}: [test] task = 'agreement': quantray tune trades INT8 against FP32 on a headline "
                        "both models have (top-1, RMSE, mIoU, F1, a metric's); label-free data has none: tune on a "
                        "labelled --validation set of the same task, or set [quantization] by hand")
    if (selection.task_name, selection.metric) != (spec.test.task_name, spec.test.metric):
        raise SpecError(f"{validation}: [test] task = {selection.task_name!r} differs from the job's "
                        f"({spec.test.task_name!r}): tune chooses by one headline; give the validation set the job's "
                        "task (or metric)")
    ctx = context or pipeline.Context(console=console or Console(stderr=True))
    with (pipeline.session(ctx, out if out is not None else Path("tunes") / f"{spec.name}-{ctx.stamp()}", spec, use_cache) as session,
          contextlib.ExitStack() as cleanup):
        staged, private = session.staged, None
        if not (use_cache and spec.run.cache):  # nothing stored earlier is read; what this tune computes
            # (statistics, FP32 outputs) is kept in a folder of its own, which its best run then reuses
            private = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="quantray-tune-stats-"))
            spec = dataclasses.replace(spec, run=dataclasses.replace(spec.run, cache=True, cache_dir=private))
        with ctx.stage("load"):
            loaded = pipeline.load(dataclasses.replace(spec, test=selection))
        with ctx.stage("prepare"):
            prepared = pipeline.prepare(loaded)
        with session.cluster(address, loaded, executor=executor):
            with session.workers(loaded, prepared, workers=workers) as pool:
                with ctx.stage("calibrate"):
                    # with bias correction's sums: a cure the search may try, from this one calibration
                    calibrated = pipeline.calibrate(ctx, loaded, prepared, pool,
                                                    bias_sums=spec.quantization.flow == "fx")
                search = _Search(ctx, loaded, calibrated, pool, max_drop, trials, rank_samples, score_with)
                search.check_engine()
                search.run()
            best = search.best()
            staged.write_bytes("best.toml", best_toml(original, best.trial).encode())
            # The chosen trial as a job, on the job's own test split: its run directory, and the proof that
            # best.toml rebuilds exactly the trial's model (the same qparams digest).
            best_spec = load_spec(staged.path("best.toml"))
            if private:
                best_spec = dataclasses.replace(best_spec, run=dataclasses.replace(best_spec.run, cache=True,
                                                                                   cache_dir=private))
            ctx.console.print("running the best trial as a job (best.toml) on the job's \\[test] ...")
            best_run = api.run(best_spec, out=staged.path("best-run"), console=ctx.console, executor=executor,
                               like=loaded)  # the model the trials prepared: prepare_fx's templates serve it
        if best_run.manifest["qparams_digest"] != best.row["qparams_digest"]:
            raise SpecError(f"best.toml gave qparams digest {best_run.manifest['qparams_digest'][:16]} where the trial had "
                            f"{best.row['qparams_digest'][:16]}: please report this")
        rows = [s.row for s in search.scored]
        for r in rows:
            if r["trial"] == best.row["trial"]:
                int8 = best_run.metrics["int8"]  # the deployed model's: TorchScript (FX), compiled (PT2E)
                r["latency_ms"] = int8.get("torchscript_latency_ms", int8["latency_ms"])
        staged.write_parquet("trials.parquet", rows, TRIALS_SCHEMA)
        met = best.row["drop"] <= max_drop
        head = {k: v for k, v in headline(best_run.metrics).items() if k not in ("fp32", "int8")}
        summary = {"job": str(original.path), "max_drop": max_drop, "met": met, "stopped": search.stopped,
                   "headline": head,
                   "scored_with": score_with, "engine_check": search.engine,
                   "selection": str(validation) if validation is not None else "[test] of the job (optimistic)",
                   "trials": len(rows), "trial_limit": trials, "best_trial": best.row["trial"],
                   "sensitivity": search.sensitivity, "groups": search.groups, "timings_s": ctx.timings, "wall_s": round(ctx.wall_s(), 3),
                   "best_run": {**({"test_top1": best_run.metrics["int8"]["top1"], "fp32_top1": best_run.metrics["fp32"]["top1"]}
                                   if head["key"] == "top1" and "task" not in best_run.metrics else {}),
                                "test_headline": headline(best_run.metrics)["int8"],
                                "fp32_headline": headline(best_run.metrics)["fp32"],
                                "qparams_digest": best_run.manifest["qparams_digest"]}}
        staged.write_json("tune.json", summary)
        staged.write_bytes("report.html", render_tune(summary, rows, best_run.metrics).encode())
        location = session.commit({"kind": "tune", **summary})
    result = TuneResult(location, met, best.row, rows, best_run, search.stopped, validation is None, search.sensitivity,
                        score_with, search.engine)
    print_tune(ctx.console, result)
    return result


class _Search:
    """The phases over one pool; `scored` keeps every trial in the order it was evaluated."""

    def __init__(self, ctx, job: pipeline.Job, calibrated: pipeline.Calibrated, pool, max_drop, limit, rank_samples,
                 score_with: str = "engine"):
        self.ctx, self.job, self.calibrated, self.pool = ctx, job, calibrated, pool
        self.reference, self.engine = score_with == "reference", None
        self.max_drop, self.limit, self.stopped = max_drop, limit, ""
        self.batches = make_batches(job.test_idx, job.spec.test.batch_size)
        self.rank_batches = pipeline.first_batches(self.batches, rank_samples)
        self.scored: list[_Scored] = []
        self.sensitivity: list[dict] = []
        self.groups: list[dict] = []
        self.equalized: pipeline.Calibrated | None = None  # the equalized model's calibration, when tried
        self.fp32_logits = pipeline.fp32_logits(ctx, job, pool, self.batches)

    @property
    def pt2e(self) -> bool:
        return self.job.spec.quantization.flow == "pt2e"

    def check_engine(self) -> None:
        """The job's own config, built from the calibration, its engine checked on the first batches
        (64 samples): a fault ends the tune here (EngineFault), or, scoring with the reference, is said.
        Under PT2E there is no per-node check (the compiled program fuses its kernels): trials score
        the INT8 program uncompiled, the reference representation."""
        if self.pt2e:
            self.ctx.console.print("tune: flow = \"pt2e\": trials score the INT8 program uncompiled (the reference "
                                   "representation); no engine check, bias correction or FP32-layer search (FX-only)")
            return
        self.engine = pipeline.check_engine(self.ctx, self.pool, self.job.spec.quantization, self.calibrated.stats,
                                            pipeline.first_batches(self.batches, 64))
        if self.engine["ok"] is not False:
            return
        if not self.reference:
            raise EngineFault(f"{self.engine['message']}. quantray tune ran no trial: no range method or FP32 layer "
                              "cures a kernel fault (--score-with reference scores trials with torch's reference "
                              "quantized model instead)")
        self.ctx.console.print(f"[yellow]{self.engine['message']}; scoring every trial with torch's reference "
                               "quantized model (--score-with reference)[/]")

    def run(self) -> None:
        base = self.job.spec.quantization
        # A weight scheme the job names is its target's constraint (a runtime with per-tensor weights
        # only): kept. Left out, both are tried, the backend's default first.
        default = "per_tensor" if base.backend == "qnnpack" else "per_channel"
        weights = (base.weight,) if base.weight else (default, *[w for w in WEIGHTS if w != default])
        self._wave([Trial(m, w) for w in weights for m in METHODS], "range", self.batches)
        if self._met():
            self.stopped = "the budget was met by a range method"
            return
        if not self._cures():
            return
        if self._met():
            best = self.best().trial
            self.stopped = f"the budget was met by a cure ({best.cures()})"
            return
        if self.pt2e:
            self.stopped = ("no range method or cure met the budget, and the FP32-layer search reads FX's INT8 modules "
                            "(flow = \"pt2e\"): tune with flow = \"fx\" to find the layers")
            return
        self._layers()

    def _cures(self) -> bool:
        """Phase 2 on the best range trial: bias correction, equalization, both. False: trials ran out."""
        best = self.best().trial
        wave = [] if self.pt2e else [dataclasses.replace(best, bias=True)]  # bias correction is FX-only
        pairs = equalize(self.job.fp32)[1]["pairs"]
        if pairs:
            wave += [dataclasses.replace(best, equalize=True)]
            wave += [] if self.pt2e else [dataclasses.replace(best, equalize=True, bias=True)]
        else:
            self.ctx.console.print("tune: no conv/linear pair joined through ReLU-like steps: equalization not tried")
        if self._left() < len(wave):
            self.stopped = f"the trials ran out ({self.limit}) before the cures were tried"
            return False
        if pairs and self.equalized is None:
            with self.ctx.stage("calibrate_equalized"):
                self.equalized = pipeline.recalibrate(self.ctx, self.job, self.pool,
                                                      dataclasses.replace(self.job.spec.quantization, equalize=True))
        self._wave(wave, "cure", self.batches)
        return True

    def _layers(self) -> None:
        """Phase 3: layers ranked by isolated error in one pass, then the fewest in FP32 (prefixes of
        the ranking, and whole groups of one kind) that meet the budget."""
        best = self.best().trial
        quant = best.quant(self.job.spec.quantization)
        ranked = pipeline.rank_layers(self.ctx, self.pool, quant, self._stats(best), self.rank_batches)
        kinds = _layer_kinds(self.job.fp32, quant, self.job.example)
        self.sensitivity = [{"module": name, "isolated_sqnr_db": sqnr, "kind": kinds.get(name, "")} for name, sqnr in ranked]
        order = [name for name, _ in ranked]
        groups = {}
        for name in order:
            groups.setdefault(kinds.get(name, ""), []).append(name)
        self.groups = [{"kind": k, "modules": v} for k, v in sorted(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))
                       if 1 < len(v) < len(order)]
        fewest, k, grouped = len(order) + 1, 1, False  # fewest: the smallest passing trial's FP32 layers so far
        while k < fewest and k <= len(order):
            if not self._left():
                self.stopped = f"the trials ran out ({self.limit}) with {k - 1} layers in FP32"
                return
            ks = range(k, min(len(order), fewest - 1, k + self.pool.size - 1) + 1)
            scored = self._wave([dataclasses.replace(best, fp32=tuple(order[:j])) for j in ks], "fp32", self.batches)
            passing = [s for s in scored if s.row["drop"] <= self.max_drop]
            if passing:
                fewest = min(fewest, len(passing[0].trial.fp32))
                break
            k += len(scored)
            if not grouped:  # after the shortest prefixes: whole groups of one kind, before longer prefixes
                grouped = True
                wave = [dataclasses.replace(best, fp32=tuple(sorted(g["modules"]))) for g in self.groups
                        if len(g["modules"]) >= k]
                passing = [s for s in self._wave(wave, "group", self.batches) if s.row["drop"] <= self.max_drop]
                if passing:
                    fewest = min(len(s.trial.fp32) for s in passing)
        if fewest <= len(order):
            how = self.best()
            self.stopped = (f"the budget was met with {len(how.trial.fp32)} layer(s) in FP32"
                            + (" (a group of one kind)" if how.phase == "group" else ""))
        else:
            self.stopped = "every ranked layer is in FP32 and the budget is still not met"

    def _stats(self, trial: Trial):
        return self.equalized.stats if trial.equalize else self.calibrated.stats

    def _left(self) -> int:
        return self.limit - len(self.scored)

    def _met(self) -> bool:
        return any(s.row["drop"] <= self.max_drop for s in self.scored)

    def best(self) -> _Scored:
        """Within the budget: the fewest FP32 layers, then the best headline (the smallest drop: FP32's
        is the same for every trial); else the best headline. Ties go to the earlier trial."""
        within = [s for s in self.scored if s.row["drop"] <= self.max_drop]
        if within:
            return min(within, key=lambda s: (len(s.trial.fp32), s.row["drop"], s.row["trial"]))
        return min(self.scored, key=lambda s: (s.row["drop"], len(s.trial.fp32), s.row["trial"]))

    def _wave(self, wave: list[Trial], phase: str, batches: list[list[int]]) -> list[_Scored]:
        """Evaluate `wave` on `batches` (the first of the selection set's): each worker builds its
        trials' INT8 models from the merged statistics (prepare_fx, load, convert_fx) and scores
        them against the FP32 logits, trials dealt out round-robin; the driver only plans."""
        wave = wave[:self._left()]
        if not wave:
            return []
        started = time.perf_counter()
        results = {}
        for equalized in (False, True):  # an equalized trial loads the equalized model's statistics
            part = [t for t in wave if t.equalize == equalized]
            if part:
                scores = pipeline.score_trials(self.ctx, self.pool, [(str(t), t.quant(self.job.spec.quantization))
                                                                      for t in part], self._stats(part[0]), batches,
                                               self.fp32_logits, self.reference)
                results.update(zip(part, scores))
        per_trial = (time.perf_counter() - started) * min(self.pool.size, len(wave)) / len(wave)  # a share of the wave
        return [self._record(trial, phase, results[trial], per_trial) for trial in wave]

    def _record(self, trial: Trial, phase: str, scored: pipeline.TrialScores, wall: float) -> _Scored:
        if self.job.scorer.task != "classification":
            return self._record_task(trial, phase, scored, wall)
        merged, digest, size = scored.scores, scored.qparams_digest, scored.int8_bytes
        c, n = merged.counts, merged.counts["n"]
        signal, noise = sum(merged.rows["signal"]), sum(merged.rows["noise"])
        sqnr = 10 * math.log10(signal / noise) if noise > 0 else math.inf
        low, high = wilson(c["int8_top1"], n)
        row = {"trial": len(self.scored), "phase": phase, "range_method": trial.method, "fp32_modules": list(trial.fp32),
               "weight": trial.weight, "equalize": trial.equalize, "bias_correction": trial.bias, "samples": n,
               "top1": c["int8_top1"] / n, "top1_ci95_low": low,
               "top1_ci95_high": high, "fp32_top1": c["fp32_top1"] / n, "drop": (c["fp32_top1"] - c["int8_top1"]) / n,
               "agreement": c["agree"] / n, "logit_sqnr_db": sqnr if noise > 0 else None, "int8_size_bytes": size,
               "latency_ms": None, "wall_s": round(wall, 4), "qparams_digest": digest,
               "headline": "top1", "fp32_headline": c["fp32_top1"] / n, "int8_headline": c["int8_top1"] / n}
        self.ctx.console.print(f"trial {row['trial']:>3} \\[{phase}] {trial.method:<10} {trial.weight:<11} "
                               f"{trial.cures():<13} FP32 layers {len(trial.fp32):>2}: top-1 {row['top1']:.4f} "
                               f"(drop {row['drop'] * 100:+.2f} pt) on {n} samples")
        return self._keep(_Scored(trial, phase, row, sqnr, merged))

    def _record_task(self, trial: Trial, phase: str, scored: pipeline.TrialScores, wall: float) -> _Scored:
        """A trial of any other task: its headline from the task's merged states (core.metrics)."""
        merged = scored.scores
        metrics = self.job.scorer.metrics(merged)
        h, agreement = metrics["headline"], metrics["output_agreement"]
        row = {"trial": len(self.scored), "phase": phase, "range_method": trial.method, "fp32_modules": list(trial.fp32),
               "weight": trial.weight, "equalize": trial.equalize, "bias_correction": trial.bias, "samples": merged.n,
               "top1": None, "top1_ci95_low": None, "top1_ci95_high": None, "fp32_top1": None,
               "drop": worsening(h, h["fp32"], h["int8"]), "agreement": agreement["argmax_agreement"],
               "logit_sqnr_db": agreement["sqnr_db"], "int8_size_bytes": scored.int8_bytes, "latency_ms": None,
               "wall_s": round(wall, 4), "qparams_digest": scored.qparams_digest,
               "headline": h["key"], "fp32_headline": h["fp32"], "int8_headline": h["int8"]}
        if row["drop"] is None:
            raise SpecError(f"{self.job.spec.path}: [test] the headline {h['key']!r} is None for a trial (FP32 "
                            f"{h['fp32']}, INT8 {h['int8']}): tune needs a number for both")
        fmt = _unit_formatter(h)
        self.ctx.console.print(f"trial {row['trial']:>3} \\[{phase}] {trial.method:<10} {trial.weight:<11} "
                               f"{trial.cures():<13} FP32 layers {len(trial.fp32):>2}: {h['label']} "
                               f"{fmt(h['int8'])} (drop {fmt(row['drop'], sign=True)}) on {merged.n} samples")
        return self._keep(_Scored(trial, phase, row, agreement["sqnr_db"], merged))

    def _keep(self, scored: _Scored) -> _Scored:
        self.scored.append(scored)
        return scored


def _layer_kinds(model, quant: QuantSpec, example) -> dict[str, str]:
    """Each quantized layer's kind for grouping: its INT8 module's class, "depthwise" convolutions apart."""
    converted = dict(flow.convert(flow.prepare(model, quant, example)).named_modules())
    kinds = {}
    for name in flow.quantized_layers(model, quant, example):
        module = converted[name]
        depthwise = getattr(module, "groups", 1) > 1 and module.groups == getattr(module, "in_channels", 0)
        kinds[name] = ("depthwise " if depthwise else "") + type(module).__name__
    return kinds


def best_toml(spec: JobSpec, trial: Trial) -> str:
    """The job file that `quantray run` turns into exactly `trial`'s model: the job's own values that
    differ from the defaults (paths absolute, as loaded), with the trial's [quantization] choices."""
    return to_toml(dataclasses.replace(spec, name=spec.name + "-tuned", quantization=trial.quant(spec.quantization)),
                   header=f"Written by `quantray tune` from {spec.path}: range method {trial.method}, weights "
                          f"{trial.weight}, cures {trial.cures()}, {len(trial.fp32)} module(s) kept in FP32.")


def _cures(row: dict) -> str:
    return "+".join(n for n, on in (("equalize", row["equalize"]), ("bias", row["bias_correction"])) if on) or "-"


def print_tune(console: Console, result: TuneResult) -> None:
    """The summary table: the default, the best range method, and the chosen trial."""
    rows = result.trials
    if result.best["headline"] != "top1":
        return _print_task_tune(console, result)
    table = Table(title=f"quantray tune: {result.location}")
    for column in ("trial", "phase", "range", "weights", "cures", "FP32 layers", "top-1", "drop (pt)", "agreement"):
        table.add_column(column, justify="right" if column not in ("phase", "range", "weights", "cures") else "left")
    for r in rows:
        mark = " *" if r["trial"] == result.best["trial"] else ""
        table.add_row(f"{r['trial']}{mark}", r["phase"], r["range_method"], r["weight"], _cures(r), str(len(r["fp32_modules"])),
                      f"{r['top1']:.4f} [{r['top1_ci95_low']:.3f}, {r['top1_ci95_high']:.3f}]",
                      f"{r['drop'] * 100:+.2f}", f"{r['agreement']:.4f}")
    console.print(table)
    _print_outcome(console, result)
    if result.best_run is not None:
        m = result.best_run.metrics
        console.print(f"on the job's \\[test]: FP32 {m['fp32']['top1']:.4f}, tuned INT8 {m['int8']['top1']:.4f} "
                      f"(drop {(m['fp32']['top1'] - m['int8']['top1']) * 100:+.2f} pt); its run: "
                      f"{join(result.location, 'best-run')}")
    _print_warnings(console, result)


def _unit_formatter(h: dict):
    """Values of a headline as text: points for a fraction, else 4 significant digits."""
    def fmt(value, sign: bool = False):
        if h["unit"] == "fraction":
            return f"{value * 100:+.2f} pt" if sign else f"{value:.4f}"
        return f"{value:+.4g}" if sign else f"{value:.4g}"
    return fmt


def _print_task_tune(console: Console, result: TuneResult) -> None:
    """print_tune for a task other than classification: its headline in place of top-1."""
    best_run = result.best_run
    h = headline(best_run.metrics) if best_run is not None else {"label": result.best["headline"], "unit": ""}
    fmt = _unit_formatter(h)
    table = Table(title=f"quantray tune: {result.location}")
    for column in ("trial", "phase", "range", "weights", "cures", "FP32 layers", h["label"], "drop", "output SQNR"):
        table.add_column(column, justify="right" if column not in ("phase", "range", "weights", "cures") else "left")
    for r in result.trials:
        mark = " *" if r["trial"] == result.best["trial"] else ""
        table.add_row(f"{r['trial']}{mark}", r["phase"], r["range_method"], r["weight"], _cures(r), str(len(r["fp32_modules"])),
                      fmt(r["int8_headline"]), fmt(r["drop"], sign=True),
                      "-" if r["logit_sqnr_db"] is None else f"{r['logit_sqnr_db']:.2f} dB")
    console.print(table)
    _print_outcome(console, result)
    if best_run is not None:
        console.print(f"on the job's \\[test]: {h['label']} FP32 {fmt(h['fp32'])}, tuned INT8 {fmt(h['int8'])} "
                      f"(drop {fmt(worsening(h, h['fp32'], h['int8']), sign=True)}); its run: "
                      f"{join(result.location, 'best-run')}")
    _print_warnings(console, result)


def _print_outcome(console: Console, result: TuneResult) -> None:
    rows = result.trials
    best = result.best
    console.print(f"{'budget met' if result.met else 'budget NOT met'}: {result.stopped}; {len(rows)} trials")
    console.print(f"best: trial {best['trial']} ({best['range_method']}, {best['weight']}, cures {_cures(best)}, "
                  f"{len(best['fp32_modules'])} FP32 layer(s): {', '.join(best['fp32_modules']) or 'none'})")


def _print_warnings(console: Console, result: TuneResult) -> None:
    if result.scored_with == "reference":
        console.print("[yellow]trial figures are torch's reference quantized model's, not the "
                      f"{result.engine_check['engine'] if result.engine_check else ''} engine's "
                      "(--score-with reference); the best run's figures are the engine's[/]")
    if result.optimistic:
        console.print("[yellow]choices were made on the test split itself (no --validation): the accuracy "
                      "reported for it is optimistic[/]")
