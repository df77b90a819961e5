"""The run directory: staged writes committed by one rename, the manifest, loading a model back.

Layout (a contract other tools rely on):
    manifest.json        spec, versions, workers, shard map, stage timings, sha256 of every file
    job.toml             the job file as given
    model_int8.pth       INT8 state_dict, loadable with the seed's prepare/convert/load_state_dict
    model_int8.pt        TorchScript of the INT8 model (torch.jit.load, no quantray needed)
    qparams.parquet      one row per activation observer
    metrics.json         fp32/int8 top1, top5 (95% CIs), latency_ms, size_mb; agreement, logit SQNR,
                         per-class accuracy, INT8 confusion matrix, speed and its conditions, worst layers
    predictions.parquet  one row per test sample: label, top-1, top-5 and margin of both models
    layers.parquet       one row per quantized layer: SQNR of its INT8 output against FP32
    report.html          one self-contained page with the tables and plots (no network needed)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import __version__
from .errors import QuantrayError, SpecError

__all__ = ["RunDir", "load_quantized", "read_manifest", "sha256_file", "sha256_bytes", "software_versions",
           "QPARAMS_SCHEMA", "PREDICTIONS_SCHEMA", "LAYERS_SCHEMA"]

QPARAMS_SCHEMA = pa.schema([
    ("name", pa.string()), ("aliases", pa.list_(pa.string())), ("observer", pa.string()), ("dtype", pa.string()),
    ("min", pa.float64()), ("max", pa.float64()), ("scale", pa.float64()), ("zero_point", pa.int64()),
    ("count", pa.int64()),
])
PREDICTIONS_SCHEMA = pa.schema([
    ("index", pa.int64()), ("label", pa.int64()), ("fp32_pred", pa.int64()), ("int8_pred", pa.int64()),
    ("fp32_top5", pa.list_(pa.int64())), ("int8_top5", pa.list_(pa.int64())),
    ("fp32_margin", pa.float64()), ("int8_margin", pa.float64()),
])


LAYERS_SCHEMA = pa.schema([
    ("position", pa.int64()), ("layer", pa.string()), ("module", pa.string()), ("fp32_type", pa.string()),
    ("int8_type", pa.string()), ("quantized", pa.bool_()), ("samples", pa.int64()), ("signal", pa.float64()), ("noise", pa.float64()),
    ("sqnr_db", pa.float64()),
])


class RunDir:
    """Files are written into a staging folder and appear at `final` only when `commit` runs.

    `final` is a local path (staging beside it, renamed into place: atomic) or a URI that
    pyarrow.fs understands, e.g. s3://bucket/prefix (staged in a local temporary folder, uploaded
    with manifest.json last: a reader that finds manifest.json finds every file it lists). A run
    that fails or is killed never leaves a half-written local `final`; `abort` (or leaving the
    `with` block on an exception) removes the staging folder.
    """

    def __init__(self, final: str | Path):
        self.fs = None
        if "://" in str(final):
            import pyarrow.fs as pafs

            try:
                self.fs, self._remote = pafs.FileSystem.from_uri(str(final))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
                raise SpecError(f"--out {final}: not a location pyarrow.fs can write ({e})") from None
            if self.fs.get_file_info(pafs.FileSelector(self._remote, allow_not_found=True)):
                raise SpecError(f"--out {final}: already exists and is not empty; choose another --out")
            self.final = str(final)
            self.staging = Path(tempfile.mkdtemp(prefix="quantray-run-"))
            return
        self.final = Path(final).absolute()
        if self.final.exists() and not (self.final.is_dir() and not any(self.final.iterdir())):
            raise SpecError(f"--out {self.final}: already exists and is not empty; choose another --out or remove it")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_bytes(self, name: str, payload: bytes) -> Path:
        self.path(name).write_bytes(payload)
        return self.path(name)

    def write_json(self, name: str, obj) -> Path:
        return self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_parquet(self, name: str, rows: list[dict], schema: pa.Schema) -> Path:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), self.path(name))
        return self.path(name)

    def commit(self, manifest: dict) -> Path:
        """Record every file's sha256 in manifest.json, then rename the folder into place."""
        manifest = dict(manifest, files={p.name: sha256_file(p) for p in sorted(self.staging.iterdir())})
        self.write_json("manifest.json", manifest)
        if self.fs is not None:
            self.fs.create_dir(self._remote)
            for name in [*sorted(manifest["files"]), "manifest.json"]:  # the manifest last
                with self.fs.open_output_stream(f"{self._remote}/{name}") as out:
                    out.write(self.path(name).read_bytes())
            self.abort()
            return self.final
        os.chmod(self.staging, 0o755)  # mkdtemp makes it 0700
        os.rename(self.staging, self.final)  # atomic; replaces an empty folder given as --out
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def software_versions() -> dict:
    """What produced a run, for its manifest."""
    import platform

    import ray
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "ray": ray.__version__, "pyarrow": pa.__version__,
            "quantray": __version__, "machine": platform.machine()}


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise SpecError(f"{run_dir}: not a quantray run directory (no manifest.json)")
    return json.loads(path.read_text())


def load_quantized(run_dir: str | Path) -> torch.nn.Module:
    """The INT8 model of a run, rebuilt with the seed's recipe: FP32 model, prepare_fx, convert_fx,
    load_state_dict(model_int8.pth). The FP32 model's factory or checkpoint must be reachable."""
    from .calibration import rebuild_int8
    from .models import build_model
    from .spec import ModelSpec, QuantSpec

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    weights = run_dir / "model_int8.pth"
    if sha256_file(weights) != manifest["files"]["model_int8.pth"]:
        raise QuantrayError(f"{weights}: sha256 differs from the manifest's; the file was changed or truncated")
    model_spec = dict(manifest["spec"]["model"])
    if model_spec["checkpoint"] is not None:
        model_spec["checkpoint"] = Path(model_spec["checkpoint"])
    fp32 = build_model(ModelSpec(**model_spec), job_path=manifest["job"]["path"])
    quant = QuantSpec(**manifest["spec"]["quantization"])
    return rebuild_int8(fp32, quant, torch.zeros(manifest["input_shape"]),
                        torch.load(weights, map_location="cpu", weights_only=True))
