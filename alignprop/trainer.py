"""The AlignProp run under its former import path (alignprop.run.Run with the alignprop objective).

The run itself lives in alignprop.run, the objectives in alignprop.objectives.
`trainer.AlignProp(config, accelerator, batch, run_dir)` keeps working for scripts, benchmarks
and tests: it reads (and sets) the objective's fields, such as `truncation` and `pretrain`,
through the run.
"""

from __future__ import annotations

from typing import Any

from alignprop import objectives
from alignprop.run import Run, TrainState, make_optimizer, peak_mem_gib  # noqa: F401 (re-exported)


class ObjectiveRun(Run):
    """A Run fixed to one objective whose fields read and write through the run."""

    algorithm = "alignprop"

    def __init__(self, config: Any, accelerator: Any, batch: Any, run_dir: Any, **kwargs: Any):
        objective = objectives.get(type(self).algorithm)
        super().__init__(config, accelerator, batch, run_dir, objective=objective, **kwargs)

    def __getattr__(self, name: str) -> Any:  # only for names the run itself lacks
        objective = self.__dict__.get("objective")
        if objective is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(objective, name)

    def __setattr__(self, name: str, value: Any) -> None:
        objective = self.__dict__.get("objective")
        if objective is not None and name in vars(objective):
            setattr(objective, name, value)
        else:
            object.__setattr__(self, name, value)


class AlignProp(ObjectiveRun):
    """The run with train.algorithm=alignprop."""

    algorithm = "alignprop"

    def loss_on(self, texts: list[str], generator: Any = None, size: Any = None):
        """(loss, rewards, info) of one micro-batch (alignprop.objectives.base.Pathwise.loss_on)."""
        return self.objective.loss_on(self, texts, generator=generator, size=size)


def run_class(algorithm: str) -> type[ObjectiveRun]:
    """The run class of train.algorithm (an unknown name is a ConfigError listing the valid ones)."""
    objectives.get(algorithm)
    if algorithm == "alignprop":
        return AlignProp
    return type(f"Run_{algorithm}", (ObjectiveRun,), {"algorithm": algorithm})
