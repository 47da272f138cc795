"""LoRA soups and export: weight deltas of loaded adapters, their mix, and kohya/ComfyUI keys.

Mixing works on weight deltas: adapter i changes a weight by dW_i = scaling_i * B_i @ A_i, and a
soup with coefficients c_i changes it by sum_i c_i dW_i. Mixing the factors instead
(A = sum c_i A_i, B = sum c_i B_i) scales a single LoRA by c^2 and adds cross terms B_i A_j.
At run time the soup is peft's multi-adapter weighting (`set_adapters`), which sums the
adapters' outputs; written to a file it is one LoRA whose factors are the adapters' factors
stacked along the rank (B = [c_1 s_1 B_1 | c_2 s_2 B_2 | ...], A = [A_1; A_2; ...]), whose
product is exactly sum_i c_i dW_i.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from alignprop.errors import ConfigError
from alignprop.families import SD, Family
from alignprop.lora_io import (
    _several_adapters_ok,
    load_lora,
    read_lora_state_dict,
    save_lora,
    unwrap,
)


def _lora_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in unwrap(unet).named_modules() if isinstance(m, LoraLayer)}


def lora_deltas(
    unet: torch.nn.Module, adapters: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Weight deltas {module name: sum over adapters of scaling * B @ A} in fp32; default: the active adapters."""
    deltas = {}
    for name, layer in _lora_layers(unet).items():
        if layer.merged or (adapters is None and layer.disable_adapters):
            continue
        use = layer.active_adapters if adapters is None else adapters
        parts = [layer.get_delta_weight(a).float() for a in use if a in layer.lora_A]
        if parts:
            deltas[name] = torch.stack(parts).sum(0)
    return deltas


def merged_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's weights in fp32 with the active adapters' deltas added, keyed like a plain UNet's state dict."""
    unet = unwrap(unet)
    out = {}
    for key, value in unet.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().float().clone()
    for name, delta in lora_deltas(unet).items():
        out[f"{name}.weight"] += delta.reshape(out[f"{name}.weight"].shape)
    return out


def add_soup_adapter(
    unet: torch.nn.Module,
    adapters: Sequence[str],
    coefs: Sequence[float],
    soup_name: str = "soup",
) -> str:
    """Add adapter `soup_name` whose delta is exactly sum_i coefs[i] * dW_i (factors stacked along the rank)."""
    from peft import LoraConfig

    if len(adapters) != len(coefs) or not adapters:
        raise ValueError(f"need one coefficient per adapter, got {len(adapters)} and {len(coefs)}")
    layers = _lora_layers(unet)
    blocks = []  # per module: [(A_i, c_i * scaling_i * B_i)]
    for name, layer in layers.items():
        got = [
            (layer.lora_A[a].weight, float(c) * layer.scaling[a] * layer.lora_B[a].weight)
            for a, c in zip(adapters, coefs, strict=True)
            if a in layer.lora_A
        ]
        if got:
            blocks.append((name, got))
    if not blocks:
        raise ValueError(f"no UNet module carries any of the adapters {list(adapters)}")
    rank = max(sum(a.shape[0] for a, _ in got) for _, got in blocks)
    # alpha = rank makes peft's scaling 1: the stacked factors already carry c_i * scaling_i.
    cfg = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=[name for name, _ in blocks],
        init_lora_weights=False,
    )
    with _several_adapters_ok():
        unwrap(unet).add_adapter(cfg, adapter_name=soup_name)
    layers = _lora_layers(unet)
    with torch.no_grad():
        for name, got in blocks:
            a_w = layers[name].lora_A[soup_name].weight  # (rank, in[, k, k])
            b_w = layers[name].lora_B[soup_name].weight  # (out, rank[, 1, 1])
            a_w.zero_()
            b_w.zero_()
            start = 0
            for a, b in got:  # zero rows/columns past a module's total rank add nothing
                r = a.shape[0]
                a_w[start : start + r] = a.to(a_w.dtype)
                b_w[:, start : start + r] = b.to(b_w.dtype)
                start += r
    return soup_name


def write_soup(
    unet: torch.nn.Module,
    loras: Sequence[str | os.PathLike],
    coefs: Sequence[float],
    out_dir: str | os.PathLike,
    family: type[Family] | Family = SD,
) -> Path:
    """Mix LoRA files by weight deltas into one diffusers LoRA file (sum_i coefs[i] * dW_i); unet gives the architecture."""
    names = [load_lora(unet, path, f"soup_in{i}", family=family) for i, path in enumerate(loras)]
    add_soup_adapter(unet, names, coefs, soup_name="soup")
    path = save_lora(unet, out_dir, adapter_name="soup", family=family)
    unwrap(unet).delete_adapters([*names, "soup"])
    return path


def _peft_scaling(meta: dict, module: str, rank: int) -> float:
    """peft's scaling of one module's adapter from the saved LoraConfig metadata (lora_alpha / r,
    or / sqrt(r) with rsLoRA; rank and alpha patterns honoured); 1 without metadata."""
    from peft.utils.other import get_pattern_key

    if not meta:
        return 1.0
    rank_pattern, alpha_pattern = meta.get("rank_pattern") or {}, meta.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern, module), meta.get("r", rank))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern, module), meta.get("lora_alpha", r))
    return alpha / (r**0.5 if meta.get("use_rslora") else r)


