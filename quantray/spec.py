"""Job specs: frozen dataclasses that check themselves, loaded strictly from TOML.

    spec = load_spec("jobs/digits.toml")                       # from a file
    spec = dataclasses.replace(spec, test=DataSpec(samples=64))  # or in Python: checked the same way

Every spec checks its values when it is constructed (`__post_init__`): an unknown source, a wrong
type, a missing file, a bad range raises `SpecError` with one line naming the key and what would be
valid. Parsing a file adds only what a file knows: unknown keys, the file and section in each
line, and paths resolved against the job file's folder. What needs torch to check (a torchvision
architecture or dataset class, a torch.nn module class) is checked where the model and data are
built (`models`, `data`, `flow`), before any work starts: this module imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError

__all__ = ["JobSpec", "ModelSpec", "DataSpec", "QuantSpec", "RunSpec", "GateSpec", "FieldError", "TASKS", "load_spec",
           "parse_spec", "load_test_section", "to_toml", "suggest"]

SOURCES = ("digits", "torchvision", "imagefolder", "factory", "parquet")
TRANSFORMS = ("imagenet_eval", "to_tensor", "none")          # inputs.transforms.PRESETS (a test pins them)
BACKENDS = ("x86", "qnnpack")
MODES = ("exact", "replay", "fast")                          # core.modes.MODES (a test pins them)
MAPPINGS = ("global", "default")
FLOWS = ("fx", "pt2e")                                       # core.flow (FX graph mode) and core.pt2e
ACTIVATIONS = ("histogram", "minmax", "moving_average")      # core.flow.ACTIVATION_OBSERVERS (pinned too)
RANGES = ("l2", "minmax", "percentile", "mse", "entropy")    # core.ranges.METHODS (a test pins them)
WEIGHTS = ("per_channel", "per_tensor")                      # core.flow.WEIGHT_OBSERVERS (pinned too)
DIGITS_SPLITS = ("train", "test", "all")
TASKS = ("classification", "regression", "segmentation", "multilabel", "agreement")  # core.metrics.TASKS (pinned)
FRACTION_TASKS = ("classification", "segmentation", "multilabel")  # headline a fraction: top-1, mIoU, F1 (pinned)
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://")


class FieldError(SpecError):
    """One spec value is wrong: `key` and what is wrong with it (`detail`, e.g. "= 0: must be at
    least 1"). Built in Python it reads "[run] threads = 0: ..."; from a file, the parser puts the
    file and the section in front instead."""

    def __init__(self, owner: str, key: str, detail: str):
        self.owner, self.key, self.detail = owner, key, detail
        super().__init__(f"{owner} {key} {detail}" if owner else f"{key} {detail}")


def suggest(word: str, options) -> str:
    """' (did you mean X?)' for the option closest to `word`, or ''."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_types(spec) -> None:
    """Each field holds a value of its declared type. Ints pass for floats (stored as float); a
    string passes for a Path (a URI stays a string where the field allows one; a path is expanded)."""
    owner = spec._OWNER
    hints = typing.get_type_hints(type(spec))
    for f in dataclasses.fields(spec):
        value, hint = getattr(spec, f.name), hints[f.name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None and type(None) in allowed:
            continue
        if Path in allowed and isinstance(value, (str, Path)):
            if isinstance(value, str) and _URI.match(value) and str in allowed:
                continue  # a URI stays as given: a Path would fold its '//' into '/'
            if isinstance(value, str) and not _URI.match(value):
                object.__setattr__(spec, f.name, Path(value).expanduser())
            if isinstance(getattr(spec, f.name), Path):
                continue
        elif float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
            object.__setattr__(spec, f.name, float(value))
            continue
        elif int in allowed and isinstance(value, int) and not isinstance(value, bool):
            continue
        elif any(t in (str, bool, dict) and isinstance(value, t) for t in allowed):
            continue
        wanted = " or ".join("a path string" if t is Path else f"a {t.__name__}" for t in allowed if t is not type(None))
        raise FieldError(owner, f.name, f"= {value!r}: wrong type ({type(value).__name__}); expected {wanted}")


def _at_least(spec, bounds: dict[str, float]) -> None:
    for key, low in bounds.items():
        value = getattr(spec, key)
        if value is not None and value < low:
            raise FieldError(spec._OWNER, key, f"= {value}: must be at least {low}")


@dataclass(frozen=True)
class ModelSpec:
    """A torchvision architecture by name, or a `module.path:function` factory; optional checkpoint.
    The model is built with torch's random generator seeded by `seed`, so a model without a
    checkpoint gets the same weights, and the same qparams, on every run. (Whether `arch` names a
    torchvision architecture is checked by `models.check_model`.)"""

    _OWNER: typing.ClassVar[str] = "[model]"

    arch: str | None = None
    num_classes: int | None = None
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    checkpoint: Path | str | None = None
    seed: int = 0

    def __post_init__(self):
        _check_types(self)
        fail = lambda key, detail: FieldError(self._OWNER, key, detail)  # noqa: E731
        if (self.arch is None) == (self.factory is None):
            raise fail("arch", "/ factory: give exactly one: arch = \"resnet18\" (torchvision) "
                               "or factory = \"package.module:function\"")
        if self.factory is not None and not _FACTORY.match(self.factory):
            raise fail("factory", f"= {self.factory!r}: expected \"package.module:function\"")
        _at_least(self, {"num_classes": 1})
        if isinstance(self.checkpoint, str):
            raise fail("checkpoint", f"= {self.checkpoint!r}: a file on the driver's disk, not a URI (the driver "
                                     "ships the model to the workers); download it first")
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise fail("checkpoint", f"= {str(self.checkpoint)!r}: file not found (paths are relative to the job file)")


# The keys each source reads, besides samples, seed and batch_size.
_SOURCE_KEYS = {"digits": {"split"},
                "torchvision": {"dataset", "root", "split", "transform", "kwargs", "download", "verify"},
                "imagefolder": {"root", "transform"},
                "factory": {"factory", "split", "kwargs"},
                "parquet": {"root", "transform"}}


@dataclass(frozen=True)
class DataSpec:
    """One dataset (calibration or test) and how to draw samples and batches from it. `split` left
    out means the section's own (digits: train for calibration, test for test: `for_section`). (A
    torchvision dataset class is checked by `data.check_data`.)"""

    _OWNER: typing.ClassVar[str] = "DataSpec"

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
    # [test] only: what the outputs are scored as (core.metrics). None: classification.
    task: str | None = None
    metric: str | None = None          # "package.module:Factory": the user's metric object instead of a task's
    metric_kwargs: dict = field(default_factory=dict)
    output: str | None = None          # which named output a built-in task scores (core.outputs); None: the first
    threshold: float = 0.5             # multilabel: a label is on where sigmoid(output) >= threshold
    ignore_index: int = 255            # segmentation: mask value left out of every figure

    def __post_init__(self):
        _check_types(self)
        self._check_task()
        if self.source not in SOURCES:
            raise self._fail("source", f"= {self.source!r}: unknown source{suggest(self.source, SOURCES)}; "
                                       f"valid: {', '.join(SOURCES)}")
        uses = _SOURCE_KEYS[self.source]
        defaults = {f.name: f.default for f in dataclasses.fields(DataSpec) if f.name != "kwargs"}
        for key in ("split", "dataset", "root", "transform", "factory", "download", "verify"):
            if getattr(self, key) != defaults[key] and key not in uses:
                raise self._fail(key, f"is not used by source = {self.source!r}; keys it takes: {', '.join(sorted(uses))}")
        if self.kwargs and "kwargs" not in uses:
            raise self._fail("kwargs", f"is not used by source = {self.source!r}")
        if isinstance(self.root, str) and self.source != "parquet":
            raise self._fail("root", f"= {self.root!r}: source = {self.source!r} reads a folder on every worker's disk; "
                                     "for data in object storage pack it (`quantray pack`) and use source = \"parquet\"")
        getattr(self, f"_check_{self.source}")()
        if self.transform is not None and self.transform not in TRANSFORMS:
            raise self._fail("transform", f"= {self.transform!r}: unknown preset{suggest(self.transform, TRANSFORMS)}; "
                                          f"valid: {', '.join(TRANSFORMS)}")
        if self.samples is not None and self.samples < 1:
            raise self._fail("samples", f"= {self.samples}: must be at least 1 (leave it out to use the whole split)")
        _at_least(self, {"batch_size": 1})

    def _fail(self, key: str, detail: str) -> FieldError:
        return FieldError(self._OWNER, key, detail)

    @property
    def task_name(self) -> str:
        """What the section is scored as: its task, "custom" for a user's metric, else classification."""
        return "custom" if self.metric is not None else self.task or "classification"

    @property
    def headline_is_fraction(self) -> bool:
        """Whether the task's headline is a fraction (limits then in points on the command line)."""
        return self.task_name in FRACTION_TASKS

    def scoring_keys(self) -> dict:
        """The task keys given (not at their defaults): [calibration] must give none."""
        defaults = {"task": None, "metric": None, "metric_kwargs": {}, "output": None, "threshold": 0.5, "ignore_index": 255}
        return {k: getattr(self, k) for k, v in defaults.items() if getattr(self, k) != v}

    def _check_task(self):
        if self.task is not None and self.task not in TASKS:
            raise self._fail("task", f"= {self.task!r}: unknown task{suggest(self.task, TASKS)}; valid: {', '.join(TASKS)}")
        if self.metric is not None:
            if not _FACTORY.match(self.metric):
                raise self._fail("metric", f"= {self.metric!r}: expected \"package.module:Factory\" returning an object "
                                           "with state(output, target), merge(a, b), value(state) and headline")
            if self.task is not None:
                raise self._fail("task", f"= {self.task!r} and metric = {self.metric!r}: give one (a metric is its own task)")
        elif self.metric_kwargs:
            raise self._fail("metric_kwargs", "is the arguments of [test] metric, which is not given")
        task = self.task_name
        if self.threshold != 0.5 and task != "multilabel":
            raise self._fail("threshold", f"is used by task = \"multilabel\" only (this section's task: {task})")
        if not 0 < self.threshold < 1:
            raise self._fail("threshold", f"= {self.threshold}: a probability between 0 and 1 (exclusive)")
        if self.ignore_index != 255 and task != "segmentation":
            raise self._fail("ignore_index", f"is used by task = \"segmentation\" only (this section's task: {task})")

    def _check_digits(self):
        if self.split is not None and self.split not in DIGITS_SPLITS:
            raise self._fail("split", f"= {self.split!r}: digits splits are {', '.join(DIGITS_SPLITS)}")

    def _check_torchvision(self):
        if self.dataset is None:
            raise self._fail("dataset", "is required for source = \"torchvision\" (a class in torchvision.datasets, "
                                        "e.g. \"Flowers102\")")
        if self.root is not None and not self.download and not self.root.is_dir():
            raise self._fail("root", f"= {str(self.root)!r}: folder not found (or set download = true on a machine "
                                     "with internet)")
        object.__setattr__(self, "transform", self.transform or "imagenet_eval")

    def _check_imagefolder(self):
        if self.root is None:
            raise self._fail("root", "is required for source = 'imagefolder' (the dataset's folder)")
        if not self.root.is_dir():
            raise self._fail("root", f"= {str(self.root)!r}: folder not found")
        object.__setattr__(self, "transform", self.transform or "imagenet_eval")

    def _check_factory(self):
        if self.factory is None or not _FACTORY.match(self.factory):
            raise self._fail("factory", f"= {self.factory!r}: expected \"package.module:function\" returning a torch Dataset")

    def _check_parquet(self):
        if self.root is None:
            raise self._fail("root", "is required for source = \"parquet\" (a folder or URI written by `quantray pack`, "
                                     "e.g. s3://bucket/flowers/test)")
        if isinstance(self.root, Path) and not (self.root / "manifest.json").is_file():
            raise self._fail("root", f"= {str(self.root)!r}: no manifest.json there; write the shards with "
                                     "`quantray pack JOB.toml --out DIR` and point root at DIR/calibration or DIR/test")

    def for_section(self, section: str) -> "DataSpec":
        """This spec as the [calibration] or [test] table: digits' split defaults to the section's."""
        if self.source == "digits" and self.split is None:
            return dataclasses.replace(self, split="train" if section == "calibration" else "test")
        return self


@dataclass(frozen=True)
class QuantSpec:
    """Backend, merge mode and qconfig choices. `module_types` / `module_names` map a torch.nn class
    name / a module's qualified name to "fp32" (not quantized) or a table of the keys below
    ({activation = ..., activation_range = ..., percentile = ..., weight = ...}).

    `activation` is the observer kind, `activation_range` how a histogram's range is chosen
    (`quantray.core.ranges`); they must agree: minmax is both a kind and a range, the other ranges need
    the histogram, moving_average takes no range. Either alone decides the other. (Whether a
    module_types key names a torch.nn class is checked by `flow.qconfig_mapping`.)"""

    _OWNER: typing.ClassVar[str] = "[quantization]"

    backend: str = "x86"
    flow: str = "fx"                     # "pt2e": torch.export + torchao's X86InductorQuantizer (`core.pt2e`)
    mode: str = "exact"
    mapping: str = "global"
    activation: str | None = None
    activation_range: str | None = None  # None: the observer's own (l2 for the backends' default histogram)
    percentile: float = 99.99            # for activation_range = "percentile": two-sided, (100 - p)th and pth
    weight: str | None = None
    equalize: bool = False               # cross-layer equalization of the FP32 model first (`core.equalize`)
    bias_correction: bool = False        # each layer's mean output error from its weights, into its bias
    module_types: dict = field(default_factory=dict)
    module_names: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_types(self)
        for key, valid in (("backend", BACKENDS), ("flow", FLOWS), ("mode", MODES), ("mapping", MAPPINGS)):
            value = getattr(self, key)
            if value not in valid:
                raise FieldError(self._OWNER, key, f"= {value!r}: unknown {key}{suggest(value, valid)}; "
                                                   f"valid: {', '.join(valid)}")
        _check_choice({"activation": self.activation, "activation_range": self.activation_range,
                       "percentile": self.percentile, "weight": self.weight}, "")
        for table in ("module_types", "module_names"):
            for name, value in getattr(self, table).items():
                key = f"{table}.{name}"
                if value == "fp32":
                    continue
                if not isinstance(value, dict):
                    raise FieldError(self._OWNER, key, f"= {value!r}: expected \"fp32\" or a table "
                                                       "{ activation = ..., weight = ... }")
                _check_choice(value, f"{key}.")
        if self.flow == "pt2e":
            self._check_pt2e()

    def _check_pt2e(self) -> None:
        """What torchao's X86InductorQuantizer cannot express, each refused in one line."""
        def fail(key, detail):
            return FieldError(self._OWNER, key, f"{detail} under flow = \"pt2e\"; {fix}")

        fix = "remove it, or use flow = \"fx\""
        if self.backend != "x86":
            raise fail("backend", f"= {self.backend!r}: torchao's PT2E quantizer here is X86InductorQuantizer (x86 only)")
        if self.mapping != "global":
            raise fail("mapping", f"= {self.mapping!r}: FX's default QConfigMapping has no PT2E form (the quantizer "
                                  "decides which ops it quantizes)")
        if self.bias_correction:
            raise fail("bias_correction", "= true: bias correction rewrites FX's INT8 modules and is not available")


_CHOICE_KEYS = {"activation": ACTIVATIONS, "activation_range": RANGES, "percentile": None, "weight": WEIGHTS}


def _check_choice(choice: dict, prefix: str) -> None:
    """One qconfig choice (the global keys, or a module table): known keys and values, and an
    observer kind and range method that agree."""
    def fail(key, detail):
        return FieldError(QuantSpec._OWNER, f"{prefix}{key}", detail)

    for sub, value in choice.items():
        if sub not in _CHOICE_KEYS:
            raise fail(sub, f"unknown key{suggest(sub, _CHOICE_KEYS)}; valid keys: {', '.join(_CHOICE_KEYS)}")
        valid = _CHOICE_KEYS[sub]
        if sub == "percentile":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 50 < value <= 100:
                raise fail(sub, f"= {value!r}: a percentile above 50 and at most 100 (99.99 clips 0.01% of values "
                                "at each end)")
        elif value is not None and value not in valid:
            raise fail(sub, f"= {value!r}: unknown {sub}{suggest(str(value), valid)}; valid: {', '.join(valid)}")
    kind, method = choice.get("activation"), choice.get("activation_range")
    if kind is None or method is None:
        return
    agree = {"histogram": ("l2", "percentile", "mse", "entropy"), "minmax": ("minmax",), "moving_average": ()}[kind]
    if method not in agree:
        fix = ('activation = "histogram" (or leave activation out)' if method != "minmax"
               else 'activation = "minmax" (or leave activation out)')
        raise fail("activation_range", f"= {method!r} contradicts {prefix}activation = {kind!r}: {method} needs {fix}")


EXECUTORS = ("auto", "ray", "driver")


@dataclass(frozen=True)
class RunSpec:
    _OWNER: typing.ClassVar[str] = "[run]"

    workers: int | None = None
    threads: int = 1
    max_attempts: int = 3
    cache: bool = True
    cache_dir: str | None = field(default=None, metadata={"folder": True})  # a folder or a URI pyarrow.fs opens
    latency_warmup: int = 10
    latency_iters: int = 100       # at most this many timed calls per model (the article's method: exactly 100)
    latency_precision: float = 0.02  # stop once the 95% interval of the mean is within +-2% of it; 0: always latency_iters
    throughput_batch: int = 0      # 0: throughput from the evaluation's own timings; N: measured at batch N on the node
    layer_samples: int = 64  # test samples (whole batches, from the first) for per-layer SQNR; 0: none
    memory_gb: float | None = None  # per worker's resident memory, keeping pass-1 activations for pass 2; None: derived; 0: keep none
    executor: str = "auto"  # where the work runs: "ray" (a pool of workers), "driver" (threads of this process), "auto" (pipeline.placement)

    def __post_init__(self):
        _check_types(self)
        _at_least(self, {"workers": 1, "threads": 1, "max_attempts": 1, "latency_warmup": 0, "latency_iters": 1,
                         "throughput_batch": 0, "layer_samples": 0, "latency_precision": 0, "memory_gb": 0})
        if self.executor not in EXECUTORS:
            raise FieldError(self._OWNER, "executor", f"= {self.executor!r}: one of {', '.join(map(repr, EXECUTORS))}"
                                                    f"{suggest(str(self.executor), EXECUTORS)}")
        if self.latency_precision >= 1:
            raise FieldError(self._OWNER, "latency_precision", f"= {self.latency_precision}: a fraction of the mean "
                                                               "(0.02 = +-2%), below 1")
        location = self.cache_dir
        if location is not None and not location.strip():
            raise FieldError(self._OWNER, "cache_dir", "= '': give a folder or a URI (s3://bucket/prefix), or leave it out")
        if location is not None and "://" in location and not _URI.match(location):
            raise FieldError(self._OWNER, "cache_dir", f"= {location!r}: not a URI (scheme://...) nor a folder")


@dataclass(frozen=True)
class GateSpec:
    """What `quantray refresh` demands before promoting a run, in its task's headline (core.metrics):
    fractions for top-1, mIoU and F1 (0.01 = 1 pt), the target's unit for RMSE, dB for agreement."""

    _OWNER: typing.ClassVar[str] = "[gate]"

    max_top1_drop: float = 0.01          # classification: INT8 top-1 may trail FP32 top-1 by at most this
    max_regression: float | None = None  # the headline may be worse than the promoted run's by at most this
                                         # (None: 0.005 where the headline is a fraction, else not checked)
    max_drop: float | None = None        # other tasks: INT8's headline worse than FP32's by at most this
                                         # (None: 0.01 where it is a fraction; required for regression, a metric)
    min_sqnr_db: float | None = None     # task = "agreement": INT8 vs FP32 output SQNR at least this (required)

    def __post_init__(self):
        _check_types(self)
        if not 0 <= self.max_top1_drop <= 1:
            raise FieldError(self._OWNER, "max_top1_drop", f"= {self.max_top1_drop}: a fraction of accuracy between 0 "
                                                           "and 1 (0.01 = 1 point)")
        for key in ("max_regression", "max_drop"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise FieldError(self._OWNER, key, f"= {getattr(self, key)}: must be at least 0 (in the task's headline unit)")

    def limits(self, task: str, fraction: bool) -> dict:
        """The limits that apply to `task` (its headline a fraction or not): drop (INT8 vs FP32),
        regression (vs the promoted run), min_sqnr_db; a FieldError naming a key the task needs or
        cannot take."""
        if task == "classification":
            if self.max_drop is not None or self.min_sqnr_db is not None:
                key = "max_drop" if self.max_drop is not None else "min_sqnr_db"
                raise FieldError(self._OWNER, key, "is for other tasks; classification's is max_top1_drop")
            drop = self.max_top1_drop
        else:
            if self.max_top1_drop != 0.01:
                raise FieldError(self._OWNER, "max_top1_drop", f"is for classification; task = {task!r} uses max_drop")
            if task == "agreement":
                if self.min_sqnr_db is None:
                    raise FieldError(self._OWNER, "min_sqnr_db", "is required for task = \"agreement\" (the INT8 vs "
                                                                 "FP32 output SQNR a run must reach, in dB, e.g. 25)")
                if self.max_drop is not None:
                    raise FieldError(self._OWNER, "max_drop", "is not used by task = \"agreement\" (FP32 is its reference); "
                                                              "use min_sqnr_db")
            elif self.min_sqnr_db is not None:
                raise FieldError(self._OWNER, "min_sqnr_db", f"is for task = \"agreement\"; task = {task!r} uses max_drop")
            elif self.max_drop is None and not fraction:
                raise FieldError(self._OWNER, "max_drop", f"is required for task = {task!r}: how much worse INT8's "
                                                          "headline may be than FP32's, in its unit")
            drop = None if task == "agreement" else self.max_drop if self.max_drop is not None else 0.01
        regression = self.max_regression if self.max_regression is not None else 0.005 if fraction else None
        if fraction:
            for key, value in (("max_drop", drop), ("max_regression", regression)):
                if value is not None and value > 1:
                    raise FieldError(self._OWNER, key, f"= {value}: the headline is a fraction; give one between 0 and 1")
        return {"drop": drop, "regression": regression, "min_sqnr_db": self.min_sqnr_db}


@dataclass(frozen=True)
class JobSpec:
    """A whole job. `path` is the job file (its bytes are copied into the run directory)."""

    _OWNER: typing.ClassVar[str] = ""

    name: str
    path: Path
    model: ModelSpec
    calibration: DataSpec
    test: DataSpec
    quantization: QuantSpec = QuantSpec()
    run: RunSpec = RunSpec()
    gate: GateSpec = GateSpec()

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[\w.-]+", self.name):
            raise FieldError("", "name", f"= {self.name!r}: must be a string of letters, digits, '_', '-' or '.'")
        object.__setattr__(self, "path", Path(self.path))
        for section, cls in _SECTIONS.items():
            if not isinstance(getattr(self, section), cls):
                raise FieldError("", section, f"= {getattr(self, section)!r}: expected a {cls.__name__}")
        for section in ("calibration", "test"):
            object.__setattr__(self, section, getattr(self, section).for_section(section))
        given = self.calibration.scoring_keys()
        if given:
            raise FieldError("[calibration]", next(iter(given)), "is a [test] key: calibration scores nothing; "
                                                                  "move it to [test]")

    def to_dict(self) -> dict:
        """JSON-ready form (paths as strings), as recorded in the manifest."""
        return _jsonable(dataclasses.asdict(self))

    def source(self) -> bytes:
        """The job file as given (a run keeps it as job.toml); for a spec built in Python, with no file
        at `path`, a job file that loads back as this spec."""
        if self.path.is_file():
            return self.path.read_bytes()
        return to_toml(self, header="Built in Python: no job file was given.").encode()


_SECTIONS = {"model": ModelSpec, "calibration": DataSpec, "test": DataSpec,
             "quantization": QuantSpec, "run": RunSpec, "gate": GateSpec}


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job file. Raises SpecError (one line) on any problem."""
    path = _local_file(path, "job file")
    return parse_spec(_read_toml(path, "job file"), path)


def _local_file(given: str | Path, what: str) -> Path:
    """`given` as a local path; a URI (Path would fold its '//') or an empty name is one SpecError."""
    if not str(given).strip():
        raise SpecError(f"{what} {str(given)!r}: empty; give the {what} (a .toml file)")
    if "://" in str(given):
        raise SpecError(f"{given}: a {what} is read from a local path, not a URI; copy it to this machine first")
    return Path(given)


def _read_toml(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        raise SpecError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder; give the {what} (a .toml file) in it") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:  # a name too long for the file system, no permission, ...
        raise SpecError(f"{path}: cannot read the {what}: {e.strerror or type(e).__name__}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None


def parse_spec(raw: dict, path: Path, base_dir: Path | None = None) -> JobSpec:
    """Validate an already-parsed TOML table; `base_dir` resolves relative paths (default: the file's folder)."""
    ctx = _Context(Path(path), Path(base_dir) if base_dir else Path(path).resolve().parent)
    valid_top = ["name", *_SECTIONS]
    for key in raw:
        if key not in valid_top:
            ctx.fail(None, key, f"unknown key{suggest(key, valid_top)}; valid top-level keys: {', '.join(valid_top)}")
    for section in ("model", "calibration", "test"):
        if section not in raw:
            ctx.fail(None, section, f"missing section [{section}]; see jobs/digits.toml for an example")
    built = {s: _build(cls, raw.get(s, {}), s, ctx) for s, cls in _SECTIONS.items()}
    with ctx.within(None):
        return JobSpec(name=raw.get("name", ctx.path.stem), path=ctx.path, **built)


def load_test_section(path: str | Path) -> DataSpec:
    """The [test] section of another TOML file (`quantray evaluate --data`), checked as strictly
    as a job's; relative paths resolve against that file's folder."""
    path = _local_file(path, "data file")
    raw = _read_toml(path, "data file")
    ctx = _Context(path, path.resolve().parent)
    if "test" not in raw:
        ctx.fail(None, "test", "missing section [test]: --data takes a file with a [test] table, as in a job file")
    return _build(DataSpec, raw["test"], "test", ctx).for_section("test")


class _Context:
    def __init__(self, path: Path, base_dir: Path):
        self.path, self.base_dir = path, base_dir

    def fail(self, section: str | None, key: str, message: str) -> typing.NoReturn:
        where = f"[{section}] {key}" if section else key
        raise SpecError(f"{self.path}: {where} {message}")

    def within(self, section: str | None):
        """A spec's own check, reported as this file's, in `section`."""
        ctx = self

        class _Reraise:
            def __enter__(self):
                return None

            def __exit__(self, kind, error, tb):
                if isinstance(error, FieldError):
                    ctx.fail(section or error.owner.strip("[]") or None, error.key, error.detail)

        return _Reraise()


def _build(cls, table, section: str, ctx: _Context):
    """A section's spec from its table: unknown keys refused, paths resolved against the job file's
    folder; the spec checks its values itself."""
    if not isinstance(table, dict):
        ctx.fail(None, section, "must be a table, e.g. [" + section + "]")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            ctx.fail(section, key, f"unknown key{suggest(key, fields)}; valid keys: {', '.join(fields)}")
        values[key] = _resolve(value, hints[key], fields[key].metadata.get("folder", False), ctx)
    with ctx.within(section):
        return cls(**values)


def _resolve(value, hint, folder: bool, ctx: _Context):
    """A path string relative to the job file's folder, made absolute (a URI stays as given); a
    `folder` field (cache_dir: a folder or a URI) likewise, kept a string. Other values as written."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    paths = Path in allowed or folder
    if not (paths and isinstance(value, str)) or "://" in value or not value.strip():
        return value
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (ctx.base_dir / p).resolve()
    return p if Path in allowed else str(p)


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
