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
  it is an error naming train.num_epochs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignprop import lora_io
from alignprop.errors import ConfigError

METRICS = "metrics.jsonl"
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
        run = lora_io.latest_run_dir(config)
        if run is None:
            name = config.run_name or new_name
            msg = f"resume_from=latest: no run folder found, starting a new run {name}"
            return RunPlan(Path(config.logdir) / name, None, 0, False, False, msg)
        checkpoint = lora_io.latest_checkpoint(run)
        if checkpoint is None:
            msg = f"resume_from=latest: {run} has no complete checkpoint; starting it over from update 0"
            return RunPlan(run, None, 0, False, True, msg)
    else:
        checkpoint = Path(config.resume_from)
        run = checkpoint.parent.parent
        newer = [p.name for p in lora_io.list_checkpoints(run) if _step(p) > _step(checkpoint)]
        if newer:
            raise ConfigError(
                f"resume_from={config.resume_from!r}: the run has newer checkpoints ({', '.join(newer)}) that "
                "resuming here would mix with; resume from latest, or delete them first"
            )
    done = int(lora_io.checkpoint_info(checkpoint)["update"])
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
    m = lora_io.CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def start_over(run_dir: Path) -> None:
    """Clear what a run killed before its first checkpoint left (metrics, images, report, partial saves)."""
    for name in (METRICS, "report.html", "images", "plots", "final", "checkpoints", "tensorboard"):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def write_final(out: Path, write: Callable[[Path], Any]) -> Path:
    """Fill `out` with `write(folder)`: written beside it, then renamed into place (whole or absent)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


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
