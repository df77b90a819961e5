"""A model's output of any structure as named tensors: what evaluation, agreement and stored FP32
outputs read, whatever the model returns.

    flat = flatten(model(x))    # {"output": t} for a tensor; {"out": .., "aux": ..} for torchvision's
                                # segmentation dicts; {"0": .., "1": ..} for tuples; nested: "a.0"
    primary(flat)               # the first of them: what a built-in metric scores (or [test] output)

Quantized tensors are dequantized; `None` leaves are skipped (torchvision returns aux=None when
its auxiliary head is off). Anything else is the user's to fix: `OutputError` names where it is.
"""

from __future__ import annotations

import torch

from ..errors import SpecError

__all__ = ["flatten", "primary", "OutputError"]


class OutputError(SpecError):
    """A model returned something that is not tensors in tuples, lists and dicts."""


def flatten(output, name: str = "") -> dict[str, torch.Tensor]:
    """Named tensors of `output`, in its own order (dict order, then position)."""
    out: dict[str, torch.Tensor] = {}
    _walk(output, name, out)
    if not out:
        raise OutputError(f"the model returned {type(output).__name__} with no tensor in it; "
                          "expected a tensor, or tuples, lists or dicts of tensors")
    return out


def _walk(value, name: str, out: dict) -> None:
    if isinstance(value, torch.Tensor):
        out[name or "output"] = value.dequantize() if value.is_quantized else value
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(item, f"{name}.{key}" if name else str(key), out)
    elif isinstance(value, (tuple, list)):
        for position, item in enumerate(value):
            _walk(item, f"{name}.{position}" if name else str(position), out)
    elif value is not None:
        raise OutputError(f"the model's output {name or '(top level)'!s} is {type(value).__name__}; "
                          "expected a tensor, or tuples, lists or dicts of tensors")


def primary(flat: dict[str, torch.Tensor], name: str | None = None) -> torch.Tensor:
    """The output a built-in metric scores: `name` ([test] output) or the first."""
    if name is None:
        return next(iter(flat.values()))
    if name not in flat:
        raise OutputError(f"output = {name!r}: the model has no such output; it returns "
                          f"{', '.join(repr(k) for k in flat)}")
    return flat[name]
