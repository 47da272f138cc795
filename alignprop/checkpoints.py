"""Checkpoint folders, the one owner of their naming, discovery and integrity: the atomic
save and the load of a run's accelerate state (checkpoints/checkpoint_<update>), the record of
every file's size and sha256 written last (checkpoint_complete.json; files.json for final/ and
best/), and which checkpoint a resume starts from.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from alignprop.errors import ConfigError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")


# written last into a checkpoint: its step and every file's size and sha256; no marker = not a checkpoint
COMPLETE_MARKER = "checkpoint_complete.json"


# the same record of every file's size and sha256 for final/ and best/ (checked when a LoRA is loaded)
MANIFEST = "files.json"


def _checkpoint_step(path: Path) -> int:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def record_files(folder: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under folder (written into its marker or manifest)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (COMPLETE_MARKER, MANIFEST)
    }


def write_manifest(folder: str | os.PathLike) -> None:
    """Record every file's size and sha256 in folder/MANIFEST (final/, best/)."""
    import json

    (Path(folder) / MANIFEST).write_text(json.dumps({"files": record_files(folder)}, indent=1))


def _recorded_files(record: Path) -> dict | None:
    """The "files" of a marker or manifest, or None when it is absent or unreadable."""
    import json

    try:
        files = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def verify_files(folder: Path, files: dict, field: str) -> None:
    """ConfigError naming the first recorded file that is missing or differs in size or sha256.

    A record is {name: size} (checkpoints written before checksums) or {name: {"size", "sha256"}}."""
    for name, want in files.items():
        f = Path(folder) / name
        size, digest = (
            (want.get("size"), want.get("sha256")) if isinstance(want, dict) else (want, None)
        )
        if not f.is_file():
            raise ConfigError(f"{field}: file {f} is missing; it was written with the checkpoint")
        if f.stat().st_size != size:
            raise ConfigError(
                f"{field}: file {f} is damaged ({f.stat().st_size} bytes, {size} written)"
            )
        if digest is not None and file_sha256(f) != digest:
            raise ConfigError(
                f"{field}: file {f} is damaged (its sha256 differs from the one recorded when it was "
                "written: changed bytes on disk or in a copy)"
            )


# what an accelerate save_state of a LoRA run holds (checkpoints written before the marker existed)
LEGACY_FILES = (LORA_WEIGHT_NAME, "optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl")


def _legacy_complete(path: Path) -> bool:
    """A checkpoint from before COMPLETE_MARKER: every file of a save present and the LoRA file whole."""
    if not all((path / name).is_file() for name in LEGACY_FILES):
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path / LORA_WEIGHT_NAME), "pt") as f:
            return len(list(f.keys())) > 0
    except Exception:  # torn or not safetensors
        return False


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint folder that resume can use: its marker was written (or a whole older-format save)."""
    path = Path(path)
    return (path / COMPLETE_MARKER).is_file() or _legacy_complete(path)


def list_checkpoints(run_dir: str | os.PathLike, complete: bool = True) -> list[Path]:
    """A run's checkpoint folders, oldest first: the complete ones (default) or every checkpoint_N folder."""
    found = [
        p
        for p in (Path(run_dir) / "checkpoints").glob("checkpoint_*")
        if CHECKPOINT_RE.match(p.name) and (not complete or is_complete(p))
    ]
    return sorted(found, key=_checkpoint_step)


def checkpoint_dir(run_dir: str | os.PathLike, update: int) -> Path:
    """Where the checkpoint after `update` updates lives."""
    return Path(run_dir) / "checkpoints" / f"checkpoint_{update}"


def _pause(point: str, update: int, run_dir: Path) -> None:
    """Tests: ALIGNPROP_TEST_PAUSE_IN_SAVE=POINT[@UPDATE] touches <run>/paused_in_save and sleeps, to be killed there."""
    want = os.environ.get("ALIGNPROP_TEST_PAUSE_IN_SAVE", "")
    name, _, at = want.partition("@")
    if name == point and (not at or int(at) == update):
        import time

        (run_dir / "paused_in_save").write_text(f"{point}@{update}")
        time.sleep(3600)


