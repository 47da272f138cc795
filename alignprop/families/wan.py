"""Wan 2.1 / 2.2 text-to-video (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, -14B, Wan2.2-TI2V-5B): a DiT
on (C, F, H/8, W/8) video latents of the causal 3D Wan VAE, conditioned on UMT5-XXL, as
WanPipeline samples it.

What the pipeline does, and so do we:
- the prompt cleaned (ftfy, HTML entities, whitespace), UMT5's last hidden state cut to the
  prompt's own tokens and zero-padded to max_sequence_length (512); no mask reaches the model;
- the transformer takes the 5D latent, the time t in [0, 1000] (one per sample, or one per
  patch token where model_index.json says expand_timesteps: Wan 2.2 TI2V-5B) and predicts a
  flow velocity; CFG u + g (c - u) when g > 1 against the negative prompt;
- decode: x * latents_std + latents_mean per channel, through the causal 3D VAE.

Differences, stated:
- The checkpoints ship UniPCMultistepScheduler (2nd order, flow sigmas, flow_shift 3 or 5); the
  reward-gradient chain here is Euler: a UniPC scheduler is replaced at load by
  FlowMatchEulerDiscreteScheduler with the same shift, which WanPipeline also runs (its docs
  list it), and sampling equals WanPipeline with that scheduler.
- The reward sees `sample.reward_frames` of the decoded video (all by default). The VAE is
  causal (video frame k depends on latent frames <= its own), so only the latent frames up to
  the last rewarded one are decoded: the same pixels as a full decode, at a fraction of the cost.
- Wan 2.2 A14B (two experts switched at boundary_ratio) is refused with a message: not covered.
"""

from __future__ import annotations

from typing import Any

import torch

from alignprop.errors import ConfigError
from alignprop.families.base import Cond
from alignprop.families.flowbase import FlowFamily

# the self- and cross-attention projections of every block (blocks.N.attn1 / attn2), as
# diffusers' Wan LoRA trainers target them
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def parse_frames(spec: Any, field: str = "sample.reward_frames") -> tuple[int, ...]:
    """ "0,4,-1" -> (0, 4, -1); "" -> () (every decoded frame)."""
    if isinstance(spec, (tuple, list)):
        spec = ",".join(str(x) for x in spec)
    out = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        try:
            out.append(int(part))
        except ValueError:
            raise ConfigError(
                f"{field}={spec!r}: {part!r} is not a frame index (e.g. 0,4,8 or -1 for the last)"
            ) from None
    return tuple(out)


