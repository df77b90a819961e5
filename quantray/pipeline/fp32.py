"""What the FP32 model computed before, asked by evaluation and by tune: its logits per test batch
and its speed per host, kept in the job's stored statistics.

    memo = Fp32Memo(open_stats(job, use_cache))
    logits = memo.logits(identities)          # per batch: the stored logits, or None
    memo.keep_logits(identity, logits)

Logits are keyed (by the store) by the FP32 weights, the thread count and the torch version, and
here by the batch's sample identities, not by the quantization config: a rerun, a refresh or an
evaluation of an unchanged FP32 model on the same images computes only the INT8 side. Speed is
keyed by the host's facts and the measurement's conditions. Without a store it remembers nothing.
"""

from __future__ import annotations

import torch

from ..storage.stats import StatsStore

__all__ = ["Fp32Memo"]


class Fp32Memo:
    def __init__(self, store: StatsStore | None):
        self.store = store

    @property
    def keeps(self) -> bool:
        """Whether anything is remembered (a store is open)."""
        return self.store is not None

    def logits(self, identities: list[str]) -> list[torch.Tensor | None]:
        """The FP32 logits stored for each batch identity, or None where there are none."""
        if self.store is None:
            return [None] * len(identities)
        return [self.store.get(self.store.key("fp32-logits", identity)) for identity in identities]

    def keep_logits(self, identity: str, logits: torch.Tensor) -> None:
        if self.store is not None:
            self.store.put(self.store.key("fp32-logits", identity), logits)

    def speed(self, host: list, conditions: tuple) -> dict | None:
        """FP32 speed figures measured on `host` under `conditions` by an earlier run, or None."""
        return self.store.get(self.store.key("fp32-speed", host, *conditions)) if self.store is not None else None

    def keep_speed(self, host: list, conditions: tuple, figures: dict) -> None:
        if self.store is not None:
            self.store.put(self.store.key("fp32-speed", host, *conditions), figures)
