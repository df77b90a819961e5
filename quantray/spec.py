"""Job specs: frozen dataclasses, loaded strictly from TOML.

    spec = load_spec("jobs/digits.toml")

Everything is checked before any work starts: an unknown key, a wrong type, a missing file, an
unknown architecture, dataset class or backend raises `SpecError` with one line naming the file,
the key and what would be valid. Relative paths resolve against the job file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError

__all__ = ["JobSpec", "ModelSpec", "DataSpec", "QuantSpec", "RunSpec", "GateSpec", "load_spec", "parse_spec",
           "load_test_section", "to_toml"]

SOURCES = ("digits", "torchvision", "imagefolder", "factory", "parquet")
TRANSFORMS = ("imagenet_eval", "to_tensor", "none")
BACKENDS = ("x86", "qnnpack")
MODES = ("exact", "replay", "fast")
MAPPINGS = ("global", "default")
ACTIVATIONS = ("histogram", "minmax", "moving_average")
RANGES = ("l2", "minmax", "percentile", "mse", "entropy")  # quantray.ranges.METHODS
WEIGHTS = ("per_channel", "per_tensor")
DIGITS_SPLITS = ("train", "test", "all")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://")


@dataclass(frozen=True)
class ModelSpec:
    """A torchvision architecture by name, or a `module.path:function` factory; optional checkpoint.
    The model is built with torch's random generator seeded by `seed`, so a model without a
    checkpoint gets the same weights, and the same qparams, on every run."""

    arch: str | None = None
    num_classes: int | None = None
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    seed: int = 0


@dataclass(frozen=True)
class DataSpec:
    """One dataset (calibration or test) and how to draw samples and batches from it."""

    source: str = "digits"
    split: str | None = None
    dataset: str | None = None
    root: Path | str | None = None  # a folder; for source = "parquet" also a URI (s3://, gs://, file://), kept as given
    transform: str | None = None
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    download: bool = False
    verify: bool = True  # torchvision's own file checks (md5); false for a re-packed subset
    samples: int | None = None
    seed: int = 0
    batch_size: int = 32


@dataclass(frozen=True)
class QuantSpec:
    """Backend, merge mode and qconfig choices. `module_types` / `module_names` map a torch.nn class
    name / a module's qualified name to "fp32" (not quantized) or a table of the keys below
    ({activation = ..., activation_range = ..., percentile = ..., weight = ...}).

    `activation` is the observer kind, `activation_range` how a histogram's range is chosen
    (`quantray.ranges`); they must agree: minmax is both a kind and a range, the other ranges need
    the histogram, moving_average takes no range. Either alone decides the other."""

    backend: str = "x86"
    mode: str = "exact"
    mapping: str = "global"
    activation: str | None = None
    activation_range: str | None = None  # None: the observer's own (l2 for the backends' default histogram)
    percentile: float = 99.99            # for activation_range = "percentile": two-sided, (100 - p)th and pth
    weight: str | None = None
    module_types: dict = field(default_factory=dict)
    module_names: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    workers: int | None = None
    threads: int = 1
    max_attempts: int = 3
    cache: bool = True
    cache_dir: str | None = None  # a folder (relative to the job file) or a URI pyarrow.fs opens
    latency_warmup: int = 10
    latency_iters: int = 100       # at most this many timed calls per model (the article's method: exactly 100)
    latency_precision: float = 0.02  # stop once the 95% interval of the mean is within +-2% of it; 0: always latency_iters
    throughput_batch: int = 0      # 0: throughput from the evaluation's own timings; N: measured at batch N on the node
    layer_samples: int = 64  # test samples (whole batches, from the first) for per-layer SQNR; 0: none
    memory_gb: float | None = None  # per worker's resident memory, keeping pass-1 activations for pass 2; None: derived; 0: keep none


@dataclass(frozen=True)
class GateSpec:
    """What `quantray refresh` demands before promoting a run (accuracies as fractions, 0.01 = 1 pt)."""

    max_top1_drop: float = 0.01     # INT8 top-1 may trail FP32 top-1 by at most this
    max_regression: float = 0.005   # and the promoted model's INT8 top-1 by at most this


@dataclass(frozen=True)
class JobSpec:
    name: str
    path: Path
    model: ModelSpec
    calibration: DataSpec
    test: DataSpec
    quantization: QuantSpec = QuantSpec()
    run: RunSpec = RunSpec()
    gate: GateSpec = GateSpec()

    def to_dict(self) -> dict:
        """JSON-ready form (paths as strings), as recorded in the manifest."""
        return _jsonable(dataclasses.asdict(self))


_SECTIONS = {"model": ModelSpec, "calibration": DataSpec, "test": DataSpec,
             "quantization": QuantSpec, "run": RunSpec, "gate": GateSpec}


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job file. Raises SpecError (one line) on any problem."""
    path = Path(path)
    return parse_spec(_read_toml(path, "job file"), path)


