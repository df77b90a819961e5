"""The Ray shell: the only module that imports ray. It starts or joins a cluster and fans work out
and in; what the work is, what it is called and what is stored is decided by the caller.

    with Cluster(address) as cluster:
        with WorkerPool(cluster, setup, size) as pool:                       # one pool per job
            results = pool.run({w: [Call(key, Worker.evaluate, args), ...]}, names=names)
            node = pool.node_alone(0)                                        # speed: alone on its node?
        speed, node = on_whole_node(fn, *args)                               # a task alone on a node

A job's work runs on one pool of hand-written actors, each holding a `worker.Worker`: they are
started once and keep the FP32 model, the datasets and the prepared and INT8 models between stages
(Ray Data's actor pools cost 3x here, DESIGN.md). Large objects go by reference (`share` once).
Every failure (a process that died past its retries, an exception raised in user code) becomes one
QuantrayError line that names the work as the caller names it (`Names`) and the cause; the pool's
loop and the tasks' loop sort Ray's errors the same way (`_fetch`).
"""

from __future__ import annotations

import logging
import os
import pickle
import time

import ray

from ..core.calls import Call
from ..errors import QuantrayError, first_line
from .address import reachable
from .names import Names, raised_line
from .worker import Worker, WorkerSetup

__all__ = ["Cluster", "WorkerPool", "map_tasks", "on_whole_node"]


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

    kind = "ray"
    memory_rule = "3/4 of the smallest node's Ray memory, over the workers it runs"  # memory_per_worker's, in words

    def __init__(self, address: str | None = None):
        self.address, self._started = address, False

    def __enter__(self) -> "Cluster":
        if not ray.is_initialized():
            if self.address == "local" or self.address is None and not os.environ.get("RAY_ADDRESS"):
                # A new local cluster (`--address local` is Ray's word for one). No dashboard: 3 s
                # less. C++-side deprecation notices from quantized kernels bypass Python's warning filters.
                ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING,
                         runtime_env={"env_vars": {"TORCH_CPP_LOG_LEVEL": "ERROR"}})
            else:  # an existing cluster (or a submitted job's) keeps its own settings and runtime_env
                given = self.address or os.environ["RAY_ADDRESS"]
                where = "--address" if self.address else "RAY_ADDRESS"
                reachable(given, where)  # one line within seconds, not Ray's minutes of retries
                ray.init(address=self.address, logging_level=logging.WARNING)
            self._started = True
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            ray.shutdown()

    @property
    def cpus(self) -> int:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def pool(self, setup: WorkerSetup, size: int, **options) -> "WorkerPool":
        return WorkerPool(self, setup, size, **options)

    def memory_per_worker(self, workers: int) -> int:
        """A worker's memory budget: three quarters of its share of the smallest node's memory that
        Ray gives to tasks and actors (Ray's default: 70% of what was free at start-up)."""
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        per_node = -(-max(1, workers) // max(1, len(nodes)))
        smallest = min(n["Resources"].get("memory", 0) for n in nodes) if nodes else 0
        return int(smallest * 0.75 / per_node)


class _Actor:
    """Builds its `Worker` in `start`, not in __init__: an exception raised in an actor's __init__
    reaches the driver only as text, one raised in a method keeps its type and message."""

    def __init__(self, setup: WorkerSetup):
        self._setup, self._worker = setup, None

    def start(self) -> dict:
        """Builds the worker; returns the seconds from its process's start to this call (Ray's
        worker start-up, the imports), the seconds the build took, its node and its kind of CPU."""
        import psutil  # a Ray dependency

        started = time.time() - psutil.Process().create_time()
        self._worker = Worker(self._setup)
        return {"process_start_s": round(started, 3), "build_s": self._worker.build_s,
                "node": ray.get_runtime_context().get_node_id(), "cpu": self._worker.cpu()}

    def call(self, on, fn, *args):
        """`fn(worker, *args)`, or `fn(on(worker), *args)`: a call on a part of the worker."""
        return fn(self._worker if on is None else on(self._worker), *args)


class WorkerPool:
    """A job's workers: `size` actors (started on first use, kept until the pool closes) and a
    driver-side table of their in-flight calls. `wanted` is how many workers were asked for (a
    calibration with fewer batches uses fewer); `memory` each one's memory budget and where it
    came from, as the manifest records them.

    When an actor dies, its calls of the current `run` are dropped and resubmitted, in order, to a
    new actor, up to `max_attempts` per worker: each run's calls for a worker must be enough for a
    fresh one (e.g. load the INT8 model before evaluating). (ActorPool would drop the actor and
    lose its items; `max_task_retries` would also re-run deterministic crashes.) Errors raised by
    quantray code are not retried: they would fail again.
    """

    in_process = False  # its workers are other processes: what a call gets is a copy

    def __init__(self, cluster: Cluster, setup: WorkerSetup, size: int, *, wanted: int | None = None,
                 memory: dict | None = None, max_attempts: int = 3, console=None, order=None):
        # With more workers than CPUs, actors share CPUs instead of waiting forever for a free one.
        self.num_cpus = min(1.0, cluster.cpus / max(1, size))
        self._cls = ray.remote(num_cpus=self.num_cpus, max_restarts=0)(_Actor)
        self._setup_ref = ray.put(setup)  # the model inside goes to the object store once
        self.size, self.wanted, self.memory = size, wanted or size, memory
        self._order = list(order) if order is not None else None
        self.max_attempts, self.console = max_attempts, console
        self.attempts: dict[int, int] = {}
        self.bytes_received = 0
        self.actors, self._starting = {}, {}
        self.startup_s: dict[int, dict] = {}  # each worker's start-up: process start to its build, then the build
        self.nodes: dict[int, str] = {}       # each worker's Ray node
        self.cpus: dict[int, dict] = {}       # each worker's kind of CPU (`evaluation.cpu_kind`)
        self.started_at = self.ready_at = None  # when start() was called, when the last start finished

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every worker now (their CPUs are free at once); a later `run` starts new ones."""
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
        self._starting.clear()  # (nodes and CPUs stay: where the job's workers ran, for its manifest)

    share = staticmethod(ray.put)

    def start(self) -> None:
        """Start every worker now (they build in parallel with whatever the driver does next)."""
        self.started_at = time.perf_counter()
        for w in range(self.size):
            if w not in self.actors:
                self._start(w)

    def _start(self, w: int) -> None:
        self.attempts.setdefault(w, 1)
        self.nodes.pop(w, None)  # known again once its start returns
        self.actors[w] = self._cls.remote(self._setup_ref)
        self._starting[w] = self.actors[w].start.remote()  # actor calls run in submission order

    def run(self, calls: dict[int, list[Call]], on_result=None, *, names: Names, on=None) -> dict:
        """Submit each worker's calls to it, in order; return {call.key: result}. `on(worker)` picks
        the part of each worker the calls are made on (default: the worker). `on_result(call, +1)`
        follows the results; `-1` takes one back when its worker died and its calls are redone."""
        in_flight, results, owner = {}, {}, {}

        def submit(w):
            if w not in self.actors:
                self._start(w)
            if w in self._starting:
                in_flight[self._starting.pop(w)] = (w, None, self.attempts[w])
            for call in calls[w]:
                in_flight[self.actors[w].call.remote(on, call.fn, *call.args)] = (w, call, self.attempts[w])

        for w in [w for w in (self._order or sorted(calls)) if w in calls]:
            submit(w)
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            w, call, attempt = in_flight.pop(ref)
            failed, value = _fetch(ref)
            if failed == "raised":
                raise _one_line(value, names.call(w, call.key if call else None)) from None
            if failed == "died":
                if attempt != self.attempts[w]:
                    continue  # a call to an actor already replaced
                for r in [r for r, entry in in_flight.items() if entry[0] == w]:
                    del in_flight[r]
                for key in [k for k, w2 in owner.items() if w2 == w]:
                    done = results.pop(key)[0]
                    del owner[key]
                    if on_result is not None:
                        on_result(done, -1)
                self._replace(w, value, names)
                submit(w)
                continue
            if call is None:  # the worker's start
                self.nodes[w], self.cpus[w] = value.pop("node"), value.pop("cpu")
                self.ready_at, self.startup_s[w] = time.perf_counter(), value
                continue
            results[call.key], owner[call.key] = (call, value), w
            self.bytes_received += len(pickle.dumps(value))
            if on_result is not None:
                on_result(call, 1)
        return {key: value for key, (_, value) in results.items()}

    def node_alone(self, w: int) -> str | None:
        """Worker `w`'s Ray node id if this pool's actors hold every CPU of that node (then, with the
        others idle, nothing else can run there: timings), else None."""
        unknown = {v: [] for v in {*self.actors, w} if v not in self.nodes}
        if unknown:  # started but never called (or not started): their starts say where they run
            self.run(unknown, names=Names(lambda v: f"worker {v}", lambda v, key: f"worker {v}"))
        node = self.nodes[w]
        total = next(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node)
        return node if self.num_cpus * sum(self.nodes[v] == node for v in self.actors) >= total - 1e-6 else None

    def _replace(self, w: int, error: Exception, names: Names) -> None:
        cause = f"{type(error).__name__}: {first_line(error)}"
        if self.attempts[w] >= self.max_attempts:
            raise names.error(f"{names.worker(w)} failed on all {self.max_attempts} attempts ([run] max_attempts); "
                              f"last cause: {cause}")
        ray.kill(self.actors[w])
        self.attempts[w] += 1
        if self.console is not None:
            self.console.print(f"[yellow]{names.worker(w)} died ({type(error).__name__}); redoing its calls on a "
                               f"new worker, attempt {self.attempts[w]} of {self.max_attempts}[/]")
        self._start(w)


def map_tasks(fn, arg_lists: list[tuple], *, describe: list[str], on_result=None, num_cpus: float = 1,
              max_retries: int = 2) -> list:
    """Run `fn(*args)` for each args as Ray tasks; return the results in order (`on_result(i)` as
    each comes). A task whose process dies is retried `max_retries` times (the tasks are
    deterministic: a retry gives the same result); past that, or on an exception raised inside `fn`,
    the rest are cancelled and one QuantrayError names `describe[i]` and the cause."""
    task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    refs = {task.remote(*args): i for i, args in enumerate(arg_lists)}
    results, pending = {}, list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = refs[ref]
                failed, value = _fetch(ref)
                if failed:
                    raise _one_line(value, describe[i], retries=max_retries) from None
                results[i] = value
                if on_result is not None:
                    on_result(i)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return [results[i] for i in range(len(arg_lists))]


def on_whole_node(fn, *args, describe: str = "speed"):
    """`fn(*args, cpus)` in one task that reserves every CPU of the largest node, so that nothing
    else is scheduled beside it (timings). Returns its result and the Ray node id it ran on."""
    cpus = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    return map_tasks(_on_node, [(fn, args, cpus)], describe=[f"{describe}: a task holding all {cpus} CPUs of a node"],
                     num_cpus=max(1, cpus))[0]


def _on_node(fn, args: tuple, cpus: int):
    return fn(*args, cpus), ray.get_runtime_context().get_node_id()


def _fetch(ref) -> tuple[str | None, object]:
    """(None, the result), or how it failed: ("raised", error) when the call's own code raised,
    ("died", error) when its process died or Ray lost it (an actor gone, a worker crashed, out of
    memory, an object lost). Both fan-in loops sort Ray's errors here."""
    try:
        return None, ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        return "raised", e
    except ray.exceptions.RayError as e:
        return "died", e


def _one_line(error: BaseException, where: str, retries: int | None = None) -> QuantrayError:
    """A Ray error as one line: the QuantrayError raised remotely (prefixed with where it ran), the
    user code's exception, or the process that died."""
    cause = _quantray_cause(error)
    if cause is not None:
        return raised_line(cause, where)
    if isinstance(error, ray.exceptions.RayTaskError):
        inner = getattr(error, "cause", None)
        if inner is not None:
            return raised_line(inner, where)
        return QuantrayError(f"{where}: {error.function_name}: {first_line(error)}")
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
