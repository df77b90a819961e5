"""The run directory's contract: its files' schemas and reading a run back (as bytes: the INT8
model is rebuilt by `api.load_quantized`).

Layout (a contract other tools rely on):
    manifest.json        spec, versions, workers, shard map, stage timings, sha256 of every file
    job.toml             the job file as given
    model_int8.pth       INT8 state_dict, loadable with the seed's prepare/convert/load_state_dict (FX)
    model_int8.pt        TorchScript of the INT8 model (torch.jit.load, no quantray needed) (FX)
    model_int8.pt2       flow = "pt2e" instead of the two above: the exported INT8 program, batch
                         size dynamic (torch.export.load after `import torchao`, no quantray needed)
    qparams.parquet      one row per activation observer
    metrics.json         fp32/int8 top1, top5 (95% CIs), latency_ms, size_mb; agreement, logit SQNR,
                         per-class accuracy, INT8 confusion matrix, speed and its conditions, worst layers
    predictions.parquet  one row per test sample: label, top-1, top-5 and margin of both models
    layers.parquet       one row per quantized layer: SQNR of its INT8 output against FP32, and of the
                         engine's output against the reference quantization on the same input
    report.html          one self-contained page with the tables and plots (no network needed)

A run directory is a local path or a URI (`store.Store`); it is written by `store.StagedDir`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from ..digest import sha256_bytes
from ..errors import SpecError, first_line
from ..version import __version__
from .store import Store

__all__ = ["RunFiles", "software_versions",
           "QPARAMS_SCHEMA", "PREDICTIONS_SCHEMA", "LAYERS_SCHEMA"]

QPARAMS_SCHEMA = pa.schema([
    ("name", pa.string()), ("aliases", pa.list_(pa.string())), ("observer", pa.string()), ("dtype", pa.string()),
    ("min", pa.float64()), ("max", pa.float64()), ("range_method", pa.string()),
    ("scale", pa.float64()), ("zero_point", pa.int64()),
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
    ("sqnr_db", pa.float64()), ("engine_sqnr_db", pa.float64()), ("engine_fault", pa.bool_()),
])


class RunFiles:
    """A finished run directory (a local path or a URI), read through its manifest."""

    def __init__(self, location: str | Path, what: str = "RUN_DIR"):
        self.store = Store(location, what)
        self.location = self.store.location
        try:
            payload = self.store.read("manifest.json")
        except OSError as e:  # on an object store: no such bucket, no endpoint, no credentials
            raise SpecError(f"{location}: cannot read the run there ({first_line(e)}); check the URI, the "
                            "credentials and the endpoint") from None
        if payload is None:
            raise SpecError(f"{location}: not a quantray run directory (no manifest.json)")
        self.manifest = json.loads(payload)
        self._verified: dict[str, bytes] = {}  # what verify() read and checked: not read again

    def read(self, name: str, verify: bool = True) -> bytes:
        """A file of the run; with `verify`, its sha256 must be the one manifest.json recorded."""
        if name in self._verified:
            return self._verified[name]
        payload = self.store.read(name)
        if verify and (payload is None or sha256_bytes(payload) != self.manifest["files"].get(name)):
            raise SpecError(f"{self.store.where(name)}: missing or changed since the run (sha256 differs from "
                            "manifest.json); the run cannot be used as it was")
        if payload is None:
            raise SpecError(f"{self.store.where(name)}: missing")
        return payload

    def json(self, name: str) -> dict:
        return json.loads(self.read(name, verify=False))

    def verify(self) -> "RunFiles":
        """Every file manifest.json lists, checked against its sha256 (not only the model files):
        a SpecError naming the first file that is missing or differs. Returns self."""
        for name, expected in sorted(self.manifest.get("files", {}).items()):
            payload = self.store.read(name)
            if payload is None:
                raise SpecError(f"{self.store.where(name)}: missing, though manifest.json lists it; the run cannot be "
                                "used as it was (copy it whole again, or run the job again)")
            if sha256_bytes(payload) != expected:
                raise SpecError(f"{self.store.where(name)}: changed since the run ({len(payload)} bytes, sha256 "
                                f"{sha256_bytes(payload)[:16]} where manifest.json says {expected[:16]}); the run "
                                "cannot be used as it was (copy it whole again, or run the job again)")
            self._verified[name] = payload
        return self


def software_versions() -> dict:
    """What produced a run, for its manifest."""
    import importlib.metadata
    import platform

    import torch

    # Ray's version from its package metadata: reading a run needs no Ray import.
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _torchvision_version(), "ray": importlib.metadata.version("ray"), "pyarrow": pa.__version__,
            "torchao": _installed("torchao"), "quantray": __version__, "machine": platform.machine()}


def _torchvision_version() -> str:
    """torchvision.__version__ (with its build, e.g. 0.29.1+cu130, which its package metadata lacks),
    read from its version.py where it is not imported yet: importing torchvision costs 3-5 s (it
    loads torch._dynamo), which a job that never uses it would pay for this one string."""
    import re
    import sys

    if "torchvision" not in sys.modules:
        import importlib.util

        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.origin is not None:
            found = re.search(r"^__version__ = '([^']+)'$", (Path(spec.origin).parent / "version.py").read_text(), re.M)
            if found:
                return found.group(1)
    import torchvision

    return torchvision.__version__


def _installed(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
