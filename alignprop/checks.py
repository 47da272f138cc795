"""Config checks and batch arithmetic: everything that can be wrong is found here, before anything loads."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignprop import models, prompts, rewards
from alignprop.errors import ConfigError
from alignprop.solvers import Truncation


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


def _check_sizes(s: Any) -> None:
    for field in ("resolution", "height", "width"):
        value = s.get(field, 0)
        if value < 0 or value % 8:
            raise ConfigError(
                f"sample.{field}={value} must be a multiple of 8 (or 0 for the model's native size)"
            )


def _check_rewards(config: Any) -> None:
    for field, spec in (("reward", config.reward), ("eval_rewards", config.eval_rewards)):
        for part in [s for s in spec.split(",") if s] if field == "eval_rewards" else [spec]:
            try:
                rewards.validate_spec(part)
            except ValueError as err:
                raise ConfigError(f"{field}: {err}") from err


def _check_ranges(config: Any) -> None:
    for field in ("train.learning_rate", "train.loss_coeff"):
        section, name = field.split(".")
        if not config[section][name] > 0:
            raise ConfigError(f"{field} must be > 0, got {config[section][name]}")
    if config.train.max_grad_norm < 0:
        raise ConfigError(
            f"train.max_grad_norm must be >= 0 (0 = off), got {config.train.max_grad_norm}"
        )
    if not 0.0 <= config.sample.eta <= 1.0:
        raise ConfigError(
            f"sample.eta={config.sample.eta} must be in [0, 1] (0 = DDIM, 1 = DDPM-like)"
        )
    if config.lora.enabled and config.lora.rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {config.lora.rank}")
    if config.lora.init not in models.LORA_INITS:
        raise ConfigError(f"lora.init={config.lora.init!r}; valid: {list(models.LORA_INITS)}")
    for field in ("eval_freq", "save_freq", "keep_checkpoints", "prompts.num_eval", "cpu_threads"):
        node, name = (config.prompts, "num_eval") if "." in field else (config, field)
        if node[name] < 0:
            raise ConfigError(f"{field} must be >= 0, got {node[name]}")


def validate_config(config: Any, processes: int = 1) -> Batching:
    """Check every cross-field rule before anything loads; raise ConfigError naming the field."""
    from alignprop.tracking import TRACKERS

    b = batching(config, processes)
    if config.mixed_precision not in ("fp16", "bf16", "no"):
        raise ConfigError(f"mixed_precision={config.mixed_precision!r}; valid: fp16, bf16, no")
    if config.log_with not in TRACKERS:
        raise ConfigError(f"log_with={config.log_with!r}; valid: {list(TRACKERS)}")
    if config.log_with != "none" and importlib.util.find_spec(config.log_with) is None:
        raise ConfigError(
            f"log_with={config.log_with!r} needs `pip install {config.log_with}` (or log_with=none)"
        )
    if config.device:
        models.resolve_device(config.device)
    Truncation.from_config(config.truncation).validate(config.sample.num_steps)
    _check_sizes(config.sample)
    _check_ranges(config)
    _check_rewards(config)
    for name in ("train", "eval"):
        prompts.check_spec(config.prompts[name], field=f"prompts.{name}")
    for field in ("model", "vae"):
        value = config.pretrained.get(field, "")
        if value and models.is_path(value) and not Path(value).expanduser().exists():
            raise ConfigError(f"pretrained.{field}={value!r}: no such file or folder")
    if config.resume_from not in ("", "latest") and not Path(config.resume_from).is_dir():
        raise ConfigError(
            f"resume_from={config.resume_from!r}: no such checkpoint folder (or use 'latest')"
        )
    _check_hacking(config)
    return b


def _check_hacking(config: Any) -> None:
    """Reward-hacking guards: regularisers, early stopping, eval seeds, hub upload."""
    from alignprop import early_stop, model_card

    t = config.train
    for field in ("kl_coeff", "pretrain_coeff"):
        if not t.get(field, 0.0) >= 0:
            raise ConfigError(f"train.{field} must be >= 0 (0 = off), got {t[field]}")
    data = t.get("pretrain_data", "")
    if data and not Path(data).expanduser().is_dir():
        raise ConfigError(f"train.pretrain_data={data!r}: no such folder of images and captions")
    if config.get("eval_repeats", 1) < 1:
        raise ConfigError(f"eval_repeats must be >= 1, got {config.eval_repeats}")
    if "early_stop" in t:
        early_stop.validate_early_stop(config)
        metric = t.early_stop.metric
        if metric.startswith("eval/diversity") and config.get("eval_repeats", 1) < 2:
            raise ConfigError(
                f"train.early_stop.metric={metric!r} needs eval_repeats >= 2 (seeds per eval prompt)"
            )
    model_card.check_push_to_hub(config.get("push_to_hub", ""))


def apply_tiny(config: Any) -> None:
    """Point every model field at the tiny random models (written on first use) when config.tiny is set.

    The pipeline is config.tiny_kit's ("" = the kit of pretrained.family, sd for auto).
    """
    if not config.tiny:
        return
    from alignprop import tiny

    tiny.apply_overrides(config, tiny.ensure_tiny())
    family = config.pretrained.get("family", "auto")
    kit = config.get("tiny_kit", "") or ("sd" if family == "auto" else family)
    if kit not in tiny.FAMILIES:
        raise ConfigError(f"tiny_kit={kit!r} is not known; valid: {', '.join(tiny.FAMILIES)}")
    config.pretrained.model = tiny.ensure_tiny_model(kit)
