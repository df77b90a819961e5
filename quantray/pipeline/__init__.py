"""The driver's stages, typed, sharing one context; `api.run`, `api.evaluate` and `tune` are lists of them.

    ctx = Context(console)
    with session(ctx, out, spec, use_cache) as run:          # the skeleton: staged output, stats checked
        job = load(spec); prepared = prepare(job)             # FP32 model, data, prepare_fx: before Ray
        with run.cluster(address), run.workers(job, prepared) as pool:
            calibrated = calibrate(ctx, job, prepared, pool)  # merged statistics loaded into `prepared`
            quantized = quantize(calibrated)                  # INT8 state_dict, TorchScript, qparams rows
            evaluation = evaluate(ctx, job, quantized, pool)  # accuracy, per-layer SQNR, speed
        write_run(run.staged, ...); run.commit(manifest(...))

Data flows one way: each stage takes the previous stages' results and returns a small dataclass.
Only `runner` (through the pool and ctx.cluster) touches Ray.
"""

from .calibrate import Calibrated, Quantized, calibrate, calibration_executor, quantize, recalibrate
from .context import Context, Session, session
from .evaluate import Evaluation, evaluate, first_batches
from .fp32 import Fp32Memo
from .load import Job, check, check_stats_location, load, load_for_evaluation, open_stats, prepare
from .record import manifest, write_html, write_qparams, write_results
from .trials import TrialScores, check_engine, fp32_logits, rank_layers, score_trials
from .workers import start_workers

__all__ = ["Context", "Session", "session", "Job", "check", "check_stats_location", "load", "load_for_evaluation",
           "open_stats", "prepare", "start_workers", "Calibrated", "calibrate", "calibration_executor", "Quantized",
           "quantize", "recalibrate", "Fp32Memo", "Evaluation", "evaluate", "first_batches", "write_results", "write_qparams",
           "write_html", "manifest", "fp32_logits", "score_trials", "check_engine", "rank_layers",
           "TrialScores"]
