"""LoRA files: save/load adapters (diffusers safetensors), check them, scale them, switch them
off, and keep only the adapter in checkpoints. Soups and export: alignprop.soups; checkpoint
folders: alignprop.checkpoints.

Every function takes the model family (alignprop.families), whose diffusers pipeline class
writes and reads the file, so `Pipeline.load_lora_weights(dir)` loads what we save.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from alignprop.checkpoints import (  # noqa: F401 (LORA_WEIGHT_NAME: the LoRA file's name, here too)
    COMPLETE_MARKER,
    LORA_WEIGHT_NAME,
    MANIFEST,
    _recorded_files,
    list_checkpoints,
    verify_files,
)
from alignprop.errors import ConfigError
from alignprop.families import SD, Family


def _pipeline(family: type[Family] | Family):
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP / DataParallel / torch.compile wrappers."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def save_lora(
    unet: torch.nn.Module,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    is_main_process: bool = True,
    family: type[Family] | Family = SD,
) -> Path:
    """Write the denoiser's peft LoRA as out_dir/pytorch_lora_weights.safetensors (diffusers format)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = unwrap(unet)
    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(
            f"the UNet has no LoRA adapter {adapter_name!r}; adapters: {sorted(getattr(unet, 'peft_config', {}))}"
        )
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    # Transformer families stay in peft keys (lora_A/lora_B), as diffusers' own SD3/FLUX trainers
    # save: SD3's loader half-converts "lora.down" keys and then drops the unconverted layers.
    layers = convert_state_dict_to_diffusers(state) if family.denoiser_name == "unet" else state
    layers = {k: v.detach().contiguous() for k, v in layers.items()}
    # The config travels as metadata so loading restores lora_alpha (else diffusers assumes alpha = r).
    metadata = unet.peft_config[adapter_name].to_dict()
    n = family.denoiser_name
    _pipeline(family).save_lora_weights(
        out_dir,
        **{f"{n}_lora_layers": layers, f"{n}_lora_adapter_metadata": metadata},
        is_main_process=is_main_process,
        weight_name=LORA_WEIGHT_NAME,
    )
    return Path(out_dir) / LORA_WEIGHT_NAME


def save_weights(
    model: torch.nn.Module, out_dir: str | os.PathLike, family: Family, lora: bool = True
) -> None:
    """The trained weights: the LoRA alone (`save_lora`), or the whole denoiser when LoRA is off."""
    model = unwrap(model)
    if lora:
        save_lora(model, out_dir, family=family)
    else:
        model.save_pretrained(Path(out_dir) / family.denoiser_name)


