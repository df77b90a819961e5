"""`quantray pack`: a job's calibration and test splits as Parquet shards, and a job file that reads them.

    quantray pack jobs/flowers102_resnet18.toml --out s3://bucket/flowers [--rows-per-shard 1000]
    result = pack("jobs/flowers102_resnet18.toml", "s3://bucket/flowers")   # from Python
    result.job_file                                  # jobs/flowers102_resnet18.packed.toml

Each split goes to OUT/calibration/ and OUT/test/ (layout in `quantray.inputs.shards`): the whole split, in
index order, so the packed job draws the same samples, cut into the same batches, as the job. Image
files are stored as they are on disk and decoded by the workers; anything else (digits, a factory's
tensors) as the dataset's own tensors. Targets are integer labels, tensors of any shape (a
regression target, a segmentation mask: stored as .npy) or absent (label-free samples), as the
first sample has them; every sample must have the same kind. Before packing a split, the first sample is decoded from its
stored form and compared with what the dataset returns: equal tensors, or the split is stored as
tensors instead.

Every file is written whole, then moved into place, and manifest.json last: a killed pack leaves no
shard a reader would take. Shard names carry a digest of their rows (ids, labels, content digests),
so packing the same input again writes nothing, and a changed image rewrites only its own shard.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console

from ..digest import digest, sha256_bytes
from ..errors import SpecError
from ..inputs.data import build_dataset, sample_file
from ..inputs.shards import FORMAT, FORMAT_TARGETS, INDEX_SCHEMA, SHARD_SCHEMA, TARGET_SCHEMA, decode
from ..inputs.transforms import make_transform
from ..report.console import make_progress
from ..spec import DataSpec, JobSpec, load_spec, to_toml
from ..storage.store import Store, check_local_folder, json_bytes

__all__ = ["pack", "PackResult", "PackedSplit", "ROWS_PER_GROUP"]

ROWS_PER_GROUP = 16  # a reader's unit: about 1 MB of JPEGs, so a worker reads little beyond its own batches


@dataclass(frozen=True)
class PackedSplit:
    section: str
    location: str | Path
    kind: str              # "encoded" (the files' bytes) or "tensor"
    rows: int
    shards: int
    written: int           # shards written now; the others were there already, unchanged
    shard_bytes: int       # all shards
    source_bytes: int      # the image files read (encoded), or the tensors' bytes
    seconds: float


@dataclass(frozen=True)
class PackResult:
    job_file: Path
    splits: list[PackedSplit]


def pack(job: str | Path | JobSpec, out: str | Path, *, rows_per_shard: int = 1000, job_out: str | Path | None = None,
         console: Console | None = None) -> PackResult:
    """Pack `job`'s [calibration] and [test] splits under `out` (a folder or a URI) and write a job
    file reading them (default: JOB.packed.toml beside the job). Returns what was written."""
    spec = job if isinstance(job, JobSpec) else load_spec(job)
    console = console or Console(stderr=True)
    if rows_per_shard < 1:
        raise SpecError(f"--rows-per-shard {rows_per_shard}: must be at least 1")
    for section in ("calibration", "test"):
        if getattr(spec, section).source == "parquet":
            raise SpecError(f"{spec.path}: [{section}] is already Parquet shards; copy its folder to move it "
                            "(e.g. `aws s3 sync`): shards are identified by content, not by location")
    root = Store(out, "--out")
    root.check_output(reuse=lambda names: _shards_only(root, names))  # a re-pack into its own folder is fine
    job_file = Path(job_out) if job_out else spec.path.with_name(f"{spec.path.stem}.packed.toml")
    if job_file.is_dir():
        raise SpecError(f"--job-out {job_file}: is a folder; give the job file to write, e.g. {job_file / 'job.toml'}")
    check_local_folder(job_file.resolve().parent, "--job-out")
    splits, packed = [], {}
    with make_progress(console) as progress:
        for section in ("calibration", "test"):
            d = getattr(spec, section)
            split = _pack_split(d, f"{spec.path}: [{section}]", root.child(section), rows_per_shard, progress, section)
            splits.append(split)
            packed[section] = DataSpec(source="parquet", root=split.location,
                                       transform=d.transform if split.kind == "encoded" else None,
                                       samples=d.samples, seed=d.seed, batch_size=d.batch_size, **d.scoring_keys())
    packed_spec = dataclasses.replace(spec, **packed)
    text = to_toml(packed_spec, header=f"Written by `quantray pack` from {spec.path.name}: its [calibration] and "
                                       f"[test] as Parquet shards under {root.location}.",
                   relative_to=job_file.resolve().parent)
    Store(job_file.resolve().parent, "--job-out").write(text.encode(), job_file.name)
    return PackResult(job_file, splits)


def _shards_only(root: Store, names: list[str]) -> bool:
    """Whether a folder holds nothing but what `quantray pack` writes (calibration/ and test/ shards)."""
    own = ("manifest.json", "part-", "index-")
    return set(names) <= {"calibration", "test"} and all(
        n.startswith(own) for split in names for n in root.names(split) if not n.startswith("."))


def _pack_split(d: DataSpec, where: str, store: Store, rows_per_shard: int, progress, section: str) -> PackedSplit:
    started = time.perf_counter()
    dataset = build_dataset(d, where)
    n = len(dataset)
    if n == 0:
        raise SpecError(f"{where} the split is empty: nothing to pack")
    kind, read = _reader(dataset, d, where)
    targets = _target_kind(dataset[0] if kind == "tensor" else (None, 0))
    _sweep_partial(store)
    present = store.sizes()  # shards written before, by this pack's input or a killed pack's
    per_group = min(ROWS_PER_GROUP, rows_per_shard)
    bar = progress.add_task(f"pack {section}", total=n)
    shards, index, labels, written, source_bytes = [], [], {}, 0, 0
    for start in range(0, n, rows_per_shard):
        rows = []
        for i in range(start, min(n, start + rows_per_shard)):
            sample_id, label, payload = read(i) if targets == "label" else _read_target(dataset, i, targets, where)
            row = {"index": i, "id": sample_id, "label": label, "image": payload, "sha256": sha256_bytes(payload)}
            if targets == "label":
                labels[label] = labels.get(label, 0) + 1
            else:  # the target's bytes go into the digests through sha256: a changed target rewrites its shard
                row["target"] = label
                row["label"] = None
                row["sha256"] = sha256_bytes(payload + (label or b""))
            rows.append(row)
            source_bytes += len(payload)
            progress.advance(bar)
        k = len(shards)
        index += [{"index": r["index"], "id": r["id"], "label": r["label"], "shard": k, "row": j, "sha256": r["sha256"]}
                  for j, r in enumerate(rows)]
        name = f"part-{k:05d}-{_rows_digest(kind, per_group, rows)}.parquet"  # the name says what it holds
        if name not in present:
            payload = _parquet(rows, SHARD_SCHEMA if targets == "label" else TARGET_SCHEMA, per_group, kind)
            store.write(payload, name)
            present[name] = len(payload)
            written += 1
        shards.append({"name": name, "rows": len(rows), "first_index": start, "bytes": present[name]})
    index_name = f"index-{digest([FORMAT, [s['name'] for s in shards]])[:16]}.parquet"  # the shards decide it
    if index_name not in present:
        store.write(_parquet(index, INDEX_SCHEMA, 1 << 20, kind), index_name)
    manifest = {"format": FORMAT if targets == "label" else FORMAT_TARGETS, "kind": kind,
                **({} if targets == "label" else {"targets": targets}),
                "transform": d.transform if kind == "encoded" else "none",
                "rows": n, "rows_per_group": per_group, "labels": {str(k): v for k, v in sorted(labels.items())},
                "classes": [str(c) for c in getattr(dataset, "classes", None) or []],
                "digest": digest([kind, [(r["index"], r["id"], r["label"], r["sha256"]) for r in index]]),
                "index": index_name, "shards": shards, "source": _source(d)}
    payload = json_bytes(manifest)
    if store.read("manifest.json") != payload:
        store.write(payload, "manifest.json")  # last: a reader that finds it finds every file it names
    named = {index_name, *(s["name"] for s in shards)}
    for old in present:  # shards and index files the new manifest does not name
        if old.endswith(".parquet") and old.startswith(("part-", "index-")) and old not in named:
            store.delete_file(old)
    return PackedSplit(section, store.location, kind, n, len(shards), written, sum(s["bytes"] for s in shards),
                       source_bytes, round(time.perf_counter() - started, 3))


def _reader(dataset, d: DataSpec, where: str):
    """(kind, read): read(i) gives sample i's (id, label, stored bytes). Image files are stored as
    they are when decoding the first one gives exactly the dataset's own tensor and label."""
    first = sample_file(dataset, 0)
    labels = _labels(dataset)
    if first is not None and os.path.isfile(first) and d.transform is not None:
        x, y = dataset[0]
        stored = decode(Path(first).read_bytes(), "encoded", make_transform(d.transform))
        if isinstance(x, torch.Tensor) and torch.equal(stored, x) and (labels is None or labels[0] == int(y)):
            root = str(d.root) if d.root is not None else os.path.dirname(first)

            def read_file(i):
                path = sample_file(dataset, i)
                label = labels[i] if labels is not None else int(dataset[i][1])
                return os.path.relpath(path, root), label, Path(path).read_bytes()

            return "encoded", read_file

    def read_tensor(i):
        x, y = dataset[i]
        if not isinstance(x, torch.Tensor):
            raise SpecError(f"{where} sample {i} is a {type(x).__name__}, not a tensor: give the split a transform "
                            "(e.g. transform = \"to_tensor\") so it can be packed")
        return str(i), int(y), _npy(x)

    return "tensor", read_tensor


