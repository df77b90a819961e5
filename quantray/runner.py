"""The Ray shell: the only module that calls ray.init and ray.remote, and fans work out and in.

Calibration runs on hand-written actors (their state must come back, and Ray Data's actor pools
cost 3x here, DESIGN.md); evaluation runs as plain tasks. Large objects go by reference
(`ray.put` once), and no `ray.get` sits inside a submission loop.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import time

import ray
import torch

from . import observers
from .calibration import CalibrationWorker, quiet_torch_warnings, rebuild_int8, set_engine
from .data import build_dataset, load_batch
from .errors import CalibrationError, QuantrayError
from .evaluation import measure_speed as _measure, merge_results, score_batch
from .layers import layer_errors

__all__ = ["Cluster", "calibrate", "evaluate", "measure_speed"]


class Cluster:
    """Connects to `address` (or RAY_ADDRESS), or starts a local cluster; reuses an initialised Ray.

    Only a cluster this object started is shut down on exit.
    """

    def __init__(self, address: str | None = None):
        self.address, self._started = address, False

    def __enter__(self) -> "Cluster":
        if not ray.is_initialized():
            if self.address is None and not os.environ.get("RAY_ADDRESS"):
                # A local cluster needs no dashboard (3 s less). C++-side deprecation notices from
                # quantized kernels bypass Python's warning filters.
                ray.init(include_dashboard=False, logging_level=logging.WARNING,
                         runtime_env={"env_vars": {"TORCH_CPP_LOG_LEVEL": "ERROR"}})
            else:  # an existing cluster (or a submitted job's) keeps its own settings and runtime_env
                ray.init(address=self.address, logging_level=logging.WARNING)
            self._started = True
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            ray.shutdown()

    @property
    def cpus(self) -> int:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))


def calibrate(cluster: Cluster, model, example_inputs, quant, data, batches, shards, threads, signature, *,
              max_attempts: int = 3, progress=None, order=None, cache=None, identities=None):
    """Calibrate on one actor per shard with the spec's merge mode; survive lost workers; reuse
    cached statistics (`cache`, with one identity per batch) and store new ones.

    Returns (logs, pass2, stats) for `observers.load_merged`; stats has the seconds spent starting
    actors and in each pass, the bytes workers sent back, attempts per shard and cache hits.
    `order` permutes the order in which shards are handed out (tests: the result must not change).
    """
    pool = _ShardPool(cluster, model, example_inputs, quant, data, threads, signature, len(shards), order,
                      max_attempts, progress.console if progress else None)
    cache = cache if identities is not None else None
    mode, t = quant.mode, time.perf_counter()
    started = t
    stats = {"mode": mode}

    def lap(name):
        nonlocal t
        stats[name], t = round(time.perf_counter() - t, 4), time.perf_counter()

    def cached_run(label, keys: dict, calls, unit_items):
        """Look every unit up in the cache; run the misses' calls; store what they return."""
        found = {u: cache.get(k) for u, k in keys.items()} if cache else {}
        found = {u: v for u, v in found.items() if v is not None}
        results = pool.run(lambda s: calls(s, found), progress, label,
                           total=sum(len(unit_items(u)) for u in keys if u not in found))
        stats.setdefault("cached", {})[label.split(": ")[-1].replace(" ", "")] = [len(found), len(keys)]
        return found, results

    try:
        if mode == "fast":  # one pass; the torch observers' state lives on the actor: cache per shard
            keys = {s: cache.key("fast", [identities[b] for b in shards[s]]) if cache else s for s in pool.order}

            def calls(s, found):
                if s in found:
                    return []
                return [(("log", b), "log", (b, batches[b], True)) for b in shards[s]] + [(("states", s), "observer_states", ())]

            found, results = cached_run("calibrate: pass 1", keys, calls, lambda s: shards[s])
            for s in pool.order:
                if s not in found:
                    found[s] = ({b: results[("log", b)] for b in shards[s]}, results[("states", s)])
                    if cache:
                        cache.put(keys[s], found[s])
            logs = {b: log for s in pool.order for b, log in found[s][0].items()}
            pass2 = [found[s][1] for s in pool.order]
            lap("pass1_s")
        else:
            keys = {b: cache.key("log", identities[b]) if cache else b for b in range(len(batches))}
            found, results = cached_run("calibrate: pass 1", keys,
                                        lambda s, found: [(("log", b), "log", (b, batches[b])) for b in shards[s] if b not in found],
                                        lambda b: [b])
            logs = {**found, **{key[1]: value for key, value in results.items()}}
            if cache:
                for key, value in results.items():
                    cache.put(keys[key[1]], value)
            lap("pass1_s")
            if mode == "replay":
                plan = observers.replay_plan(logs)
                keys = {b: cache.key("replay", plan[b], identities[b]) if cache else b for b in range(len(batches))}
                found, results = cached_run(
                    "calibrate: pass 2", keys,
                    lambda s, found: [(("replay", b), "replay", (b, batches[b], plan[b])) for b in shards[s] if b not in found],
                    lambda b: [b])
                pass2 = {**found, **{key[1]: value for key, value in results.items()}}
                if cache:
                    for key, value in results.items():
                        cache.put(keys[key[1]], value)
            else:
                ranges = observers.global_ranges(logs)
                ranges_ref = ray.put(ranges)
                keys = {s: cache.key("count", ranges, [identities[b] for b in shards[s]]) if cache else s for s in pool.order}

                def calls(s, found):  # counts accumulate on the actor: a retry redoes the whole shard
                    if s in found:
                        return []
                    return ([(("start", s), "start_counts", (ranges_ref,))]
                            + [(("count", b), "count", (b, batches[b])) for b in shards[s]]
                            + [(("collect", s), "collect_counts", ())])

                found, results = cached_run("calibrate: pass 2", keys, calls, lambda s: shards[s])
                for s in pool.order:
                    if s not in found:
                        found[s] = results[("collect", s)]
                        if cache:
                            cache.put(keys[s], found[s])
                pass2 = observers.merge_counts(found[s] for s in pool.order)
            lap("pass2_s")
        stats.update(bytes_from_workers=pool.bytes_received, attempts=pool.attempts,
                     actors_ready_s=round(pool.ready_at - started, 4) if pool.ready_at else 0.0)
        return logs, pass2, stats
    finally:
        pool.close()


