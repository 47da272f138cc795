"""The interface every model family implements, and the conditioning object it returns.

A family owns what differs between model lines: how the pipeline is loaded, how prompts
become conditioning, how the denoiser is called (and what it predicts), the latent layout,
decoding, and where the LoRA goes. Sampling, truncation, rewards and training are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from alignprop import models
from alignprop.errors import ConfigError


@dataclass
class Cond:
    """Prompt conditioning: named tensors, batch first, that concatenate along the batch for CFG."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @staticmethod
    def cat(items: list[Cond]) -> Cond:
        """Concatenate along the batch: [uncond, cond] for one guided denoiser call.

        Token sequences of different lengths (Qwen-Image pads each encode to its longest prompt)
        are zero-padded at the end to the longest; a mask pads with 0 (False), i.e. masked."""

        def padded(v: torch.Tensor, length: int) -> torch.Tensor:
            if v.shape[1] == length:
                return v
            pad = v.new_zeros(v.shape[0], length - v.shape[1], *v.shape[2:])
            return torch.cat([v, pad], dim=1)

        out = {}
        for k in items[0].tensors:
            vs = [c.tensors[k] for c in items]
            if vs[0].ndim >= 2 and len({v.shape[1] for v in vs}) > 1:
                vs = [padded(v, max(v.shape[1] for v in vs)) for v in vs]
            out[k] = torch.cat(vs)
        return Cond(out)

    def expand(self, n: int) -> Cond:
        """Repeat a batch-1 conditioning (the negative prompt) n times."""
        return Cond({k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()})

    def slice(self, start: int, stop: int) -> Cond:
        return Cond({k: v[start:stop] for k, v in self.tensors.items()})

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Cond:
        """Move every tensor; only floating tensors take the dtype (ids stay integer)."""
        return Cond(
            {
                k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                for k, v in self.tensors.items()
            }
        )


@dataclass(frozen=True)
class Pretrained:
    """Where the weights come from (config.pretrained): hub id, diffusers folder or single file."""

    model: str
    revision: str = ""
    variant: str = ""
    single_file_config: str = ""
    vae: str = ""
    field: str = "pretrained.model"
    # text-encoder options of the transformer families (SD3, FLUX); see config/base.py
    drop_t5: bool = False
    offload_text_encoders: bool = False
    max_sequence_length: int = 0

    @classmethod
    def from_config(cls, p: Any, field: str = "pretrained.model") -> Pretrained:
        return cls(
            p.model, p.revision, p.variant, p.single_file_config, p.get("vae", ""), field=field,
            drop_t5=p.get("drop_t5", False), offload_text_encoders=p.get("offload_text_encoders", False),
            max_sequence_length=p.get("max_sequence_length", 0),
        )  # fmt: skip


