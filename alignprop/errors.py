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