def _read_toml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise SpecError(f"{path}: {what} not found")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None


def parse_spec(raw: dict, path: Path, base_dir: Path | None = None) -> JobSpec:
    """Validate an already-parsed TOML table; `base_dir` resolves relative paths (default: the file's folder)."""
    ctx = _Context(Path(path), Path(base_dir) if base_dir else Path(path).resolve().parent)
    valid_top = ["name", *_SECTIONS]
    for key in raw:
        if key not in valid_top:
            ctx.fail(None, key, f"unknown key{_suggest(key, valid_top)}; valid top-level keys: {', '.join(valid_top)}")
    for section in ("model", "calibration", "test"):
        if section not in raw:
            ctx.fail(None, section, f"missing section [{section}]; see jobs/digits.toml for an example")
    name = raw.get("name", ctx.path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        ctx.fail(None, "name", f"= {name!r}: must be a string of letters, digits, '_', '-' or '.'")
    built = {s: _build(cls, raw.get(s, {}), s, ctx) for s, cls in _SECTIONS.items()}
    _check_model(built["model"], ctx)
    for section in ("calibration", "test"):
        built[section] = _check_data(built[section], section, ctx)
    _check_quant(built["quantization"], ctx)
    built["run"] = _check_run(built["run"], ctx)
    for key in ("max_top1_drop", "max_regression"):
        if not 0 <= getattr(built["gate"], key) <= 1:
            ctx.fail("gate", key, f"= {getattr(built['gate'], key)}: a fraction of accuracy between 0 and 1 (0.01 = 1 point)")
    return JobSpec(name=name, path=ctx.path, **built)


def load_test_section(path: str | Path) -> DataSpec:
    """The [test] section of another TOML file (`quantray evaluate --data`), checked as strictly
    as a job's; relative paths resolve against that file's folder."""
    path = Path(path)
    raw = _read_toml(path, "data file")
    ctx = _Context(path, path.resolve().parent)
    if "test" not in raw:
        ctx.fail(None, "test", "missing section [test]: --data takes a file with a [test] table, as in a job file")
    return _check_data(_build(DataSpec, raw["test"], "test", ctx), "test", ctx)


class _Context:
    def __init__(self, path: Path, base_dir: Path):
        self.path, self.base_dir = path, base_dir

    def fail(self, section: str | None, key: str, message: str) -> typing.NoReturn:
        where = f"[{section}] {key}" if section else key
        raise SpecError(f"{self.path}: {where} {message}")


def _build(cls, table, section: str, ctx: _Context):
    if not isinstance(table, dict):
        ctx.fail(None, section, "must be a table, e.g. [" + section + "]")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in table.items():
        if key not in names:
            ctx.fail(section, key, f"unknown key{_suggest(key, names)}; valid keys: {', '.join(names)}")
        values[key] = _coerce(value, hints[key], section, key, ctx)
    return cls(**values)


def _coerce(value, hint, section: str, key: str, ctx: _Context):
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in allowed:
        if t is type(None):
            continue
        if t is Path and isinstance(value, str):
            if _URI.match(value):  # a URI stays as given: a Path would fold its '//' into '/'
                return value
            p = Path(value).expanduser()
            return p if p.is_absolute() else (ctx.base_dir / p).resolve()
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t in (str, bool, dict) and isinstance(value, t):
            return value
    wanted = " or ".join("a path string" if t is Path else f"a {t.__name__}" for t in allowed if t is not type(None))
    ctx.fail(section, key, f"= {value!r}: wrong type ({type(value).__name__}); expected {wanted}")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_model(m: ModelSpec, ctx: _Context) -> None:
    if (m.arch is None) == (m.factory is None):
        ctx.fail("model", "arch", "/ factory: give exactly one: arch = \"resnet18\" (torchvision) "
                                  "or factory = \"package.module:function\"")
    if m.arch is not None:
        import torchvision
        archs = torchvision.models.list_models()
        if m.arch not in archs:
            ctx.fail("model", "arch", f"= {m.arch!r}: unknown torchvision architecture{_suggest(m.arch, archs)}; "
                                      f"valid: any name in torchvision.models.list_models() ({len(archs)} names, "
                                      f"e.g. resnet18, resnet50, mobilenet_v3_large)")
    if m.factory is not None and not _FACTORY.match(m.factory):
        ctx.fail("model", "factory", f"= {m.factory!r}: expected \"package.module:function\"")
    if m.num_classes is not None and m.num_classes < 1:
        ctx.fail("model", "num_classes", f"= {m.num_classes}: must be at least 1")
    if isinstance(m.checkpoint, str):
        ctx.fail("model", "checkpoint", f"= {m.checkpoint!r}: a file on the driver's disk, not a URI (the driver "
                                        "ships the model to the workers); download it first")
    if m.checkpoint is not None and not m.checkpoint.is_file():
        ctx.fail("model", "checkpoint", f"= {str(m.checkpoint)!r}: file not found (paths are relative to the job file)")


def _check_data(d: DataSpec, section: str, ctx: _Context) -> DataSpec:
    if d.source not in SOURCES:
        ctx.fail(section, "source", f"= {d.source!r}: unknown source{_suggest(d.source, SOURCES)}; valid: {', '.join(SOURCES)}")
    uses = {"digits": {"split"},
            "torchvision": {"dataset", "root", "split", "transform", "kwargs", "download", "verify"},
            "imagefolder": {"root", "transform"},
            "factory": {"factory", "split", "kwargs"},
            "parquet": {"root", "transform"}}[d.source]
    defaults = {f.name: f.default for f in dataclasses.fields(DataSpec)}
    for key in ("split", "dataset", "root", "transform", "factory", "download", "verify"):
        if getattr(d, key) != defaults[key] and key not in uses:
            ctx.fail(section, key, f"is not used by source = {d.source!r}; keys it takes: {', '.join(sorted(uses))}")
    if d.kwargs and "kwargs" not in uses:
        ctx.fail(section, "kwargs", f"is not used by source = {d.source!r}")
    if d.source == "digits":
        split = d.split or ("train" if section == "calibration" else "test")
        if split not in DIGITS_SPLITS:
            ctx.fail(section, "split", f"= {split!r}: digits splits are {', '.join(DIGITS_SPLITS)}")
        d = dataclasses.replace(d, split=split)
    if d.source == "torchvision":
        if d.dataset is None:
            ctx.fail(section, "dataset", "is required for source = \"torchvision\" (a class in torchvision.datasets, e.g. \"Flowers102\")")
        import torch.utils.data
        import torchvision.datasets
        cls = getattr(torchvision.datasets, d.dataset, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.utils.data.Dataset)):
            names = [n for n in dir(torchvision.datasets) if isinstance(getattr(torchvision.datasets, n), type)]
            ctx.fail(section, "dataset", f"= {d.dataset!r}: not a dataset class in torchvision.datasets"
                                         f"{_suggest(d.dataset, names)}; e.g. Flowers102, CIFAR10, ImageNet")
    if isinstance(d.root, str) and d.source != "parquet":
        ctx.fail(section, "root", f"= {d.root!r}: source = {d.source!r} reads a folder on every worker's disk; for data "
                                  "in object storage pack it (`quantray pack`) and use source = \"parquet\"")
    if d.source == "parquet":
        if d.root is None:
            ctx.fail(section, "root", "is required for source = \"parquet\" (a folder or URI written by `quantray pack`, "
                                      "e.g. s3://bucket/flowers/test)")
        if isinstance(d.root, Path) and not (d.root / "manifest.json").is_file():
            ctx.fail(section, "root", f"= {str(d.root)!r}: no manifest.json there; write the shards with "
                                      "`quantray pack JOB.toml --out DIR` and point root at DIR/calibration or DIR/test")
        if d.transform is not None and d.transform not in TRANSFORMS:
            ctx.fail(section, "transform", f"= {d.transform!r}: unknown preset{_suggest(d.transform, TRANSFORMS)}; "
                                           f"valid: {', '.join(TRANSFORMS)}")
    if d.source in ("torchvision", "imagefolder"):
        takes_root = d.source == "imagefolder" or "root" in inspect.signature(cls).parameters
        if takes_root and d.root is None:
            ctx.fail(section, "root", f"is required for source = {d.source!r} (the dataset's folder)")
        if takes_root and not d.download and not d.root.is_dir():
            hint = " (or set download = true on a machine with internet)" if d.source == "torchvision" else ""
            ctx.fail(section, "root", f"= {str(d.root)!r}: folder not found{hint}")
        transform = d.transform or "imagenet_eval"
        if transform not in TRANSFORMS:
            ctx.fail(section, "transform", f"= {transform!r}: unknown preset{_suggest(transform, TRANSFORMS)}; valid: {', '.join(TRANSFORMS)}")
        d = dataclasses.replace(d, transform=transform)
    if d.source == "factory" and (d.factory is None or not _FACTORY.match(d.factory)):
        ctx.fail(section, "factory", f"= {d.factory!r}: expected \"package.module:function\" returning a torch Dataset")
    if d.samples is not None and d.samples < 1:
        ctx.fail(section, "samples", f"= {d.samples}: must be at least 1 (leave it out to use the whole split)")
    if d.batch_size < 1:
        ctx.fail(section, "batch_size", f"= {d.batch_size}: must be at least 1")
    return d


