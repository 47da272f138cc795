"""Finding and freezing reward weights: hub ids or local paths, each loaded once per process."""

from __future__ import annotations

import os

from alignprop.errors import OFFLINE_HINT, MissingWeightsError
from alignprop.models import freeze, is_path, split_revision

__all__ = ["check_local", "freeze", "missing_pretrained", "resolve_file"]


def missing_pretrained(
    field: str, value: str, cause: BaseException | None = None
) -> MissingWeightsError:
    """The error for `reward_models.<field>` naming a hub id or folder that could not be loaded."""
    field = f"reward_models.{field}"
    if is_path(value):
        how = f"No such folder here. Point --config.{field} at a local model folder or a hub id."
    else:
        how = OFFLINE_HINT.format(repo=value, field=field)
    return MissingWeightsError(field, value, how, cause=cause)


def check_local(field: str, value: str) -> None:
    """Fail fast with the clear error when `value` is a local path that does not exist."""
    if is_path(value) and not os.path.exists(os.path.expanduser(value)):
        raise missing_pretrained(field, value)


def resolve_file(field: str, value: str, repo: str, filename: str) -> str:
    """The local file `value`, or `hf_hub_download(repo, filename)` when `value` is "" (repo may end in @REVISION)."""
    field = f"reward_models.{field}"
    how = (
        f"Download it where you are online: `hf download {repo} {filename} --local-dir DIR`, "
        f"then set --config.{field}=DIR/{filename} (or run once online: the Hugging Face cache "
        "is then used with HF_HUB_OFFLINE=1)."
    )
    if value:
        path = os.path.expanduser(value)
        if not os.path.isfile(path):
            raise MissingWeightsError(field, value, f"No such file. {how}")
        return path
    from huggingface_hub import hf_hub_download

    repo_id, revision = split_revision(repo)
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except (OSError, ValueError) as e:  # offline, not cached, no such repo or file
        raise MissingWeightsError(
            field, f"hf_hub_download({repo!r}, {filename!r})", how, cause=e
        ) from e