def _target_kind(sample) -> str:
    """"label" (an integer class), "tensor" or "none", as the first sample has its target."""
    if isinstance(sample, torch.Tensor) or (isinstance(sample, (tuple, list)) and (len(sample) == 1 or sample[1] is None)):
        return "none"
    y = sample[1]
    if isinstance(y, torch.Tensor) and (y.dim() > 0 or y.dtype.is_floating_point):
        return "tensor"
    return "label"


def _read_target(dataset, i: int, targets: str, where: str) -> tuple[str, bytes | None, bytes]:
    """Sample i of a split whose targets are tensors or absent: (id, target .npy bytes or None, input .npy bytes)."""
    sample = dataset[i]
    x = sample if isinstance(sample, torch.Tensor) else sample[0]
    y = None if isinstance(sample, torch.Tensor) or len(sample) == 1 else sample[1]
    if not isinstance(x, torch.Tensor):
        raise SpecError(f"{where} sample {i} is a {type(x).__name__}, not a tensor: give the split a transform "
                        "(e.g. transform = \"to_tensor\") so it can be packed")
    if (targets == "none") != (y is None) or (y is not None and not isinstance(y, torch.Tensor)):
        found = "no target" if y is None else f"a {type(y).__name__} target"
        raise SpecError(f"{where} sample {i} has {found}, where sample 0's target is "
                        f"{'absent' if targets == 'none' else 'a tensor'}: every sample of a split needs the same kind")
    return str(i), None if y is None else _npy(y), _npy(x)


