"""Stored calibration statistics and FP32 outputs, keyed by everything they depend on.

    store = StatsStore(spec.run.cache_dir or default_location(), fp32, threads)   # a path or a URI
    store.get(store.key("log", batch_identity)) ...

A key hashes the store's base (the FP32 weights, the per-worker thread count, the torch version)
and the entry's own parts: a pass-1 log of a batch, its identity; exact pass-2 counts of a shard,
its batches' identities; FP32 logits of a test batch, its identity. Entries are keyed by the FP32
values they observe (`sites`), not by the quantization config, so another config over the same
FP32 model finds them: a pass reuses an entry when it covers what the config needs (`modes`).
A sample's identity is its file's path, size and mtime where the dataset has files; in Parquet
shards, its shard, row and content digest; else the dataset's spec and the sample's index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import torch

from .data import sample_file
from .digest import digest, state_dict_digest
from .store import Store

__all__ = ["StatsStore", "batch_identities", "default_location"]

FORMAT = 2  # bumped when the layout of stored entries changes: older entries are then never read


def default_location() -> Path:
    """Where statistics are stored without [run] cache_dir: $QUANTRAY_CACHE/stats, else ~/.cache/quantray/stats."""
    return Path(os.environ.get("QUANTRAY_CACHE", Path.home() / ".cache" / "quantray")) / "stats"


class StatsStore:
    """Entries as torch files named by key, in a `Store`; unreadable entries are misses."""

    def __init__(self, location: str | Path, model: torch.nn.Module, threads: int, what: str = "[run] cache_dir"):
        self.store = Store(location, what)
        self.base = digest(["quantray-stats", FORMAT, state_dict_digest(model), threads, torch.__version__])
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


def batch_identities(dataset, data_spec, batches: list[list[int]]) -> list[str]:
    """One digest per batch: the dataset's spec (what transforms the files) and each sample's identity."""
    # samples, seed and batch_size only pick samples: identities cover them. Packed shards are
    # identified by content, wherever they are stored: a copy in another bucket is the same data.
    skip = ("samples", "seed", "batch_size") + (("root",) if data_spec.source == "parquet" else ())
    spec = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(data_spec).items() if k not in skip}
    prefix = json.dumps(spec, sort_keys=True)
    packed = dataset.identities() if callable(getattr(dataset, "identities", None)) else None
    out = []
    for batch in batches:  # (the same text hashed as before: run manifests' data_digest stays comparable)
        h = hashlib.sha256(prefix.encode())
        for i in batch:
            if packed is not None:  # shard, row and the sample's content digest, written at pack time
                h.update(f"|{i}:{packed[i]}".encode())
                continue
            path = sample_file(dataset, i)
            if path is None:
                h.update(f"|{i}".encode())
            else:
                st = os.stat(path)
                h.update(f"|{i}:{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        out.append(h.hexdigest())
    return out