def resolve_lora_file(path: str | os.PathLike) -> Path:
    """Find the LoRA file for a .safetensors path, a folder holding one, or a run folder (final/ or newest checkpoint)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise ConfigError(
            f"LoRA {str(path)!r}: no such file or folder (give a .safetensors file, a checkpoint folder or a run folder)"
        )
    if (p / LORA_WEIGHT_NAME).is_file():
        return p / LORA_WEIGHT_NAME
    if (p / "final" / LORA_WEIGHT_NAME).is_file():
        return p / "final" / LORA_WEIGHT_NAME
    ckpts = [c for c in list_checkpoints(p) if (c / LORA_WEIGHT_NAME).is_file()]
    if ckpts:
        return ckpts[-1] / LORA_WEIGHT_NAME
    raise ConfigError(
        f"LoRA {str(path)!r}: found no {LORA_WEIGHT_NAME} in it, in final/ or in checkpoints/checkpoint_*/"
    )


def check_lora_file(path: str | os.PathLike, field: str = "LoRA") -> Path:
    """Resolve a LoRA path and check, without torch, that it is a whole safetensors file holding LoRA weights."""
    import json
    import struct

    file = resolve_lora_file(path)
    where = f"{field} {str(file)!r}"
    if file.suffix != ".safetensors":
        raise ConfigError(f"{where}: not a .safetensors file (give the LoRA this project wrote)")
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError("header length past the end")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{where}: not a readable safetensors file ({err}); truncated or damaged?"
        ) from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if ends and 8 + n + max(ends) > size:
        raise ConfigError(
            f"{where}: truncated ({size} bytes, the header describes {8 + n + max(ends)}); write or copy it again"
        )
    keys = [k for k in header if k != "__metadata__"]
    if not any("lora" in k.lower() for k in keys):
        raise ConfigError(
            f"{where}: holds no LoRA weights ({len(keys)} tensors, none named lora_*); is it a base model file?"
        )
    for record in (file.parent / COMPLETE_MARKER, file.parent / MANIFEST):
        files = _recorded_files(record)
        if files and file.name in files:
            verify_files(file.parent, {file.name: files[file.name]}, field)
            break
    return file


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """Split 'PATH[:SCALE]' into (path, scale); the scale defaults to 1."""
    path, sep, scale = arg.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return arg, 1.0


def read_lora_state_dict(
    path: str | os.PathLike, family: type[Family] | Family = SD
) -> tuple[dict, dict | None, dict | None]:
    """Read a LoRA file in any format diffusers knows for the family: (state_dict, network_alphas, metadata)."""
    file = check_lora_file(path)
    out = _pipeline(family).lora_state_dict(
        str(file.parent), weight_name=file.name, return_lora_metadata=True
    )
    out = (out[0], None, out[1]) if len(out) == 2 else out  # transformer families: (sd, metadata)
    bad = [k for k, v in out[0].items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(
            f"LoRA {str(file)!r}: {len(bad)} of its {len(out[0])} tensors hold NaN or inf (e.g. {bad[0]}); "
            "the file is damaged (or a run that diverged wrote it): use an earlier checkpoint"
        )
    return out


# (down/A, up/B) suffixes of LoRA factor keys in the formats diffusers' lora_state_dict returns
_FACTOR_SUFFIXES = (
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)


def check_lora_fits(
    state_dict: dict, denoiser: torch.nn.Module, family: type[Family] | Family, source
) -> None:
    """Raise ConfigError if the LoRA's denoiser layers are not this denoiser's (another family's LoRA)."""
    prefix = f"{family.denoiser_name}."
    modules = dict(unwrap(denoiser).named_modules())
    checked, bad = 0, []
    for key, down in state_dict.items():
        for down_sfx, up_sfx in _FACTOR_SUFFIXES:
            if key.startswith(prefix) and key.endswith(down_sfx):
                name = key[len(prefix) : -len(down_sfx)]
                module = modules.get(name)
                module = getattr(module, "base_layer", module)  # already carries an adapter
                up = state_dict.get(key[: -len(down_sfx)] + up_sfx)
                weight = getattr(module, "weight", None)
                checked += 1
                if weight is None or up is None:
                    bad.append(f"{name} (no such layer)")
                elif (up.shape[0], down.shape[1]) != tuple(weight.shape[:2]):
                    bad.append(
                        f"{name} ({up.shape[0]}x{down.shape[1]} vs the model's {weight.shape[0]}x{weight.shape[1]})"
                    )
    if bad or not checked:
        what = (
            f"{len(bad)} of its {checked} {family.denoiser_name} layers do not fit, e.g. {bad[0]}"
            if bad
            else f"it has no {family.denoiser_name} LoRA layers"
        )
        raise ConfigError(
            f"LoRA {str(source)!r} does not fit this {family.name} model ({family.pipeline_class}): "
            f"{what}. Was it trained on another model family?"
        )


@contextlib.contextmanager
def _several_adapters_ok():
    """Silence peft's warning about a second adapter: several adapters in one UNet is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        yield


def load_lora(
    unet: torch.nn.Module,
    path: str | os.PathLike,
    adapter_name: str,
    scale: float = 1.0,
    family: type[Family] | Family = SD,
) -> str:
    """Load one LoRA file/folder into the denoiser as a named adapter and make it the only active one, at `scale`."""
    state_dict, network_alphas, metadata = read_lora_state_dict(path, family)
    check_lora_fits(state_dict, unet, family, path)
    n = family.denoiser_name
    loader = getattr(_pipeline(family), f"load_lora_into_{n}")
    takes_alphas = "network_alphas" in inspect.signature(loader).parameters
    kw = {"network_alphas": network_alphas} if takes_alphas else {}
    try:
        with _several_adapters_ok():
            loader(
                state_dict, **kw, **{n: unwrap(unet)}, adapter_name=adapter_name, metadata=metadata
            )
    except (RuntimeError, ValueError, KeyError) as err:  # shape or key mismatch
        raise ConfigError(
            f"LoRA {str(path)!r} does not fit this {family.name} {n} (another model or architecture?): "
            f"{str(err).splitlines()[0][:200]}"
        ) from None
    if adapter_name not in getattr(unwrap(unet), "peft_config", {}):
        raise ConfigError(f"LoRA {str(path)!r} matched no module of this {family.name} {n}")
    unwrap(unet).set_adapters([adapter_name], weights=[scale])
    return adapter_name


def load_loras(
    unet: torch.nn.Module,
    loras: Sequence[tuple[str | os.PathLike, float]],
    prefix: str = "lora",
    family: type[Family] | Family = SD,
) -> list[str]:
    """Load several LoRAs as adapters `{prefix}{i}` and activate them together with per-adapter scales."""
    names = [
        load_lora(unet, path, f"{prefix}{i}", family=family) for i, (path, _) in enumerate(loras)
    ]
    set_scales(unet, names, [scale for _, scale in loras])
    return names


def set_scales(unet: torch.nn.Module, names: Sequence[str], scales: Sequence[float]) -> None:
    """Activate exactly these adapters; the UNet's weights then change by sum_i scales[i] * dW_i."""
    if len(names) != len(scales):
        raise ValueError(f"{len(names)} adapters but {len(scales)} scales")
    unwrap(unet).set_adapters(list(names), weights=[float(s) for s in scales])


def load_adapter_weights(
    denoiser: torch.nn.Module, lora_dir: str | os.PathLike, family: type[Family] | Family = SD
) -> None:
    """Load a saved LoRA into the denoiser's existing "default" adapter in place (exact resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    state, _, _ = read_lora_state_dict(lora_dir, family)
    check_lora_fits(state, denoiser, family, lora_dir)
    prefix = f"{family.denoiser_name}."
    state = convert_unet_state_dict_to_peft({k.removeprefix(prefix): v for k, v in state.items()})
    try:
        result = set_peft_model_state_dict(unwrap(denoiser), state, adapter_name="default")
    except RuntimeError as err:  # size mismatch: another rank or architecture
        raise ConfigError(
            f"LoRA in {lora_dir} does not match this run's adapter (lora.rank or model differ): "
            f"{str(err).splitlines()[0][:200]}"
        ) from None
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = getattr(result, "unexpected_keys", [])
    if missing or unexpected:
        raise ConfigError(
            f"LoRA in {lora_dir} does not match this run's adapter: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def checkpoint_adapter_only(accelerator, model: torch.nn.Module, family: Family) -> None:
    """Make accelerator.save_state / load_state write and read the adapter alone, not the frozen
    base weights (the main process writes it; every process loads it)."""

    def save_hook(models_: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:  # save_lora unwraps DDP and compile
            save_lora(model, output_dir, family=family)
        weights.clear()
        models_.clear()

    def load_hook(models_: list, input_dir: str) -> None:
        load_adapter_weights(model, input_dir, family=family)
        models_.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _tuner_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unwrap(module).modules() if isinstance(m, BaseTunerLayer)]


def adapters_are_off(module: torch.nn.Module) -> bool:
    """Whether the module holds LoRA layers and they are disabled (inside `adapters_disabled`)."""
    layers = _tuner_layers(module)
    return bool(layers) and all(m.disable_adapters for m in layers)


@contextlib.contextmanager
def adapters_disabled(denoiser: torch.nn.Module):
    """Run the bare base model: every LoRA layer off inside, as it was (requires_grad too) after.

    Works through DDP / compile wrappers (the bare module is toggled), and nests: each layer
    gets back the state it had on entry. peft's toggle also flips the adapters' requires_grad,
    so the flags are restored exactly on exit.
    """
    layers = _tuner_layers(denoiser)
    was_off = [m.disable_adapters for m in layers]
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, off in zip(layers, was_off, strict=True):
            m.enable_adapters(not off)
        for p, flag in grads:
            p.requires_grad_(flag)
