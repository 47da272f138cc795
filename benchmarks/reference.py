"""The published AlignProp training step (mihirp1998/AlignProp, main.py), kept as a baseline.

benchmarks/benchmark.py times it against the project's own step (tests/test_fast_path.py
checks that both give the same gradient). Per update, as published:
  - frozen weights in fp16, LoRA weights in fp32, fp16 autocast around each UNet call (what
    accelerate's `prepare()` wraps the UNet's forward in), a GradScaler for the fp16 loss;
  - autograd on at every one of the DDIM steps, guidance as two separate UNet calls (uncond,
    then cond), each under `torch.utils.checkpoint(use_reentrant=False)`; the timestep is a
    tensor of B copies in the half dtype;
  - before the cut both noise predictions are `.detach()`ed: each early step builds its
    (checkpointed) graph and then drops it, instead of running without autograd;
  - the DDIM update is diffusers' `DDIMScheduler.step`;
  - `vae.decode(latent / scaling_factor)` with no decoder checkpointing, the reward,
    loss = loss_coeff * sum(loss) / B, backward, clip to max_grad_norm, AdamW step.

Departures, each so that its gradient equals the project's for the same K, noise and prompts
(tests/test_fast_path.py) and the benchmark compares speed, not different math:
  - K is fixed for the trajectory (`truncated_backprop_rand=False` in the published config);
  - the reward is the caller's `reward_fn` (the project's aesthetic reward: the same CLIP
    ViT-L/14 + MLP; the published loss resizes with torchvision `Resize(224)` instead);
  - LoRA is peft's (`models.make_trainable`: rank 4 on to_q/to_k/to_v/to_out, as the published
    `LoRAAttnProcessor`s), so both recipes start from the same adapter; prompts are encoded and
    images decoded by the family (alignprop.families.SD), the optimizer is the trainer's AdamW.

`cfg_calls=1` (one UNet call on [uncond, cond]) and `grad_before_cut=False` (no autograd
before the cut) each move one switch toward the project's path, so their shares can be measured.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from alignprop import models, prompts, solvers
from alignprop.trainer import make_optimizer


def sample(
    family: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    latents: torch.Tensor,
    *,
    k: int,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    dtype: torch.dtype = torch.float16,
    generator: torch.Generator | None = None,
    grad_checkpoint: bool = True,
    cfg_calls: int = 2,
    grad_before_cut: bool = True,
) -> torch.Tensor:
    """The published differentiable sampling loop; returns decoded images (B, 3, H, W) in [-1, 1]."""
    if cfg_calls not in (1, 2):
        raise ValueError(f"cfg_calls must be 1 or 2, got {cfg_calls}")
    if not 1 <= k <= num_steps:
        raise ValueError(f"k={k} must be in [1, num_steps={num_steps}]")
    unet, scheduler = family.unet, family.scheduler
    device, bsz = cond.device, cond.shape[0]
    half = dtype in (torch.float16, torch.bfloat16)  # float64: the exactness tests

    def eps(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # accelerate's prepare(): autocast around forward, outputs converted to fp32.
        with torch.autocast(device.type, dtype=dtype, enabled=half):
            out = unet(x, t, encoder_hidden_states=emb).sample
            return out if out.dtype == torch.float64 else out.float()

    uncond = uncond.expand(bsz, -1, -1).to(dtype)  # (B, 77, D)
    cond = cond.to(dtype)
    latent = latents.to(device=device, dtype=dtype)  # (B, 4, H/8, W/8), half as published
    scheduler.set_timesteps(num_steps)
    cut = num_steps - k
    for i, t in enumerate(scheduler.timesteps):
        tb = torch.full((bsz,), float(t), dtype=dtype, device=device)  # (B,)
        graph = grad_before_cut or i >= cut
        call = checkpoint if grad_checkpoint and graph else _direct
        with torch.set_grad_enabled(graph):
            if cfg_calls == 2:
                eps_u = call(eps, latent, tb, uncond, use_reentrant=False)
                eps_c = call(eps, latent, tb, cond, use_reentrant=False)
            else:
                both = call(
                    eps,
                    torch.cat([latent, latent]),
                    torch.cat([tb, tb]),
                    torch.cat([uncond, cond]),
                    use_reentrant=False,
                )  # (2B, 4, H/8, W/8)
                eps_u, eps_c = both.chunk(2)
            if i < cut:
                eps_u, eps_c = eps_u.detach(), eps_c.detach()
            noise_pred = eps_u + guidance_scale * (eps_c - eps_u)
            latent = scheduler.step(
                noise_pred, int(t), latent, eta=eta, generator=generator
            ).prev_sample
    return family.decode(latent)  # vae.decode(latent / scaling_factor), no checkpointing


def _direct(fn, *args, use_reentrant: bool = False):
    return fn(*args)


class Reference:
    """The published recipe's training state: its own family (SD), LoRA, AdamW and GradScaler.

    `family` must already be in `dtype` (the half type on a GPU, as published; fp32 on CPU).
    """

    def __init__(
        self,
        config: Any,
        family: Any,
        reward_fn: Any,
        device: torch.device | str,
        dtype: torch.dtype,
        *,
        cfg_calls: int = 2,
        grad_before_cut: bool = True,
    ):
        if config.truncation.strategy != "fixed":
            raise ValueError(
                "the reference recipe takes a fixed K: set truncation.strategy='fixed'"
            )
        self.config, self.family, self.reward_fn = config, family, reward_fn
        self.device, self.dtype = torch.device(device), dtype
        self.cfg_calls, self.grad_before_cut = cfg_calls, grad_before_cut
        family.freeze(self.device)
        with torch.random.fork_rng(devices=[]):  # the same adapter init as the trainer's
            torch.manual_seed(config.seed)
            self.params = models.make_trainable(
                family.denoiser, config.lora, family.lora_targets, family.lora_exclude
            )
        self.optimizer = make_optimizer(self.params, config.train)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        self.uncond = self.encode([config.sample.negative_prompt])  # (1, 77, D)
        self.prompt_sampler = prompts.PromptSampler(
            prompts.load_prompts(config.prompts.train, config.prompts.template)
        )
        self.size = solvers.Sampling.from_config(config.sample).size(family)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.family.encode(texts)["encoder_hidden_states"]

    def loss_on(
        self, texts: list[str], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, rewards) for one micro-batch; x_T is drawn from `generator` as the project's sampler draws it."""
        s = self.config.sample
        shape = self.family.latent_shape(*self.size)
        latents = torch.randn((len(texts), *shape), generator=generator)  # (B, 4, H/8, W/8)
        images = sample(
            self.family, self.encode(texts), self.uncond, latents,
            k=self.config.truncation.k, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
            eta=s.eta, dtype=self.dtype, generator=generator, grad_checkpoint=s.grad_checkpoint,
            cfg_calls=self.cfg_calls, grad_before_cut=self.grad_before_cut,
        )  # fmt: skip
        reward, info = self.reward_fn(images, texts)
        loss = self.config.train.loss_coeff * info["loss"].sum() / len(texts)
        return loss, reward

    def update(self) -> dict[str, float]:
        """One optimizer update on one micro-batch of config.sample.batch_size prompts."""
        t0 = time.perf_counter()
        loss, reward = self.loss_on(self.prompt_sampler(self.config.sample.batch_size))
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.train.max_grad_norm or float("inf")  # 0 = off, as in the trainer
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss.item(),
            "reward_mean": reward.mean().item(),
            "grad_norm": float(grad_norm),
            "sec_per_step": time.perf_counter() - t0,
        }
