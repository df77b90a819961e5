"""Where a job's work runs: on a pool of Ray workers, or in the driver's own process.

    choice = place(job, executor="auto", address=None, workers=None)   # before Ray is started
    choice.kind     # "ray" or "driver"; choice.why: the reason, as the manifest records it

`executor = "auto"` (the default) keeps Ray wherever a cluster is named (`--address`, RAY_ADDRESS,
Ray already initialised in this process). Otherwise the job runs in this process, its workers as
threads (`cluster.driver`): a local Ray would give its workers this machine's CPUs and no more, and
costs its start and its workers' start-up (together 4-8 s here) on every run. This decides only where
the work runs, never what it computes: a run in the driver and one on Ray give the same bits.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

from ..cluster import local
from ..errors import SpecError

__all__ = ["Placement", "place"]


@dataclass(frozen=True)
class Placement:
    kind: str                   # "ray" or "driver"
    executor: str               # what was asked: "auto", "ray" or "driver"
    why: str                    # the reason, one phrase

    def record(self) -> dict:
        return asdict(self)


def place(job, *, executor: str, address: str | None) -> Placement:
    """Where `job` runs (module docstring)."""
    if executor == "driver":
        if address is not None:
            raise SpecError(f"--address {address} with executor 'driver': the driver runs the job in this process; "
                            "drop one of them")
        return Placement("driver", executor, "asked for")
    if executor == "ray":
        return Placement("ray", executor, "asked for")
    # What the user typed is named before the state of this process (a test's or a notebook's Ray).
    named = "--address" if address is not None else "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else None
    if named:
        return Placement("ray", executor, f"a cluster is named ({named})")
    if _ray_initialised():
        return Placement("ray", executor, "a cluster is named (Ray initialised in this process)")
    if local.running():
        return Placement("driver", executor, "no cluster is named, and `quantray up`'s runs on this machine's CPUs, which "
                                             "worker threads here use without starting workers")
    return Placement("driver", executor, "no cluster is named: worker threads here use this machine's CPUs without "
                                         "starting Ray and its workers")


def _ray_initialised() -> bool:
    ray = sys.modules.get("ray")  # not imported: not initialised (and the driver's path never imports it)
    return ray is not None and ray.is_initialized()
