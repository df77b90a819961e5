"""Images as Parquet shards, at a local path or any URI pyarrow.fs opens (s3://, gs://, file://).

    images = ShardedImages("s3://bucket/flowers/test", transform="imagenet_eval")
    x, y = images[17]             # reads the row group that holds sample 17 (and keeps it a while)
    images.prefetch([32, 33, ...])  # start reading the row groups of what comes next, in the background
    images.bytes_read             # what this process has read of the shards and the manifest

A split is a folder written by `quantray pack` (`quantray.commands.pack`):
    manifest.json             counts, labels, the shards in order, the index file; written last
    index-DIGEST.parquet      one row per sample: index, id, label, shard, row, sha256 (the driver's
                              sample identities, without reading any image)
    part-NNNNN-DIGEST.parquet the samples in index order: index, id, label, image, sha256 (and
                              target, where the targets are tensors)

`kind` says what `image` holds: "encoded", the bytes of the original file (JPEG, PNG, ...), decoded
here exactly as torchvision's loaders do (PIL, then RGB) and put through the `transform` preset, so
the tensors equal the folder's; or "tensor", the dataset's own output as a .npy array (digits, a
factory's tensors, a torchvision dataset without image files), taken as is. `targets` says what
each sample's target is: "label", an integer class in `label` (format quantray-shards/1, what
image classification packs); "tensor", any tensor (a regression target, a mask) as a .npy array in
`target`; "none", no target at all (label-free data: samples are inputs alone). Both of the
latter are format quantray-shards/2. Readers fetch only the row groups of the samples asked for: a
worker reads its own batches, never the whole split.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from ..errors import SpecError
from ..storage.store import Store
from .transforms import make_transform

__all__ = ["ShardedImages", "FORMAT", "FORMAT_TARGETS", "SHARD_SCHEMA", "TARGET_SCHEMA", "INDEX_SCHEMA", "decode"]

FORMAT = "quantray-shards/1"          # integer labels (as every pack before targets of any kind)
FORMAT_TARGETS = "quantray-shards/2"  # tensor targets, or none
SHARD_SCHEMA = pa.schema([("index", pa.int64()), ("id", pa.string()), ("label", pa.int64()),
                          ("image", pa.binary()), ("sha256", pa.string())])
TARGET_SCHEMA = SHARD_SCHEMA.append(pa.field("target", pa.binary()))  # label null; target: .npy bytes or null
INDEX_SCHEMA = pa.schema([("index", pa.int64()), ("id", pa.string()), ("label", pa.int64()),
                          ("shard", pa.int32()), ("row", pa.int32()), ("sha256", pa.string())])
_KEPT_BYTES = 64 << 20  # row groups a reader keeps: batches that share a group read it once


def decode(payload: bytes, kind: str, transform):
    """One stored image as the dataset it was packed from returns it."""
    if kind == "tensor":
        return torch.from_numpy(np.load(io.BytesIO(payload), allow_pickle=False))
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as image:  # torchvision's pil_loader: open, then RGB
        rgb = image.convert("RGB")
    return transform(rgb) if transform is not None else rgb


class ShardedImages(Dataset):
    """A packed split as a map-style dataset of (tensor, label). Opening reads manifest.json only;
    `transform` is a preset name (None: the one the split was packed with)."""

    def __init__(self, location: str, transform: str | None = None, what: str = "root"):
        self.store = Store(location, what)
        self.location, self.what = str(self.store.location), what
        payload = self.store.read("manifest.json")
        if payload is None:
            raise SpecError(f"{what} = {self.location!r}: no manifest.json there; write the shards with "
                            "`quantray pack JOB.toml --out URI` and point root at URI/calibration or URI/test")
        self.bytes_read = len(payload)
        manifest = json.loads(payload)
        if manifest.get("format") not in (FORMAT, FORMAT_TARGETS):
            raise SpecError(f"{what} = {self.location!r}: manifest.json is not {FORMAT} or {FORMAT_TARGETS} "
                            f"(format {manifest.get('format')!r}); pack the data again with this quantray")
        self.manifest, self.kind = manifest, manifest["kind"]
        self.targets = manifest.get("targets", "label")
        if self.kind == "tensor" and transform not in (None, "none"):
            raise SpecError(f"{what} = {self.location!r}: these shards hold tensors the source had already "
                            f"transformed; transform = {transform!r} cannot apply: leave transform out")
        self.transform_name = transform or manifest["transform"]
        self._transform = make_transform(self.transform_name) if self.kind == "encoded" else None
        self._starts = np.cumsum([0] + [s["rows"] for s in manifest["shards"]])
        self._files: dict[int, pq.ParquetFile] = {}  # opened on the IO thread, used there only
        self._groups: collections.OrderedDict = collections.OrderedDict()  # (shard, group) -> table, kept
        self._pending: dict[tuple[int, int], concurrent.futures.Future] = {}  # being read
        self._reader = None
        self._kept = 0
        self.groups_read = 0
        self._index = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int):
        table, row = self._row(i)
        x = decode(table.column("image")[row].as_py(), self.kind, self._transform)
        if self.targets == "none":
            return x
        if self.targets == "tensor":
            return x, decode(table.column("target")[row].as_py(), "tensor", None)
        return x, int(table.column("label")[row].as_py())

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, row) of sample `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return shard, i - int(self._starts[shard])

    def sample_file(self, i: int) -> str:
        """Where sample `i` is stored, for error messages."""
        shard, row = self.locate(i)
        return f"{self.store.where(self.manifest['shards'][shard]['name'])} row {row}"

    def identities(self) -> list[str]:
        """Each sample's identity for stored statistics: its shard, row and content digest (from the
        index file: no image is read). A rewritten shard changes only its own samples' identities."""
        if self._index is None:
            payload = self.store.read(self.manifest["index"])
            if payload is None:
                raise SpecError(f"{self.what} = {self.location!r}: {self.manifest['index']} is missing; pack again")
            self.bytes_read += len(payload)
            table = pq.read_table(pa.BufferReader(payload), columns=["shard", "row", "sha256"])
            self._index = [f"{s}:{r}:{h}" for s, r, h in zip(*(table.column(c).to_pylist() for c in table.column_names))]
        return self._index

    def prefetch(self, indices: list[int]) -> None:
        """Start reading the row groups `indices` need (a worker's next batch) in the background, so
        that their transfer overlaps the decoding of the batch at hand. Every read of the shards runs
        on one IO thread: no file object is shared between threads."""
        for key in dict.fromkeys(self._key(i)[0] for i in indices):
            if key not in self._groups and key not in self._pending:
                self._pending[key] = self._io().submit(self._read_group, key)

    def _key(self, i: int) -> tuple[tuple[int, int], int]:
        """((shard, row group), row within the group) of sample `i`."""
        shard, row = self.locate(i)
        per_group = self.manifest["rows_per_group"]
        return (shard, row // per_group), row % per_group

    def _row(self, i: int):
        key, row = self._key(i)
        table = self._groups.get(key)
        if table is not None:
            self._groups.move_to_end(key)
            return table, row
        future = self._pending.pop(key, None) or self._io().submit(self._read_group, key)
        table = self._groups[key] = future.result()
        self._kept += table.nbytes
        while self._kept > _KEPT_BYTES and len(self._groups) > 1:
            self._kept -= self._groups.popitem(last=False)[1].nbytes
        return table, row

    def _io(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._reader is None:
            self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shards-io")
        return self._reader

    def _read_group(self, key: tuple[int, int]):
        """One row group's labels and images (on the IO thread)."""
        shard, group = key
        if shard not in self._files:
            name = self.manifest["shards"][shard]["name"]
            # pre_buffer: a row group's label and image chunks (adjacent) come in one ranged read
            self._files[shard] = pq.ParquetFile(pa.PythonFile(_Counted(self.store.open_input_file(name), self), mode="r"),
                                                pre_buffer=True)
        self.groups_read += 1
        columns = ["label", "image"] + (["target"] if self.targets == "tensor" else [])
        return self._files[shard].read_row_group(group, columns=columns)


class _Counted:
    """A file object that counts the bytes read through it into `owner.bytes_read`."""

    def __init__(self, raw, owner):
        self.raw, self.owner, self.closed = raw, owner, False

    def read(self, n: int = -1) -> bytes:
        payload = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        self.owner.bytes_read += len(payload)
        return payload

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
        self.raw.close()