# ComfyUI's LoRA loader (comfy/lora.py, model_lora_keys_unet) maps diffusers-named keys with a
# "transformer." prefix onto its own weights for SD3 (mmdit_to_diffusers), FLUX.1 and FLUX.2
# (flux_to_diffusers: Flux2 subclasses Flux), Z-Image (Lumina2, z_image_to_diffusers) and
# Qwen-Image (its names are diffusers'); Wan has no such table there and loads LoRAs in its own
# checkpoint names under "diffusion_model." (WAN_TO_NATIVE below; the inverse of diffusers'
# Wan conversion: attn1 = self_attn, attn2 = cross_attn, to_out.0 = o, ffn.net.0.proj = ffn.0).
WAN_TO_NATIVE = (
    (r"\.attn1\.to_([qkv])$", r".self_attn.\1"),
    (r"\.attn1\.to_out\.0$", ".self_attn.o"),
    (r"\.attn2\.to_([qkv])$", r".cross_attn.\1"),
    (r"\.attn2\.to_out\.0$", ".cross_attn.o"),
    (r"\.ffn\.net\.0\.proj$", ".ffn.0"),
    (r"\.ffn\.net\.2$", ".ffn.2"),
)
# FLUX.2's single blocks fuse q, k, v and the MLP input in one linear: ComfyUI's linear1
FLUX2_TO_NATIVE = (
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj$", r"single_blocks.\1.linear1"),
)
COMFYUI_TRANSFORMER_FAMILIES = ("sd3", "flux", "flux2", "zimage", "qwenimage", "wan")


def comfyui_module_key(family: str, module: str) -> str:
    """The key prefix ComfyUI's loader reads for the LoRA of one diffusers transformer module."""
    import re

    if family == "wan":
        if re.match(r"^blocks\.\d+\.", module):
            for pattern, repl in WAN_TO_NATIVE:
                native, n = re.subn(pattern, repl, module)
                if n:
                    return f"diffusion_model.{native}"
        raise ValueError(
            f"the Wan module {module!r} has no ComfyUI name here (exported: the blocks' attn1, "
            "attn2 and ffn projections)"
        )
    if family == "flux2":
        for pattern, repl in FLUX2_TO_NATIVE:
            native, n = re.subn(pattern, repl, module)
            if n:
                return f"diffusion_model.{native}"
    return f"transformer.{module}"


def comfyui_transformer_state_dict(
    path: str | os.PathLike, family: type[Family] | Family
) -> dict[str, torch.Tensor]:
    """A transformer family's LoRA file in the keys ComfyUI loads: `<prefix>.lora_A.weight`,
    `<prefix>.lora_B.weight` and `<prefix>.alpha` (ComfyUI scales B @ A by alpha / rank, so
    alpha = peft's scaling x rank)."""
    if family.name not in COMFYUI_TRANSFORMER_FAMILIES:
        raise ConfigError(
            f"--format comfyui is not available for the {family.name} family; use --format diffusers"
        )
    state_dict, _, metadata = read_lora_state_dict(path, family)
    prefix = f"{family.denoiser_name}."
    meta = {k.removeprefix(prefix): v for k, v in (metadata or {}).items()}
    out: dict[str, torch.Tensor] = {}
    for key, a in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(prefix).removesuffix(".lora_A.weight")
        b = state_dict.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None:
            raise ValueError(f"{path}: {key} has no lora_B")
        name = comfyui_module_key(family.name, module)
        rank = a.shape[0]
        out[f"{name}.lora_A.weight"] = a.contiguous()
        out[f"{name}.lora_B.weight"] = b.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(_peft_scaling(meta, module, rank) * rank))
    if not out:
        raise ValueError(f"{path}: no lora_A / lora_B pairs (not a LoRA of this project?)")
    return out


def kohya_state_dict(
    path: str | os.PathLike, family: type[Family] | Family = SD
) -> dict[str, torch.Tensor]:
    """Convert a diffusers LoRA file of this project to kohya/ComfyUI keys (`lora_unet_...` with `.alpha`)."""
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    if family.denoiser_name != "unet":
        return comfyui_transformer_state_dict(path, family)
    state_dict, network_alphas, metadata = read_lora_state_dict(path, family)
    if network_alphas:
        raise ValueError(
            f"{path}: already a kohya/A1111-style file (it carries alphas); nothing to convert"
        )
    unet_sd = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    if len(unet_sd) != len(state_dict):
        raise ValueError(f"{path}: only UNet LoRAs can be exported (found non-UNet keys)")
    peft_sd = convert_unet_state_dict_to_peft(unet_sd)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    # diffusers writes alpha = rank (scale 1); kohya scales up @ down by alpha / rank, so the
    # alpha that reproduces peft's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) is scaling * rank.
    meta = {k.removeprefix("unet."): v for k, v in (metadata or {}).items()}
    for key in [k for k in peft_sd if k.endswith("lora_A.weight")]:
        module = key.removesuffix(".lora_A.weight")
        rank = peft_sd[key].shape[0]
        scaling = _peft_scaling(meta, module, rank)
        alpha_key = "lora_unet_" + module.replace(".", "_") + ".alpha"
        if alpha_key not in kohya:
            raise KeyError(f"conversion produced no {alpha_key}")
        kohya[alpha_key] = torch.tensor(float(scaling * rank))
    return kohya