def _check_quant(q: QuantSpec, ctx: _Context) -> None:
    for key, valid in (("backend", BACKENDS), ("mode", MODES), ("mapping", MAPPINGS)):
        value = getattr(q, key)
        if value is not None and value not in valid:
            ctx.fail("quantization", key, f"= {value!r}: unknown {key}{_suggest(value, valid)}; valid: {', '.join(valid)}")
    _check_choice({"activation": q.activation, "activation_range": q.activation_range, "percentile": q.percentile,
                   "weight": q.weight}, "", ctx)
    import torch.nn

    for table in ("module_types", "module_names"):
        for name, value in getattr(q, table).items():
            key = f"{table}.{name}"
            if table == "module_types" and not (isinstance(getattr(torch.nn, name, None), type)
                                                and issubclass(getattr(torch.nn, name), torch.nn.Module)):
                classes = [n for n in dir(torch.nn) if isinstance(getattr(torch.nn, n), type)]
                ctx.fail("quantization", key, f": not a torch.nn module class{_suggest(name, classes)}; e.g. Conv2d, Linear")
            if value == "fp32":
                continue
            if not isinstance(value, dict):
                ctx.fail("quantization", key, f"= {value!r}: expected \"fp32\" or a table {{ activation = ..., weight = ... }}")
            _check_choice(value, f"{key}.", ctx)


