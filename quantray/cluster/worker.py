"""One worker of a job's pool: the same process calibrates a shard, evaluates test batches, logs
per-layer errors, scores tune's trials and measures speed, building what it needs once per job.

    worker = Worker(WorkerSetup(fp32, example, quant, threads, calibration=data_spec, test=data_spec))
    Call(key, CalibrationWorker.log, (b, indices)).on(worker.calibration)   # calibration's protocol
    worker.load_int8(key, script, state)               # once per INT8 model
    worker.evaluate(indices, stored_logits, layers)    # one test batch -> BatchScores
    worker.trial(quant, stats, batches, logits)        # one tune trial -> TrialScores
    worker.engine_check(quant, stats, batches)         # that trial's INT8 kernels against the reference
    worker.isolated_errors(quant, stats, batches)      # each of its layers' error alone, for tune's ranking
    worker.speed(x, batch, warmup, iters, precision)   # latency (and throughput) of the models

Plain Python and torch: `runner.WorkerPool` runs it in a Ray actor (calls as `calls.Call`s), tests
call it directly.
"""

from __future__ import annotations

import io
import os
import platform
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import flow, merge
from ..core.bias import correct_biases
from ..core.calibration import CalibrationWorker
from ..core.engine import EngineCheck, EngineResult, merge_engine
from ..core.evaluation import (
    ShardResult,
    cpu_kind,
    measure_speed,
    processor,
    state_dict_bytes,
)
from ..core.layers import LayerLogger, LayerResult, isolated_errors
from ..core.metrics import TaskScores, build_scorer
from ..core.modes import MergedStats
from ..core.tracing import TURNS
from ..errors import CalibrationError
from ..inputs.decoded import DecodedBatches
from ..spec import DataSpec, QuantSpec

__all__ = ["Worker", "WorkerSetup", "BatchScores", "TrialScores", "calibration_of", "measure_alone"]

_DECODED_BYTES = 1 << 30  # per worker: 1 GiB holds about 1,700 decoded 224x224 RGB images


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker of a job's pool is built from (shipped to the workers once, by reference)."""

    model: nn.Module
    example: torch.Tensor
    quant: QuantSpec
    threads: int                                  # intra-op threads: the same for every worker count
    calibration: DataSpec | None = None           # the split it calibrates on (None: it only evaluates)
    test: DataSpec | None = None                  # the split it evaluates on
    signature: list | None = field(default=None, repr=False)  # the driver's observers, which its own must equal
    memory_bytes: int = 0                         # what it may keep of pass 1's values for pass 2
    kept_only: bool = False                       # memory_bytes bounds only what it keeps (`KeptValues`)
    decoded: str | None = None                    # where decoded images are kept (`inputs.decoded`); None: nowhere


@dataclass
class BatchScores:
    """One test batch through FP32 and INT8."""

    scores: ShardResult | TaskScores  # classification's counts and rows, or another task's states (core.metrics)
    fp32_logits: object | None        # FP32's output, as the model returns it, computed here (None: stored ones given)
    seconds: dict[str, float]         # each plain forward's time, by model, where one ran
    layers: LayerResult | None        # its per-layer signal and noise, when asked for
    engine: EngineResult | None = None  # the engine against the reference, when asked for
    engine_s: float = 0.0               # what that check took here
    compile_s: float = 0.0              # PT2E: compiling the INT8 runtime for this batch's size (not in `seconds`)


@dataclass
class TrialScores:
    """One tune trial's INT8 model, scored against the FP32 logits."""

    scores: ShardResult | TaskScores  # classification's counts, or the task's merged states (core.metrics)
    qparams_digest: str
    int8_bytes: int  # the INT8 state_dict's size


