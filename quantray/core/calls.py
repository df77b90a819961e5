"""The driver's calls to its workers, as data: a function, its arguments, and the key its result
is filed under.

    Call(("batch", 3), Worker.evaluate, (batch, stored, True, upcoming))
    results = executor.run({worker: [call, ...]}, on_result)   # {call.key: what the call returned}

A call names a function (`CalibrationWorker.log`, `Worker.evaluate`), not a method's name as a
string: a typo fails where the call is built, and a reader can follow it. An executor runs each
worker's calls in order on that worker and files each result under its call's key: in this
process (`calibration.SerialExecutor`) or on Ray actors (`runner.WorkerPool`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol

__all__ = ["Call", "Executor"]


@dataclass(frozen=True)
class Call:
    """`fn(worker, *args)`, its result filed under `key`."""

    key: Hashable
    fn: Callable
    args: tuple = ()

    def on(self, worker) -> Any:
        """Make the call on `worker`, here."""
        return self.fn(worker, *self.args)


class Executor(Protocol):
    """Runs calls on workers. `run` returns {call.key: result} and reports each result as it comes
    (`on_result(call, +1)`), or its loss (`-1`) when a worker died and its calls are redone."""

    def run(self, calls: dict[int, list[Call]], on_result: Callable[[Call, int], None] | None = None) -> dict: ...

    def share(self, obj) -> Any:
        """A handle to `obj` that many calls can take for the cost of one (the object itself here)."""
