"""The trials stage of `quantray tune`: the FP32 logits of the selection set once, then INT8 models
built from one calibration's merged statistics and scored on the pool's workers.

    logits = fp32_logits(ctx, job, pool, batches)               # the memo's, else computed once
    scored = score_trials(ctx, pool, quants, stats, batches, logits)   # [TrialScores], in order
    verdict = check_engine(ctx, pool, quant, stats, batches)     # the engine check of one config
    ranked = rank_layers(ctx, pool, quant, stats, batches)       # [(layer, isolated SQNR dB)], worst first

Each worker builds a trial's INT8 model from the merged statistics (prepare_fx, load them,
convert_fx: no forward pass) and scores it against the FP32 logits; trials are dealt out
round-robin, one wave at a time. The search itself (which trials, when to stop) is tune's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..cluster.names import Names
from ..cluster.worker import TrialScores, Worker
from ..core.calls import Call
from ..core.engine import engine_verdict, merge_engine
from ..core.modes import MergedStats
from ..inputs.data import batch_identities
from ..spec import QuantSpec
from .fp32 import Fp32Memo
from .load import Job, open_stats

if TYPE_CHECKING:
    from ..cluster.runner import WorkerPool

__all__ = ["fp32_logits", "score_trials", "check_engine", "rank_layers", "TrialScores"]

# Lines name the trial (or the FP32 batch) a call was for.
_NAMES = Names(worker=lambda w: f"tune worker {w}",
               call=lambda w, key: f"tune: {key[1]}" if key is not None else f"tune: worker {w}")


def fp32_logits(ctx, job: Job, pool: WorkerPool, batches: list[list[int]]) -> list[torch.Tensor]:
    """FP32 logits of every batch of the job's test split: the FP32 memo's reused, the others
    computed once on the pool (and kept in the memo)."""
    identities = batch_identities(job.test_ds, job.spec.test, batches)
    memo = Fp32Memo(open_stats(job, use_cache=True))
    logits = memo.logits(identities)
    missing = [b for b, found in enumerate(logits) if found is None]
    if not missing:
        ctx.console.print(f"reused stored FP32 outputs: {len(batches)} of {len(batches)} batches")
        return logits
    with ctx.stage("fp32"):
        n = min(pool.size, len(missing))
        calls = {w: [Call((b, f"FP32 on batch {b}"), Worker.fp32_logits, (batches[b],)) for b in missing[w::n]]
                 for w in range(n)}
        for (b, _), value in pool.run(calls, names=_NAMES).items():
            logits[b] = value
            memo.keep_logits(identities[b], value)
    return logits


def check_engine(ctx, pool: WorkerPool, quant: QuantSpec, stats: MergedStats, batches: list[list[int]]) -> dict:
    """The engine check (`core.engine`) of `quant`'s INT8 model built from `stats`, on `batches`
    spread over the pool's workers: its verdict."""
    n, shared = min(pool.size, len(batches)), pool.share(stats)
    calls = {w: [Call((w, "engine check"), Worker.engine_check, (quant, shared, batches[w::n]))]
             for w in range(n)}
    with ctx.stage("engine_check"):
        results = pool.run(calls, names=_NAMES)
    return engine_verdict(merge_engine(results.values()), quant.backend)


def rank_layers(ctx, pool: WorkerPool, quant: QuantSpec, stats: MergedStats,
                batches: list[list[int]]) -> list[tuple[str, float | None]]:
    """Each quantized conv/linear layer of `quant`'s INT8 model by its isolated error on `batches`
    (`layers.isolated_errors`: its INT8 module on FP32 inputs against FP32), in one pass spread over
    the pool: (layer, SQNR in dB, None where exact), the worst first (ties by name)."""
    n, shared = min(pool.size, len(batches)), pool.share(stats)
    calls = {w: [Call((w, "layer ranking"), Worker.isolated_errors, (quant, shared, batches[w::n]))] for w in range(n)}
    with ctx.stage("rank"):
        results = pool.run(calls, names=_NAMES)
    per_batch = sorted((first, errors) for r in results.values() for first, errors in r.items())
    layers = sorted({name for _, errors in per_batch for name in errors})
    ranked = []
    for name in layers:
        signal = math.fsum(e[name][0] for _, e in per_batch if name in e)
        noise = math.fsum(e[name][1] for _, e in per_batch if name in e)
        ranked.append((name, 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else None))
    return sorted(ranked, key=lambda r: (r[1] if r[1] is not None else math.inf, r[0]))


def score_trials(ctx, pool: WorkerPool, quants: list[tuple[str, QuantSpec]], stats: MergedStats,
                 batches: list[list[int]], logits: list[torch.Tensor], reference: bool = False) -> list[TrialScores]:
    """Each (name, quantization) built from `stats` and scored on `batches` against their FP32
    `logits`, on the pool's workers side by side; in the order given. `reference`: torch's reference
    quantized models are scored instead of the engine's INT8 models."""
    n = min(pool.size, len(quants))
    shared = (pool.share(stats), pool.share(batches), pool.share(logits[:len(batches)]), reference)
    calls = {w: [Call((t, f"trial {name}"), Worker.trial, (quant, *shared))
                 for t, (name, quant) in enumerate(quants) if t % n == w] for w in range(n)}
    with ctx.stage("trials"):
        results = pool.run(calls, names=_NAMES)
    return [results[(t, f"trial {name}")] for t, (name, _) in enumerate(quants)]
