"""The public API: run a job, evaluate a finished run again. The CLI is a thin layer over these.

    import quantray
    result = quantray.run("jobs/digits.toml", workers=2)     # calibrate, convert, evaluate, write
    result.metrics["int8"]["top1"], result.location
    model = result.int8()                                    # the INT8 model, rebuilt on demand
    again = quantray.evaluate(result.location, samples=300)  # no calibration

Both check everything they can before the expensive stages (the job file, the output location, the
model, the data) and write their directory whole or not at all.
"""

from __future__ import annotations

import dataclasses
import io
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from . import pipeline
from .core.flow import rebuild_int8
from .errors import QuantrayError, SpecError
from .inputs.models import build_model
from .report.console import print_summary
from .spec import JobSpec, ModelSpec, QuantSpec, load_spec, load_test_section, parse_spec
from .storage.artifacts import RunFiles
from .storage.store import is_uri, join

__all__ = ["run", "evaluate", "load_quantized", "RunResult"]


@dataclass(frozen=True)
class RunResult:
    """A written run (or evaluation) directory: where it is, its metrics and manifest, as written."""

    location: str | Path
    metrics: dict
    manifest: dict
    layers: list[dict]

    def int8(self):
        """The INT8 model, rebuilt from the run's files with the seed's recipe."""
        return load_quantized(self.location)

    def print(self, console: Console | None = None) -> None:
        """The comparison table, as `quantray run` prints it."""
        print_summary(console or Console(), self.metrics, self.manifest, self.location)


def run(job: str | Path | JobSpec, *, workers: int | None = None, out: str | Path | None = None,
        address: str | None = None, use_cache: bool = True, console: Console | None = None,
        shard_order=None, before_commit=None, context: pipeline.Context | None = None,
        executor: str | None = None, like: pipeline.Job | None = None) -> RunResult:
    """Run a job file (or a loaded JobSpec): calibrate on Ray, convert, evaluate, write a run directory.

    `workers`: calibration actors (default: the job's, else the CPUs Ray sees); `out`: the run
    directory to create, a local path or a URI (default runs/NAME-TIMESTAMP); `address`: an existing
    Ray cluster (default $RAY_ADDRESS, else a local one is started and stopped); `use_cache=False`
    recomputes every stored statistic. `shard_order` (tests) permutes the order shards are handed
    out; `before_commit(run, manifest)` may add files to the staged directory (refresh's drift);
    `executor`: where the work runs, "auto", "ray" or "driver" (default: the job's [run] executor;
    "auto" runs the job in this process unless a cluster is named, `pipeline.placement`); `like`: a
    loaded job whose model and data this one shares (`pipeline.load`: tune's best run).
    """
    spec = job if isinstance(job, JobSpec) else load_spec(job)
    ctx = context or pipeline.Context(console=console or Console(stderr=True))
    with pipeline.session(ctx, out if out is not None else Path("runs") / f"{spec.name}-{ctx.stamp()}", spec, use_cache) as session:
        with ctx.stage("load"):
            job = pipeline.load(spec, like)
        with ctx.stage("prepare"):
            prepared = pipeline.prepare(job, ctx.console)
        with (session.cluster(address, job, executor=executor),
              session.workers(job, prepared, workers=workers, shard_order=shard_order) as pool):
            with ctx.stage("calibrate"):
                calibrated = pipeline.calibrate(ctx, job, prepared, pool, use_cache=use_cache)
            with ctx.stage("convert"):
                quantized = pipeline.quantize(calibrated, job.example)
            if quantized.bias_correction is not None and not quantized.bias_correction["layers"]:
                ctx.console.print(f"[yellow]{spec.path}: [quantization] bias_correction = true: no quantized conv or "
                                  "linear layer to correct; no bias was changed[/]")
            evaluation = pipeline.evaluate(ctx, job, quantized, pool, use_cache)
        staged = session.staged
        with ctx.stage("write"):
            pipeline.write_qparams(staged, quantized)
            staged.write_bytes("job.toml", spec.source())
            metrics = pipeline.write_results(staged, evaluation, len(job.fp32_bytes), quantized, job.scorer)
        manifest = pipeline.manifest(ctx, job, evaluation, qparams_digest=quantized.digest,
                                     input_shape=list(job.example.shape), calibrated=calibrated, pool=pool,
                                     quantized=quantized)
        if before_commit is not None:
            before_commit(staged, manifest)
        pipeline.write_html(staged, metrics, evaluation.layers, manifest)
        location = session.commit(manifest)
    return RunResult(location, metrics, staged.manifest, evaluation.layers)


def evaluate(run_dir: str | Path, *, data: str | Path | None = None, samples: int | None = None,
             out: str | Path | None = None, address: str | None = None, use_cache: bool = True,
             console: Console | None = None, context: pipeline.Context | None = None,
             executor: str | None = None) -> RunResult:
    """Evaluate a finished run's INT8 model again, without calibrating, into a new directory.

    `data`: a TOML file whose [test] table (keys as in a job's, paths relative to that file) replaces
    the run's test set; `samples`: how many test samples to draw. The run's INT8 files and job.toml
    must match its manifest, and the FP32 model rebuilt from its job must be the one it quantized.
    The result's directory defaults to RUN_DIR-eval-TIMESTAMP beside the run; the run is never changed.
    """
    ctx = context or pipeline.Context(console=console or Console(stderr=True))
    with ctx.stage("load"):
        files = RunFiles(run_dir).verify()  # every file the manifest lists, not only the model's
        manifest = files.manifest
        job_toml = files.read("job.toml")
        job_path = Path(manifest["job"]["path"])
        spec = parse_spec(tomllib.loads(job_toml.decode()), job_path, manifest["job"]["base_dir"])
        quantized = pipeline.Quantized.from_run(spec.quantization.flow, files.read)
        test = load_test_section(data) if data is not None else spec.test
        if samples is not None:
            test = dataclasses.replace(test, samples=samples)
        spec = dataclasses.replace(spec, test=test)
    with pipeline.session(ctx, out if out is not None else join(files.location, suffix=f"-eval-{ctx.stamp()}"), spec, use_cache) as session:
        with ctx.stage("load"):
            where = f"{data}: [test]" if data is not None else f"{job_path}: [test]"
            job = pipeline.load_for_evaluation(spec, manifest, where)
        with session.cluster(address, job, executor=executor), session.workers(job) as pool:
            evaluation = pipeline.evaluate(ctx, job, quantized, pool, use_cache)
        staged = session.staged
        with ctx.stage("write"):
            metrics = pipeline.write_results(staged, evaluation, len(job.fp32_bytes), quantized, job.scorer)
            if data is not None:
                staged.write_bytes("data.toml", Path(data).read_bytes())
        evaluates = {"run_dir": str(files.location if is_uri(files.location) else Path(files.location).resolve()),
                     "created": manifest["created"],
                     "files": {k: manifest["files"][k] for k in quantized.files}}
        summary = pipeline.manifest(ctx, job, evaluation, qparams_digest=manifest["qparams_digest"],
                                    input_shape=manifest["input_shape"], evaluates=evaluates, pool=pool)
        pipeline.write_html(staged, metrics, evaluation.layers, summary)
        location = session.commit(summary)
    return RunResult(location, metrics, staged.manifest, evaluation.layers)


def load_quantized(run_dir: str | Path) -> torch.nn.Module:
    """The INT8 model of a run, rebuilt with the seed's recipe: FP32 model, prepare_fx, convert_fx,
    load_state_dict(model_int8.pth). The FP32 model's factory or checkpoint must be reachable.
    A PT2E run's model is its exported program (model_int8.pt2) as a module: the reference
    representation; `torch.compile` it under inductor's freezing for INT8 speed (README)."""
    run = RunFiles(run_dir).verify()
    if run.manifest["spec"]["quantization"].get("flow", "fx") == "pt2e":
        from .core import pt2e

        return pt2e.load_program(run.read("model_int8.pt2"))
    try:
        weights = run.read("model_int8.pth")
    except SpecError as e:
        raise QuantrayError(str(e)) from None
    manifest = run.manifest
    model_spec = dict(manifest["spec"]["model"])
    if model_spec.get("checkpoint") is not None:
        model_spec["checkpoint"] = Path(model_spec["checkpoint"])
    fp32 = build_model(ModelSpec(**model_spec), job_path=manifest["job"]["path"])
    quant = QuantSpec(**manifest["spec"]["quantization"])
    return rebuild_int8(fp32, quant, torch.zeros(manifest["input_shape"]),
                        torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True))
