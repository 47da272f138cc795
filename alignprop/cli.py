"""The scripts' command-line plumbing: parse `--config FILE:NAME --config.a.b=v` without global
flags, and turn every user error into one line on stderr with an exit status.

Status 0: done (or nothing to do); 2: a user error (bad flag, config value, file or folder), found
before any model loads wherever it can be; 3: the run stopped on purpose mid-way (non-finite
updates, a checkpoint that could not be written), its last checkpoint and metrics intact.
Each script's `main(argv) -> int` goes through `run`, so tests call it in-process.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignprop.errors import ConfigError, MissingWeightsError, RunStopped, write_failure

# errnos of a write the machine refused: no space, quota, file-size limit, read-only file system
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)

USER_ERROR, STOPPED = 2, 3
# under scripts/launch.sh (alignprop.launcher): the file each launched process appends its status to
STATUS_FILE = "ALIGNPROP_STATUS_FILE"


def one_line(err: BaseException | str) -> str:
    """The message on a single line (tracebacks quoted by absl reduced to their last line)."""
    text = str(err).strip()
    if "Traceback (most recent call last)" in text:
        tail = [x.strip() for x in text.splitlines() if x.strip()]
        head = text.split("Error whilst parsing", 1)[0].strip().rstrip(":")
        text = f"{head}: {tail[-1]}" if head else tail[-1]
    return " ".join(x.strip() for x in text.splitlines() if x.strip())


def write_status(status: int) -> None:
    """In a launched process: record its exit status for the launcher (one line per process)."""
    path = os.environ.get(STATUS_FILE)
    if path:
        try:
            with open(path, "a") as f:
                f.write(f"{status}\n")
        except OSError:
            pass  # the launcher falls back on accelerate's status


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call main(argv); a user error prints `error: ...` (status 2), a stopped run `stopped: ...` (3)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = int(main(argv) or 0)
    except (ConfigError, MissingWeightsError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        status = USER_ERROR
    except RunStopped as err:
        print(f"stopped: {one_line(err)}", file=sys.stderr)
        status = STOPPED
    except OSError as err:  # a write no save site caught: a full disk, a quota, a read-only folder
        if err.errno not in FULL_ERRNOS:
            raise
        print(f"stopped: could not write ({write_failure(err, err.filename and Path(err.filename).parent)}); "
              "free space or fix the folder's permissions, then run it again", file=sys.stderr)  # fmt: skip
        status = STOPPED
    write_status(status)  # under scripts/launch.sh: accelerate would report 1 for any failure
    return status


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors (one line, status 2 through `run`) instead of usage + exit."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message} (see {self.prog} --help)")


def parse_config(argv: Sequence[str], default: str, prog: str = "") -> tuple[Any, list[str]]:
    """Parse `--config FILE:NAME` and `--config.a.b=value` from argv into a ConfigDict (fresh flags each call).

    Returns (config, the arguments left over). Unknown fields, names and values raise ConfigError.
    """
    from absl import flags

    argv = [prog or "script", *argv]
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(
            f"usage: {argv[0]} [--config FILE:NAME] [--config.a.b=value ...]  (fields: config/base.py)"
        )
        sys.exit(0)
    overrides = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    try:
        fv = _flags(argv, default)
        rest = fv(argv)
        config = fv.config
        config.keys()  # the file is loaded lazily: fail here, not at first use
    except AttributeError as err:  # ml_collections: a --config.a.b whose field does not exist
        raise ConfigError(_unknown_field(argv, default, overrides, err)) from None
    except flags.UnrecognizedFlagError as err:
        name = getattr(err, "flagname", "") or str(err)
        if name.startswith("config."):
            raise ConfigError(_unknown_field(argv, default, [name], err)) from None
        raise ConfigError(f"unknown flag --{name}") from None
    except flags.Error as err:
        raise ConfigError(one_line(err)) from None
    except OSError as err:  # a config file that is not there
        m = re.search(r"Attempted.*?\n\s*(\S+)\s*\n\s*(.*)", str(err))
        what = f"{m.group(1)}: {m.group(2)}" if m else one_line(err)[:200]
        raise ConfigError(f"--config: cannot load the config file ({what})") from None
    return config, rest[1:]


def _flags(argv: list[str], default: str):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", default, "experiment config FILE:NAME", fv, sys_argv=argv
    )
    return fv


def _unknown_field(argv: list[str], default: str, overrides: list[str], err: BaseException) -> str:
    bare = [a for a in argv if not a.startswith("--config.")]
    try:
        fv = _flags(bare, default)
        fv(bare)
        config = fv.config
    except Exception:  # noqa: BLE001 - the config itself failed to load: report the original error
        return f"unknown config field ({one_line(err)})"
    for name in overrides:
        path = name.removeprefix("config.")
        node, ok = config, True
        for part in path.split("."):
            if ok and hasattr(node, "keys") and part in node.keys():
                node = node[part]
            else:
                ok = False
        if not ok:
            return (
                f"--config.{path}: no such config field (every field is listed in config/base.py)"
            )
    return f"unknown config field ({one_line(err)})"
