"""Calibration: prepare/convert, the worker-side class, and the two-pass exact protocol. No Ray here.

    prepared = prepare(model, "x86", example_inputs)
    ranges, histograms = calibrate_serial(model, example_inputs, "x86", data_spec, batches, shards)
    load_merged(prepared, ranges, histograms)
    int8 = convert(prepared)

Pass 1: every worker records, per batch, the exact range each observer saw; the driver merges them
into global ranges. Pass 2: every worker counts its activations into histograms over those fixed
global ranges; the driver sums them. `runner` runs the same two passes on Ray actors.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.ao.quantization import QConfigMapping, get_default_qconfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from . import data as data_mod
from . import observers
from .errors import CalibrationError, DataError, QuantrayError
from .spec import DataSpec

__all__ = ["prepare", "convert", "set_engine", "quiet_torch_warnings", "CalibrationWorker", "calibrate_serial"]

# Warnings torch 2.14 prints on every FX-quantization or TorchScript call, in every process; the
# README says once that FX quantization is deprecated upstream (torchao PT2E is the successor).
_KNOWN_WARNINGS = (".*quant_min and quant_max.*", ".*torch.jit.* is deprecated.*", ".*quantize_per_tensor.*",
                   ".*TypedStorage is deprecated.*", ".*TorchScript type system.*", ".*torchao.*")


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


def qconfig_mapping(backend: str) -> QConfigMapping:
    """The seed's mapping: one global default qconfig for the backend."""
    return QConfigMapping().set_global(get_default_qconfig(backend))


def prepare(model: nn.Module, backend: str, example_inputs: torch.Tensor) -> nn.Module:
    """`prepare_fx` on a copy of `model` (the FP32 model stays untouched)."""
    set_engine(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch points to torchao's PT2E flow
        return prepare_fx(copy.deepcopy(model).eval(), qconfig_mapping(backend), (example_inputs,))


def convert(prepared: nn.Module) -> nn.Module:
    """`convert_fx` on a copy: convert mutates the prepared model it is given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(copy.deepcopy(prepared)).eval()


class CalibrationWorker:
    """One calibration shard's worker: a plain class, wrapped by `ray.remote` in `runner`.

    It prepares its own copy of the FP32 model (a prepared GraphModule does not pickle), checks its
    observers match the driver's, and keeps its shard's batches in memory between the two passes.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, backend: str, data: DataSpec,
                 threads: int, signature: list | None = None, shard: int = 0):
        quiet_torch_warnings()
        # Same intra-op thread count for every worker count: reduction order may depend on it.
        torch.set_num_threads(threads)
        self._shard = shard
        self._model = prepare(model, backend, example_inputs)
        mine = observers.observer_signature(self._model)
        if signature is not None and [tuple(s) for s in signature] != mine:
            raise CalibrationError(f"shard {shard}: this worker's prepare_fx gave other observers than the "
                                   "driver's; workers and driver need the same torch version")
        self._probes = observers.attach_probes(self._model)
        self._dataset = data_mod.build_dataset(data, where="[calibration]")
        self._batches: dict[int, torch.Tensor] = {}

    def ranges(self, batch_id: int, indices: list[int]) -> observers.Ranges:
        """Pass 1 on one batch: the exact (min, max) of every observer's input."""
        observers.start_batch(self._probes)
        self._forward(batch_id, indices)
        return observers.batch_ranges(self._probes)

    def begin_histograms(self, ranges: observers.Ranges) -> None:
        observers.begin_histograms(self._probes, ranges)

    def histograms(self, batch_id: int, indices: list[int]) -> None:
        """Pass 2 on one batch: count activations over the global ranges (kept on the worker)."""
        self._forward(batch_id, indices)

    def collect(self) -> observers.Histograms:
        return observers.collect_histograms(self._probes)

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


def calibrate_serial(model, example_inputs, backend, data, batches, shards, threads=1, order=None):
    """The two passes in this process, one worker object per shard: the reference for `runner`.

    `order` permutes the sequence in which shards are processed (the result must not change).
    Returns (ranges, histograms), ready for `observers.load_merged`.
    """
    signature = observers.observer_signature(prepare(model, backend, example_inputs))
    order = list(order) if order is not None else list(range(len(shards)))
    workers = {s: CalibrationWorker(model, example_inputs, backend, data, threads, signature, shard=s) for s in order}
    ranges = observers.merge_ranges(workers[s].ranges(b, batches[b]) for s in order for b in shards[s])
    for s in order:
        workers[s].begin_histograms(ranges)
        for b in shards[s]:
            workers[s].histograms(b, batches[b])
    return ranges, observers.merge_histograms(workers[s].collect() for s in order)