class _CalibrationActor(CalibrationWorker):
    """Runs CalibrationWorker's constructor in `setup`: an exception raised in an actor's __init__
    reaches the driver only as text, one raised in a method keeps its type and message."""

    def __init__(self, *args, **kwargs):
        self._init_args = (args, kwargs)

    def setup(self) -> None:
        args, kwargs = self._init_args
        super().__init__(*args, **kwargs)


class _ShardPool:
    """A driver-side table of one actor per shard (started on first use) and its in-flight calls.

    When an actor dies, its shard's calls of the current pass are dropped and resubmitted, in order,
    to a new actor, up to `max_attempts` per shard. (ActorPool would drop the actor and lose its
    items; `max_task_retries` would also re-run deterministic crashes.) Errors raised by quantray
    code are not retried: they would fail again.
    """

    def __init__(self, cluster, model, example_inputs, quant, data, threads, signature, n_shards, order,
                 max_attempts, console):
        # With more workers than CPUs, actors share CPUs instead of waiting forever for a free one.
        num_cpus = min(1.0, cluster.cpus / n_shards)
        self._cls = ray.remote(num_cpus=num_cpus, max_restarts=0)(_CalibrationActor)
        self._args = (ray.put(model), example_inputs, quant, data, threads, signature)
        self.order = list(order) if order is not None else list(range(n_shards))
        self.max_attempts, self.console = max_attempts, console
        self.attempts = {s: 1 for s in self.order}
        self.bytes_received = 0
        self.actors, self._setup = {}, {}
        self.ready_at = None  # when the last actor finished its setup (start-up cost, for profiles)

    def _start(self, s: int) -> None:
        self.actors[s] = self._cls.remote(*self._args, shard=s)
        self._setup[s] = self.actors[s].setup.remote()  # actor calls run in submission order

    def run(self, calls, progress, label: str, total: int = 0) -> dict:
        """Submit `calls(shard)` -> [(key, method, args)] for every shard; return {key: result}."""
        bar = progress.add_task(label, total=total) if progress is not None else None
        in_flight, results, owner = {}, {}, {}

        def submit(s):
            todo = calls(s)
            if not todo:
                return
            if s not in self.actors:
                self._start(s)
            if s in self._setup:
                in_flight[self._setup.pop(s)] = (s, ("setup", s), self.attempts[s])
            for key, method, args in todo:
                in_flight[getattr(self.actors[s], method).remote(*args)] = (s, key, self.attempts[s])

        for s in self.order:
            submit(s)
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            s, key, attempt = in_flight.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise _quantray_cause(e) or e from None
            except ray.exceptions.RayActorError as e:
                if attempt != self.attempts[s]:
                    continue  # a call to an actor already replaced
                cause = _quantray_cause(e)
                if cause is not None:
                    raise cause from None
                for r in [r for r, (s2, _, _) in in_flight.items() if s2 == s]:
                    del in_flight[r]
                for k in [k for k, s2 in owner.items() if s2 == s]:
                    del results[k], owner[k]
                if bar is not None:
                    progress.update(bar, completed=sum(1 for k in results if k[0] in _PROGRESS))
                self._replace(s, e)
                submit(s)
                continue
            if key[0] == "setup":
                self.ready_at = time.perf_counter()
            else:
                results[key], owner[key] = value, s
                self.bytes_received += len(pickle.dumps(value))
                if bar is not None and key[0] in _PROGRESS:
                    progress.advance(bar)
        return results

    def _replace(self, s: int, error: Exception) -> None:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if self.attempts[s] >= self.max_attempts:
            raise CalibrationError(f"calibration shard {s} failed on all {self.max_attempts} attempts "
                                   f"([run] max_attempts); last cause: {type(error).__name__}: {cause}")
        ray.kill(self.actors[s])
        self.attempts[s] += 1
        if self.console is not None:
            self.console.print(f"[yellow]calibration worker for shard {s} died ({type(error).__name__}); "
                               f"redoing the shard on a new worker, attempt {self.attempts[s]} of {self.max_attempts}[/]")
        self._start(s)

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)