def check_frames(num_frames: int, reward_frames: tuple[int, ...], temporal: int = 4) -> None:
    """num_frames = temporal * k + 1 (the VAE's causal layout) and every index inside the clip."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ConfigError(
            f"sample.num_frames={num_frames} must be {temporal} k + 1 (1, 5, ..., 49, 81): the "
            f"Wan VAE encodes the first frame alone and then {temporal} frames per latent frame"
        )
    bad = [i for i in reward_frames if not -num_frames <= i < num_frames]
    if bad:
        raise ConfigError(
            f"sample.reward_frames={','.join(map(str, reward_frames))}: {bad} outside a clip of "
            f"{num_frames} frames (0..{num_frames - 1}, or -1 for the last)"
        )


class Wan(FlowFamily):
    name = "wan"
    pipeline_class = "WanPipeline"
    lora_targets = WAN_LORA_TARGETS
    default_max_sequence_length = 512  # WanPipeline's default
    text_encoder_names = ("text_encoder",)
    is_video = True
    # the model card's clip (Wan 2.1: 81 frames at 16 fps); sample.num_frames sets it
    default_num_frames = 81

    def __init__(self, components: dict[str, Any], expand_timesteps: bool = False):
        super().__init__(components)
        self.expand_timesteps = expand_timesteps
        self.num_frames = self.default_num_frames
        self.reward_frames: tuple[int, ...] = ()
        self.scheduler = euler_scheduler(self.scheduler)
        self.components["scheduler"] = self.scheduler

    @classmethod
    def from_pipeline(cls, pipe: Any, spec=None):
        if pipe.components.get("transformer_2") is not None or pipe.config.get("boundary_ratio"):
            raise ConfigError(
                f"{getattr(spec, 'model', '') or 'this Wan pipeline'} has two experts "
                "(transformer_2, boundary_ratio: Wan 2.2 A14B), which alignprop does not train "
                "yet; use Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.1-T2V-14B-Diffusers or "
                "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
            )
        components = {k: v for k, v in pipe.components.items() if k != "transformer_2"}
        family = cls(components, bool(pipe.config.get("expand_timesteps", False)))
        family.spec = spec if spec is not None else family.spec
        return family

    def set_frames(self, num_frames: int, reward_frames: Any = ()) -> None:
        """The clip length (sample.num_frames; 0 = the card's 81) and the rewarded frames."""
        num_frames = int(num_frames) or self.default_num_frames
        frames = parse_frames(reward_frames)
        check_frames(num_frames, frames, self.temporal_factor)
        self.num_frames, self.reward_frames = num_frames, frames

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.config.get("scale_factor_temporal") or 4)

    @property
    def vae_factor(self) -> int:
        return int(self.vae.config.get("scale_factor_spatial") or 8)

    @property
    def latent_multiple(self) -> int:
        return self.vae_factor * self.transformer.config.patch_size[1]

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        self.check_size(height, width)
        f = self.vae_factor
        frames = (self.num_frames - 1) // self.temporal_factor + 1
        return (self.transformer.config.in_channels, frames, height // f, width // f)

    def cfg_scale(self, guidance_scale: float, true_cfg_scale: float) -> float:  # type: ignore[override]
        """u + g (c - u) when g > 1, as WanPipeline; g <= 1 is no CFG call."""
        return guidance_scale if guidance_scale > 1.0 else 1.0

    def _encode(self, prompts: list[str]) -> Cond:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        encoder, tokenizer = self.components["text_encoder"], self.components["tokenizer"]
        length = self.max_sequence_length
        tokens = tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(encoder.device)
        hidden = encoder(tokens.input_ids.to(encoder.device), mask).last_hidden_state
        hidden = hidden * mask.bool().unsqueeze(-1)  # the pipeline's u[:len] + zeros
        return Cond({"encoder_hidden_states": hidden}).to(self.device)

    def denoise(self, model, x, t, cond):
        b, _, f, h, w = x.shape
        t = t.to(x.dtype)
        if self.expand_timesteps:  # one time per patch token (all equal in text-to-video)
            _, ph, pw = self.transformer.config.patch_size
            t = t[:, None].expand(b, f * (h // ph) * (w // pw))
        return model(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
        )[0]

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The solver's latent as the VAE decodes it: its per-channel statistics undone."""
        vae = self.vae
        z = latents.to(next(vae.parameters()).dtype)
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(vae.config.latents_std, dtype=z.dtype, device=z.device).view(shape)
        return z * std + mean

    def latent_frames_for(self, frames: tuple[int, ...]) -> int:
        """How many leading latent frames the causal VAE needs for these video frames."""
        last = max(i % self.num_frames for i in frames)
        return 1 if last == 0 else (last - 1) // self.temporal_factor + 2

    def decode_video(self, latents: torch.Tensor, latent_frames: int = 0) -> torch.Tensor:
        """The clip in [-1, 1], (B, 3, F, H, W): all frames, or the 1 + 4 (n - 1) frames of the
        first n latent frames (the same pixels: the decoder is causal)."""
        z = self.vae_latents(latents)
        if latent_frames:
            z = z[:, :, :latent_frames]
        video = self.vae.decode(z).sample
        return video.to(torch.promote_types(video.dtype, torch.float32))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The rewarded frames, (B, 3, F_r, H, W) (every frame when sample.reward_frames is empty);
        image rewards average over F_r (alignprop.rewards)."""
        if not self.reward_frames:
            return self.decode_video(latents)
        video = self.decode_video(latents, self.latent_frames_for(self.reward_frames))
        index = [i % self.num_frames for i in self.reward_frames]
        return video[:, :, index]

    def native_size(self) -> tuple[int, int]:
        # Wan 2.1's 480p card size (832 x 480); neither model records one (tiny configs set 64)
        return 480, 832


def euler_scheduler(scheduler: Any) -> Any:
    """FlowMatchEulerDiscreteScheduler with the shift of the checkpoint's UniPC flow scheduler
    (the scheduler itself when it is already a flow-matching Euler one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler
    cfg = scheduler.config
    if not (cfg.get("use_flow_sigmas") or cfg.get("prediction_type") == "flow_prediction"):
        raise ConfigError(
            f"the Wan checkpoint's scheduler {type(scheduler).__name__} is not a flow-matching "
            "one (use_flow_sigmas / prediction_type=flow_prediction): cannot sample it"
        )
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=cfg.get("num_train_timesteps", 1000),
        shift=float(cfg.get("flow_shift", 1.0)),
    )
