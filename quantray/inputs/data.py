"""Datasets by source, and the deterministic plan of samples, batches and shards.

Determinism is by sample index: the same spec picks the same samples, in ascending index order,
cut into the same batches; shards are whole batches, never re-batched per worker (DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import DataError, SpecError, first_line
from ..spec import DataSpec, suggest
from .transforms import make_transform, split_transform

__all__ = ["build_dataset", "check_data", "digits", "sklearn_file", "sample_indices", "draw_indices", "make_batches", "assign_shards",
           "load_batch", "load_samples", "stack_targets", "sample_file", "batch_identities", "targets_of"]

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def build_dataset(spec: DataSpec, where: str = "job", first_stage: bool = False) -> Dataset:
    """The dataset a `[calibration]` or `[test]` section names. `where` prefixes error messages.
    `first_stage`: an image folder or torchvision dataset gives its images through the first
    stage of the transform only (`transforms.split_transform`: uint8 pixels, still to finish)."""
    if spec.source == "digits":
        return digits(spec.split)
    if spec.source == "parquet":
        from .shards import ShardedImages

        try:
            return ShardedImages(str(spec.root), spec.transform, what=f"{where} root")
        except OSError as e:  # an unreachable endpoint, missing credentials, no such bucket
            raise SpecError(f"{where} root = {str(spec.root)!r}: cannot read it: {first_line(e)}") from None
    if spec.source == "imagefolder":
        import torchvision.datasets

        try:
            return torchvision.datasets.ImageFolder(str(spec.root), transform=_transform(spec, first_stage))
        except (FileNotFoundError, RuntimeError) as e:
            raise SpecError(f"{where} root = {str(spec.root)!r}: not an ImageFolder layout (root/CLASS/IMAGE): {e}") from None
    if spec.source == "torchvision":
        return _torchvision_dataset(spec, where, first_stage)
    from .models import call_user, resolve_callable

    fn = resolve_callable(spec.factory, f"{where} factory")
    kwargs = dict(spec.kwargs)
    if spec.split is not None:
        kwargs["split"] = spec.split
    dataset = call_user(fn, kwargs, f"{where} factory = {spec.factory!r}")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise SpecError(f"{where} factory = {spec.factory!r} returned {type(dataset).__name__}, "
                        "expected a map-style torch Dataset (with __getitem__ and __len__)")
    return dataset


@functools.lru_cache(maxsize=4)
def digits(split: str = "all") -> TensorDataset:
    """scikit-learn's 1,797 real 8x8 digits as (1, 8, 8) float tensors in [0, 1], with a fixed split."""
    raw = _digits_table()
    x = torch.tensor(raw[:, :-1].reshape(-1, 8, 8), dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw[:, -1].astype(int), dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = round(len(y) * DIGITS_TEST_FRACTION)
    chosen = {"test": order[:n_test], "train": order[n_test:], "all": order}[split].sort().values
    return TensorDataset(x[chosen], y[chosen])


@functools.lru_cache(maxsize=1)
def _digits_table():
    """The file sklearn.datasets.load_digits reads (pixels, then the label, per row), read the same
    way without importing scikit-learn: 1.4 s less in every worker process that loads digits."""
    import gzip

    import numpy as np

    with gzip.open(sklearn_file("digits.csv.gz", "the digits source"), "rt") as f:
        return np.loadtxt(f, delimiter=",")


def sklearn_file(name: str, who: str, folder: str = "data") -> Path:
    """A data file scikit-learn ships (sklearn/datasets/FOLDER/NAME), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise SpecError(f"{who} needs scikit-learn's data file {name}: pip install scikit-learn")
    return Path(spec.origin).parent / "datasets" / folder / name


def sample_indices(n: int, samples: int | None, seed: int) -> list[int]:
    """`samples` distinct indices of range(n) drawn with `seed`, ascending; all of them if None."""
    if samples is None or samples == n:
        return list(range(n))
    if samples > n:
        raise ValueError(f"asked for {samples} samples but the split has only {n}")
    return sorted(random.Random(seed).sample(range(n), samples))


def draw_indices(dataset, d: DataSpec, where: str, empty: str) -> list[int]:
    """The samples `d` draws from `dataset`; a SpecError naming `where` if it asks for too many or
    draws none (`empty`: what to say then)."""
    try:
        indices = sample_indices(len(dataset), d.samples, d.seed)
    except ValueError as e:
        raise SpecError(f"{where} samples = {d.samples}: {e}") from None
    if not indices:
        raise SpecError(f"{where} {empty}")
    return indices


def make_batches(indices: list[int], batch_size: int) -> list[list[int]]:
    """Cut the canonical sample order into fixed batches, once, for every worker count."""
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def assign_shards(n_batches: int, workers: int) -> list[list[int]]:
    """Contiguous, near-equal blocks of batch ids, one per worker (no empty shard)."""
    workers = max(1, min(workers, n_batches))
    base, extra = divmod(n_batches, workers)
    shards, start = [], 0
    for w in range(workers):
        size = base + (1 if w < extra else 0)
        shards.append(list(range(start, start + size)))
        start += size
    return shards


def load_batch(dataset: Dataset, indices: list[int], upcoming: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack samples `indices` into (inputs, targets); a sample that fails names its index and file.
    A sample is (input, target) or, label-free, an input alone (a tensor, `(input,)` or
    `(input, None)`): targets are then None. Integer labels stack into an int64 vector, as
    classification reads them; any other target (a tensor of any shape, a float) is stacked as a
    tensor. `upcoming`: the samples the caller loads next, which a source that can (Parquet
    shards) starts reading in the background while this batch is decoded."""
    xs, ys = load_samples(dataset, indices, upcoming)
    return torch.stack(xs), stack_targets(ys, indices)


def load_samples(dataset: Dataset, indices: list[int], upcoming: list[int] | None = None) -> tuple[list, list]:
    """Samples `indices` as two lists, inputs and targets (None where there is none), unstacked:
    `load_batch`'s first half."""
    if upcoming is not None and callable(getattr(dataset, "prefetch", None)):
        dataset.prefetch(indices)
        dataset.prefetch(upcoming)
    xs, ys = [], []
    for i in indices:
        try:
            x, y = _split(dataset[i])
        except Exception as e:
            path = sample_file(dataset, i)
            raise DataError(f"sample {i}{f' ({path})' if path else ''} failed to load: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        xs.append(x)
        ys.append(y)
    return xs, ys


def _split(sample):
    if isinstance(sample, torch.Tensor):
        return sample, None
    if isinstance(sample, (tuple, list)) and len(sample) in (1, 2):
        return sample[0], sample[1] if len(sample) == 2 else None
    raise TypeError(f"a sample is (input, target) or an input alone; got {type(sample).__name__}"
                    f"{f' of {len(sample)} items' if isinstance(sample, (tuple, list)) else ''}")


def stack_targets(ys: list, indices: list[int]) -> torch.Tensor | None:
    """Targets of samples `indices` as one tensor (see `load_batch`), or None for label-free data."""
    absent = [y is None for y in ys]
    if all(absent):
        return None
    if any(absent):
        raise DataError(f"sample {indices[absent.index(True)]} has no target but sample "
                        f"{indices[absent.index(False)]} has one: a split is labelled throughout or not at all")
    if all(isinstance(y, int) or isinstance(y, torch.Tensor) and y.dim() == 0 and not y.dtype.is_floating_point
           for y in ys):
        return torch.tensor([int(y) for y in ys], dtype=torch.int64)  # class labels, as they always were
    tensors = [torch.as_tensor(y) for y in ys]
    for i, t in zip(indices, tensors):
        if t.shape != tensors[0].shape:
            raise DataError(f"sample {i}'s target has shape {tuple(t.shape)}, sample {indices[0]}'s "
                            f"{tuple(tensors[0].shape)}: targets of one split must have one shape")
    return torch.stack(tensors)


def targets_of(dataset) -> list | None:
    """Every sample's class label as the dataset lists it without reading an image (ImageFolder's
    and most torchvision datasets' `targets`, Flowers102's `_labels`), or None where it lists no
    integer labels (VOCSegmentation's `targets` are mask files)."""
    for attr in ("targets", "_labels"):
        found = getattr(dataset, attr, None)
        if isinstance(found, torch.Tensor) and found.dim() == 1 and not found.dtype.is_floating_point:
            found = found.tolist()
        if isinstance(found, (list, tuple)) and len(found) == len(dataset) and all(type(t) is int for t in found):
            return list(found)
    return None


def sample_file(dataset, i: int) -> str | None:
    """The file sample `i` is read from, where the dataset says (ImageFolder, Flowers102, Parquet shards, ...)."""
    if callable(getattr(dataset, "sample_file", None)):
        return dataset.sample_file(i)
    for attr in ("samples", "imgs", "_image_files"):
        items = getattr(dataset, attr, None)
        if isinstance(items, (list, tuple)) and 0 <= i < len(items):
            item = items[i]
            return str(item[0] if isinstance(item, tuple) else item)
    return None


def check_data(spec: DataSpec, where: str) -> None:
    """What a DataSpec cannot check without torch: that a torchvision source names a dataset class
    in torchvision.datasets, and has the root it takes. `where` ("JOB: [test]") starts the error line."""
    if spec.source != "torchvision":
        return
    import torch.utils.data
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.dataset, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.utils.data.Dataset)):
        names = [n for n in dir(torchvision.datasets) if isinstance(getattr(torchvision.datasets, n), type)]
        raise SpecError(f"{where} dataset = {spec.dataset!r}: not a dataset class in torchvision.datasets"
                        f"{suggest(spec.dataset, names)}; e.g. Flowers102, CIFAR10, ImageNet")
    if spec.root is None and "root" in inspect.signature(cls).parameters:
        raise SpecError(f"{where} root is required for source = 'torchvision' with dataset = {spec.dataset!r} "
                        "(the dataset's folder)")