def save_checkpoint(acc, run_dir: str | os.PathLike, update: int, meta: dict | None = None) -> Path:
    """accelerate's save_state on every rank into a hidden temporary folder; the main process then writes
    COMPLETE_MARKER and renames it to checkpoints/checkpoint_<update>, so that folder is whole or absent."""
    import json
    import shutil

    run_dir = Path(run_dir)
    final = checkpoint_dir(run_dir, update)
    tmp = final.parent / f".{final.name}.tmp"
    if acc.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".checkpoint_*.tmp"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
    acc.wait_for_everyone()
    try:
        _pause("begin", update, run_dir)
        acc.save_state(str(tmp))  # main: LoRA (save hook), optimizer, counters; every rank: its RNG
        _pause("state", update, run_dir)
        acc.wait_for_everyone()
        if acc.is_main_process:
            marker = {"update": update, **(meta or {}), "files": record_files(tmp)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1))
            _pause("marker", update, run_dir)
            if final.exists():  # an older folder of that name (e.g. incomplete): replace it
                old = final.parent / f".{final.name}.old.tmp"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    except Exception as err:
        from alignprop.errors import RunStopped, write_failure

        if isinstance(err, RunStopped) or (why := write_failure(err, final.parent)) is None:
            raise
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        last = list_checkpoints(run_dir)
        raise RunStopped(
            f"could not write checkpoint {final} ({why}); free space or fix the folder's permissions, then "
            f"resume with --config.resume_from=latest (last complete checkpoint: {last[-1] if last else 'none'})"
        ) from err
    acc.wait_for_everyone()
    _pause("renamed", update, run_dir)
    return final


class _Unused:
    """Takes a custom state the checkpoint holds beyond what this run registered, and drops it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def load_checkpoint(acc, checkpoint: str | os.PathLike) -> list:
    """accelerate's load_state of a checkpoint folder, the run's custom states matched by content.

    Custom states (the trainer's counters; the early-stopping state when train.early_stop is on;
    DDPO's per-prompt statistics) are saved by registration order, and accelerate loads them
    by position, refusing a checkpoint that holds another number of them. Each saved state goes
    to the registered object whose state_dict has the same keys instead: a checkpoint saved with
    early stopping off resumes with it on (and the other way round). Returns the registered
    objects the checkpoint held no state for (they start afresh).
    """
    found = {}
    for name in os.listdir(checkpoint):
        if m := re.fullmatch(r"custom_checkpoint_(\d+)\.pkl", name):
            found[int(m.group(1))] = Path(checkpoint) / name
    saved = [_load_state_file(found[i]) for i in sorted(found)]
    rng = Path(checkpoint) / f"random_states_{acc.process_index}.pkl"
    if rng.is_file():  # accelerate logs a failure to read it at INFO and goes on with other streams
        _load_state_file(rng)
    else:
        from alignprop.errors import warn_once

        warn_once(
            f"{checkpoint} holds no {rng.name} (saved with fewer processes): process "
            f"{acc.process_index}'s random streams start from the seed, not from the checkpoint"
        )
    registered = list(acc._custom_objects)
    free, order = list(registered), []
    for state in saved:
        keys = set(state) if isinstance(state, dict) else None
        match = next((o for o in free if set(o.state_dict()) == keys), None)
        if match is not None:
            free.remove(match)
        order.append(match if match is not None else _Unused())
    acc._custom_objects = order
    try:
        acc.load_state(str(checkpoint))
    except ConfigError:
        raise
    except Exception as err:  # optimizer.bin, scheduler, scaler: unreadable or not this run's
        raise ConfigError(
            f"resume_from: {checkpoint} could not be loaded ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else 'no message'}); resume from another "
            "checkpoint, or start a new run"
        ) from None
    finally:
        acc._custom_objects = registered
    for model in acc._models:  # a LoRA saved non-finite would be blamed on the learning rate later
        bad = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and not torch.isfinite(p).all()
        ]
        if bad:
            raise ConfigError(
                f"resume_from: {checkpoint} holds non-finite weights ({len(bad)} tensors, e.g. "
                f"{bad[0]}); resume from an earlier checkpoint"
            )
    return free


def _load_state_file(path: Path):
    """torch.load a pickled state of a checkpoint; ConfigError naming the file when it cannot be read."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError, AttributeError,
            ImportError, IndexError, KeyError, TypeError) as err:  # fmt: skip
        raise ConfigError(
            f"resume_from: checkpoint file {path} cannot be read ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:150] if str(err) else 'no message'}); it is damaged: resume from "
            "another checkpoint"
        ) from None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# checkpoint_info's verified records: {(path, the files' sizes and mtimes): info}
