"""The job's pool in the driver's own process: its workers are threads here, no Ray. On one machine
Ray's workers get no more CPUs than these threads do, and cost Ray's start and their own start-up
(`pipeline.placement.place` decides where a job runs).

    with DriverCluster() as cluster:
        with cluster.pool(setup, 2) as pool:          # the same calls as runner.WorkerPool's
            results = pool.run({0: [Call(key, Worker.evaluate, args)], 1: [...]}, names=names)

Each worker is its own `Worker` (its own prepared model, observers and datasets), and its calls run
in order on a thread of its own, at the job's thread count: torch's kernels release the GIL, so the
workers compute at once as Ray's processes do, and compute the same bits (tested). A thread's intra-op
thread count is its own (OpenMP's setting is per thread): it is set in every thread a run starts,
and the driver's own settings are put back after the builds. FX tracing patches torch for the whole
process, so a worker that traces (a trial's prepare_fx, per-layer SQNR's loggers) does it while the
others wait between calls (`tracing.TURNS`); under PT2E the calls take turns. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..core.calls import Call
from ..core.tracing import TURNS
from .names import Names, raised_line
from .worker import Worker, WorkerSetup

__all__ = ["DriverCluster", "DriverPool", "NODE", "usable_cpus"]

NODE = "driver"  # the node id the manifest records for work done in the driver's process


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class DriverCluster:
    """No cluster: the work runs in this process, on this machine's CPUs."""

    kind = "driver"
    memory_rule = ("3/4 of 70% of the memory free when the pool started, over the workers (threads of the driver's "
                   "process): for what each keeps of calibration's values")

    def __init__(self):
        self.cpus = usable_cpus()

    def __enter__(self) -> "DriverCluster":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def memory_per_worker(self, workers: int) -> int:
        """Three quarters of 70% of the memory free now (Ray's share, then a Ray worker's rule), over the workers."""
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not Linux
            import psutil

            free = psutil.virtual_memory().available
        return int(free * 0.7 * 0.75 / max(1, workers))

    def pool(self, setup: WorkerSetup, size: int, **options) -> "DriverPool":
        # Its workers share this process: each budget is a share of the memory free now, for what
        # it keeps of calibration's values, not for the process's resident memory (`KeptValues`).
        return DriverPool(dataclasses.replace(setup, kept_only=True), size, cpus=self.cpus, **options)


class DriverPool:
    """`runner.WorkerPool`'s interface over `size` workers in this process, each run on a thread of
    its own. Nothing is retried (an exception here would happen again; a process that dies takes
    the driver with it) and nothing crosses a process (`share` is the object itself). The first
    exception raised in a call is one QuantrayError line naming the call, as on Ray
    (`names.raised_line`); the other workers stop after the call they are in."""

    in_process = True  # a call gets the driver's objects themselves

    def __init__(self, setup: WorkerSetup, size: int = 1, *, cpus: int | None = None, wanted: int | None = None,
                 memory: dict | None = None, max_attempts: int = 3, console=None, order=None):
        self._setup, self._workers = setup, {}
        self.size, self.wanted = max(1, size), wanted or max(1, size)
        self.num_cpus = min(1.0, (cpus or usable_cpus()) / self.size)
        self.memory, self.max_attempts, self.console = memory, max_attempts, console
        self._order = list(order) if order is not None else None
        self.attempts = {w: 1 for w in range(self.size)}
        self.bytes_received = 0
        self.startup_s, self.nodes, self.cpus = {}, {}, {}
        self.started_at = self.ready_at = None

    def __enter__(self) -> "DriverPool":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def actors(self) -> dict:
        return self._workers

    @staticmethod
    def share(obj):
        return obj

    def start(self) -> None:
        """Build every worker now, in turn (building is mostly Python: threads would not overlap it)."""
        if self.started_at is None:
            self.started_at = time.perf_counter()
        for w in range(self.size):
            self._build(w)
        self.ready_at = time.perf_counter()

    def _build(self, w: int) -> Worker:
        if w not in self._workers:
            with self._settings():
                self._workers[w] = Worker(self._setup)
            self.startup_s[w] = {"process_start_s": 0.0, "build_s": self._workers[w].build_s}
            self.nodes[w], self.cpus[w] = NODE, self._workers[w].cpu()
        return self._workers[w]

    def run(self, calls: dict[int, list[Call]], on_result=None, *, names: Names, on=None) -> dict:
        """Each worker's calls, in order, on a thread of their own; {call.key: result}."""
        for w in calls:
            self._build(w)
        results, failed, stop, lock = {}, [], threading.Event(), threading.Lock()
        threads = self._setup.threads
        # PT2E's calls take turns: torch.compile and inductor's config patches are not safe across threads
        turn = TURNS.alone if self._setup.quant.flow == "pt2e" else TURNS.computing

        def work(w: int) -> None:
            torch.set_num_threads(threads)  # this thread's own setting (OpenMP's is per thread)
            worker = self._workers[w]
            for call in calls[w]:
                if stop.is_set():
                    return
                try:
                    with turn():
                        value = call.fn(worker if on is None else on(worker), *call.args)
                except Exception as e:
                    with lock:
                        failed.append(raised_line(e, names.call(w, call.key)))
                    stop.set()
                    return
                with lock:
                    results[call.key] = value
                    if on_result is not None:
                        on_result(call, 1)

        order = [w for w in (self._order or sorted(calls)) if w in calls]
        engine = torch.backends.quantized.engine
        with ThreadPoolExecutor(max_workers=max(1, len(order)), thread_name_prefix="quantray-worker") as running:
            futures = [running.submit(work, w) for w in order]
            try:
                for future in futures:
                    future.result()
            finally:
                stop.set()  # an interrupt: the others end after the call they are in
                torch.backends.quantized.engine = engine
        if failed:
            raise failed[0] from None  # the first to fail
        return results

    def node_alone(self, w: int) -> str:
        """The driver's process runs nothing else meanwhile: speed is measured here."""
        self._build(w)
        return NODE

    def stop(self) -> None:
        self._workers.clear()

    @contextlib.contextmanager
    def _settings(self):
        """The job's threads and quantized engine while a worker is built; the driver's after."""
        threads, engine = torch.get_num_threads(), torch.backends.quantized.engine
        torch.set_num_threads(self._setup.threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.backends.quantized.engine = engine
