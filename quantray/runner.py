"""The Ray shell: the only module that imports ray. It starts or joins a cluster and fans work out
and in; what the work is, and what is stored, is decided by the caller.

    with Cluster(address) as cluster:
        executor = ActorExecutor(cluster, worker_args, n_shards)      # calibration: stateful actors
        results = map_tasks(fn, [args, ...], stage="evaluate", ...)   # evaluation: plain tasks
        speed = on_whole_node(fn, *args)                              # a task alone on a node

Calibration runs on hand-written actors (their state must come back, and Ray Data's actor pools
cost 3x here, DESIGN.md); evaluation runs as tasks. Large objects go by reference (`put` once).
Every failure (a process that died past its retries, an exception raised in user code inside a
task) becomes one QuantrayError line naming the stage, the shard or batches and the cause.
"""

from __future__ import annotations

import logging
import os
import pickle
import time

import ray

from .calibration import CalibrationWorker
from .errors import CalibrationError, QuantrayError, SpecError

__all__ = ["Cluster", "ActorExecutor", "map_tasks", "on_whole_node"]


class _DropTokenNotice(logging.Filter):
    """Ray 2.60's warning that ray.init() turned token authentication on for a new local cluster."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_DropTokenNotice())


class Cluster:
    """Connects to `address` (or RAY_ADDRESS), or starts a local cluster; reuses an initialised Ray.
    Only a cluster this object started is shut down on exit.

    A local cluster keeps Ray's default token authentication (its GCS listens on every interface);
    only Ray's notice that it turned it on is silenced: a laptop user can do nothing about it.
    """

    def __init__(self, address: str | None = None):
        self.address, self._started = address, False

    def __enter__(self) -> "Cluster":
        if not ray.is_initialized():
            if self.address is None and not os.environ.get("RAY_ADDRESS"):
                # No dashboard: 3 s less. C++-side deprecation notices from quantized kernels bypass
                # Python's warning filters.
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

    @staticmethod
    def put(obj):
        """A reference to `obj` in the object store, to pass to many tasks at the cost of one."""
        return ray.put(obj)


class _CalibrationActor(CalibrationWorker):
    """Runs CalibrationWorker's constructor in `setup`: an exception raised in an actor's __init__
    reaches the driver only as text, one raised in a method keeps its type and message."""

    def __init__(self, *args, **kwargs):
        self._init_args = (args, kwargs)

    def setup(self) -> None:
        args, kwargs = self._init_args
        super().__init__(*args, **kwargs)


class ActorExecutor:
    """One actor per shard (started on first use) and a driver-side table of its in-flight calls.

    When an actor dies, its shard's calls of the current pass are dropped and resubmitted, in order,
    to a new actor, up to `max_attempts` per shard. (ActorPool would drop the actor and lose its
    items; `max_task_retries` would also re-run deterministic crashes.) Errors raised by quantray
    code are not retried: they would fail again.
    """

    def __init__(self, cluster: Cluster, worker_args: tuple, n_shards: int, *, max_attempts: int = 3,
                 console=None, order=None):
        # With more workers than CPUs, actors share CPUs instead of waiting forever for a free one.
        num_cpus = min(1.0, cluster.cpus / max(1, n_shards))
        self._cls = ray.remote(num_cpus=num_cpus, max_restarts=0)(_CalibrationActor)
        model, *rest = worker_args
        self._args = (ray.put(model), *rest)
        self._order = list(order) if order is not None else None
        self.max_attempts, self.console = max_attempts, console
        self.attempts: dict[int, int] = {}
        self.bytes_received = 0
        self.actors, self._setup = {}, {}
        self.ready_at = None  # when the last actor finished its setup (start-up cost, for profiles)

    def __enter__(self) -> "ActorExecutor":
        return self

    def __exit__(self, *exc) -> None:
        for actor in self.actors.values():
            ray.kill(actor)

    share = staticmethod(ray.put)

    def _start(self, s: int) -> None:
        self.attempts.setdefault(s, 1)
        self.actors[s] = self._cls.remote(*self._args, shard=s)
        self._setup[s] = self.actors[s].setup.remote()  # actor calls run in submission order

    def run(self, calls: dict[int, list], on_result=None) -> dict:
        """Submit each shard's [(key, method, args)] to its actor, in order; return {key: result}."""
        in_flight, results, owner = {}, {}, {}

        def submit(s):
            if s not in self.actors:
                self._start(s)
            if s in self._setup:
                in_flight[self._setup.pop(s)] = (s, None, "setup", self.attempts[s])
            for key, method, args in calls[s]:
                in_flight[getattr(self.actors[s], method).remote(*args)] = (s, key, method, self.attempts[s])

        for s in [s for s in (self._order or sorted(calls)) if s in calls]:
            submit(s)
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            s, key, method, attempt = in_flight.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # quantray's errors name their shard and batch
                raise _quantray_cause(e) or _one_line(e, f"calibrate: shard {s}") from None
            except ray.exceptions.RayActorError as e:
                if attempt != self.attempts[s]:
                    continue  # a call to an actor already replaced
                cause = _quantray_cause(e)
                if cause is not None:
                    raise cause from None
                for r in [r for r, entry in in_flight.items() if entry[0] == s]:
                    del in_flight[r]
                for k in [k for k, s2 in owner.items() if s2 == s]:
                    del results[k], owner[k]
                    if on_result is not None:
                        on_result(k, _method_of(calls[s], k), -1)
                self._replace(s, e)
                submit(s)
                continue
            if method == "setup":
                self.ready_at = time.perf_counter()
                continue
            results[key], owner[key] = value, s
            self.bytes_received += len(pickle.dumps(value))
            if on_result is not None:
                on_result(key, method, 1)
        return results

    def _replace(self, s: int, error: Exception) -> None:
        cause = _first_line(error)
        if self.attempts[s] >= self.max_attempts:
            raise CalibrationError(f"calibration shard {s} failed on all {self.max_attempts} attempts "
                                   f"([run] max_attempts); last cause: {type(error).__name__}: {cause}")
        ray.kill(self.actors[s])
        self.attempts[s] += 1
        if self.console is not None:
            self.console.print(f"[yellow]calibration worker for shard {s} died ({type(error).__name__}); "
                               f"redoing the shard on a new worker, attempt {self.attempts[s]} of {self.max_attempts}[/]")
        self._start(s)