_PROGRESS = ("log", "count", "replay")  # the calls a progress bar counts: one per batch


def evaluate(fp32, int8_script: bytes, int8_state: bytes, quant, example, data, groups, layer_groups, threads,
             progress=None, stored=None):
    """FP32 and INT8 over groups of whole test batches, one task per group (the INT8 TorchScript
    artifact runs there), and per-layer errors over `layer_groups`, one task per group (they need
    the INT8 GraphModule, rebuilt on the worker). `stored[g][b]`: FP32 logits of group g's batch b
    kept from an earlier run, or None to compute them.

    Returns ([ShardResult], [LayerResult], [{batch position: FP32 logits computed}] per group).
    """
    task = ray.remote(num_cpus=1, max_retries=2)(_evaluate_task)
    layer_task = ray.remote(num_cpus=1, max_retries=2)(_layer_task)
    fp32_ref, script_ref, state_ref = ray.put(fp32), ray.put(int8_script), ray.put(int8_state)
    stored = stored or [[None] * len(g) for g in groups]
    refs = {task.remote(fp32_ref, script_ref, quant.backend, data, group, ray.put(known), threads): i
            for i, (group, known) in enumerate(zip(groups, stored))}
    layer_refs = {layer_task.remote(fp32_ref, state_ref, quant, example, data, group, threads): i
                  for i, group in enumerate(layer_groups)}
    weights = {r: sum(map(len, groups[i])) for r, i in refs.items()}
    weights.update({r: sum(map(len, layer_groups[i])) for r, i in layer_refs.items()})
    results = _gather({**refs, **layer_refs}, progress, "evaluate", weights=weights)
    shards = results[:len(refs)]
    return [s for s, _ in shards], results[len(refs):], [computed for _, computed in shards]


def _evaluate_task(fp32, int8_script, backend, data, batches, stored, threads):
    quiet_torch_warnings()
    torch.set_num_threads(threads)
    set_engine(backend)
    int8 = torch.jit.load(io.BytesIO(int8_script))
    dataset = build_dataset(data, where="[test]")
    results, computed = [], {}
    with torch.inference_mode():
        for k, (batch, logits) in enumerate(zip(batches, stored)):
            x, y = load_batch(dataset, batch)
            if logits is None:
                logits = computed[k] = fp32(x)
            results.append(score_batch(batch, y, logits, int8(x)))
    return merge_results(results), computed


def _layer_task(fp32, int8_state, quant, example, data, batches, threads):
    quiet_torch_warnings()
    torch.set_num_threads(threads)
    int8 = rebuild_int8(fp32, quant, example, torch.load(io.BytesIO(int8_state), weights_only=True))
    return layer_errors(fp32, int8, build_dataset(data, where="[test]"), batches)


def measure_speed(fp32, int8_script: bytes, int8_state: bytes, quant, example, x, batch, threads, warmup,
                  iters) -> dict:
    """Latency (on `x`) and throughput (on `batch`) of FP32, INT8 eager and the INT8 TorchScript
    artifact, measured in one task that reserves every CPU of the largest node, so nothing else is
    scheduled beside it. `example` has the input shape the INT8 model was prepared with."""
    cpus = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    task = ray.remote(num_cpus=max(1, cpus), max_retries=2)(_speed_task)
    return _gather({task.remote(fp32, int8_script, int8_state, quant, example, x, batch, threads, warmup, iters,
                                cpus): 0}, None, "speed")[0]


def _speed_task(fp32, int8_script, int8_state, quant, example, x, batch, threads, warmup, iters, cpus):
    import platform

    quiet_torch_warnings()
    torch.set_num_threads(threads)
    int8 = rebuild_int8(fp32, quant, example, torch.load(io.BytesIO(int8_state), weights_only=True))
    scripted = torch.jit.load(io.BytesIO(int8_script))
    speed = _measure({"fp32": fp32, "int8": int8, "int8_torchscript": scripted}, x, batch, warmup, iters)
    speed["conditions"].update(
        where=f"one Ray task holding all {cpus} CPUs of its node, nothing else scheduled there",
        node=ray.get_runtime_context().get_node_id(), host=platform.node(), processor=_processor(),
        threads=threads, torch_threads=torch.get_num_threads(), engine=torch.backends.quantized.engine)
    return speed


def _processor() -> str:
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
