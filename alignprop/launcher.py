"""What scripts/launch.sh runs around `accelerate launch`: the user's launcher config read the way
accelerate reads it, and the training process's own exit status passed back.

    python -m alignprop.launcher --check-accelerate-config FILE   # one line naming FILE, status 2
    python -m alignprop.launcher -- accelerate launch --quiet ... scripts/train.py ...

`accelerate launch` turns any failing child into its own status 1 (a CalledProcessError traceback
without --quiet), so the child writes its status to ALIGNPROP_STATUS_FILE (alignprop.cli.run) and
the launcher exits with it: 2 for a user error, 3 for a run stopped on purpose.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from alignprop.cli import STATUS_FILE, USER_ERROR, one_line

PREFIX = "alignprop launch: "


def check_accelerate_config(path: str) -> str:
    """'' if accelerate's own loader reads `path`, else the one-line reason (YAML, unknown field or value)."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        load_config_from_file(path)
    except AttributeError:  # yaml that is a list or a scalar
        return (
            f"ACCELERATE_CONFIG={path}: not a launcher config (YAML key: value settings expected)"
        )
    except Exception as err:  # noqa: BLE001 - yaml, TypeError (field), ValueError (enum): all one line
        return f"ACCELERATE_CONFIG={path}: not a launcher config accelerate can read ({one_line(err)[:300]})"
    return ""


def run_child(cmd: list[str]) -> int:
    """Run `cmd` (accelerate launch) and return the first failing process's own status, else cmd's."""
    fd, path = tempfile.mkstemp(prefix="alignprop_status_")
    os.close(fd)
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, STATUS_FILE: path})
        # SIGINT from a terminal reaches the whole process group; SIGTERM/SIGHUP (a scheduler's
        # pre-emption, `kill`) reach only this process: pass them on, as `exec accelerate` would
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: proc.send_signal(s))
        rc = proc.wait()
        failed = [int(x) for x in Path(path).read_text().split() if x.strip("-").isdigit()]
        failed = [x for x in failed if x]
    finally:
        Path(path).unlink(missing_ok=True)
    if failed:
        return failed[0]
    return rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's convention


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--check-accelerate-config":
        reason = check_accelerate_config(argv[1])
        if reason:
            print(PREFIX + reason, file=sys.stderr)
            return USER_ERROR
        return 0
    if len(argv) >= 2 and argv[0] == "--":
        return run_child(argv[1:])
    print(f"{PREFIX}usage: python -m alignprop.launcher --check-accelerate-config FILE | -- CMD...", file=sys.stderr)  # fmt: skip
    return USER_ERROR


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
