"""One content digest for everything quantray keys or checks by content: bytes, tensors, nested data.

    sha256_bytes(payload)          # a file's or a buffer's sha256
    digest({"ranges": [...]})      # stable over dicts, lists, tuples, tensors, strings and numbers
    state_dict_digest(model)       # a model's weights, by name

A tensor enters every digest the same way: its dtype and shape, then its raw bytes. torch is not
imported here: an object can only be a tensor once something else has imported torch, so reading a
run's files (`quantray report`) costs no torch import.
"""

from __future__ import annotations

import hashlib
import sys

__all__ = ["sha256_bytes", "update_tensor", "digest", "state_dict_digest"]


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def update_tensor(h, tensor) -> None:
    """Feed `tensor` to the hash `h`: "dtype:shape;" then its bytes (bfloat16 through its int16 view)."""
    import torch

    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
    h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())


def digest(obj) -> str:
    """sha256 of strings, numbers, tensors and nested lists, tuples and dicts of them."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def _update(h, obj) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        h.update(b"T")
        update_tensor(h, obj)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            _update(h, key)
            _update(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _update(h, item)
    else:
        h.update(f"S{obj!r};".encode())


def state_dict_digest(model) -> str:
    """A model's weights and buffers by name: equal digests, equal FP32 computation for the same graph."""
    return digest(dict(model.state_dict()))