class Worker:
    """See the module docstring. `calibration` is its calibration part (None when it only
    evaluates); `build_s` is what building it took (the datasets), for the manifest."""

    def __init__(self, setup: WorkerSetup):
        started = time.perf_counter()
        flow.quiet_torch_warnings()
        torch.set_num_threads(setup.threads)
        self._fp32, self._example, self._quant, self._threads = setup.model.eval(), setup.example, setup.quant, setup.threads
        self._setup, self._calibration = setup, None
        self._data = DecodedBatches(setup.test, "[test]", setup.decoded) if setup.test is not None else None
        self._test = self._data.dataset if self._data is not None else None
        self._scorer = build_scorer(setup.test) if setup.test is not None else None
        self._int8_key, self._script, self._state, self._eager, self._logger = None, None, None, None, None
        self._engine = None
        self._built = None  # (config key, stats, prepared, int8): the last model _build made to read only
        self._decoded, self._decoded_bytes = {}, 0  # test batches a tune's trials see again and again
        self.build_s = round(time.perf_counter() - started, 4)

    @property
    def calibration(self) -> CalibrationWorker | None:
        """The calibration part, built at its first use: a run whose statistics are all stored never
        prepares the worker's copy (prepare_fx: 0.1-0.4 s per worker here)."""
        setup = self._setup
        if self._calibration is None and setup.calibration is not None:
            self._calibration = CalibrationWorker(setup.model, setup.example, setup.quant, setup.calibration,
                                                  setup.threads, setup.signature, setup.memory_bytes, setup.decoded,
                                                  setup.kept_only)
        return self._calibration

    def load_int8(self, key: str, deployed: bytes, state: bytes, eager: nn.Module | None = None,
                  layers: bool = False) -> None:
        """The INT8 model to evaluate and to diagnose and time. FX: the TorchScript file, and eager
        INT8 rebuilt from its state_dict when first needed (a converted GraphModule does not pickle),
        or `eager` itself where the worker shares the driver's process (the model the state came from).
        PT2E: the exported program (`pt2e.load_program`, the reference representation, as eager) and
        its compiled runtime (`pt2e.Compiled`), compiled at each batch size's first call. `layers`
        (FX): the per-layer loggers are built now, in this short first call, where tracing waits
        for no other worker's batch (`tracing.TURNS`), rather than in the first batch's."""
        if key == self._int8_key:
            return
        flow.set_engine(self._quant.backend)
        self._int8_key, self._state, self._eager, self._logger, self._engine = key, state, None, None, None
        if self._quant.flow == "pt2e":
            from ..core import pt2e

            self._eager = pt2e.load_program(deployed)
            self._script = pt2e.Compiled(self._eager)
        else:
            self._script, self._eager = torch.jit.load(io.BytesIO(deployed)), eager
            if layers:
                self._layer_logger()

    @property
    def _runtime(self) -> str:
        return flow.runtime_name(self._quant.flow)

    def _layer_logger(self) -> LayerLogger:
        """Layer by layer, INT8 is compared with the FP32 model it was made from."""
        if self._logger is None:
            self._base = flow.base_model(self._fp32, self._quant)
            self._logger = LayerLogger(self._base, self._int8_eager())
        return self._logger

    def _int8_eager(self):
        if self._eager is None:
            self._eager = flow.rebuild_int8(self._fp32, self._quant, self._example,
                                            torch.load(io.BytesIO(self._state), weights_only=True))
        return self._eager

    def evaluate(self, indices: list[int], stored: torch.Tensor | None, layers: bool = False,
                 upcoming: list[int] | None = None, engine: bool = False) -> BatchScores:
        """One test batch through FP32 (or its logits stored by an earlier run, `stored`) and the
        INT8 TorchScript model; with `layers`, its per-layer result too (the logged FP32 forward then
        gives the FP32 logits); with `engine`, the engine check (`core.engine`). `upcoming`: this
        worker's next batch, whose data a sharded source starts reading now."""
        x, y = self._data.load(indices, upcoming)
        seconds, logits, layer, checked, engine_s = {}, stored, None, None, 0.0
        if engine:
            int8_eager = self._int8_eager()  # built for the per-layer pass and speed anyway: not the check's cost
            t = time.perf_counter()
            if self._engine is None:
                self._engine = EngineCheck(int8_eager)
            checked = self._engine.run(x, indices, y if self._scorer.task == "classification" else None)
            engine_s = time.perf_counter() - t
        with torch.inference_mode():
            if layers:
                fp32, layer = self._layer_logger().log(x, indices)
                if logits is None and self._base is self._fp32:  # an equalized model's logits differ by rounding
                    logits = fp32
            if logits is None:
                t = time.perf_counter()
                logits = self._fp32(x)
                seconds["fp32"] = time.perf_counter() - t
            # PT2E: compiling for a new batch size is not the forward's time
            compile_s = self._script.warm(x) if hasattr(self._script, "warm") else 0.0
            t = time.perf_counter()
            int8 = self._script(x)
            seconds[self._runtime] = time.perf_counter() - t
        return BatchScores(self._scorer.score(indices, y, logits, int8), logits if stored is None else None, seconds,
                           layer, checked, engine_s, compile_s)

    def trial(self, quant: QuantSpec, stats: MergedStats, batches: list[list[int]],
              logits: list[torch.Tensor], reference: bool = False) -> TrialScores:
        """One `quantray tune` trial: `quant`'s INT8 model built here from the merged statistics
        (prepare_fx, load them, convert_fx: no forward pass), scored on `batches` against their FP32
        `logits`. `reference`: torch's reference quantized model is scored instead of the engine's."""
        prepared, int8 = self._build(quant, stats)
        if reference:
            int8 = flow.reference(prepared)
        results = []
        with torch.inference_mode():
            for batch, fp32 in zip(batches, logits):
                TURNS.between()  # another worker's trial may trace its model here
                x, y = self._decoded_batch(batch)
                results.append(self._scorer.score(batch, y, fp32, int8(x)))
        return TrialScores(self._scorer.merge(results), merge.state_digest(prepared), len(state_dict_bytes(int8)))

    def engine_check(self, quant: QuantSpec, stats: MergedStats, batches: list[list[int]]) -> EngineResult:
        """`quant`'s INT8 model built from the merged statistics, its engine checked on `batches`."""
        check, results = EngineCheck(self._build(quant, stats)[1]), []
        for batch in batches:
            TURNS.between()
            x, y = self._decoded_batch(batch)
            results.append(check.run(x, batch, y))
        return merge_engine(results)

    def isolated_errors(self, quant: QuantSpec, stats: MergedStats, batches: list[list[int]]) -> dict:
        """`quant`'s INT8 model built from the merged statistics; each quantized conv/linear layer's
        isolated error (`layers.isolated_errors`) on each of `batches`: {first sample: {layer: (signal, noise)}}."""
        prepared, int8 = self._build(quant, stats, kept=False)  # isolated_errors runs the prepared model
        names = flow.quantized_layers(self._fp32, quant, self._example)
        errors = {}
        for batch in batches:
            TURNS.between()
            errors[batch[0]] = isolated_errors(prepared, int8, self._decoded_batch(batch)[0], names)
        return errors

    def _build(self, quant: QuantSpec, stats: MergedStats, *, kept: bool = True):
        """The prepared model with the merged statistics loaded, and its INT8 model. `kept`: for calls
        that only read both (the engine check, a trial), the last build is kept and given again for
        the same config (`flow.config_key`) and statistics: tune's engine check and its trial of the
        job's own config build the same model. A caller that runs the prepared model (its observers
        would record) gets a build of its own."""
        key = flow.config_key(quant)
        if kept and self._built is not None and self._built[0] == key and self._built[1] is stats:
            return self._built[2:]
        flow.set_engine(quant.backend)
        prepared = flow.prepare(self._fp32, quant, self._example)
        stats.load(prepared)  # MissingStatistics names a value the calibration did not observe
        int8 = flow.convert(prepared)
        if quant.bias_correction:
            if stats.bias is None:
                raise CalibrationError("bias correction needs the calibration's input sums, which it did not gather")
            correct_biases(int8, prepared, stats.bias)
        if kept:
            self._built = (key, stats, prepared, int8)
        return prepared, int8

    def fp32_logits(self, indices: list[int]) -> torch.Tensor:
        """The FP32 model's logits on one test batch (which a tune's trials then find decoded)."""
        with torch.inference_mode():
            return self._fp32(self._decoded_batch(indices)[0])

    def _decoded_batch(self, indices: list[int]):
        """A test batch, decoded once and kept while the kept batches stay under _DECODED_BYTES."""
        found = self._decoded.get(tuple(indices))
        if found is None:
            found = self._data.load(indices)
            if self._decoded_bytes + found[0].nbytes <= _DECODED_BYTES:
                self._decoded[tuple(indices)] = found
                self._decoded_bytes += found[0].nbytes
        return found

    def data_read(self) -> dict:
        """What this worker has read of Parquet shards, per split: bytes (footers and manifests
        included) and row groups; {} where its data is not sharded."""
        datasets = {"calibration": self._calibration.dataset if self._calibration else None, "test": self._test}
        return {split: {"bytes": ds.bytes_read, "row_groups": ds.groups_read}
                for split, ds in datasets.items() if hasattr(ds, "groups_read")}

    def peak_rss_mb(self) -> float:
        """This process's peak resident memory so far, in MiB."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def host_facts(self) -> list:
        """What a stored FP32 speed figure is valid for: this host, its processor and CPU count."""
        return [platform.node(), processor(), os.cpu_count(), self._threads]

    def cpu(self) -> dict:
        """The kind of CPU this worker computes on (`evaluation.cpu_kind`)."""
        return cpu_kind()

    def speed(self, x: torch.Tensor, batch: torch.Tensor | None, warmup: int, iters: int, precision: float,
              skip: tuple = ()) -> dict:
        """Latency at batch 1 (and throughput on `batch`) of FP32, INT8 eager and the INT8
        TorchScript model, in turn, leaving out the models in `skip` (figures known already)."""
        models = {"fp32": self._fp32, "int8": self._int8_eager(), self._runtime: self._script}
        speed = measure_speed({k: m for k, m in models.items() if k not in skip}, x, batch, warmup, iters, precision)
        speed["conditions"].update(host=platform.node(), processor=processor(), threads=self._threads,
                                   torch_threads=torch.get_num_threads(), engine=torch.backends.quantized.engine)
        if hasattr(self._script, "compile_s"):  # in the warm-up, which latency leaves out
            speed["conditions"]["compile_s"] = {str(n): s for n, s in sorted(self._script.compile_s.items())}
        return speed


def calibration_of(worker: Worker) -> CalibrationWorker:
    """The part of a worker that calibration's calls (`CalibrationWorker` functions) are made on."""
    return worker.calibration


def measure_alone(setup: WorkerSetup, script: bytes, state: bytes, args: tuple, skip: tuple, cpus: int) -> dict:
    """Speed measured by a worker built for it alone (a task holding all `cpus` of its node)."""
    worker = Worker(setup)
    worker.load_int8("", script, state)
    return {**worker.speed(*args, skip), "cpus": cpus}
