"""DDPO under its former import path: the objective lives in alignprop.objectives.ddpo.

`DDPO` here is the run with the DDPO objective (what scripts and tests built before the
objectives layer); `trainer_class` maps train.algorithm to such a run class.
"""

from __future__ import annotations

from typing import Any

from alignprop.objectives import OBJECTIVES
from alignprop.objectives.ddpo import (  # noqa: F401 (re-exported)
    UNUSED_UNDER_DDPO,
    PerPromptStatTracker,
    batch_advantages,
    check_ddpo,
    check_family_solver,
    ppo_loss,
)
from alignprop.trainer import ObjectiveRun, run_class

ALGORITHMS = OBJECTIVES


class DDPO(ObjectiveRun):
    """The run with train.algorithm=ddpo; the objective's fields and methods read through it."""

    algorithm = "ddpo"

    def sample_trajectories(self, texts: list[str]) -> dict[str, Any]:
        return self.objective.sample_trajectories(self, texts)


def trainer_class(algorithm: str) -> type[ObjectiveRun]:
    """The run class for train.algorithm (an unknown name is a ConfigError listing the valid ones)."""
    return DDPO if algorithm == "ddpo" else run_class(algorithm)
