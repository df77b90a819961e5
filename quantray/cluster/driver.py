"""The job's pool in the driver's own process: one `Worker`, called in turn, no Ray. For a job so
small that starting Ray and its workers costs more than spreading the work saves
(`pipeline.placement.place` decides, from a measured forward).

    with DriverCluster() as cluster:
        with cluster.pool(setup, 1) as pool:          # the same calls as runner.WorkerPool's
            results = pool.run({0: [Call(key, Worker.evaluate, args)]}, names=names)

The worker computes at the job's thread count and quantized engine, as a Ray worker does, and the
driver's own settings are put back after each call: the same bits as a run on Ray (tested), and the
driver's own stages (convert, bias correction) as in a Ray run. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from ..core.calls import Call
from .names import Names, raised_line
from .worker import Worker, WorkerSetup

__all__ = ["DriverCluster", "DriverPool", "NODE"]

NODE = "driver"  # the node id the manifest records for work done in the driver's process


class DriverCluster:
    """No cluster: the work runs in this process, on one CPU."""

    kind = "driver"
    cpus = 1
    memory_rule = "3/4 of 70% of the memory free when the run began (the driver's process)"  # memory_per_worker's

    def __enter__(self) -> "DriverCluster":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def memory_per_worker(self, workers: int) -> int:
        """Three quarters of 70% of the memory free now (a Ray worker's rule, with Ray's share)."""
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not Linux
            import psutil

            free = psutil.virtual_memory().available
        return int(free * 0.7 * 0.75)

    def pool(self, setup: WorkerSetup, size: int, **options) -> "DriverPool":
        return DriverPool(setup, **options)


class DriverPool:
    """`runner.WorkerPool`'s interface over one worker in this process: `size` is 1, so callers
    give their calls to worker 0; nothing is retried (an exception here would happen again) and
    nothing crosses a process (`share` is the object itself). An exception raised in a call is one
    QuantrayError line naming the call, as on Ray (`names.raised_line`)."""

    num_cpus = 1.0
    in_process = True  # a call gets the driver's objects themselves

    def __init__(self, setup: WorkerSetup, *, wanted: int | None = None, memory: dict | None = None,
                 max_attempts: int = 3, console=None, order=None):
        self._setup, self._worker = setup, None
        self.size = self.wanted = 1
        self.memory, self.max_attempts, self.console = memory, max_attempts, console
        self.attempts = {0: 1}
        self.bytes_received = 0
        self.startup_s, self.nodes, self.cpus = {}, {}, {}
        self.started_at = self.ready_at = None

    def __enter__(self) -> "DriverPool":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def share(obj):
        return obj

    def start(self) -> None:
        """Build the worker now (there is nothing to overlap it with)."""
        if self._worker is not None:
            return
        self.started_at = time.perf_counter()
        with self._settings():
            self._worker = Worker(self._setup)
        self.ready_at = time.perf_counter()
        self.startup_s[0] = {"process_start_s": 0.0, "build_s": self._worker.build_s}
        self.nodes[0], self.cpus[0] = NODE, self._worker.cpu()

    def run(self, calls: dict[int, list[Call]], on_result=None, *, names: Names, on=None) -> dict:
        """Each call, in worker order and then in order, on the one worker; {call.key: result}."""
        self.start()
        results = {}
        with self._settings():
            for w in sorted(calls):
                target = self._worker if on is None else on(self._worker)
                for call in calls[w]:
                    try:
                        results[call.key] = call.fn(target, *call.args)
                    except Exception as e:
                        raise raised_line(e, names.call(w, call.key)) from None
                    if on_result is not None:
                        on_result(call, 1)
        return results

    def node_alone(self, w: int) -> str:
        """The driver's process runs nothing else meanwhile: speed is measured here."""
        self.start()
        return NODE

    def stop(self) -> None:
        self._worker = None

    @contextlib.contextmanager
    def _settings(self):
        """The job's threads and quantized engine while the worker computes; the driver's after."""
        threads, engine = torch.get_num_threads(), torch.backends.quantized.engine
        torch.set_num_threads(self._setup.threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.backends.quantized.engine = engine