class Family:
    """One model family: components loaded from a pipeline, plus the calls the solver needs."""

    name: ClassVar[str]
    # diffusers pipeline class: loads the components and saves/loads the LoRA.
    pipeline_class: ClassVar[str]
    # the component that gets the LoRA and is called at every step
    denoiser_name: ClassVar[str] = "unet"
    # module names that get LoRA adapters by default (config.lora.target_modules = () uses them)
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    @property
    def lora_exclude(self) -> tuple[str, ...]:
        """Modules that match lora_targets but whose output the denoiser discards (an adapter
        there could never train): none unless a family says so."""
        return ()

    # the solver this family samples with (see alignprop.solvers.SOLVERS)
    solver: ClassVar[str] = "ddim"
    # the pipeline components this family does not use (not loaded)
    skip_components: ClassVar[dict[str, Any]] = {}
    # the guidance scale is a denoiser input (FLUX.1-dev), not CFG on [uncond, cond]
    distilled_guidance: ClassVar[bool] = False
    # CFG comes only from sample.true_cfg_scale against the negative prompt, never from
    # sample.guidance_scale (FLUX.1: guidance_scale is dev's embedded input and nothing on schnell)
    true_cfg_only: ClassVar[bool] = False
    # sample.guidance_scale g means CFG s = g + guidance_offset: 1 where the pipeline guides as
    # pos + g (pos - neg) and g = 0 is no guidance (Z-Image)
    guidance_offset: ClassVar[float] = 0.0
    # where the weights came from (set by load; a family built from components keeps the default)
    spec: Pretrained = Pretrained("")

    def __init__(self, components: dict[str, Any]):
        self.components = components
        self.scheduler = components["scheduler"]
        self.vae = components["vae"]

    @classmethod
    def load_kwargs(cls, spec: Pretrained) -> dict[str, Any]:
        """Extra from_pretrained arguments a family derives from the spec (e.g. a component left out)."""
        return {}

    # ---- loading

    @classmethod
    def load(cls, spec: Pretrained, dtype: torch.dtype | None = None) -> Family:
        """Load the family's pipeline components (offline-first; a missing model names the field)."""
        import diffusers

        pipe_cls = getattr(diffusers, cls.pipeline_class)
        model = spec.model
        if not model:
            raise ConfigError(f"{spec.field} is empty: give a hub id or a local path")
        kwargs: dict[str, Any] = dict(cls.skip_components, **cls.load_kwargs(spec), dtype=dtype)
        kwargs["local_files_only"] = models.offline()
        if spec.vae:
            kwargs["vae"] = models.load_vae(spec.vae, dtype, field="pretrained.vae")
        try:
            if models.is_single_file(model):
                if not Path(model).is_file():
                    raise FileNotFoundError(model)
                if spec.single_file_config:
                    kwargs["config"] = spec.single_file_config
                pipe = pipe_cls.from_single_file(model, **kwargs)
            else:
                if models.is_path(model) and not Path(model).exists():
                    raise FileNotFoundError(model)
                kwargs.update(revision=spec.revision or None, variant=spec.variant or None)
                pipe = pipe_cls.from_pretrained(model, **kwargs)
        except (OSError, ValueError) as err:  # hub errors subclass OSError / ValueError
            if isinstance(err, ConfigError):
                raise
            raise models.missing_weights(spec.field, model, err) from err
        return cls.from_pipeline(pipe, spec)

    @classmethod
    def from_pipeline(cls, pipe: Any, spec: Pretrained | None = None) -> Family:
        """The family over a loaded diffusers pipeline's components (a family may read its config too)."""
        family = cls(dict(pipe.components))
        family.spec = spec if spec is not None else family.spec
        return family

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.denoiser_name]

    def modules(self) -> list[torch.nn.Module]:
        """Every neural component (frozen by `freeze`)."""
        return [m for m in self.components.values() if isinstance(m, torch.nn.Module)]

    def freeze(self, device: torch.device | str) -> Family:
        """Eval mode, no grad, on the device (the dtype was set at load)."""
        for m in self.modules():
            models.freeze(m, device)
        return self

    @property
    def device(self) -> torch.device:
        return self.vae.device

    # ---- what the solver calls

    def encode(self, prompts: list[str]) -> Cond:
        """Prompt conditioning for a batch of prompts (no grad)."""
        raise NotImplementedError

    def encode_negative(self, prompt: str) -> Cond:
        """The unconditional (negative prompt) conditioning, batch 1, as the family's pipeline builds it."""
        return self.encode([prompt])

    # a video family: latents (C, F, h, w), decode gives (B, 3, F, H, W) (Wan)
    is_video: ClassVar[bool] = False

    def set_frames(self, num_frames: int, reward_frames: Any = "") -> None:
        """sample.num_frames / sample.reward_frames: only video families have frames."""
        if int(num_frames or 0) > 1 or str(reward_frames or "").strip(", "):
            raise ConfigError(
                f"sample.num_frames={num_frames} / sample.reward_frames={reward_frames!r} apply "
                f"to video families (wan); the {self.name} family makes images: leave them unset"
            )

    def combine_cfg(self, out_u: torch.Tensor, out_c: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided output from the unconditional and conditional ones at CFG scale s (> 1)."""
        return out_u + scale * (out_c - out_u)

    @classmethod
    def cfg_scale(cls, guidance_scale: float, true_cfg_scale: float) -> float:
        """The s of out_u + s (out_c - out_u) that the family's pipeline applies (1 = no CFG call).

        Most pipelines use guidance_scale itself, FLUX.1 only true_cfg_scale, and the ones whose
        guidance is pos + g (pos - neg) (Z-Image) g + guidance_offset."""
        return true_cfg_scale if cls.true_cfg_only else guidance_scale + cls.guidance_offset

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: epsilon, v_prediction or flow (velocity)."""
        return self.scheduler.config.get("prediction_type", "epsilon")

    def denoise(
        self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond
    ) -> torch.Tensor:
        """The denoiser's output for latents x at timestep t (model may be a DDP/compiled wrapper)."""
        raise NotImplementedError

    def solver_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """Extra arguments of the family's solver for a chain on latents of this (B, C, h, w) shape."""
        return {}

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        """Image sides must be a multiple of this many pixels."""
        return self.vae_factor

    def native_size(self) -> tuple[int, int]:
        """(height, width) in pixels the denoiser was built for."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one initial latent (without the batch) for an image of height x width."""
        self.check_size(height, width)
        f = self.vae_factor
        return (self.vae.config.latent_channels, height // f, width // f)

    def check_size(self, height: int, width: int, field: str = "sample.height/width") -> None:
        m = self.latent_multiple
        if height < m or width < m or height % m or width % m:
            raise ConfigError(
                f"{field}={height}x{width}: each side must be a positive multiple of {m} for the "
                f"{self.name} family"
            )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (before clamping), (B, 3, H, W) float32 (float64 from an fp64 VAE)."""
        vae = self.vae
        z = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
        if vae.config.get("shift_factor") is not None:
            z = z + vae.config.shift_factor
        images = vae.decode(z).sample
        return images.to(torch.promote_types(images.dtype, torch.float32))
