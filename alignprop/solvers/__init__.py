"""Differentiable sampling: settings, one small update rule per solver, checkpointing, and the
one chain loop. Every name below is importable as alignprop.solvers.NAME.

- settings.py: `Truncation` (K drawn once per trajectory), `Sampling` (config.sample);
- rules.py: `DDIM` (eps, v), `Flow` (velocity; its SDE at eta > 0), `SOLVERS`, `make_solver`;
- checkpointing.py: the denoiser's per-step/per-block and the VAE decoder's checkpointing;
- sampling.py: `sample()` (where the gradient enters: `HOWS`), `guided` (CFG), `decode`.
"""

from alignprop.solvers.checkpointing import (
    DECODER_CHECKPOINTS,
    _block_checkpoint,
    decoder_checkpoint_mode,
    set_block_checkpointing,
    set_decoder_checkpointing,
)
from alignprop.solvers.rules import DDIM, SOLVERS, Flow, gaussian_log_prob, make_solver
from alignprop.solvers.sampling import HOWS, decode, guided, sample
from alignprop.solvers.settings import (
    CHECKPOINTS,
    PAPER_STEPS,
    TRUNCATIONS,
    Sampling,
    Truncation,
    parse_buckets,
)

__all__ = [
    "CHECKPOINTS", "DDIM", "DECODER_CHECKPOINTS", "HOWS", "PAPER_STEPS", "SOLVERS", "TRUNCATIONS",
    "Flow", "Sampling", "Truncation", "_block_checkpoint", "decode", "decoder_checkpoint_mode",
    "gaussian_log_prob",
    "guided", "make_solver", "parse_buckets", "sample", "set_block_checkpointing",
    "set_decoder_checkpointing",
]  # fmt: skip
