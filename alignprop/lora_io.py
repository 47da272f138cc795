"""LoRA files and checkpoints: save/load adapters (diffusers safetensors), scale and mix them
("soups"), and the one owner of checkpoint naming and discovery.

Every function takes the model family (alignprop.families), whose diffusers pipeline class
writes and reads the file, so `Pipeline.load_lora_weights(dir)` loads what we save.

Mixing works on weight deltas: adapter i changes a weight by dW_i = scaling_i * B_i @ A_i, and a
soup with coefficients c_i changes it by sum_i c_i dW_i. Mixing the factors instead
(A = sum c_i A_i, B = sum c_i B_i) scales a single LoRA by c^2 and adds cross terms B_i A_j.
At run time the soup is peft's multi-adapter weighting (`set_adapters`), which sums the
adapters' outputs; written to a file it is one LoRA whose factors are the adapters' factors
stacked along the rank (B = [c_1 s_1 B_1 | c_2 s_2 B_2 | ...], A = [A_1; A_2; ...]), whose
product is exactly sum_i c_i dW_i.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from alignprop.errors import ConfigError
from alignprop.families import SD, Family

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
# written last into a checkpoint: its step and every file's size and sha256; no marker = not a checkpoint
COMPLETE_MARKER = "checkpoint_complete.json"
# the same record of every file's size and sha256 for final/ and best/ (checked when a LoRA is loaded)
MANIFEST = "files.json"


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


def _checkpoint_step(path: Path) -> int:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


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


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def record_files(folder: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under folder (written into its marker or manifest)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (COMPLETE_MARKER, MANIFEST)
    }


def write_manifest(folder: str | os.PathLike) -> None:
    """Record every file's size and sha256 in folder/MANIFEST (final/, best/)."""
    import json

    (Path(folder) / MANIFEST).write_text(json.dumps({"files": record_files(folder)}, indent=1))


def _recorded_files(record: Path) -> dict | None:
    """The "files" of a marker or manifest, or None when it is absent or unreadable."""
    import json

    try:
        files = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def verify_files(folder: Path, files: dict, field: str) -> None:
    """ConfigError naming the first recorded file that is missing or differs in size or sha256.

    A record is {name: size} (checkpoints written before checksums) or {name: {"size", "sha256"}}."""
    for name, want in files.items():
        f = Path(folder) / name
        size, digest = (
            (want.get("size"), want.get("sha256")) if isinstance(want, dict) else (want, None)
        )
        if not f.is_file():
            raise ConfigError(f"{field}: file {f} is missing; it was written with the checkpoint")
        if f.stat().st_size != size:
            raise ConfigError(
                f"{field}: file {f} is damaged ({f.stat().st_size} bytes, {size} written)"
            )
        if digest is not None and file_sha256(f) != digest:
            raise ConfigError(
                f"{field}: file {f} is damaged (its sha256 differs from the one recorded when it was "
                "written: changed bytes on disk or in a copy)"
            )


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


def kohya_state_dict(
    path: str | os.PathLike, family: type[Family] | Family = SD
) -> dict[str, torch.Tensor]:
    """Convert a diffusers LoRA file of this project to kohya/ComfyUI keys (`lora_unet_...` with `.alpha`)."""
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
    from peft.utils.other import get_pattern_key

    if family.denoiser_name != "unet":
        raise ConfigError(
            f"--format comfyui is not available for the {family.name} family (diffusers has no "
            "kohya key mapping for it); use --format diffusers"
        )
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
    rank_pattern, alpha_pattern = meta.get("rank_pattern") or {}, meta.get("alpha_pattern") or {}
    for key in [k for k in peft_sd if k.endswith("lora_A.weight")]:
        module = key.removesuffix(".lora_A.weight")
        rank = peft_sd[key].shape[0]
        if meta:
            r = rank_pattern.get(get_pattern_key(rank_pattern, module), meta.get("r", rank))
            alpha = alpha_pattern.get(
                get_pattern_key(alpha_pattern, module), meta.get("lora_alpha", r)
            )
            scaling = alpha / (r**0.5 if meta.get("use_rslora") else r)
        else:
            scaling = 1.0
        alpha_key = "lora_unet_" + module.replace(".", "_") + ".alpha"
        if alpha_key not in kohya:
            raise KeyError(f"conversion produced no {alpha_key}")
        kohya[alpha_key] = torch.tensor(float(scaling * rank))
    return kohya


# ---------------------------------------------------------------- checkpoints of a run


# what an accelerate save_state of a LoRA run holds (checkpoints written before the marker existed)
LEGACY_FILES = (LORA_WEIGHT_NAME, "optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl")