def _transform(spec: DataSpec, first_stage: bool):
    staged = split_transform(spec.transform) if first_stage else None
    return staged[0] if staged is not None else make_transform(spec.transform)


def _torchvision_dataset(spec: DataSpec, where: str, first_stage: bool = False) -> Dataset:
    import torchvision.datasets

    check_data(spec, where)
    cls = getattr(torchvision.datasets, spec.dataset)
    params = inspect.signature(cls).parameters
    if not spec.verify:
        cls = _unverified(cls, where)
    kwargs = dict(spec.kwargs)
    kwargs["transform"] = _transform(spec, first_stage)
    if spec.split is not None:
        if "split" in params:
            kwargs["split"] = spec.split
        elif "train" in params and spec.split in ("train", "test"):
            kwargs["train"] = spec.split == "train"
        else:
            raise SpecError(f"{where} split = {spec.split!r}: torchvision.datasets.{spec.dataset} takes no split; "
                            "leave split out or pass its own argument under kwargs")
    if "download" in params:
        kwargs["download"] = spec.download
    elif spec.download:
        raise SpecError(f"{where} download: torchvision.datasets.{spec.dataset} cannot download")
    try:
        if "root" in params:
            kwargs["root"] = str(spec.root)
        return cls(**kwargs)
    except TypeError as e:
        raise SpecError(f"{where} kwargs: torchvision.datasets.{spec.dataset} rejected them: {e}") from None
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise SpecError(f"{where} root = {str(Path(spec.root))!r}: torchvision.datasets.{spec.dataset} "
                        f"cannot read it: {str(e).splitlines()[0]}") from None


def _unverified(cls, where: str):
    """`cls` without its md5 check of the downloaded files, which a re-packed subset (fewer images,
    rewritten .mat files) cannot pass; missing files still fail when the dataset reads them."""
    if not callable(getattr(cls, "_check_integrity", None)):
        raise SpecError(f"{where} verify = false: torchvision.datasets.{cls.__name__} has no file check to skip")
    return type(cls.__name__, (cls,), {"_check_integrity": lambda self: True})


def batch_identities(dataset, data_spec, batches: list[list[int]]) -> list[str]:
    """One digest per batch, what stored statistics are keyed by: the dataset's spec (what transforms
    the files) and each sample's identity: its file's path, size and mtime where the dataset has
    files; in Parquet shards, its shard, row and content digest; else the sample's index."""
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
