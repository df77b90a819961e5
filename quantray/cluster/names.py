"""How a pool names its work in the one line a failure becomes: shared by the Ray pool (`runner`)
and the pool in the driver's own process (`driver`), so that a failure reads the same in both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

from ..errors import QuantrayError, SpecError, first_line

__all__ = ["Names", "raised_line"]


@dataclass(frozen=True)
class Names:
    """How the caller names its work in the pool's lines. `worker(w)`: the worker, e.g. "the worker
    of calibration shard 1"; `call(w, key)`: where an error raised in a call happened, e.g.
    "evaluate: test batch 3 of 6"; `error`: the class of the line when a worker fails on every attempt."""

    worker: Callable[[int], str]
    call: Callable[[int, Hashable], str]
    error: type[QuantrayError] = QuantrayError


def raised_line(cause: BaseException, where: str) -> QuantrayError:
    """An exception a call raised, as one line prefixed with where it ran: a QuantrayError keeps its
    class (a bad input found while working is a failure of the run there: a SpecError becomes exit 1),
    anything else (user code's) is named by its type and first line."""
    if isinstance(cause, QuantrayError):
        return (QuantrayError if isinstance(cause, SpecError) else type(cause))(f"{where}: {cause}")
    return QuantrayError(f"{where}: {type(cause).__name__}: {first_line(cause)}")
