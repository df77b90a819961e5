"""FX tracing without the cost of its debugging metadata (used by `flow`, `layers`, `equalize`), and
alone among worker threads (`TURNS`: `cluster.driver` runs a pool's workers as threads).

    with TURNS.computing(): worker_call()      # many threads at once
    with TURNS.alone(): prepare_fx(...)         # no other thread computing meanwhile
    TURNS.between()                             # in a long call, between forwards: a tracer may go
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["without_stack_traces", "TURNS"]


@contextlib.contextmanager
def without_stack_traces():
    """FX's tracer records a Python stack trace per node, debugging metadata only; symbolizing the
    first one imports torch._dynamo, about 2 s in every new process (driver, actor, task)."""
    import torch.fx.config

    if not hasattr(torch.fx.config, "do_not_emit_stack_traces"):  # torch < 2.12 has no such switch
        yield
        return
    before = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = before


class _Turns:
    """Worker threads compute at once; a thread that traces does it alone.

    FX's tracer patches `torch.nn.Module.__call__` and `__getattr__` for the whole process while it
    traces (prepare_fx, add_loggers, fuse): a forward on another thread meanwhile goes through the
    tracer and fails ("module is not installed as a submodule") or is recorded into its graph. So a
    worker's call runs inside `computing()`, and tracing inside `alone()`, which waits until no other
    thread is computing (a thread gives up its own share while it waits, and takes it back after),
    and holds new calls back meanwhile; a long call lets it in `between` its forwards. Re-entrant;
    in a process without worker threads (a Ray worker, the driver between runs) nothing waits."""

    def __init__(self):
        self._cond = threading.Condition()
        self._computing = 0  # threads inside computing(), less those waiting in or inside alone()
        self._waiting = 0    # threads waiting to trace: new calls wait for them
        self._tracer = None  # the thread tracing now
        self._local = threading.local()

    @contextlib.contextmanager
    def computing(self):
        with self._cond:
            while self._tracer is not None or self._waiting:
                self._cond.wait()
            self._computing += 1
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            with self._cond:
                self._computing -= 1
                self._cond.notify_all()

    def between(self) -> None:
        """A point between two forwards of a long call (a trial's batches) where a thread waiting to
        trace goes first: this thread gives up its share until that tracing is done."""
        mine = getattr(self._local, "depth", 0)
        if not self._waiting or not mine or self._tracer == threading.get_ident():
            return
        with self._cond:
            self._computing -= mine
            self._cond.notify_all()
            while self._tracer is not None or self._waiting:
                self._cond.wait()
            self._computing += mine

    @contextlib.contextmanager
    def alone(self):
        me = threading.get_ident()
        if self._tracer == me:  # already alone (prepare inside rebuild_int8)
            yield
            return
        mine = getattr(self._local, "depth", 0)
        with self._cond:
            self._computing -= mine
            self._waiting += 1
            self._cond.notify_all()
            while self._tracer is not None or self._computing:
                self._cond.wait()
            self._waiting -= 1
            self._tracer = me
        try:
            yield
        finally:
            with self._cond:
                self._tracer = None
                self._computing += mine
                self._cond.notify_all()


TURNS = _Turns()
