"""Gradient checkpointing of the denoiser (per step, per block) and of the VAE decoder."""

from __future__ import annotations

import types
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from alignprop.errors import ConfigError


def set_block_checkpointing(denoiser: torch.nn.Module, on: bool) -> None:
    """Turn the denoiser's own per-block checkpointing on/off (it acts only while grad is enabled).

    On, each block is checkpointed by `_block_checkpoint` (installed every time, so a plain
    diffusers `enable_gradient_checkpointing()` from elsewhere is replaced by it).
    """
    if not hasattr(denoiser, "enable_gradient_checkpointing"):
        if not on:
            return
        raise ConfigError(
            f"sample.checkpoint=block needs a denoiser with enable_gradient_checkpointing() (diffusers "
            f"models); {type(denoiser).__name__} has none: use sample.checkpoint=step"
        )
    if on:
        denoiser.enable_gradient_checkpointing(_block_checkpoint)
    elif getattr(denoiser, "is_gradient_checkpointing", False):
        denoiser.disable_gradient_checkpointing()


def _block_checkpoint(block: Any, *args: Any, **kwargs: Any) -> Any:
    """One denoiser block under a non-reentrant checkpoint whose recomputation sees the same LoRA state.

    The backward recomputes the block outside the call that ran it: a block run with its
    adapters off (the KL term's base call) is recomputed with them off again, not with the LoRA.
    """
    from alignprop.lora_io import adapters_are_off, adapters_disabled

    if not (isinstance(block, torch.nn.Module) and adapters_are_off(block)):
        return _checkpoint(block, *args, use_reentrant=False, **kwargs)

    def bare(*a: Any, **k: Any) -> Any:
        with adapters_disabled(block):
            return block(*a, **k)

    return _checkpoint(bare, *args, use_reentrant=False, **kwargs)


# How the VAE decoder is checkpointed during a grad step (sample.decoder_checkpoint):
#   none   its whole graph is kept until backward
#   block  diffusers' own, one checkpoint per up-block and the mid-block: the backward's
#          recomputation of the last up-block (128 channels at full resolution) holds all its
#          layers' activations at once (the step's peak)
#   layer  one checkpoint per resnet, upsampler and attention of the mid- and up-blocks: the
#          backward recomputes one layer at a time (one more decoder forward, as block)
DECODER_CHECKPOINTS = ("none", "block", "layer")


_PLAIN_FORWARD = "_alignprop_plain_forward"  # on a layer while its forward is checkpointed


def decoder_checkpoint_mode(value: Any) -> str:
    """sample.decoder_checkpoint as one of DECODER_CHECKPOINTS (True = block, False = none)."""
    if isinstance(value, bool):
        return "block" if value else "none"
    mode = value.lower() if isinstance(value, str) else None
    mode = {"true": "block", "false": "none"}.get(mode, mode)
    if mode not in DECODER_CHECKPOINTS:
        raise ConfigError(
            f"sample.decoder_checkpoint={value!r} is not known; valid: "
            f"{list(DECODER_CHECKPOINTS)} (True = block, False = none)"
        )
    return mode


def _checkpointed_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A decoder layer's forward under its own checkpoint while grad is enabled, plain without."""
    own = self.__dict__[_PLAIN_FORWARD]
    fn, args = (own, args) if own is not None else (type(self).forward, (self, *args))
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return _checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _decoder_layers(vae: torch.nn.Module) -> list[torch.nn.Module]:
    """The resnets, upsamplers and attentions of the decoder's mid-block and up-blocks."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D, Upsample2D

    decoder = getattr(vae, "decoder", None)
    parts = [getattr(decoder, "mid_block", None), *getattr(decoder, "up_blocks", ())]
    kinds = (ResnetBlock2D, Upsample2D, Attention)
    layers = [m for p in parts if p is not None for m in p.modules() if isinstance(m, kinds)]
    if not layers:
        raise ConfigError(
            f"sample.decoder_checkpoint=layer needs a diffusers VAE decoder with mid/up blocks; "
            f"{type(vae).__name__} has none: use block or none"
        )
    return layers


def set_decoder_checkpointing(vae: torch.nn.Module, mode: Any) -> None:
    """Checkpoint the VAE decoder as `mode` says (DECODER_CHECKPOINTS; True/False too).

    Idempotent, and each mode undoes the others. "layer" replaces the forward of each layer
    instance (parameters and state_dict keys unchanged); it acts only while grad is enabled.
    """
    mode = decoder_checkpoint_mode(mode)
    if mode == "block" and not hasattr(vae, "enable_gradient_checkpointing"):
        raise ConfigError(
            f"sample.decoder_checkpoint=block needs a VAE with enable_gradient_checkpointing() "
            f"(diffusers models); {type(vae).__name__} has none: use layer or none"
        )
    for m in vae.modules():  # undo "layer"
        if _PLAIN_FORWARD in m.__dict__:
            own = m.__dict__.pop(_PLAIN_FORWARD)
            if own is None:
                del m.forward
            else:
                m.forward = own
    if mode == "block":
        vae.enable_gradient_checkpointing()
    elif hasattr(vae, "disable_gradient_checkpointing"):
        vae.disable_gradient_checkpointing()
    if mode == "layer":
        for m in _decoder_layers(vae):
            setattr(m, _PLAIN_FORWARD, m.__dict__.get("forward"))
            m.forward = types.MethodType(_checkpointed_forward, m)
