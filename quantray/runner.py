"""The Ray shell: the only module that calls ray.init and ray.remote, and fans work out and in.

Calibration runs on hand-written actors (their state must come back, and Ray Data's actor pools
cost 3x here, DESIGN.md); evaluation runs as plain tasks. Large objects go by reference
(`ray.put` once), and no `ray.get` sits inside a submission loop.
"""

from __future__ import annotations

import io
import logging
import os
import time

import ray
import torch

from . import observers
from .calibration import CalibrationWorker, quiet_torch_warnings, set_engine
from .data import build_dataset
from .errors import CalibrationError, QuantrayError
from .evaluation import evaluate_shard

__all__ = ["Cluster", "calibrate", "evaluate"]


class Cluster:
    """Connects to `address` (or RAY_ADDRESS), or starts a local cluster; reuses an initialised Ray.

    Only a cluster this object started is shut down on exit.
    """

    def __init__(self, address: str | None = None):
        self.address, self._started = address, False

    def __enter__(self) -> "Cluster":
        if not ray.is_initialized():
            # A local cluster needs no dashboard (3 s less); an existing one keeps its own settings.
            local = self.address is None and not os.environ.get("RAY_ADDRESS")
            # C++-side deprecation notices from quantized kernels bypass Python's warning filters.
            ray.init(address=self.address, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"TORCH_CPP_LOG_LEVEL": "ERROR"}},
                     **({"include_dashboard": False} if local else {}))
            self._started = True
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            ray.shutdown()

    @property
    def cpus(self) -> int:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))


def calibrate(cluster: Cluster, model, example_inputs, backend, data, batches, shards, threads,
              signature, progress=None, order=None):
    """The two-pass exact protocol on one actor per shard.

    Returns merged (ranges, histograms) and the seconds spent starting actors and in each pass.
    `order` permutes the order in which shards are handed out (tests: the result must not change).
    """
    # With more workers than CPUs, actors share CPUs instead of waiting forever for a free one.
    num_cpus = min(1.0, cluster.cpus / len(shards))
    worker_cls = ray.remote(num_cpus=num_cpus, max_restarts=0)(_CalibrationActor)
    order = list(order) if order is not None else list(range(len(shards)))
    model_ref = ray.put(model)
    actors = {s: worker_cls.remote(model_ref, example_inputs, backend, data, threads, signature, shard=s)
              for s in order}
    timings, t = {}, time.perf_counter()
    try:
        _gather({actors[s].setup.remote(): s for s in order}, None, "")
        timings["actors_start"], t = round(time.perf_counter() - t, 4), time.perf_counter()
        refs = {actors[s].ranges.remote(b, batches[b]): s for s in order for b in shards[s]}
        ranges = observers.merge_ranges(_gather(refs, progress, "calibrate: ranges"))
        timings["pass1_ranges"], t = round(time.perf_counter() - t, 4), time.perf_counter()
        ranges_ref = ray.put(ranges)
        for s in order:
            actors[s].begin_histograms.remote(ranges_ref)  # actor calls run in submission order
        refs = {actors[s].histograms.remote(b, batches[b]): s for s in order for b in shards[s]}
        _gather(refs, progress, "calibrate: histograms")
        refs = {actors[s].collect.remote(): s for s in order}
        histograms = observers.merge_histograms(_gather(refs, None, ""))
        timings["pass2_histograms"] = round(time.perf_counter() - t, 4)
        return ranges, histograms, timings
    finally:
        for actor in actors.values():
            ray.kill(actor)


class _CalibrationActor(CalibrationWorker):
    """Runs CalibrationWorker's constructor in `setup`: an exception raised in an actor's __init__
    reaches the driver only as text, one raised in a method keeps its type and message."""

    def __init__(self, *args, **kwargs):
        self._init_args = (args, kwargs)

    def setup(self) -> None:
        args, kwargs = self._init_args
        super().__init__(*args, **kwargs)


def evaluate(fp32, int8_script: bytes, backend, data, groups, threads, progress=None):
    """FP32 and INT8 over groups of whole test batches, one task per group; one ShardResult each."""
    task = ray.remote(num_cpus=1, max_retries=2)(_evaluate_task)
    fp32_ref, int8_ref = ray.put(fp32), ray.put(int8_script)
    refs = {task.remote(fp32_ref, int8_ref, backend, data, group, threads): i for i, group in enumerate(groups)}
    return _gather(refs, progress, "evaluate", weights={r: sum(map(len, groups[i])) for r, i in refs.items()})


def _evaluate_task(fp32, int8_script, backend, data, batches, threads):
    quiet_torch_warnings()
    torch.set_num_threads(threads)
    set_engine(backend)
    int8 = torch.jit.load(io.BytesIO(int8_script))
    dataset = build_dataset(data, where="[test]")
    from .evaluation import merge_results

    return merge_results(evaluate_shard(fp32, int8, dataset, batch, len(batch)) for batch in batches)


def _gather(refs: dict, progress, label: str, weights: dict | None = None) -> list:
    """Wait for every ref, advancing a progress bar as each lands; errors become one-line QuantrayErrors."""
    bar = progress.add_task(label, total=sum(weights.values()) if weights else len(refs)) if progress else None
    results, pending = {}, list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            try:
                results[ref] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = _quantray_cause(e)
                if cause is not None:
                    raise cause from None
                raise
            except ray.exceptions.RayActorError as e:
                cause = _quantray_cause(e)
                if cause is not None:
                    raise cause from None
                raise CalibrationError(f"calibration worker for shard {refs[ref]} died: "
                                       f"{str(e).splitlines()[0]}") from None
            if bar is not None:
                progress.advance(bar, weights[ref] if weights else 1)
    return [results[ref] for ref in refs]


def _quantray_cause(error: BaseException) -> QuantrayError | None:
    """The QuantrayError a remote call raised, if any, through Ray's wrappers."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ray.exceptions.RayTaskError):
            # Ray's copy subclasses the cause too, but its message is the remote traceback.
            error = error.cause
        elif isinstance(error, QuantrayError):
            return error
        else:
            error = getattr(error, "cause", None) or error.__cause__
    return None