def _legacy_complete(path: Path) -> bool:
    """A checkpoint from before COMPLETE_MARKER: every file of a save present and the LoRA file whole."""
    if not all((path / name).is_file() for name in LEGACY_FILES):
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path / LORA_WEIGHT_NAME), "pt") as f:
            return len(list(f.keys())) > 0
    except Exception:  # torn or not safetensors
        return False


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint folder that resume can use: its marker was written (or a whole older-format save)."""
    path = Path(path)
    return (path / COMPLETE_MARKER).is_file() or _legacy_complete(path)


def list_checkpoints(run_dir: str | os.PathLike, complete: bool = True) -> list[Path]:
    """A run's checkpoint folders, oldest first: the complete ones (default) or every checkpoint_N folder."""
    found = [
        p
        for p in (Path(run_dir) / "checkpoints").glob("checkpoint_*")
        if CHECKPOINT_RE.match(p.name) and (not complete or is_complete(p))
    ]
    return sorted(found, key=_checkpoint_step)


def checkpoint_dir(run_dir: str | os.PathLike, update: int) -> Path:
    """Where the checkpoint after `update` updates lives."""
    return Path(run_dir) / "checkpoints" / f"checkpoint_{update}"


def _pause(point: str, update: int, run_dir: Path) -> None:
    """Tests: ALIGNPROP_TEST_PAUSE_IN_SAVE=POINT[@UPDATE] touches <run>/paused_in_save and sleeps, to be killed there."""
    want = os.environ.get("ALIGNPROP_TEST_PAUSE_IN_SAVE", "")
    name, _, at = want.partition("@")
    if name == point and (not at or int(at) == update):
        import time

        (run_dir / "paused_in_save").write_text(f"{point}@{update}")
        time.sleep(3600)


def save_checkpoint(acc, run_dir: str | os.PathLike, update: int, meta: dict | None = None) -> Path:
    """accelerate's save_state on every rank into a hidden temporary folder; the main process then writes
    COMPLETE_MARKER and renames it to checkpoints/checkpoint_<update>, so that folder is whole or absent."""
    import json
    import shutil

    run_dir = Path(run_dir)
    final = checkpoint_dir(run_dir, update)
    tmp = final.parent / f".{final.name}.tmp"
    if acc.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".checkpoint_*.tmp"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
    acc.wait_for_everyone()
    try:
        _pause("begin", update, run_dir)
        acc.save_state(str(tmp))  # main: LoRA (save hook), optimizer, counters; every rank: its RNG
        _pause("state", update, run_dir)
        acc.wait_for_everyone()
        if acc.is_main_process:
            marker = {"update": update, **(meta or {}), "files": record_files(tmp)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1))
            _pause("marker", update, run_dir)
            if final.exists():  # an older folder of that name (e.g. incomplete): replace it
                old = final.parent / f".{final.name}.old.tmp"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    except Exception as err:
        from alignprop.errors import RunStopped, write_failure

        if isinstance(err, RunStopped) or (why := write_failure(err, final.parent)) is None:
            raise
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        last = list_checkpoints(run_dir)
        raise RunStopped(
            f"could not write checkpoint {final} ({why}); free space or fix the folder's permissions, then "
            f"resume with --config.resume_from=latest (last complete checkpoint: {last[-1] if last else 'none'})"
        ) from err
    acc.wait_for_everyone()
    _pause("renamed", update, run_dir)
    return final


