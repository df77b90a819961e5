"""FX tracing without the cost of its debugging metadata (used by `flow`, `layers`, `equalize`)."""

from __future__ import annotations

import contextlib

__all__ = ["without_stack_traces"]


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
