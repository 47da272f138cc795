"""A run owns its folder: which folder a run writes to, whether it starts, resumes, starts over or is
already done, and metrics.jsonl cut back to the checkpoint it resumes from.

Rules (decided here once, before any model loads):
- a new run (resume_from="") never writes into an existing run folder: a reused run_name is an error;
- resume_from=latest takes the newest complete checkpoint of logdir/run_name (or of the newest
  <name>_* folder); a run folder with no complete checkpoint (killed before its first save) starts
  over in the same folder, its metrics, images and report cleared, since nothing was saved;
- resume_from=<checkpoint folder> must be complete and the newest of its run (newer ones would mix
  two histories);
- a checkpoint at the run's last update means the run is finished: nothing to do (status 0); one past
  it is an error naming train.num_epochs;
- a resume is compared with the run's record (config.json, plus the changes earlier resumes made):
  a field that changes what the checkpoint means (RESUME_FIXED) is an error naming both values;
  any other change is allowed, appended to resumes.jsonl (RESUME_QUIET quietly, the rest with a
  warning), and config.json keeps what the run started with.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignprop import checkpoints
from alignprop.errors import ConfigError

METRICS = "metrics.jsonl"
RESUMES = "resumes.jsonl"  # one JSON object per resume: update, checkpoint, changed fields
# what makes a folder a run's: a new run refuses a folder holding any of these
RUN_FILES = ("config.json", METRICS, "checkpoints", "final", "report.html")


@dataclass(frozen=True)
class RunPlan:
    """Where the run writes and how it begins."""

    run_dir: Path
    checkpoint: Path | None  # resume from it
    done: int  # updates the checkpoint holds (0 without one)
    finished: bool  # the checkpoint is at the last update: nothing to do
    start_over: bool  # the folder exists without a complete checkpoint: clear it and begin
    message: str  # what is happening, for the log


def plan(config: Any, num_updates: int, new_name: str) -> RunPlan:
    """Decide the run folder and the starting point; raise ConfigError for anything that would mix two runs."""
    epochs = f"train.num_epochs={config.train.num_epochs} ({num_updates} updates)"
    if config.resume_from == "":
        name = config.run_name or new_name
        run = Path(config.logdir) / name
        taken = [f for f in RUN_FILES if (run / f).exists()]
        if taken:
            raise ConfigError(
                f"run_name={name!r}: {run} already holds a run ({', '.join(taken)}); continue it with "
                "--config.resume_from=latest, or choose another run_name"
            )
        return RunPlan(run, None, 0, False, False, "")
    if config.resume_from == "latest":
        run = checkpoints.latest_run_dir(config)
        if run is None:
            name = config.run_name or new_name
            msg = f"resume_from=latest: no run folder found, starting a new run {name}"
            return RunPlan(Path(config.logdir) / name, None, 0, False, False, msg)
        checkpoint = checkpoints.latest_checkpoint(run)
        if checkpoint is None:
            msg = f"resume_from=latest: {run} has no complete checkpoint; starting it over from update 0"
            return RunPlan(run, None, 0, False, True, msg)
    else:
        checkpoint = Path(config.resume_from)
        run = checkpoint.parent.parent
        newer = [p.name for p in checkpoints.list_checkpoints(run) if _step(p) > _step(checkpoint)]
        if newer:
            raise ConfigError(
                f"resume_from={config.resume_from!r}: the run has newer checkpoints ({', '.join(newer)}) that "
                "resuming here would mix with; resume from latest, or delete them first"
            )
    done = int(checkpoints.checkpoint_info(checkpoint)["update"])
    if done > num_updates:
        raise ConfigError(
            f"{epochs} is fewer than the {done} updates {checkpoint} has done; raise train.num_epochs to continue"
        )
    finished = done == num_updates
    msg = (
        f"{run} already finished ({done} of {num_updates} updates); nothing to do"
        if finished
        else ""
    )
    return RunPlan(run, checkpoint, done, finished, False, msg)


def _step(path: Path) -> int:
    m = checkpoints.CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def start_over(run_dir: Path) -> None:
    """Clear what a run killed before its first checkpoint left (metrics, images, report, partial saves)."""
    for name in (
        METRICS,
        RESUMES,
        "report.html",
        "images",
        "plots",
        "final",
        "checkpoints",
        "tensorboard",
    ):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def write_final(out: Path, write: Callable[[Path], Any]) -> Path:
    """Fill `out` with `write(folder)` and a manifest of its files' sha256: written beside it, then
    renamed into place (whole or absent). A failed write (full disk, quota) removes the temporary
    folder and raises RunStopped; the run's checkpoints are untouched."""
    from alignprop.errors import writing

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(out, out.parent, RESUME_HINT):
            write(tmp)
            checkpoints.write_manifest(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


RESUME_HINT = (
    "free space or fix the folder's permissions, then resume with --config.resume_from=latest"
)


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Keep metrics rows with step <= `step` (a torn last line is dropped); return how many rows remain."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return 0
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial line
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line + "\n")
    tmp = path.with_name(f".{METRICS}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return len(keep)


# Fields (and sections) whose change on resume would make the checkpoint mean something else: the
# LoRA's shape or scale, the weights it adapts and how they are conditioned, what it was trained for.
RESUME_FIXED = (
    "lora.enabled", "lora.rank", "lora.alpha", "lora.target_modules",
    "pretrained.model", "pretrained.revision", "pretrained.family", "pretrained.variant",
    "pretrained.single_file_config", "pretrained.vae", "pretrained.drop_t5",
    "pretrained.max_sequence_length", "reward", "reward_models", "train.algorithm", "tiny", "tiny_kit",
)  # fmt: skip
# Changes that leave the training itself as it was: run length, logging, evaluation, saving, speed.
RESUME_QUIET = (
    "train.num_epochs", "eval_freq", "save_freq", "keep_checkpoints", "log_with", "wandb_project",
    "log_images", "eval_rewards", "eval_seed", "eval_repeats", "prompts.eval", "prompts.num_eval",
    "push_to_hub", "cpu_threads", "device", "allow_tf32", "train.max_nonfinite",
    "train.debug_dump_grads", "train.compile_unet", "train.cuda_graphs", "train.channels_last",
    "sample.grad_checkpoint", "sample.checkpoint", "sample.decoder_checkpoint", "sample.decode_chunk",
    "sample.merge_lora", "pretrained.offload_text_encoders", "lora.init",
)  # fmt: skip
# where the run is, not what it is
_RESUME_IGNORED = ("resume_from", "run_name", "logdir")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _kind(field: str) -> str:
    def under(names: tuple[str, ...]) -> bool:
        return any(field == n or field.startswith(n + ".") for n in names)

    if under(_RESUME_IGNORED):
        return "ignored"
    return "fixed" if under(RESUME_FIXED) else "quiet" if under(RESUME_QUIET) else "warn"


def recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config as it stands: config.json with every earlier resume's changes applied
    (flat, dotted fields); None when the run has no config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        record = _flat(json.loads(path.read_text()))
    except (ValueError, OSError) as err:
        raise ConfigError(
            f"resume: {path} cannot be read ({err}); it records what the run was trained with, so "
            "restore it, or start a new run with another run_name"
        ) from None
    for event in resume_events(run_dir):
        record.update({k: v[1] for k, v in event.get("changes", {}).items()})
    return record


def resume_events(run_dir: Path) -> list[dict[str, Any]]:
    """The run's resumes.jsonl, in order (a torn last line is skipped)."""
    path = Path(run_dir) / RESUMES
    events = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            events.append(row)
    return events


def resume_changes(config: Any, run_dir: Path, done: int) -> dict[str, list]:
    """{field: [recorded, new]} for every field the resumed config changes; ConfigError for one
    that changes what the checkpoint means; a one-line warning for one that changes the training."""
    from alignprop.errors import warn_once

    record = recorded_config(run_dir)
    if record is None:
        warn_once(
            f"resume: {run_dir} has no config.json, so the config cannot be compared; writing it"
        )
        return {}
    new = _flat(json.loads(config.to_json_best_effort()))
    changes = {k: [record[k], v] for k, v in new.items() if k in record and record[k] != v}
    changes = {k: v for k, v in changes.items() if _kind(k) != "ignored"}
    fixed = [k for k in changes if _kind(k) == "fixed"]
    if fixed:
        k, (old, value) = fixed[0], changes[fixed[0]]
        also = f" (also changed: {', '.join(fixed[1:])})" if fixed[1:] else ""
        raise ConfigError(
            f"resume: {k}={value!r}, but {run_dir} was trained with {k}={old!r}{also}; its checkpoint "
            f"means something else under the new value: put the old value back (--config.{k}={_arg(old)}), "
            "or start a new run (another run_name, no resume_from)"
        )
    warned = [
        f"{k} {old!r} -> {value!r}" for k, (old, value) in changes.items() if _kind(k) == "warn"
    ]
    if warned:
        warn_once(
            f"resume at update {done} changes how training continues: {'; '.join(warned)} "
            f"(recorded in {RESUMES}; config.json keeps what the run started with)"
        )
    return changes


def _arg(value: Any) -> str:
    """A recorded value as a --config.a.b=VALUE argument."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def record_resume(run_dir: Path, checkpoint: Path, done: int, changes: dict[str, list]) -> None:
    """Append this resume (update, checkpoint, changed fields) to the run's resumes.jsonl."""
    import datetime

    event = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "update": done,
             "checkpoint": Path(checkpoint).name, "changes": changes}  # fmt: skip
    try:
        with open(Path(run_dir) / RESUMES, "a") as f:
            f.write(json.dumps(event) + "\n")
    except OSError as err:
        raise ConfigError(f"logdir: cannot write {Path(run_dir) / RESUMES} ({err})") from None
