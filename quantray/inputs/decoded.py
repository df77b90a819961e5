"""Decoded images kept between runs: a batch's images after the transform's exact uint8 stage
(Resize, CenterCrop: `transforms.split_transform`), keyed by every image file's content and the
transform, so that a rerun, a refresh or a tune on the same images reads them back instead of
decoding and resizing the same JPEGs again.

    batches = DecodedBatches(data_spec, "[test]", location)  # the stats store's folder or URI, or None
    x, y = batches.load(indices, upcoming)                  # what data.load_batch gives, bit for bit

What it keeps: image folders and torchvision datasets with the imagenet_eval or to_tensor preset,
whose samples are files and whose labels the dataset lists (`data.targets_of`); labels are read from
that list, never kept. A changed file, transform, torchvision or Pillow finds no entry; an entry that
cannot be read is a miss. Anything else loads as `data.load_batch` loads it.
"""

from __future__ import annotations

import hashlib
import io

import torch

from ..digest import digest
from ..errors import first_line
from ..spec import DataSpec
from ..storage.store import Store
from . import data as data_mod
from .transforms import split_transform

__all__ = ["DecodedBatches", "FORMAT"]

FORMAT = 1  # bumped when an entry's layout changes: older entries are then never read
_SOURCES = ("imagefolder", "torchvision")  # whose samples are image files, transformed by a preset


class DecodedBatches:
    """A split's batches, with the decoded images kept at `location` (see the module docstring).
    `hits` and `misses` count batches; `unwritable` says why entries could not be kept, if so."""

    def __init__(self, spec: DataSpec, where: str, location: str | None):
        staged = split_transform(spec.transform) if location is not None and spec.source in _SOURCES else None
        self.dataset = data_mod.build_dataset(spec, where, first_stage=staged is not None)
        self._finish = staged[1] if staged is not None else None
        self._labels = data_mod.targets_of(self.dataset) if staged is not None else None
        self.store = Store(location, "[run] cache_dir") if self._labels is not None else None
        self._base = None
        if self.store is not None:
            import PIL
            import torchvision

            self._base = ["quantray-decoded", FORMAT, spec.transform, torchvision.__version__, PIL.__version__]
        self.hits = self.misses = 0
        self.unwritable: str | None = None

    def load(self, indices: list[int], upcoming: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Samples `indices` stacked into (inputs, targets), as `data.load_batch` gives them."""
        if self._finish is None:
            return data_mod.load_batch(self.dataset, indices, upcoming)
        key = self._key(indices) if self.store is not None else None
        kept = self._read(key) if key is not None else None
        if kept is not None and kept.shape[0] == len(indices):
            self.hits += 1
            return self._finish(kept), data_mod.stack_targets([self._labels[i] for i in indices], indices)
        xs, ys = data_mod.load_samples(self.dataset, indices, upcoming)
        y = data_mod.stack_targets(ys, indices)
        if key is not None:
            self.misses += 1
            self._keep(key, xs, y, indices)
        if all(x.dtype == torch.uint8 for x in xs):
            return self._finish(torch.stack(xs)), y
        return torch.stack([self._finish(x) for x in xs]), y

    def _key(self, indices: list[int]) -> str | None:
        """The batch's entry name: the transform and every image's content (its file's sha256)."""
        contents = []
        for i in indices:
            path = data_mod.sample_file(self.dataset, i)
            if path is None:
                return None
            with open(path, "rb") as f:
                contents.append(hashlib.file_digest(f, "sha256").hexdigest())
        return f"decoded-{digest([*self._base, contents])}.pt"

    def _read(self, key: str) -> torch.Tensor | None:
        payload = self.store.read(key)
        try:
            kept = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True) if payload else None
        except Exception:  # from an incompatible version, or not a torch file at all
            return None
        return kept if isinstance(kept, torch.Tensor) and kept.dtype == torch.uint8 else None

    def _keep(self, key: str, xs: list, y, indices: list[int]) -> None:
        """Keep a batch of uint8 images of one shape whose labels the dataset's list gives: anything
        else (an image of another mode, a dataset whose list disagrees) is not kept."""
        if self.unwritable is not None or not all(x.dtype == torch.uint8 and x.shape == xs[0].shape for x in xs):
            return
        if y is None or not torch.equal(y, data_mod.stack_targets([self._labels[i] for i in indices], indices)):
            self.store = None  # its listed labels are not what it gives: read it as it is from now on
            return
        buffer = io.BytesIO()
        torch.save(torch.stack(xs), buffer)
        try:
            self.store.write(buffer.getvalue(), key)
        except OSError as e:
            self.unwritable = f"{type(e).__name__}: {first_line(e)}"
