"""The training schedule: how many optimizer steps, how they map to epochs and micro-batches, and the learning
rate at each step (linear warmup, then half-cycle cosine to zero, as in the MAE paper). Pure arithmetic."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    micro_per_epoch: int  # micro-batches one process takes per epoch
    accum_iter: int  # micro-batches per optimizer step (the last step of an epoch may take fewer)
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float = 0.0

    @classmethod
    def plan(
        cls,
        micro_per_epoch: int,
        accum_iter: int,
        peak_lr: float,
        *,
        epochs: int,
        steps: int | None = None,
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
    ) -> Schedule:
        """`steps` wins over `epochs`; warmup is given in epochs and capped at half the run."""
        steps_per_epoch = math.ceil(micro_per_epoch / accum_iter)
        total = steps if steps else epochs * steps_per_epoch
        warmup = min(int(round(warmup_epochs * steps_per_epoch)), total // 2)
        return cls(micro_per_epoch, accum_iter, total, warmup, peak_lr, min_lr)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / self.accum_iter)

    @property
    def epochs(self) -> int:
        """Epochs begun by the end of the run (the last may be partial)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def epoch_of(self, step: int) -> int:
        """The epoch (from 0) that optimizer step `step` (from 0) belongs to."""
        return step // self.steps_per_epoch

    def micro_in_step(self, step: int) -> int:
        """Micro-batches that step `step` takes: accum_iter, or what is left of the epoch."""
        in_epoch = step % self.steps_per_epoch
        return min(self.accum_iter, self.micro_per_epoch - in_epoch * self.accum_iter)

    def micro_before(self, step: int) -> int:
        """Micro-batches taken before step `step`, counted from the start of the run."""
        return self.epoch_of(step) * self.micro_per_epoch + (step % self.steps_per_epoch) * self.accum_iter

    def is_epoch_end(self, steps_done: int) -> bool:
        return steps_done % self.steps_per_epoch == 0 or steps_done == self.total_steps

    def lr_at(self, step: int) -> float:
        """Linear warmup to the peak over `warmup_steps`, then half-cycle cosine down to `min_lr`."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
