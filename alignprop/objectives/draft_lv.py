"""DRaFT-LV (arXiv 2309.17400): the chain without autograd, then train.draft_lv.n re-noisings
of its result x0 to the noise level of step T - K, each denoised by the last K steps with
gradient and scored; the loss is the mean reward loss over the n copies.

K = 1 (truncation.strategy=fixed, truncation.k=1) is the paper's method: n noisy copies of the
final image at the last step's level, one differentiable denoiser call each. The n copies
lower the gradient's variance at n times the last steps' compute and memory.
"""

from __future__ import annotations

from typing import Any

from alignprop.errors import ConfigError
from alignprop.objectives.base import Pathwise


class DraftLV(Pathwise):
    name = "draft_lv"
    paper = "DRaFT-LV, arXiv 2309.17400"
    how = "renoise"

    @classmethod
    def check(cls, config: Any, batch: Any) -> None:
        super().check(config, batch)
        n = config.train.draft_lv.n
        if not isinstance(n, int) or n < 1:
            raise ConfigError(
                f"train.draft_lv.n must be an integer >= 1 (re-noised copies), got {n!r}"
            )

    def __init__(self, run: Any):
        super().__init__(run)
        self.n = run.config.train.draft_lv.n

    def sample_kwargs(self, run: Any) -> dict:
        return {"copies": self.n}

    def texts_for(self, texts: list[str]) -> list[str]:
        return texts * self.n  # copy-major, as solvers.sample returns the copies

    def describe(self, run: Any) -> str:
        return f"DRaFT-LV: {self.n} re-noised copies of each image, denoised by the last K steps with gradient"
