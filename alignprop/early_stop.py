"""Early stopping on an eval metric, and tracking of the best evaluation (to keep its LoRA).

Reward hacking makes the training reward climb while what it stands for (a held-out judge,
the diversity of the images) gets worse. Watching such a metric at each evaluation,

    stop = EarlyStop.from_config(config)          # None when train.early_stop.metric == ""
    ...
    metrics = run.evaluate()                      # {"eval/hps_mean": ..., "eval/diversity": ...}
    if stop is not None and stop.update(step, metrics):
        save the LoRA as the best one             # a new best evaluation
    if stop is not None and stop.should_stop:
        break                                     # `patience` evaluations without improvement

lets a run end when the metric stops improving and keep the best LoRA, not the last.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from alignprop.errors import ConfigError

MODES = ("max", "min")
FIELD = "train.early_stop"


class EarlyStopMetricError(ConfigError):
    """The watched metric is not among the eval metrics."""


def early_stop_config() -> ml_collections.ConfigDict:
    """The `train.early_stop` config section (plug in as `config.train.early_stop`)."""
    c = ml_collections.ConfigDict()
    # Eval metric to watch, e.g. "eval/hps_mean" or "eval/diversity"; "" = early stopping off.
    c.metric = ""
    # "max": higher is better (rewards, diversity); "min": lower is better.
    c.mode = "max"
    # Stop after this many evaluations in a row without a new best.
    c.patience = 3
    # A new best must beat the previous best by more than this (in the metric's units).
    c.min_delta = 0.0
    return c


def _section(cfg: Any) -> Any:
    """config.train.early_stop from a full config, or the section itself."""
    train = cfg.get("train") if hasattr(cfg, "get") else None
    if train is not None and "early_stop" in train:
        return train.early_stop
    return cfg


def validate_early_stop(cfg: Any) -> None:
    """Check `train.early_stop` (pass the full config or the section); ConfigError names the field.

    With the full config it also checks that evaluation runs during training (eval_freq > 0)
    and that an `eval/<name>_mean` metric names the training reward ("reward"), one of its
    parts, or an entry of eval_rewards.
    """
    c = _section(cfg)
    for name in ("metric", "mode", "patience", "min_delta"):
        if name not in c:
            raise ConfigError(f"{FIELD}.{name} is missing (see early_stop.early_stop_config())")
    if not isinstance(c.metric, str):
        raise ConfigError(f"{FIELD}.metric must be a string, got {c.metric!r}")
    if not c.metric:
        return
    if c.mode not in MODES:
        raise ConfigError(f"{FIELD}.mode={c.mode!r}; choose one of {list(MODES)}")
    if isinstance(c.patience, bool) or not isinstance(c.patience, int) or c.patience < 1:
        raise ConfigError(f"{FIELD}.patience must be an integer >= 1, got {c.patience!r}")
    try:
        min_delta = float(c.min_delta)
    except (TypeError, ValueError):
        min_delta = math.nan
    if not (math.isfinite(min_delta) and min_delta >= 0):
        raise ConfigError(f"{FIELD}.min_delta must be a finite number >= 0, got {c.min_delta!r}")
    if not c.metric.startswith("eval/"):
        raise ConfigError(
            f"{FIELD}.metric={c.metric!r}: early stopping watches eval metrics, which start with "
            "'eval/' (e.g. 'eval/hps_mean', 'eval/reward_mean', 'eval/diversity')"
        )
    if c is cfg:  # only the section: nothing more to check against
        return
    if "eval_freq" in cfg and not cfg.eval_freq:
        raise ConfigError(
            f"{FIELD}.metric={c.metric!r} needs evaluations during training, but eval_freq=0 "
            "evaluates only at the end; set eval_freq > 0 or metric=''"
        )
    name = c.metric[len("eval/") :]
    if name.endswith("_mean") and "eval_rewards" in cfg and "reward" in cfg:
        from alignprop import rewards

        known = {"reward", *[s.strip() for s in cfg.eval_rewards.split(",") if s.strip()]}
        try:
            known |= {n for n, _ in rewards.parse_spec(cfg.reward)}
        except (ValueError, TypeError):
            pass  # a bad reward spec is reported under its own field
        if name[: -len("_mean")] not in known:
            raise ConfigError(
                f"{FIELD}.metric={c.metric!r}: no eval reward named "
                f"{name[: -len('_mean')]!r}; evaluated are {sorted(known)} (eval/<name>_mean), "
                "add it to eval_rewards or watch one of those"
            )


class EarlyStop:
    """Track the best value of one eval metric and say when `patience` evaluations brought none.

    `update(step, metrics)` once per evaluation returns True for a new best. An improvement is
    `value > best + min_delta` ("max") or `value < best - min_delta` ("min"); the first finite
    value is always a best. A NaN value is never a best and counts toward patience.
    `state_dict()` / `load_state_dict()` make it resumable (accelerate's
    `register_for_checkpointing` saves it with the checkpoint).
    """

    def __init__(self, metric: str, mode: str = "max", patience: int = 3, min_delta: float = 0.0):
        section = ml_collections.ConfigDict(
            {"metric": metric, "mode": mode, "patience": patience, "min_delta": min_delta}
        )
        if not metric:
            raise ConfigError(f"{FIELD}.metric is empty: early stopping is off, build no EarlyStop")
        validate_early_stop(section)
        self.metric, self.mode = metric, mode
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0  # evaluations since the last best
        self.last_step: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> EarlyStop | None:
        """From the full config or its `train.early_stop` section; None when metric is ""."""
        validate_early_stop(cfg)
        c = _section(cfg)
        if not c.metric:
            return None
        return cls(c.metric, c.mode, c.patience, c.min_delta)

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def update(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Record one evaluation's metrics at `step`; True when it is a new best."""
        if self.metric not in metrics:
            raise EarlyStopMetricError(
                f"{FIELD}.metric={self.metric!r} is not among the eval metrics; "
                f"available: {sorted(metrics)}"
            )
        value = metrics[self.metric]
        value = float(value.item() if hasattr(value, "item") else value)
        self.last_step = int(step)
        if self._improves(value):
            self.best_value, self.best_step, self.bad_evals = value, int(step), 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        """True once `patience` evaluations in a row brought no new best."""
        return self.bad_evals >= self.patience

    def summary(self) -> dict[str, float | int | None]:
        """Metrics to log: the best value and its step (None before the first evaluation)."""
        return {
            f"early_stop/best_{self.metric}": self.best_value,
            "early_stop/best_step": self.best_step,
            "early_stop/bad_evals": self.bad_evals,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the best and the patience count; patience and min_delta stay as configured.

        A checkpoint that watched another metric or mode has no comparable best: it is ignored
        (with a warning) and tracking starts afresh.
        """
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            warnings.warn(
                f"{FIELD}: the checkpoint tracked {state.get('metric')!r} ({state.get('mode')}), "
                f"this run tracks {self.metric!r} ({self.mode}); starting the best anew",
                stacklevel=2,
            )
            return
        best = state.get("best_value")
        self.best_value = None if best is None else float(best)
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.last_step = state.get("last_step")


def observe(stop: EarlyStop, step: int, metrics: Mapping[str, Any], accelerator: Any) -> bool:
    """`stop.update` on the main process (which holds the eval metrics); every process then holds
    the same state and the same answer. True on a new best."""
    from accelerate.utils import broadcast_object_list

    box = [None, None]
    if accelerator.is_main_process:
        box = [stop.update(step, metrics), stop.state_dict()]
    broadcast_object_list(box)
    if not accelerator.is_main_process:
        stop.load_state_dict(box[1])
    return bool(box[0])


def replace_folder(out: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write a folder atomically: `write(tmp)` fills a temporary sibling, which then replaces `out`.

    A crash leaves either the old folder or the new one whole (the old one, renamed aside for the
    moment of the swap, is restored on the next call if the swap did not finish).
    """
    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    if old.exists() and not out.exists():  # a swap was cut short: the old folder is the good one
        os.replace(old, out)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    from alignprop import checkpoints
    from alignprop.errors import writing

    try:  # a failed write (full disk) keeps the old folder and removes the temporary one
        with writing(out, out.parent, "free space, then resume with --config.resume_from=latest"):
            tmp.mkdir(parents=True)
            write(tmp)
            checkpoints.write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
