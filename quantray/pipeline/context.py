"""What every stage shares (console, clocks, timings, the cluster, progress) and the run skeleton
that `api.run`, `api.evaluate` and `tune` are written in.

    ctx = Context(console)
    with session(ctx, out, spec, use_cache) as run:   # stats location checked, output staged
        with run.cluster(address, job):                # Ray up (timed as "ray_start"), or this process
            with run.workers(job, prepared) as pool:   # the job's pool
                ...
        run.commit(manifest)                           # the output appears whole, or not at all
"""

from __future__ import annotations

import contextlib
import os
import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from rich.console import Console

from ..cluster import local
from ..cluster.driver import DriverCluster
from ..report.console import make_progress
from ..spec import JobSpec
from ..storage.store import StagedDir
from .load import check_stats_location, decoded_location
from .placement import Placement, place
from .workers import start_workers

if TYPE_CHECKING:
    from ..cluster import runner

__all__ = ["Context", "Timings", "Session", "session"]


class Timings(dict):
    """Seconds per stage, in the order the stages ran."""


@dataclass
class Context:
    """What every stage shares: where progress goes, the clocks (injectable), the timings, the
    cluster once started. `started` is when the command began (its wall time counts from there)."""

    console: Console = field(default_factory=lambda: Console(stderr=True))
    clock: Callable[[], float] = time.perf_counter
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc)
    timings: Timings = field(default_factory=Timings)
    cluster: runner.Cluster | None = None
    progress: object = None
    started: float | None = None
    placement: Placement | None = None  # where the job's work runs (`placement.place`), once decided

    def __post_init__(self):
        if self.started is None:
            self.started = self.clock()

    @contextlib.contextmanager
    def stage(self, name: str):
        """`with ctx.stage("load"): ...` records ctx.timings["load"] in seconds."""
        t = self.clock()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + self.clock() - t, 4)

    def stamp(self) -> str:
        """Local time as output folders are named by default (runs/NAME-20261201-093000)."""
        return f"{self.now().astimezone():%Y%m%d-%H%M%S}"

    def wall_s(self) -> float:
        return round(self.clock() - self.started, 4)


@dataclass
class Session:
    """A command's output being made: its context and its staged directory."""

    ctx: Context
    staged: StagedDir
    use_cache: bool = True

    @contextlib.contextmanager
    def cluster(self, address: str | None, job, *, executor: str | None = None) -> Iterator[runner.Cluster | DriverCluster]:
        """Where `job` runs for the block (`placement.place`): Ray, started or joined (its start-up
        timed apart, as "ray_start": a fixed cost, not calibration), or worker threads in this process;
        and the progress bars. `executor`: "auto", "ray" or "driver" (default: the job's [run] executor)."""
        placement = place(job, executor=executor or job.spec.run.executor, address=address)
        self.ctx.placement = placement
        with contextlib.ExitStack() as stack:
            if placement.kind == "driver":
                if placement.executor == "auto":
                    self.ctx.console.print(f"running in this process, without Ray: {placement.why} "
                                           "(--executor ray to use Ray)")
                self.ctx.cluster = stack.enter_context(DriverCluster())
            else:
                from ..cluster import runner  # imports Ray: only a job that uses it pays for the import

                if address is None and not os.environ.get("RAY_ADDRESS"):
                    joined = local.running()  # `quantray up`'s, when there is one
                    if joined is not None:
                        address = joined["address"]
                        self.ctx.console.print(f"using the local cluster at {address} (`quantray up`; `quantray down` "
                                               "stops it)")
                with self.ctx.stage("ray_start"):
                    self.ctx.cluster = stack.enter_context(runner.Cluster(address))
            self.ctx.progress = stack.enter_context(make_progress(self.ctx.console))
            try:
                yield self.ctx.cluster
            finally:
                self.ctx.cluster = self.ctx.progress = None

    def workers(self, job, prepared=None, *, workers: int | None = None, shard_order=None):
        """The job's pool, started now (a context manager: stopped at the end of the block)."""
        return start_workers(self.ctx, job, prepared, workers=workers, shard_order=shard_order,
                             decoded=decoded_location(job.spec, self.use_cache))

    def commit(self, manifest: dict):
        """Publish the staged directory with its manifest; returns where it now is."""
        return self.staged.commit(manifest)


@contextlib.contextmanager
def session(ctx: Context, out: str | Path, spec: JobSpec, use_cache: bool) -> Iterator[Session]:
    """The skeleton every command that writes a directory shares: a `cache_dir` that cannot be
    opened is the job's error, found first; `out` is checked and staged before the model is built,
    and is written whole or not at all (an exception removes the staged folder)."""
    check_stats_location(spec, use_cache)
    with StagedDir(out) as staged:
        yield Session(ctx, staged, use_cache)
