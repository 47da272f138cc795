"""Model families behind one interface (alignprop.families.base.Family), chosen by name or detected.

Adding a family is one module with a Family subclass plus one line in FAMILIES.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignprop import models
from alignprop.errors import ConfigError, warn_once
from alignprop.families.base import Cond, Family, Pretrained
from alignprop.families.flux import Flux
from alignprop.families.flux2 import Flux2
from alignprop.families.qwenimage import QwenImage
from alignprop.families.sd import SD
from alignprop.families.sd3 import SD3
from alignprop.families.sdxl import SDXL
from alignprop.families.wan import Wan
from alignprop.families.zimage import ZImage

FAMILIES: dict[str, type[Family]] = {
    "sd": SD,
    "sdxl": SDXL,
    "sd3": SD3,
    "flux": Flux,
    "zimage": ZImage,
    "flux2": Flux2,
    "qwenimage": QwenImage,
    "wan": Wan,
}

__all__ = [
    "FAMILIES",
    "Flux2",
    "QwenImage",
    "Wan",
    "SD",
    "SDXL",
    "Cond",
    "Family",
    "Pretrained",
    "detect",
    "get_family",
    "load_family",
]


def get_family(name: str) -> type[Family]:
    """The family class for a registered name."""
    if name not in FAMILIES:
        raise ConfigError(
            f"pretrained.family={name!r} is not known; valid: auto, {', '.join(FAMILIES)}"
        )
    return FAMILIES[name]


def _model_index(model: str, revision: str = "") -> dict | None:
    """model_index.json of a diffusers folder or hub repo (None for a single file or when unreachable)."""
    if models.is_single_file(model):
        return None
    path = Path(model).expanduser() / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text())
    if models.is_path(model):
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, "model_index.json", revision=revision or None)
        return json.loads(Path(path).read_text())
    except Exception:  # offline and not cached, or no such repo: the loader says so with the field
        return None


def detect(model: str, revision: str = "") -> str:
    """The family name of a model, read from its model_index.json (a single file counts as sd)."""
    index = _model_index(model, revision)
    if index is None:
        return "sd"
    cls = index.get("_class_name", "")
    for name, fam in FAMILIES.items():
        if fam.pipeline_class == cls:
            return name
    raise ConfigError(
        f"pretrained.model={model!r} is a {cls or 'pipeline without _class_name'}; supported: "
        + ", ".join(f"{f.pipeline_class} ({n})" for n, f in FAMILIES.items())
    )


def check_family(name: str, model: str, revision: str = "") -> str:
    """Resolve pretrained.family ('auto' detects); an explicit name must match the model's own pipeline."""
    if name == "auto":
        return detect(model, revision)
    fam = get_family(name)
    index = _model_index(model, revision)
    cls = (index or {}).get("_class_name")
    if cls and cls != fam.pipeline_class:
        raise ConfigError(
            f"pretrained.family={name!r} expects a {fam.pipeline_class}, but pretrained.model={model!r} "
            f"is a {cls}: set pretrained.family=auto (or the matching family)"
        )
    return name


def load_family(pretrained, dtype, device, field: str = "pretrained.model") -> Family:
    """Load, freeze and move a family's components as config.pretrained says."""
    spec = Pretrained.from_config(pretrained, field=field)
    name = check_family(pretrained.get("family", "auto"), spec.model, spec.revision)
    return get_family(name).load(spec, dtype).freeze(device)


def note_ignored_guidance(family: Family, scale: float, field: str, true_cfg_field: str) -> None:
    """One line when a guidance scale is set on a model without a guidance embedding
    (FLUX.1-schnell, Qwen-Image) or on a step-distilled FLUX.2 [klein]: their pipelines ignore it, and
    so does our sampler."""
    if getattr(family, "is_distilled", False) and scale > 1.0:
        warn_once(
            f"{field}={scale} is ignored: {family.spec.model or family.name} is step-distilled "
            f"(model_index.json is_distilled), and Flux2KleinPipeline never applies CFG to it; "
            f"the -base models take guidance (their card: 4)"
        )
    if family.true_cfg_only and not family.distilled_guidance and scale != 1.0:
        warn_once(
            f"{field}={scale} is ignored: {family.spec.model or family.name} has no guidance "
            f"embedding (FLUX.1-schnell, Qwen-Image); as {family.pipeline_class} it is guided "
            f"only by {true_cfg_field} > 1 against the negative prompt"
        )