def _npy(t: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, t.detach().cpu().contiguous().numpy(), allow_pickle=False)
    return buffer.getvalue()


def _labels(dataset) -> list[int] | None:
    """Every sample's label without decoding an image, where the dataset keeps them (ImageFolder's
    targets, Flowers102's _labels)."""
    for attr in ("targets", "_labels"):
        values = getattr(dataset, attr, None)
        if isinstance(values, (list, tuple)) and len(values) == len(dataset):
            return [int(v) for v in values]
    return None


def _rows_digest(kind: str, per_group: int, rows: list[dict]) -> str:
    return digest([FORMAT, kind, per_group, [(r["index"], r["id"], r["label"], r["sha256"]) for r in rows]])[:16]


def _parquet(rows: list[dict], schema: pa.Schema, per_group: int, kind: str) -> bytes:
    sink = io.BytesIO()
    compression = {name: "zstd" for name in schema.names}
    if "image" in compression and kind == "encoded":
        compression["image"] = "none"  # JPEG and PNG bytes are compressed already
    # No statistics or dictionary for the image bytes: min/max of each row group's images would go
    # into the footer every reader fetches.
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, row_group_size=per_group, compression=compression,
                   use_dictionary=["label"], write_statistics=[c for c in ("index", "label", "shard") if c in schema.names])
    return sink.getvalue()


def _sweep_partial(store: Store) -> None:
    """Temporary files a killed pack left (hidden names; no reader ever takes them)."""
    for name in store.names():
        if name.startswith(".") and ".tmp-" in name:
            store.delete_file(name)


def _source(d: DataSpec) -> dict:
    fields = {"source": d.source, "dataset": d.dataset, "root": None if d.root is None else str(d.root),
              "split": d.split, "factory": d.factory, "kwargs": d.kwargs, "transform": d.transform}
    return {k: v for k, v in fields.items() if v not in (None, {})}


def print_pack(console: Console, result: PackResult, command: str = "quantray run") -> None:
    """What `quantray pack` wrote, per split, and the job file to run."""
    from rich.table import Table

    table = Table(title="quantray pack")
    for column in ("split", "stored as", "samples", "shards", "new", "MB", "source MB", "img/s"):
        table.add_column(column, justify="left" if column in ("split", "stored as") else "right", no_wrap=True)
    for s in result.splits:
        table.add_row(s.section, "files" if s.kind == "encoded" else "tensors", str(s.rows), str(s.shards), str(s.written),
                      f"{s.shard_bytes / 1e6:.1f}", f"{s.source_bytes / 1e6:.1f}", f"{s.rows / max(s.seconds, 1e-9):.0f}")
    console.print(table)
    for s in result.splits:
        console.print(f"{s.section}: {s.location}")
    console.print(f"job file: {result.job_file}  (run it: {command} {result.job_file})")