class _Unused:
    """Takes a custom state the checkpoint holds beyond what this run registered, and drops it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def load_checkpoint(acc, checkpoint: str | os.PathLike) -> list:
    """accelerate's load_state of a checkpoint folder, the run's custom states matched by content.

    Custom states (the trainer's counters; the early-stopping state when train.early_stop is on;
    DDPO's per-prompt statistics) are saved by registration order, and accelerate loads them
    by position, refusing a checkpoint that holds another number of them. Each saved state goes
    to the registered object whose state_dict has the same keys instead: a checkpoint saved with
    early stopping off resumes with it on (and the other way round). Returns the registered
    objects the checkpoint held no state for (they start afresh).
    """
    found = {}
    for name in os.listdir(checkpoint):
        if m := re.fullmatch(r"custom_checkpoint_(\d+)\.pkl", name):
            found[int(m.group(1))] = Path(checkpoint) / name
    saved = [_load_state_file(found[i]) for i in sorted(found)]
    rng = Path(checkpoint) / f"random_states_{acc.process_index}.pkl"
    if rng.is_file():  # accelerate logs a failure to read it at INFO and goes on with other streams
        _load_state_file(rng)
    else:
        from alignprop.errors import warn_once

        warn_once(
            f"{checkpoint} holds no {rng.name} (saved with fewer processes): process "
            f"{acc.process_index}'s random streams start from the seed, not from the checkpoint"
        )
    registered = list(acc._custom_objects)
    free, order = list(registered), []
    for state in saved:
        keys = set(state) if isinstance(state, dict) else None
        match = next((o for o in free if set(o.state_dict()) == keys), None)
        if match is not None:
            free.remove(match)
        order.append(match if match is not None else _Unused())
    acc._custom_objects = order
    try:
        acc.load_state(str(checkpoint))
    except ConfigError:
        raise
    except Exception as err:  # optimizer.bin, scheduler, scaler: unreadable or not this run's
        raise ConfigError(
            f"resume_from: {checkpoint} could not be loaded ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else 'no message'}); resume from another "
            "checkpoint, or start a new run"
        ) from None
    finally:
        acc._custom_objects = registered
    for model in acc._models:  # a LoRA saved non-finite would be blamed on the learning rate later
        bad = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and not torch.isfinite(p).all()
        ]
        if bad:
            raise ConfigError(
                f"resume_from: {checkpoint} holds non-finite weights ({len(bad)} tensors, e.g. "
                f"{bad[0]}); resume from an earlier checkpoint"
            )
    return free


def _load_state_file(path: Path):
    """torch.load a pickled state of a checkpoint; ConfigError naming the file when it cannot be read."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError, AttributeError,
            ImportError, IndexError, KeyError, TypeError) as err:  # fmt: skip
        raise ConfigError(
            f"resume_from: checkpoint file {path} cannot be read ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:150] if str(err) else 'no message'}); it is damaged: resume from "
            "another checkpoint"
        ) from None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def checkpoint_info(path: str | os.PathLike, field: str = "resume_from") -> dict:
    """Check a checkpoint folder is complete and undamaged (marker present, every file it records
    there with its size and sha256); return its marker. Raises ConfigError naming the first bad file."""
    import json

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{field}={str(path)!r}: no such checkpoint folder (or use 'latest')")
    marker = path / COMPLETE_MARKER
    if not marker.is_file() and _legacy_complete(path):
        return {"update": _checkpoint_step(path), "files": {}}
    if not marker.is_file():
        raise ConfigError(
            f"{field}={str(path)!r}: incomplete checkpoint (no {COMPLETE_MARKER}: its save was interrupted); "
            "resume from an earlier checkpoint or use 'latest'"
        )
    stats = [
        (f.name, f.stat().st_mtime_ns, f.stat().st_size)
        for f in sorted(path.iterdir())
        if f.is_file()
    ]
    key = (str(path.resolve()), tuple(stats))
    if key in _verified:  # hashed once per process (latest, then the plan, ask twice)
        return dict(_verified[key])
    try:
        info = json.loads(marker.read_text())
        files = dict(info["files"])
        int(info["update"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{field}: {marker} is damaged; resume from another checkpoint") from None
    try:
        verify_files(path, files, field)
    except ConfigError as err:
        raise ConfigError(f"{err}; resume from another checkpoint (or 'latest')") from None
    _verified[key] = info
    return dict(info)


_verified: dict[tuple, dict] = {}


def latest_checkpoint(run_dir: str | os.PathLike, warn=None) -> Path | None:
    """The newest complete, undamaged checkpoint of a run. The newer ones it skips (incomplete, or
    a file whose size or sha256 differs from its record) are reported through warn, each by name;
    ConfigError when the run has complete checkpoints and every one is damaged."""
    from alignprop.errors import warn_once

    warn = warn or warn_once
    complete = list_checkpoints(run_dir)
    newest = _checkpoint_step(complete[-1]) if complete else -1
    for p in list_checkpoints(run_dir, complete=False):
        if _checkpoint_step(p) > newest and not is_complete(p):
            warn(
                f"skipping incomplete checkpoint {p} (no {COMPLETE_MARKER}: its save was interrupted)"
            )
    damaged = []
    for p in reversed(complete):
        try:
            checkpoint_info(p)
        except ConfigError as err:
            damaged.append(p.name)
            warn(f"skipping damaged checkpoint {p}: {str(err).removeprefix('resume_from: ')}")
            continue
        return p
    if damaged:
        raise ConfigError(
            f"resume_from=latest: every checkpoint of {run_dir} is damaged ({', '.join(damaged)}); "
            "restore one from a copy, or start a new run (another run_name, no resume_from)"
        )
    return None


def find_checkpoint(config) -> Path | None:
    """The checkpoint to resume from: config.resume_from as a path (checked), or the newest complete one for 'latest'."""
    if not config.resume_from:
        return None
    if config.resume_from != "latest":
        path = Path(config.resume_from)
        checkpoint_info(path)
        return path
    run = latest_run_dir(config)
    return latest_checkpoint(run) if run is not None else None


def latest_run_dir(config) -> Path | None:
    """The run folder resume_from=latest means: logdir/run_name, else the newest <name>_* folder (None if none)."""
    logdir = Path(config.logdir)
    if config.run_name:
        run = logdir / config.run_name
        return run if run.is_dir() else None
    runs = [p for p in logdir.glob(f"{config.name}_*") if p.is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def run_dir_for(config, checkpoint: Path | None) -> Path:
    """The run folder: the resumed run's, or logdir/run_name (run_name must be set by then)."""
    if checkpoint is not None:
        return checkpoint.parent.parent
    return Path(config.logdir) / config.run_name


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, upto: int) -> list[Path]:
    """Delete this run's complete checkpoints at or before update `upto` beyond the newest `keep` (0 = keep all)."""
    import shutil

    if not keep:
        return []
    mine = [p for p in list_checkpoints(run_dir) if _checkpoint_step(p) <= upto]
    gone = mine[:-keep]
    for old in gone:
        shutil.rmtree(old, ignore_errors=True)
    return gone


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
