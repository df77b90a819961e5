"""Calibration statistics as reusable artifacts, keyed by everything they depend on.

A key hashes: the FP32 weights, the quantization spec (minus the merge mode), the per-worker thread
count and the torch version (the `base`), then what the entry itself depends on:

    pass-1 log of a batch       the batch's sample identities
    exact pass-2 counts, shard  the global ranges and the shard's batch identities
    replay updates of a batch   the batch's planned ranges and its identity
    fast result of a shard      the shard's batch identities, in order

so a rerun recomputes only what changed: new images re-run their batches' pass 1; a new merge mode
keeps every pass-1 log. A sample's identity is its file's path, size and mtime where the dataset
has files, else the dataset's spec and the sample's index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .data import sample_file

__all__ = ["StatsCache", "batch_identities", "cache_dir"]


def cache_dir() -> Path:
    """quantray's cache folder: $QUANTRAY_CACHE, else ~/.cache/quantray."""
    return Path(os.environ.get("QUANTRAY_CACHE", Path.home() / ".cache" / "quantray"))


class StatsCache:
    """A folder of torch files named by key; writes are atomic, unreadable entries are misses."""

    def __init__(self, root: str | Path, model: torch.nn.Module, quant, threads: int):
        self.root = Path(root)
        h = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        spec = {k: v for k, v in dataclasses.asdict(quant).items() if k != "mode"}
        h.update(json.dumps({"quant": spec, "threads": threads, "torch": torch.__version__}, sort_keys=True).encode())
        self.base = h.hexdigest()
        self.hits = self.misses = 0

    def key(self, kind: str, *parts) -> str:
        h = hashlib.sha256(f"{self.base}:{kind}".encode())
        for part in parts:
            h.update(_digest(part).encode())
        return f"{kind}-{h.hexdigest()}"

    def get(self, key: str):
        path = self.root / f"{key}.pt"
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # absent, truncated by a crash, or from an incompatible version
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.")
        os.close(fd)
        try:
            torch.save(value, tmp)
            os.replace(tmp, self.root / f"{key}.pt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def batch_identities(dataset, data_spec, batches: list[list[int]]) -> list[str]:
    """One digest per batch: the dataset's spec (what transforms the files) and each sample's identity."""
    spec = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(data_spec).items()
            if k not in ("samples", "seed", "batch_size")}  # these only pick samples: identities cover them
    prefix = json.dumps(spec, sort_keys=True)
    out = []
    for batch in batches:
        h = hashlib.sha256(prefix.encode())
        for i in batch:
            path = sample_file(dataset, i)
            if path is None:
                h.update(f"|{i}".encode())
            else:
                st = os.stat(path)
                h.update(f"|{i}:{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        out.append(h.hexdigest())
    return out


def _digest(part) -> str:
    """A stable digest of strings, numbers, tensors and nested lists/tuples/dicts of them."""
    h = hashlib.sha256()
    if isinstance(part, torch.Tensor):
        t = part.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    elif isinstance(part, dict):
        for k in sorted(part):
            h.update(f"K{k}".encode())
            h.update(_digest(part[k]).encode())
    elif isinstance(part, (list, tuple)):
        h.update(f"L{len(part)}".encode())
        for item in part:
            h.update(_digest(item).encode())
    else:
        h.update(f"S{part!r}".encode())
    return h.hexdigest()
