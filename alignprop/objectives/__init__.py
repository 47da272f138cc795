"""Objectives: how the reward reaches the LoRA, one module each; `train.algorithm` picks one.

To add an objective: a module here with an alignprop.objectives.base.Objective subclass (a
pathwise one subclasses Pathwise and names where the gradient enters, solvers.HOWS), its
config section under train.<name> in config/base.py, and one line in OBJECTIVES below.
"""

from __future__ import annotations

from alignprop.errors import ConfigError
from alignprop.objectives.alignprop import AlignProp
from alignprop.objectives.base import Objective, Pathwise, changed_fields
from alignprop.objectives.ddpo import DDPO
from alignprop.objectives.diffusion_nft import DiffusionNFT
from alignprop.objectives.direct_align import DirectAlign
from alignprop.objectives.draft_lv import DraftLV
from alignprop.objectives.drtune import DRTune
from alignprop.objectives.flow_grpo import FlowGRPO
from alignprop.objectives.refl import ReFL

# train.algorithm -> its objective
OBJECTIVES: dict[str, type[Objective]] = {
    c.name: c for c in (AlignProp, DDPO, DraftLV, ReFL, DRTune, DirectAlign, FlowGRPO, DiffusionNFT)
}

__all__ = ["OBJECTIVES", "Objective", "Pathwise", "check", "get"]


def get(name: str) -> type[Objective]:
    """The objective class of train.algorithm=name (a ConfigError listing the valid names)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"train.algorithm={name!r} is not known; valid: {list(OBJECTIVES)}")
    return OBJECTIVES[name]


def check(config, batch, differentiable: bool) -> None:
    """Before any model loads: the objective's own checks, a reward it can train on, and no
    other objective's section changed (it would be ignored). `differentiable`: the reward's."""
    name = config.train.get("algorithm", "alignprop")
    cls = get(name)
    if cls.differentiable_reward and not differentiable:
        raise ConfigError(
            f"reward={config.reward!r} is not differentiable, and train.algorithm={name} "
            "backpropagates through the reward: use train.algorithm=ddpo (flow families: flow_grpo, "
            "diffusion_nft) or a "
            "differentiable reward"
        )
    for other in OBJECTIVES:
        if other != name:
            for field, value, want in changed_fields(config, f"train.{other}"):
                raise ConfigError(
                    f"{field}={value!r} is ignored under train.algorithm={name} (config/base.py: "
                    f"{want!r}): only train.algorithm={other} reads it; drop it"
                )
    cls.check(config, batch)