_CHOICE_KEYS = {"activation": ACTIVATIONS, "activation_range": RANGES, "percentile": None, "weight": WEIGHTS}


def _check_choice(choice: dict, prefix: str, ctx: _Context) -> None:
    """One qconfig choice (the global keys, or a module table): known keys and values, and an
    observer kind and range method that agree."""
    for sub, value in choice.items():
        if sub not in _CHOICE_KEYS:
            ctx.fail("quantization", f"{prefix}{sub}", f"unknown key{_suggest(sub, _CHOICE_KEYS)}; valid keys: "
                                                       f"{', '.join(_CHOICE_KEYS)}")
        valid = _CHOICE_KEYS[sub]
        if sub == "percentile":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 50 < value <= 100:
                ctx.fail("quantization", f"{prefix}{sub}", f"= {value!r}: a percentile above 50 and at most 100 "
                                                           "(99.99 clips 0.01% of values at each end)")
        elif value is not None and value not in valid:
            ctx.fail("quantization", f"{prefix}{sub}", f"= {value!r}: unknown {sub}{_suggest(str(value), valid)}; "
                                                       f"valid: {', '.join(valid)}")
    kind, method = choice.get("activation"), choice.get("activation_range")
    if kind is None or method is None:
        return
    agree = {"histogram": ("l2", "percentile", "mse", "entropy"), "minmax": ("minmax",), "moving_average": ()}[kind]
    if method not in agree:
        fix = ('activation = "histogram" (or leave activation out)' if method != "minmax"
               else 'activation = "minmax" (or leave activation out)')
        ctx.fail("quantization", f"{prefix}activation_range", f"= {method!r} contradicts {prefix}activation = {kind!r}: "
                                                              f"{method} needs {fix}")


