"""The record stage: a run's files into its staged directory, and its manifest.

    write_qparams(staged, quantized); metrics = write_results(staged, evaluation, sizes...)
    summary = manifest(ctx, job, evaluation, qparams_digest=..., calibrated=..., pool=pool)
    write_html(staged, metrics, evaluation.layers, summary)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.evaluation import cpu_kind
from ..core.metrics import Scorer
from ..digest import sha256_bytes
from ..report.html import render
from ..storage.artifacts import LAYERS_SCHEMA, PREDICTIONS_SCHEMA, QPARAMS_SCHEMA, software_versions
from ..storage.store import StagedDir
from ..version import __version__
from .calibrate import Calibrated, Quantized
from .evaluate import Evaluation
from .load import Job
from .workers import cpu_kinds, mixed_cpus

if TYPE_CHECKING:
    from ..cluster.runner import WorkerPool

__all__ = ["write_results", "write_qparams", "write_html", "manifest"]


def write_results(run: StagedDir, outcome: Evaluation, fp32_size: int, quantized: Quantized, scorer: Scorer) -> dict:
    """predictions.parquet (classification: one row per sample), layers.parquet and metrics.json
    (the task's figures, `Scorer.metrics`) into the staged run; returns the metrics. INT8 size: the
    state_dict's (FX) or the exported program's (PT2E)."""
    merged, speed = outcome.merged, outcome.speed
    if scorer.task == "classification":
        columns = PREDICTIONS_SCHEMA.names
        run.write_parquet("predictions.parquet",
                          [dict(zip(columns, row)) for row in zip(*(merged.rows[c] for c in columns))], PREDICTIONS_SCHEMA)
    run.write_parquet("layers.parquet", outcome.layers, LAYERS_SCHEMA)
    metrics = scorer.metrics(merged)
    metrics["fp32"].update(latency_ms=speed["fp32"]["mean_ms"], size_mb=fp32_size / 1e6)
    if quantized.flow == "pt2e":  # the INT8 model is the compiled program; run uncompiled, it simulates INT8
        metrics["int8"].update(latency_ms=speed["int8_compiled"]["mean_ms"], size_mb=len(quantized.deployed) / 1e6,
                               compiled_latency_ms=speed["int8_compiled"]["mean_ms"],
                               uncompiled_latency_ms=speed["int8"]["mean_ms"],
                               compile_s=speed["conditions"].get("compile_s"),
                               evaluation_compile_s=outcome.plan.get("compile_s"))
    else:
        metrics["int8"].update(latency_ms=speed["int8"]["mean_ms"], size_mb=len(quantized.state) / 1e6,
                               torchscript_latency_ms=speed["int8_torchscript"]["mean_ms"],
                               torchscript_size_mb=len(quantized.deployed) / 1e6)
    metrics["speed"] = speed
    sqnr = [r for r in outcome.layers if r["sqnr_db"] is not None and r["quantized"]]
    metrics["layers"] = {"count": sum(r["quantized"] for r in outcome.layers), "samples": outcome.plan["layer_samples"],
                         "worst": sorted(sqnr, key=lambda r: r["sqnr_db"])[:5]}
    if outcome.engine is not None:
        metrics["engine_check"] = outcome.engine
    run.write_json("metrics.json", metrics)
    return metrics


def write_qparams(run: StagedDir, quantized: Quantized) -> None:
    for name, payload in quantized.files.items():
        run.write_bytes(name, payload)
    run.write_parquet("qparams.parquet", quantized.rows, QPARAMS_SCHEMA)


def write_html(run: StagedDir, metrics: dict, layers: list[dict], manifest: dict) -> None:
    run.write_bytes("report.html", render(metrics, layers, manifest).encode())


def manifest(ctx, job: Job, evaluation: Evaluation, *, qparams_digest: str, input_shape: list[int],
             calibrated: Calibrated | None = None, evaluates: dict | None = None,
             pool: WorkerPool | None = None, quantized: Quantized | None = None) -> dict:
    """manifest.json for a run (`calibrated`) or an evaluation of one (`evaluates`)."""
    spec = job.spec
    out = {"quantray": __version__, "created": ctx.now().isoformat(),
           "job": {"name": spec.name, "path": str(spec.path), "base_dir": str(spec.path.resolve().parent)},
           "spec": spec.to_dict(), "versions": software_versions(), "backend": spec.quantization.backend,
           "input_shape": input_shape, "threads": spec.run.threads,
           "speed_conditions": evaluation.speed["conditions"], "evaluation": evaluation.plan,
           "qparams_digest": qparams_digest, "fp32_state_sha256": sha256_bytes(job.fp32_bytes)}
    if job.transforms:  # equalization: the FP32 weights INT8 was made from are not the model's own
        out["transforms"] = job.transforms
    if quantized is not None and quantized.flow == "pt2e":
        out["pt2e"] = {"export": quantized.export, "quantizer": "torchao X86InductorQuantizer",
                       "runtime": "torch.compile(dynamic=False) under inductor freezing, one compile per batch size",
                       "compile_s_evaluation": evaluation.plan.get("compile_s"),
                       "not_measured": evaluation.plan.get("not_measured")}
    if quantized is not None and quantized.bias_correction is not None:
        out["bias_correction"] = quantized.bias_correction
    if spec.model.checkpoint is None:  # the model's weights are what it was built with, under this seed
        out["model_init_seed"] = spec.model.seed
    if calibrated is not None:
        plan = calibrated.plan
        out.update(workers=len(plan.shards),
                   calibration={"samples": len(job.calib_idx), "batches": plan.batches, "shards": plan.shards},
                   data_digest=sha256_bytes("\n".join(plan.identities + evaluation.identities).encode()),
                   calibration_stats=calibrated.info)
    if evaluates is not None:
        out.update(evaluates=evaluates, workers=len(evaluation.plan["workers"]),
                   data_digest=sha256_bytes("\n".join(evaluation.identities).encode()))
    if evaluation.data_read is not None:
        out["data_read"] = evaluation.data_read
    if pool is not None:  # the fixed cost of the job's workers, the memory each may keep, what they ran on
        out["pool"] = {"placement": ctx.placement.record() if ctx.placement else None,  # Ray or the driver, and why
                       "workers": pool.size, "cpus_each": pool.num_cpus, "memory": pool.memory,
                       "ready_s": round(pool.ready_at - pool.started_at, 4) if pool.ready_at else None,
                       "startup_s": {str(w): v for w, v in sorted(pool.startup_s.items())},
                       "nodes": {str(w): v for w, v in sorted(pool.nodes.items())},
                       "cpu": {str(w): v for w, v in sorted(pool.cpus.items())},
                       "cpu_kinds": len(cpu_kinds(pool)), "driver_cpu": cpu_kind()}
        mixed = mixed_cpus(pool)
        if mixed:
            out["pool"]["mixed_cpus"] = mixed
    out.update(timings_s=ctx.timings, wall_s=ctx.wall_s())
    return out
