"""ReFL (ImageReward, arXiv 2304.05977): the chain without autograd down to step T - K, K drawn
by truncation.* per trajectory (the paper stops at a random step of the last 10 of 40: uniform
with k_min=1, k_max=10 on 40 steps), then one differentiable denoiser call whose predicted x0
is decoded and scored. The paper mixes in the pretraining (denoising) loss: train.pretrain_coeff
(its data: train.pretrain_data, or the base model's own samples).
"""

from __future__ import annotations

from alignprop.objectives.base import Pathwise


class ReFL(Pathwise):
    name = "refl"
    paper = "ReFL (ImageReward), arXiv 2304.05977"
    how = "x0"
