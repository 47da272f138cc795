"""The KL-to-base regulariser (solvers.sample(kl=True)): its gradient against float64 finite
differences at K >= 2 for eps (SD 1.5), v (SD 2) and flow (SD3) models, in every checkpoint mode.

From the second differentiable step on, x depends on the LoRA, so the base model's output at x
does too: a base call under no_grad drops that part of the gradient (measured with the chains
below, before the fix: 1.2% off for SD 1.5 at K=2, 5.2% for SD 2 v-pred at K=3, 3.9% for SD3.5
at K=2; after: 4.8e-11, 1.9e-10, 5.3e-7).
"""

from __future__ import annotations

import pytest
import torch

from alignprop import families, lora_io, solvers, tiny
from alignprop.families import Pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "an oil painting of two dogs"]
# kit: (family, guidance, eta, K): K-step chains, every step differentiable, so that a finite
# difference (which sees the whole chain) and the truncated gradient are the same derivative
CASES = {"sd": ("sd", 3.0, 1.0, 2), "sd2": ("sd", 3.0, 1.0, 3), "sd3": ("sd3", 4.5, 0.0, 2)}
TRUNC = dict(k_min=1, k_max=1, cut_mean=42.0, cut_std=5.0)
# float64 relative error of the analytic gradient against a central difference, measured on a
# Xeon with AVX-512/AMX: sd 4.8e-11, sd2 1.9e-10 (eps 1e-5); sd3 5.3e-7 at eps 1e-3 (4.7e-5 at
# 1e-5: diffusers computes the q/k RMSNorm variance in fp32 even in a float64 model, and a
# larger step keeps that rounding out of the difference). A dropped base gradient is >= 1.2% off.
RTOL = {"sd": 1e-8, "sd2": 1e-8, "sd3": 1e-5}
EPS = {"sd": 1e-5, "sd2": 1e-5, "sd3": 1e-3}


@pytest.fixture(scope="module")
def fams(tiny_overrides, random_lora) -> dict:
    """Each kit in float64 with a LoRA whose B is random (the LoRA changes every output)."""
    out = {}
    for kit, (name, *_) in CASES.items():
        folder = tiny.ensure_tiny_model(kit)
        fam = families.get_family(name).load(Pretrained(folder), torch.float64).freeze("cpu")
        out[kit] = (fam, random_lora(fam, torch.float64))
    return out


def kl_value(fam, kit: str, checkpoint: str = "none", grad: bool = True) -> torch.Tensor:
    _, guidance, eta, k = CASES[kit]
    opts = solvers.Sampling(k, guidance, eta=eta, height=64, width=64, checkpoint=checkpoint)
    trunc = solvers.Truncation("fixed", k=k, **TRUNC)
    noise = torch.randn(
        (2, *fam.latent_shape(64, 64)), generator=torch.Generator().manual_seed(3)
    ).double()
    cond, uncond = fam.encode(PROMPTS), fam.encode([""])
    with torch.set_grad_enabled(grad):
        _, info = solvers.sample(
            fam, cond, uncond, opts, truncation=trunc, latents=noise, kl=True,
            generator=torch.Generator().manual_seed(7),  # the same eta noise every call
        )  # fmt: skip
    assert info["K"] == (k if grad else 0)
    return info["kl"]


def kl_grads(fam, params, kit: str, checkpoint: str) -> list[torch.Tensor]:
    for p in params:
        p.grad = None
    kl_value(fam, kit, checkpoint).backward()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("kit", list(CASES))
def test_kl_gradient_matches_finite_difference_in_float64(fams, kit):
    fam, params = fams[kit]
    g = kl_grads(fam, params, kit, "none")
    # the largest gradient entry of the LoRA layer with the largest gradient
    i = max(range(len(params)), key=lambda j: g[j].abs().max())
    idx = int(g[i].abs().argmax())
    p, eps = params[i].data.view(-1), EPS[kit]
    with torch.no_grad():  # under no_grad K=0 would change the chain: differentiate with grad on
        p[idx] += eps
        up = kl_value(fam, kit).item()
        p[idx] -= 2 * eps
        down = kl_value(fam, kit).item()
        p[idx] += eps
    fd, ad = (up - down) / (2 * eps), g[i].view(-1)[idx].item()
    assert abs(ad) > 1e-8
    assert abs(fd - ad) <= RTOL[kit] * abs(ad), (kit, fd, ad, abs(fd - ad) / abs(ad))


@pytest.mark.parametrize("kit", ["sd", "sd3"])
def test_every_checkpoint_mode_gives_the_kl_gradient(fams, kit):
    """The recomputation of a checkpointed base call runs with the adapters off again, and so
    does diffusers' per-block recomputation (solvers._block_checkpoint): float64 round-off only."""
    fam, params = fams[kit]
    plain = kl_grads(fam, params, kit, "none")
    try:
        for mode in ("step", "block", "step+block"):
            got = kl_grads(fam, params, kit, mode)
            for a, b in zip(got, plain, strict=True):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9, msg=mode)
    finally:
        solvers.set_block_checkpointing(fam.denoiser, False)
    # after the base calls the LoRA is on again and trainable
    assert not lora_io.adapters_are_off(fam.denoiser)
    assert all(p.requires_grad for p in params)
    assert kl_value(fam, kit, grad=False).item() == 0.0  # no grad steps, no term
