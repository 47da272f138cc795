"""The batch arithmetic of a run: micro-batch, processes, accumulation and run length (checked here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignprop.errors import ConfigError


@dataclass(frozen=True)
class Batching:
    """Per-process micro-batch, processes, accumulation and run length, all derived from the config."""

    micro: int
    processes: int
    accum: int
    total: int
    updates_per_epoch: int
    num_updates: int

    def describe(self) -> str:
        return (
            f"{self.total} samples per update = {self.processes} processes x {self.micro} per micro-batch "
            f"x {self.accum} accumulation steps; {self.updates_per_epoch} updates per epoch, {self.num_updates} updates"
        )


def batching(config: Any, processes: int) -> Batching:
    """Derive gradient accumulation and run length; raise ConfigError naming the field if they don't divide."""
    micro, total = config.sample.batch_size, config.train.total_batch_size
    if micro < 1:
        raise ConfigError(f"sample.batch_size must be >= 1, got {micro}")
    if total < 1 or total % (micro * processes):
        raise ConfigError(
            f"train.total_batch_size={total} must be a positive multiple of sample.batch_size x processes = "
            f"{micro} x {processes} = {micro * processes}"
        )
    per_epoch = config.train.samples_per_epoch
    if per_epoch < total or per_epoch % total:
        raise ConfigError(
            f"train.samples_per_epoch={per_epoch} must be a positive multiple of train.total_batch_size={total}"
        )
    if config.train.num_epochs < 1:
        raise ConfigError(f"train.num_epochs must be >= 1, got {config.train.num_epochs}")
    updates_per_epoch = per_epoch // total
    return Batching(
        micro,
        processes,
        total // (micro * processes),
        total,
        updates_per_epoch,
        updates_per_epoch * config.train.num_epochs,
    )
