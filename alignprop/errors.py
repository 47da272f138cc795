"""Errors a user is meant to read: each says what was wrong and what to do."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


class RunStopped(RuntimeError):
    """Training stopped on purpose mid-run (non-finite updates, a checkpoint that cannot be written);
    the message names the last good checkpoint. Scripts exit with status 3."""


class NonFiniteStop(RunStopped, FloatingPointError):
    """train.max_nonfinite updates in a row had a NaN/inf loss or gradient."""


class MissingWeightsError(FileNotFoundError):
    """A weight file or model folder could not be found; the message says how to provide it."""

    def __init__(self, field: str, tried: str, how: str, cause: BaseException | None = None):
        self.field, self.tried = field, tried
        msg = f"{field}: could not load weights from {tried!r}. {how}"
        if cause is not None:
            msg += f"\n  (underlying error: {type(cause).__name__}: {str(cause).splitlines()[0][:300]})"
        super().__init__(msg)


OFFLINE_HINT = (
    "Pass a local folder or file instead, or download it once where you are online "
    "(`hf download {repo}` fills the Hugging Face cache, which is used offline with "
    "HF_HUB_OFFLINE=1), then set the field, e.g. --config.{field}=/path/to/weights."
)


def write_failure(err: BaseException, folder=None) -> str | None:
    """What went wrong, in a few words, when err is a failed write (a full disk, a quota, a file-size
    limit, a read-only or vanished folder); None for any other error. torch reports a failed write
    as a RuntimeError of its zip writer, safetensors as its own SafetensorError."""
    import shutil

    if isinstance(err, RunStopped):
        return None
    if isinstance(err, OSError):
        why = err.strerror or str(err)
        if err.filename:
            why += f": {err.filename}"
    elif isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError":
        why = (
            f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'no message'}"
        )
    else:
        return None
    try:
        free = shutil.disk_usage(folder).free / 2**20 if folder is not None else None
    except OSError:
        free = None
    return why + (f"; {free:.0f} MiB free there" if free is not None else "")


def writing(
    what: str, folder, then: str = "free space or fix the folder's permissions, then run it again"
):
    """Context: a failed write inside (any cause write_failure knows) becomes RunStopped naming `what`."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except Exception as err:
            why = write_failure(err, folder)
            if why is None:
                raise
            raise RunStopped(f"could not write {what} ({why}); {then}") from err

    return guard()


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Print a one-line warning on stderr, once per message and process."""
    import sys

    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def user_errors_exit(fn):
    """Wrap a script's main: a user error (bad config, missing weights) prints its message, not a traceback, and exits 2."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, MissingWeightsError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except RunStopped as err:
            print(f"stopped: {err}", file=sys.stderr)
            sys.exit(3)

    return wrapper
