"""DRTune (arXiv 2405.00760): K steps (truncation.*) spread over the whole chain carry
gradient, one in each of K equal strides at an offset drawn per trajectory, and each of their
denoiser calls sees its input with a stop-gradient. The gradient then reaches early steps along
the solver's linear path x_i -> x_{i+1} without backpropagating through the denoiser's Jacobian
in x, so the memory is K checkpointed calls whatever the chain's length.
"""

from __future__ import annotations

from alignprop.objectives.base import Pathwise


class DRTune(Pathwise):
    name = "drtune"
    paper = "DRTune, arXiv 2405.00760"
    how = "spread"
