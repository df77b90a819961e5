"""One worker of a job's pool: the same process calibrates a shard, evaluates test batches, logs
per-layer errors and measures speed, building what it needs once per job.

    worker = Worker(fp32, example, quant, threads, calibration=data_spec, test=data_spec, signature=sig)
    worker.log(b, indices) ...                        # calibration: CalibrationWorker's protocol
    worker.load_int8(key, script, state)              # once per INT8 model
    worker.evaluate(indices, stored_logits, layers)   # one test batch: scores, FP32 logits, seconds,
                                                      #   and with `layers` its per-layer signal and noise
    worker.speed(x, batch, warmup, iters, precision)  # latency (and throughput) of the models

Plain Python and torch: `runner.WorkerPool` runs it in a Ray actor; tests call it directly.
"""

from __future__ import annotations

import io
import platform
import time

import torch

from . import data as data_mod
from . import flow, merge
from .calibration import CalibrationWorker
from .evaluation import ShardResult, measure_speed, merge_results, processor, score_batch, state_dict_bytes
from .layers import LayerLogger, LayerResult

__all__ = ["Worker"]

_DECODED_BYTES = 1 << 30  # per worker: 1 GiB holds about 1,700 decoded 224x224 RGB images


class Worker(CalibrationWorker):
    """`calibration`/`test`: the data specs of the splits this worker will see (None: not needed).
    `setup_s` is what building it took (prepare_fx and the datasets), for the manifest."""

    def __init__(self, model, example_inputs: torch.Tensor, quant, threads: int, *, calibration=None, test=None,
                 signature: list | None = None, index: int = 0, memory_bytes: int = 0):
        started = time.perf_counter()
        flow.quiet_torch_warnings()
        torch.set_num_threads(threads)
        self._fp32, self._example, self._quant, self._threads = model.eval(), example_inputs, quant, threads
        if calibration is not None:
            super().__init__(model, example_inputs, quant, calibration, threads, signature, shard=index,
                             memory_bytes=memory_bytes)
        self._test = data_mod.build_dataset(test, where="[test]") if test is not None else None
        self._int8_key, self._script, self._state, self._eager, self._logger = None, None, None, None, None
        self._decoded, self._decoded_bytes = {}, 0  # test batches a tune's trials see again and again
        self.setup_s = round(time.perf_counter() - started, 4)

    def load_int8(self, key: str, script: bytes, state: bytes) -> None:
        """The INT8 model to evaluate (TorchScript) and to diagnose and time (eager, rebuilt from its
        state_dict when first needed: a converted GraphModule does not pickle)."""
        if key == self._int8_key:
            return
        flow.set_engine(self._quant.backend)
        self._script = torch.jit.load(io.BytesIO(script))
        self._int8_key, self._state, self._eager, self._logger = key, state, None, None

    def _int8_eager(self):
        if self._eager is None:
            self._eager = flow.rebuild_int8(self._fp32, self._quant, self._example,
                                            torch.load(io.BytesIO(self._state), weights_only=True))
        return self._eager

    def evaluate(self, indices: list[int], stored: torch.Tensor | None, layers: bool = False,
                 upcoming: list[int] | None = None) -> tuple[ShardResult, torch.Tensor | None, dict, LayerResult | None]:
        """One test batch through FP32 (or its logits stored by an earlier run, `stored`) and the
        INT8 TorchScript model: the batch's scores, the FP32 logits if computed here, the seconds
        each plain forward took (throughput, where no other figure is asked for) and, with
        `layers`, its per-layer result (the logged FP32 forward then gives the FP32 logits).
        `upcoming`: this worker's next batch, whose data a sharded source starts reading now."""
        x, y = data_mod.load_batch(self._test, indices, upcoming)
        seconds, logits, layer = {}, stored, None
        with torch.inference_mode():
            if layers:
                if self._logger is None:
                    self._logger = LayerLogger(self._fp32, self._int8_eager())
                fp32, layer = self._logger.log(x, indices)
                logits = fp32 if logits is None else logits
            elif logits is None:
                t = time.perf_counter()
                logits = self._fp32(x)
                seconds["fp32"] = time.perf_counter() - t
            t = time.perf_counter()
            int8 = self._script(x)
            seconds["int8_torchscript"] = time.perf_counter() - t
        return score_batch(indices, y, logits, int8), (logits if stored is None else None), seconds, layer

    def trial(self, quant, stats, batches: list[list[int]], logits: list[torch.Tensor]) -> tuple[ShardResult, str, int]:
        """One `quantray tune` trial: `quant`'s INT8 model built here from the merged statistics
        (prepare_fx, load them, convert_fx: no forward pass), scored on `batches` against their FP32
        `logits`. Returns the scores, the qparams digest and the INT8 state_dict's size."""
        prepared = flow.prepare(self._fp32, quant, self._example)
        stats.load(prepared)  # MissingStatistics names a value the calibration did not observe
        int8 = flow.convert(prepared)
        results = []
        with torch.inference_mode():
            for batch, fp32 in zip(batches, logits):
                x, y = self._decoded_batch(batch)
                results.append(score_batch(batch, y, fp32, int8(x)))
        return merge_results(results), merge.state_digest(prepared), len(state_dict_bytes(int8))

    def fp32_logits(self, indices: list[int]) -> torch.Tensor:
        """The FP32 model's logits on one test batch (which a tune's trials then find decoded)."""
        with torch.inference_mode():
            return self._fp32(self._decoded_batch(indices)[0])

    def _decoded_batch(self, indices: list[int]):
        """A test batch, decoded once and kept while the kept batches stay under _DECODED_BYTES."""
        found = self._decoded.get(tuple(indices))
        if found is None:
            found = data_mod.load_batch(self._test, indices)
            if self._decoded_bytes + found[0].nbytes <= _DECODED_BYTES:
                self._decoded[tuple(indices)] = found
                self._decoded_bytes += found[0].nbytes
        return found

    def data_read(self) -> dict:
        """What this worker has read of Parquet shards, per split: bytes (footers and manifests
        included) and row groups; {} where its data is not sharded."""
        datasets = {"calibration": getattr(self, "_dataset", None), "test": self._test}
        return {split: {"bytes": ds.bytes_read, "row_groups": ds.groups_read}
                for split, ds in datasets.items() if hasattr(ds, "groups_read")}

    def peak_rss_mb(self) -> float:
        """This process's peak resident memory so far, in MiB."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def host_facts(self) -> list:
        """What a stored FP32 speed figure is valid for: this host, its processor and CPU count."""
        import os

        return [platform.node(), processor(), os.cpu_count(), self._threads]

    def speed(self, x: torch.Tensor, batch: torch.Tensor | None, warmup: int, iters: int, precision: float,
              skip: tuple = ()) -> dict:
        """Latency at batch 1 (and throughput on `batch`) of FP32, INT8 eager and the INT8
        TorchScript model, in turn, leaving out the models in `skip` (figures known already)."""
        models = {"fp32": self._fp32, "int8": self._int8_eager(), "int8_torchscript": self._script}
        speed = measure_speed({k: m for k, m in models.items() if k not in skip}, x, batch, warmup, iters, precision)
        speed["conditions"].update(host=platform.node(), processor=processor(), threads=self._threads,
                                   torch_threads=torch.get_num_threads(), engine=torch.backends.quantized.engine)
        return speed
