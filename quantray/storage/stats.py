"""Stored calibration statistics and FP32 outputs, keyed by everything they depend on.

    store = StatsStore(spec.run.cache_dir or default_location(), fp32, threads)   # a path or a URI
    store.get(store.key("log", batch_identity)) ...

A key hashes the store's base (the FP32 weights, class and modules, the per-worker thread count, the torch version)
and the entry's own parts: a pass-1 log of a batch, its identity; exact pass-2 counts of a shard,
its batches' identities; FP32 logits of a test batch, its identity. Entries are keyed by the FP32
values they observe (`sites`), not by the quantization config, so another config over the same
FP32 model finds them: a pass reuses an entry when it covers what the config needs (`modes`).
A batch's identity (`data.batch_identities`) covers its samples' files, shards or indices.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ..digest import digest, state_dict_digest
from .store import Store

__all__ = ["StatsStore", "default_location"]

FORMAT = 2  # bumped when the layout of stored entries changes: older entries are then never read


def default_location() -> Path:
    """Where statistics are stored without [run] cache_dir: $QUANTRAY_CACHE/stats, else ~/.cache/quantray/stats."""
    return Path(os.environ.get("QUANTRAY_CACHE", Path.home() / ".cache" / "quantray")) / "stats"


class StatsStore:
    """Entries as torch files named by key, in a `Store`; unreadable entries are misses."""

    def __init__(self, location: str | Path, model: torch.nn.Module, threads: int, what: str = "[run] cache_dir"):
        self.store = Store(location, what)
        # Weights alone do not name a model: a ReLU swapped for a ReLU6 keeps the state_dict (and would
        # find the other model's FP32 outputs). Its class and modules (their repr) are in the key too;
        # code in forward() that no module shows is not.
        self.base = digest(["quantray-stats", FORMAT, state_dict_digest(model), threads, torch.__version__,
                            f"{type(model).__module__}.{type(model).__qualname__}", repr(model)])
        self.hits = self.misses = 0
        self.unwritable: str | None = None  # why entries could not be stored, if they could not

    @property
    def location(self):
        return self.store.location

    def key(self, kind: str, *parts) -> str:
        return f"{kind}-{digest([self.base, kind, *parts])}"

    def get(self, key: str):
        payload = self.store.read(f"{key}.pt")
        try:
            value = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True) if payload else None
        except Exception:  # from an incompatible version, or not a torch file at all
            value = None
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value) -> None:
        """Store an entry; a location that cannot be written is remembered, not fatal: the run's
        results do not depend on its stored statistics."""
        if self.unwritable is not None:
            return
        buffer = io.BytesIO()
        torch.save(value, buffer)
        try:
            self.store.write(buffer.getvalue(), f"{key}.pt")
        except OSError as e:
            self.unwritable = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