def _method_of(calls: list, key) -> str:
    return next(method for k, method, _ in calls if k == key)


def map_tasks(fn, arg_lists: list[tuple], *, stage: str, describe: list[str], progress=None,
              weights: list[int] | None = None, num_cpus: float = 1, max_retries: int = 2) -> list:
    """Run `fn(*args)` for each args as Ray tasks; return the results in order. A task whose process
    dies is retried `max_retries` times (the tasks are deterministic: a retry gives the same result);
    past that, or on an exception raised inside `fn`, the rest are cancelled and one QuantrayError
    names `stage`, `describe[i]` and the cause."""
    task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    refs = {task.remote(*args): i for i, args in enumerate(arg_lists)}
    weights = weights or [1] * len(arg_lists)
    bar = progress.add_task(stage, total=sum(weights)) if progress is not None else None
    results, pending = {}, list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = refs[ref]
                try:
                    results[i] = ray.get(ref)
                except (ray.exceptions.RayError, ray.exceptions.RayTaskError) as e:
                    raise _one_line(e, f"{stage}: {describe[i]}", retries=max_retries) from None
                if bar is not None:
                    progress.advance(bar, weights[i])
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return [results[i] for i in range(len(arg_lists))]


def on_whole_node(fn, *args, stage: str = "speed"):
    """`fn(*args, cpus)` in one task that reserves every CPU of the largest node, so that nothing
    else is scheduled beside it (timings). Returns its result and the Ray node id it ran on."""
    cpus = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    return map_tasks(_on_node, [(fn, args, cpus)], stage=stage, describe=[f"a task holding all {cpus} CPUs of a node"],
                     num_cpus=max(1, cpus))[0]


def _on_node(fn, args: tuple, cpus: int):
    return fn(*args, cpus), ray.get_runtime_context().get_node_id()


def _one_line(error: BaseException, where: str, retries: int | None = None) -> QuantrayError:
    """A Ray error as one line: the QuantrayError raised remotely (prefixed with where it ran), the
    user code's exception, or the process that died."""
    cause = _quantray_cause(error)
    if cause is not None:  # a bad input found on a worker is a failure of the run there: exit 1
        return (QuantrayError if isinstance(cause, SpecError) else type(cause))(f"{where}: {cause}")
    if isinstance(error, ray.exceptions.RayTaskError):
        inner = getattr(error, "cause", None)
        name = type(inner).__name__ if inner is not None else error.function_name
        text = _first_line(inner) if inner is not None else _first_line(error)
        return QuantrayError(f"{where}: {name}: {text}")
    tries = f" {retries + 1} times" if retries is not None else ""
    return QuantrayError(f"{where}: its worker process died{tries} ({type(error).__name__}); "
                         "see the Ray logs for why (out of memory is the usual cause)")


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
