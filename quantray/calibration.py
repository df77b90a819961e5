"""Calibration: qconfigs, prepare/convert, the worker-side class and the serial reference protocol.

    prepared = prepare(model, quant, example_inputs)
    logs, pass2 = calibrate_serial(model, example_inputs, quant, data_spec, batches, shards)
    load_merged(prepared, quant.mode, logs, pass2)
    int8 = convert(prepared)

No Ray here: `runner` drives the same `CalibrationWorker` methods on Ray actors. The passes, by
merge mode (see `observers`): pass 1 `log` (every mode), then `count` (exact) or `replay`
(replay); fast mode runs torch's own histogram observers during pass 1 and has no pass 2.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn
from torch import nn
from torch.ao.quantization import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QConfig,
    QConfigMapping,
    default_per_channel_weight_observer,
    default_weight_observer,
    get_default_qconfig,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.observer import HistogramObserver
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from . import data as data_mod
from . import observers
from .errors import CalibrationError, DataError, QuantrayError, SpecError
from .spec import DataSpec, QuantSpec

__all__ = ["prepare", "convert", "rebuild_int8", "qconfig_mapping", "set_engine", "quiet_torch_warnings",
           "CalibrationWorker", "calibrate_serial"]

# Warnings torch 2.14 prints on every FX-quantization or TorchScript call, in every process; the
# README says once that FX quantization is deprecated upstream (torchao PT2E is the successor).
_KNOWN_WARNINGS = (".*quant_min and quant_max.*", ".*torch.jit.* is deprecated.*", ".*quantize_per_tensor.*",
                   ".*TypedStorage is deprecated.*", ".*TorchScript type system.*", ".*torchao.*",
                   ".*must run observer before calling calculate_qparams.*")
_ACTIVATIONS = {"histogram": HistogramObserver, "minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver}
_WEIGHTS = {"per_channel": default_per_channel_weight_observer, "per_tensor": default_weight_observer}


def quiet_torch_warnings() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
    for message in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def set_engine(backend: str) -> None:
    """The quantized kernels must match the qconfig's backend wherever an INT8 model runs."""
    if backend not in torch.backends.quantized.supported_engines:
        raise QuantrayError(f"quantized engine {backend!r} is not available in this torch build "
                            f"(available: {', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = backend


def _quant(quant: QuantSpec | str) -> QuantSpec:
    return QuantSpec(backend=quant) if isinstance(quant, str) else quant


def qconfig_mapping(quant: QuantSpec | str) -> QConfigMapping:
    """The seed's mapping (`set_global(get_default_qconfig(backend))`) or torch's default mapping,
    with the spec's activation/weight choices and per-type / per-name overrides on top."""
    quant = _quant(quant)
    base = get_default_qconfig(quant.backend)
    mapping = get_default_qconfig_mapping(quant.backend) if quant.mapping == "default" else QConfigMapping()
    mapping.set_global(_qconfig(base, quant.backend, {"activation": quant.activation, "weight": quant.weight}))
    for type_name, choice in quant.module_types.items():
        mapping.set_object_type(getattr(torch.nn, type_name), _qconfig(base, quant.backend, choice))
    for module_name, choice in quant.module_names.items():
        mapping.set_module_name(module_name, _qconfig(base, quant.backend, choice))
    return mapping


def _qconfig(base: QConfig, backend: str, choice) -> QConfig | None:
    if choice == "fp32":
        return None  # the module stays in floating point
    activation, weight = base.activation, base.weight
    if choice.get("activation"):
        # The backend's default reduce_range: x86 keeps 7 bits of headroom, qnnpack uses all 8.
        activation = _ACTIVATIONS[choice["activation"]].with_args(reduce_range=backend == "x86")
    if choice.get("weight"):
        weight = _WEIGHTS[choice["weight"]]
    return QConfig(activation=activation, weight=weight)


def prepare(model: nn.Module, quant: QuantSpec | str, example_inputs: torch.Tensor) -> nn.Module:
    """`prepare_fx` on a copy of `model` (the FP32 model stays untouched)."""
    quant = _quant(quant)
    set_engine(quant.backend)
    modules = dict(model.named_modules())
    for name in quant.module_names:
        if name not in modules:
            import difflib

            close = difflib.get_close_matches(name, list(modules), n=3)
            raise SpecError(f"[quantization] module_names.{name}: the model has no module {name!r}"
                                   + (f"; close: {', '.join(close)}" if close else ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch points to torchao's PT2E flow
        return prepare_fx(copy.deepcopy(model).eval(), qconfig_mapping(quant), (example_inputs,))


def convert(prepared: nn.Module) -> nn.Module:
    """`convert_fx` on a copy: convert mutates the prepared model it is given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(copy.deepcopy(prepared)).eval()


def rebuild_int8(fp32: nn.Module, quant: QuantSpec | str, example_inputs: torch.Tensor, state_dict: dict) -> nn.Module:
    """The seed's way back to an INT8 GraphModule: prepare_fx, convert_fx without calibrating, then
    load the INT8 state_dict (a converted GraphModule does not unpickle, so workers rebuild it)."""
    int8 = convert(prepare(fp32, quant, example_inputs))
    int8.load_state_dict(state_dict)
    return int8


class CalibrationWorker:
    """One calibration shard's worker: a plain class, wrapped by `ray.remote` in `runner`.

    It prepares its own copy of the FP32 model (a prepared GraphModule does not pickle), checks its
    observers match the driver's, and keeps its shard's batches in memory between the two passes.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, quant: QuantSpec | str, data: DataSpec,
                 threads: int, signature: list | None = None, shard: int = 0):
        quiet_torch_warnings()
        # Same intra-op thread count for every worker count: reduction order may depend on it.
        torch.set_num_threads(threads)
        self._shard = shard
        self._model = prepare(model, quant, example_inputs)
        mine = observers.observer_signature(self._model)
        if signature is not None and [tuple(s) for s in signature] != mine:
            raise CalibrationError(f"shard {shard}: this worker's prepare_fx gave other observers than the "
                                   "driver's; workers and driver need the same torch version")
        self._probes = observers.attach_probes(self._model)
        self._dataset = data_mod.build_dataset(data, where="[calibration]")
        self._batches: dict[int, torch.Tensor] = {}

    def log(self, batch_id: int, indices: list[int], run_observer: bool = False) -> observers.BatchLog:
        """Pass 1 on one batch: the exact (min, max) of each observer call. `run_observer`: fast mode."""
        observers.start_log(self._probes, run_observer)
        self._forward(batch_id, indices)
        return observers.batch_log(self._probes)

    def start_counts(self, ranges: dict) -> None:
        observers.start_counts(self._probes, ranges)

    def count(self, batch_id: int, indices: list[int]) -> None:
        """Exact pass 2 on one batch: counts over the global ranges, kept on the worker."""
        self._forward(batch_id, indices)

    def collect_counts(self) -> observers.Counts:
        return observers.collect_counts(self._probes)

    def replay(self, batch_id: int, indices: list[int], plan: observers.BatchLog) -> dict:
        """Replay pass 2 on one batch: torch's update histogram for each call, over the planned ranges."""
        observers.start_replay(self._probes, plan)
        self._forward(batch_id, indices)
        return observers.batch_updates(self._probes)

    def observer_states(self) -> dict:
        return observers.observer_states(self._probes)

    def _forward(self, batch_id: int, indices: list[int]) -> None:
        x = self._batches.get(batch_id)
        where = f"shard {self._shard}, batch {batch_id}, samples {indices[0]}..{indices[-1]}"
        try:
            if x is None:
                x = self._batches[batch_id] = data_mod.load_batch(self._dataset, indices)[0]
            if not torch.isfinite(x).all():
                raise DataError("NaN or Inf in the calibration input")
            with torch.inference_mode():
                self._model(x)
        except QuantrayError as e:
            raise type(e)(f"{e} ({where})") from None


def calibrate_serial(model, example_inputs, quant, data, batches, shards, threads=1, order=None, mode=None):
    """All passes in this process, one worker object per shard: the reference for `runner`.

    `order` permutes the sequence in which shards are processed (exact and replay must not change).
    Returns (logs, pass2), ready for `observers.load_merged(prepared, mode, logs, pass2)`.
    """
    quant = _quant(quant)
    mode = mode or quant.mode
    signature = observers.observer_signature(prepare(model, quant, example_inputs))
    order = list(order) if order is not None else list(range(len(shards)))
    workers = {s: CalibrationWorker(model, example_inputs, quant, data, threads, signature, shard=s) for s in order}
    logs = {b: workers[s].log(b, batches[b], run_observer=mode == "fast") for s in order for b in shards[s]}
    if mode == "fast":
        return logs, [workers[s].observer_states() for s in order]
    if mode == "replay":
        plan = observers.replay_plan(logs)
        return logs, {b: workers[s].replay(b, batches[b], plan[b]) for s in order for b in shards[s]}
    ranges = observers.global_ranges(logs)
    for s in order:
        workers[s].start_counts(ranges)
        for b in shards[s]:
            workers[s].count(b, batches[b])
    return logs, observers.merge_counts(workers[s].collect_counts() for s in order)
