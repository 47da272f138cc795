"""Direct-Align (SRPO, arXiv 2509.06942): a generated image x0 (the chain without autograd) is
noised with known noise eps to the level of step T - K (K drawn by truncation.*), one
differentiable deterministic solver step takes it to the next level, and x0 is recovered from
that latent in closed form with the same eps: x0_hat = (x - noise_level * eps) / signal_level.
The recovered image is scored; even at high noise x0_hat stays close to the image, so early
(noisy) levels get a usable gradient.

The timestep discount: the reward loss of a trajectory is weighted by
lambda(K) = 1 - (1 - train.direct_align.discount_min) (K - 1) / (T - 1), falling linearly from
1 at the last step (K = 1) to discount_min at the first (K = T), so that noisier levels, whose
recovery is coarser, count less. SRPO's other parts (its reward-inversion branch with negative
prompts, its sigma shift) are not implemented.
"""

from __future__ import annotations

from typing import Any

from alignprop.errors import ConfigError
from alignprop.objectives.base import Pathwise


class DirectAlign(Pathwise):
    name = "direct_align"
    paper = "Direct-Align (SRPO), arXiv 2509.06942"
    how = "inject"

    @classmethod
    def check(cls, config: Any, batch: Any) -> None:
        super().check(config, batch)
        d = config.train.direct_align.discount_min
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"train.direct_align.discount_min must be in [0, 1], got {d}")

    def weight(self, run: Any, sinfo: dict) -> float:
        steps, k = run.opts.num_steps, sinfo["K"]
        if steps == 1:
            return 1.0
        d = run.config.train.direct_align.discount_min
        return 1.0 - (1.0 - d) * (k - 1) / (steps - 1)
