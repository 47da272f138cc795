"""AlignProp (arXiv 2310.03739): backprop of the reward through the last K steps of the chain.

K is drawn per trajectory by truncation.* (fixed K is DRaFT-K, arXiv 2309.17400); the steps
before them run without autograd, the K steps under gradient checkpointing.
"""

from __future__ import annotations

from alignprop.objectives.base import Pathwise


class AlignProp(Pathwise):
    name = "alignprop"
    paper = "AlignProp, arXiv 2310.03739 (DRaFT-K with truncation.strategy=fixed)"
    how = "last"