_verified: dict[tuple, dict] = {}


def checkpoint_info(path: str | os.PathLike, field: str = "resume_from") -> dict:
    """Check a checkpoint folder is complete and undamaged (marker present, every file it records
    there with its size and sha256); return its marker. Raises ConfigError naming the first bad file."""
    import json

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{field}={str(path)!r}: no such checkpoint folder (or use 'latest')")
    marker = path / COMPLETE_MARKER
    if not marker.is_file() and _legacy_complete(path):
        return {"update": _checkpoint_step(path), "files": {}}
    if not marker.is_file():
        raise ConfigError(
            f"{field}={str(path)!r}: incomplete checkpoint (no {COMPLETE_MARKER}: its save was interrupted); "
            "resume from an earlier checkpoint or use 'latest'"
        )
    stats = [
        (f.name, f.stat().st_mtime_ns, f.stat().st_size)
        for f in sorted(path.iterdir())
        if f.is_file()
    ]
    key = (str(path.resolve()), tuple(stats))
    if key in _verified:  # hashed once per process (latest, then the plan, ask twice)
        return dict(_verified[key])
    try:
        info = json.loads(marker.read_text())
        files = dict(info["files"])
        int(info["update"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{field}: {marker} is damaged; resume from another checkpoint") from None
    try:
        verify_files(path, files, field)
    except ConfigError as err:
        raise ConfigError(f"{err}; resume from another checkpoint (or 'latest')") from None
    _verified[key] = info
    return dict(info)


def latest_checkpoint(run_dir: str | os.PathLike, warn=None) -> Path | None:
    """The newest complete, undamaged checkpoint of a run. The newer ones it skips (incomplete, or
    a file whose size or sha256 differs from its record) are reported through warn, each by name;
    ConfigError when the run has complete checkpoints and every one is damaged."""
    from alignprop.errors import warn_once

    warn = warn or warn_once
    complete = list_checkpoints(run_dir)
    newest = _checkpoint_step(complete[-1]) if complete else -1
    for p in list_checkpoints(run_dir, complete=False):
        if _checkpoint_step(p) > newest and not is_complete(p):
            warn(
                f"skipping incomplete checkpoint {p} (no {COMPLETE_MARKER}: its save was interrupted)"
            )
    damaged = []
    for p in reversed(complete):
        try:
            checkpoint_info(p)
        except ConfigError as err:
            damaged.append(p.name)
            warn(f"skipping damaged checkpoint {p}: {str(err).removeprefix('resume_from: ')}")
            continue
        return p
    if damaged:
        raise ConfigError(
            f"resume_from=latest: every checkpoint of {run_dir} is damaged ({', '.join(damaged)}); "
            "restore one from a copy, or start a new run (another run_name, no resume_from)"
        )
    return None


def latest_run_dir(config) -> Path | None:
    """The run folder resume_from=latest means: logdir/run_name, else the newest <name>_* folder (None if none)."""
    logdir = Path(config.logdir)
    if config.run_name:
        run = logdir / config.run_name
        return run if run.is_dir() else None
    runs = [p for p in logdir.glob(f"{config.name}_*") if p.is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, upto: int) -> list[Path]:
    """Delete this run's complete checkpoints at or before update `upto` beyond the newest `keep` (0 = keep all)."""
    import shutil

    if not keep:
        return []
    mine = [p for p in list_checkpoints(run_dir) if _checkpoint_step(p) <= upto]
    gone = mine[:-keep]
    for old in gone:
        shutil.rmtree(old, ignore_errors=True)
    return gone