def _check_run(r: RunSpec, ctx: _Context) -> RunSpec:
    for key, low in (("workers", 1), ("threads", 1), ("max_attempts", 1), ("latency_warmup", 0), ("latency_iters", 1),
                     ("throughput_batch", 0), ("layer_samples", 0), ("latency_precision", 0), ("memory_gb", 0)):
        value = getattr(r, key)
        if value is not None and value < low:
            ctx.fail("run", key, f"= {value}: must be at least {low}")
    if r.latency_precision >= 1:
        ctx.fail("run", "latency_precision", f"= {r.latency_precision}: a fraction of the mean (0.02 = +-2%), below 1")
    if r.cache_dir is not None:
        location = r.cache_dir
        if not location.strip():
            ctx.fail("run", "cache_dir", "= '': give a folder or a URI (s3://bucket/prefix), or leave it out")
        if "://" in location:  # a URI stays as given: a Path would fold its '//' into '/'
            if not _URI.match(location):
                ctx.fail("run", "cache_dir", f"= {location!r}: not a URI (scheme://...) nor a folder")
        else:
            p = Path(location).expanduser()
            r = dataclasses.replace(r, cache_dir=str(p if p.is_absolute() else (ctx.base_dir / p).resolve()))
    return r


def to_toml(spec: JobSpec, *, header: str = "", relative_to: Path | None = None) -> str:
    """A job file that loads back as `spec`: every value that differs from its default. Paths are
    absolute, as loaded, or relative to `relative_to` (the folder the file will be written to)."""
    import os

    def path(p: Path) -> str:
        return os.path.relpath(p, relative_to) if relative_to is not None else str(p)

    lines = [f"# {header}"] if header else []
    lines += [f"name = {_toml(spec.name)}", ""]
    for section in _SECTIONS:
        value = getattr(spec, section)
        lines.append(f"[{section}]")
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if v is not None and v != default:
                lines.append(f"{f.name} = {_toml(path(v) if isinstance(v, Path) else v)}")
        lines.append("")
    return "\n".join(lines)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml(k)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj
