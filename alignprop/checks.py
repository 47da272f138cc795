"""Config checks and batch arithmetic: everything that can be wrong is found here, before anything loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alignprop import models, prompts, rewards
from alignprop.batching import Batching, batching  # noqa: F401  (public here too)
from alignprop.config_files import load_config  # noqa: F401  (public here too)
from alignprop.errors import ConfigError, warn_once
from alignprop.families import FAMILIES, get_family, note_ignored_guidance  # noqa: F401  (public here too)
from alignprop.solvers import Sampling, Truncation, decoder_checkpoint_mode, parse_buckets

# every family's VAE downsamples 8x; a family with a larger multiple says so at load (check_size)
SIZE_MULTIPLE = 8


# the RL objectives: they sample without autograd and draw no truncation K
RL = ("ddpo", "flow_grpo", "diffusion_nft")


def _check_sizes(s: Any) -> None:
    for field in ("resolution", "height", "width"):
        value = s.get(field, 0)
        if value < 0 or value % SIZE_MULTIPLE:
            raise ConfigError(
                f"sample.{field}={value} must be a multiple of {SIZE_MULTIPLE} (or 0 for the model's native size)"
            )
    for h, w in parse_buckets(s.get("buckets", "")):
        if min(h, w) < SIZE_MULTIPLE or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ConfigError(
                f"sample.buckets: {h}x{w} must have both sides positive multiples of {SIZE_MULTIPLE}"
            )


def _check_rewards(config: Any) -> None:
    try:
        config.eval_rewards = rewards.expand_judges(config.eval_rewards, config.reward)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"reward: {err}") from err
    for field, spec in (("reward", config.reward), ("eval_rewards", config.eval_rewards)):
        for part in [s for s in spec.split(",") if s] if field == "eval_rewards" else [spec]:
            try:
                parts = rewards.validate_spec(part)
            except (ValueError, TypeError, ImportError) as err:
                raise ConfigError(f"{field}: {err}") from err
            zero = [n for n, w in parts if w == 0]
            if field == "reward" and len(zero) == len(parts):
                raise ConfigError(
                    f"reward={spec!r}: every weight is 0, so the run would train nothing"
                )
            if zero:
                warn_once(
                    f"{field}={spec!r}: {', '.join(zero)} has weight 0 and contributes nothing"
                )


MAX_T5_TOKENS = 512  # the longest T5 prompt SD3 and FLUX.1 were trained on (diffusers refuses more)


def _check_ranges(config: Any) -> None:
    for field in ("train.learning_rate", "train.loss_coeff"):
        section, name = field.split(".")
        if not config[section][name] > 0:
            raise ConfigError(f"{field} must be > 0, got {config[section][name]}")
    if config.train.max_grad_norm < 0:
        raise ConfigError(
            f"train.max_grad_norm must be >= 0 (0 = off), got {config.train.max_grad_norm}"
        )
    if not 0.0 <= config.sample.eta <= 1.0:
        raise ConfigError(
            f"sample.eta={config.sample.eta} must be in [0, 1] (0 = DDIM, 1 = DDPM-like)"
        )
    family = config.pretrained.get("family", "auto")
    if config.train.get("algorithm", "alignprop") in RL:  # before eta: the real reason
        from alignprop.objectives.ddpo import check_family_solver

        check_family_solver(config, _known_family(config))
    if family != "auto" and get_family(family).solver == "flow" and config.sample.eta != 0:
        raise ConfigError(
            f"sample.eta={config.sample.eta}: the {family} family samples with a deterministic "
            "flow solver; set sample.eta=0 (train.algorithm=flow_grpo trains on its SDE at "
            "train.flow_grpo.noise_level)"
        )
    if config.sample.get("true_cfg_scale", 1.0) < 1:
        raise ConfigError(
            f"sample.true_cfg_scale must be >= 1 (1 = off), got {config.sample.true_cfg_scale}"
        )
    known = _known_family(config)
    if known is not None:
        check_true_cfg(config, known, get_family(known).true_cfg_only)
    if config.lora.enabled and config.lora.rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {config.lora.rank}")
    if config.lora.init not in models.LORA_INITS:
        raise ConfigError(f"lora.init={config.lora.init!r}; valid: {list(models.LORA_INITS)}")
    for field in ("eval_freq", "save_freq", "keep_checkpoints", "prompts.num_eval", "cpu_threads",
                  "train.max_nonfinite", "log_images", "train.adam_weight_decay"):  # fmt: skip
        value = _get(config, field)
        if value < 0:
            raise ConfigError(f"{field} must be >= 0, got {value}")
    for field in ("seed", "eval_seed"):
        value = _get(config, field)
        if not 0 <= value < 2**32:
            raise ConfigError(f"{field}={value} must be in [0, 2**32 - 1]")
    for field in ("train.adam_beta1", "train.adam_beta2"):
        value = _get(config, field)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{field}={value} must be in [0, 1)")
    for field in ("train.adam_epsilon", "sample.num_steps", "eval_repeats"):
        value = _get(config, field)
        if not value > 0:
            raise ConfigError(f"{field} must be > 0, got {value}")
    known = _known_family(config)
    _check_frames(config, known)
    offset = FAMILIES[known].guidance_offset if known in FAMILIES else 0.0
    check_guidance(config.sample.guidance_scale, "sample.guidance_scale", offset)
    length = config.pretrained.get("max_sequence_length", 0)
    if not isinstance(length, int) or not 0 <= length <= MAX_T5_TOKENS:
        raise ConfigError(
            f"pretrained.max_sequence_length={length!r} must be in [0, {MAX_T5_TOKENS}] (T5 tokens "
            "per prompt for SD3/FLUX; 0 = the family's default: SD3 256, FLUX 512)"
        )


def _known_family(config: Any) -> str | None:
    """pretrained.family, or the family of a local model folder (its model_index.json); None if unknown yet."""
    from alignprop import families

    family = config.pretrained.get("family", "auto")
    if family != "auto":
        return family
    model = config.pretrained.model
    if not (models.is_path(model) and (Path(model).expanduser() / "model_index.json").is_file()):
        return None  # a hub id or a single file: checked once the family is loaded
    try:
        return families.detect(str(Path(model).expanduser()))
    except (ConfigError, ValueError, OSError):
        return None  # the loader reports it, naming the field


def _check_frames(config: Any, known: str | None) -> None:
    """sample.num_frames / reward_frames: 4 k + 1 frames and indices inside the clip on a video
    family, unset on an image family (checked again at load when the family is detected then)."""
    from alignprop.families.wan import check_frames, parse_frames

    frames = config.sample.get("num_frames", 0)
    if not isinstance(frames, int) or frames < 0:
        raise ConfigError(f"sample.num_frames={frames!r} must be an integer >= 0 (0 = the card's)")
    reward_frames = parse_frames(config.sample.get("reward_frames", ""))
    if known not in FAMILIES:
        return
    fam = FAMILIES[known]
    if fam.is_video:
        check_frames(frames or fam.default_num_frames, reward_frames)
    elif frames > 1 or reward_frames:
        raise ConfigError(
            f"sample.num_frames={frames} / sample.reward_frames="
            f"{config.sample.get('reward_frames', '')!r} apply to video families (wan); the "
            f"{known} family makes images: leave them unset"
        )


def check_true_cfg(config: Any, family: str, true_cfg_only: bool) -> None:
    """sample.true_cfg_scale only acts on FLUX.1 (dev and schnell, family.true_cfg_only):
    elsewhere it is ignored, and so an error."""
    scale = config.sample.get("true_cfg_scale", 1.0)
    if scale != 1 and not true_cfg_only:
        raise ConfigError(
            f"sample.true_cfg_scale={scale} does nothing on the {family} family: only FLUX.1 "
            "(dev and schnell) and Qwen-Image take true CFG, and this family's guidance is "
            f"sample.guidance_scale={config.sample.guidance_scale}; set sample.true_cfg_scale=1"
        )


def _check_algorithm(config: Any, b: Batching) -> None:
    """train.algorithm and its section: a known objective, a reward it can train on, its own checks."""
    from alignprop import objectives

    objectives.check(config, b, rewards.is_differentiable(config.reward))


def _get(config: Any, field: str) -> Any:
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def check_guidance(scale: float, field: str, offset: float = 0.0) -> None:
    """Guidance <= 0 ignores (or inverts) the prompt: an error; between 0 and 1 it weakens it: a
    warning. With offset 1 (the family guides as pos + g (pos - neg): Z-Image) g >= 0, 0 = none."""
    if offset:
        if not scale >= 0:
            raise ConfigError(
                f"{field}={scale} must be >= 0 for this family: its pipeline guides as "
                "pos + g (pos - neg), 0 = no guidance (Z-Image-Turbo), 3 to 5 is usual otherwise"
            )
        return
    if not scale > 0:
        raise ConfigError(
            f"{field}={scale}: classifier-free guidance <= 0 ignores the prompt (0) or steers away from it; "
            "use 1 for no guidance, 7.5 is usual (Z-Image, whose 0 is no guidance, is only known "
            "as such with pretrained.family=zimage or a local model folder)"
        )
    if scale < 1:
        warn_once(
            f"{field}={scale} < 1 mixes in the unconditional prediction: the prompt is only partly followed"
        )


def check_num_steps(model: str, num_steps: int, field: str = "sample.num_steps") -> None:
    """num_steps must not exceed the scheduler's training timesteps (read from a local model folder; cheap)."""
    import json

    cfg = Path(model).expanduser() / "scheduler" / "scheduler_config.json"
    if not (models.is_path(model) and cfg.is_file()):
        return  # a hub id or a single file: diffusers checks it at load
    try:
        train_steps = int(json.loads(cfg.read_text()).get("num_train_timesteps", 1000))
    except (ValueError, TypeError):
        return
    if num_steps > train_steps:
        raise ConfigError(
            f"{field}={num_steps} exceeds the scheduler's num_train_timesteps={train_steps} ({cfg})"
        )


def check_writable(path: str | Path, field: str) -> Path:
    """Create the folder (and parents) and prove it takes a file; ConfigError naming the field if not."""
    import tempfile

    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write_test_"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{field}={str(path)!r}: cannot write there ({err.strerror or err})"
        ) from None
    return p


def check_wandb_login(field: str = "log_with") -> None:
    """wandb needs WANDB_API_KEY, a netrc login (`wandb login`) or WANDB_MODE=offline|disabled; checked without network."""
    import netrc
    import os
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError(
        f"{field}=wandb: not logged in to wandb (no WANDB_API_KEY, no {host} entry in {path}); run `wandb login`, "
        f"set WANDB_MODE=offline, or pass --config.{field}=none"
    )


def warn_long_prompts(family: Any, texts: list[str], field: str) -> None:
    """Warn once when a prompt tokenizes past a text encoder's context (the encoder cuts it silently)."""
    for name, tok in sorted(family.components.items()):
        limit = getattr(tok, "model_max_length", None) if name.startswith("tokenizer") else None
        if not tok or not limit or limit > 100_000:
            continue
        lengths = [len(ids) for ids in tok(list(texts), truncation=False)["input_ids"]]
        long = [t for t, n in zip(texts, lengths, strict=True) if n > limit]
        if long:
            warn_once(
                f"{field}: {len(long)} prompt(s) exceed {name}'s context of {limit} tokens and are cut, "
                f"e.g. {long[0][:60]!r}"
            )


def validate_config(config: Any, processes: int = 1, training: bool = True) -> Batching | None:
    """Check every cross-field rule before anything loads; raise ConfigError naming the field.

    `training=False` (evaluate.py) skips what only training reads: batch arithmetic, truncation,
    training prompts, log_with, resume_from; it then returns None."""
    from alignprop.tracking import TRACKERS

    resolve_moved_ids(config)
    b = batching(config, processes) if training else None
    if config.mixed_precision not in ("fp16", "bf16", "no"):
        raise ConfigError(f"mixed_precision={config.mixed_precision!r}; valid: fp16, bf16, no")
    if training and config.log_with not in TRACKERS:
        raise ConfigError(f"log_with={config.log_with!r}; valid: {list(TRACKERS)}")
    if training and config.log_with != "none" and importlib.util.find_spec(config.log_with) is None:
        raise ConfigError(
            f"log_with={config.log_with!r} needs `pip install {config.log_with}` (or log_with=none)"
        )
    if training and config.log_with == "wandb":
        check_wandb_login()
    if config.device:  # a named device must exist; fp16 on an explicit CPU is an error
        models.resolve_dtype(config.mixed_precision, models.resolve_device(config.device))
    if training and config.train.get("algorithm", "alignprop") not in RL:  # RL draws no K
        Truncation.from_config(config.truncation).validate(config.sample.num_steps)
    Sampling.from_config(config.sample)  # sample.checkpoint
    decoder_checkpoint_mode(config.sample.decoder_checkpoint)  # as the trainer reads it
    _check_sizes(config.sample)
    _check_ranges(config)
    _check_rewards(config)
    if training:
        _check_algorithm(config, b)
    prompts.check_template(config.prompts.template, "prompts.template")
    for name in ("train", "eval") if training else ("eval",):
        if prompts.check_spec(config.prompts[name], field=f"prompts.{name}"):
            prompts.load_prompts(
                config.prompts[name], field=f"prompts.{name}"
            )  # a file: read it now
    for field in ("model", "vae"):
        value = config.pretrained.get(field, "")
        if value and models.is_path(value) and not Path(value).expanduser().exists():
            raise ConfigError(f"pretrained.{field}={value!r}: no such file or folder")
    check_num_steps(config.pretrained.model, config.sample.num_steps)
    if training and config.resume_from not in ("", "latest"):
        from alignprop import checkpoints

        checkpoints.checkpoint_info(config.resume_from)
    if Path(config.logdir).expanduser().exists() and not Path(config.logdir).expanduser().is_dir():
        raise ConfigError(f"logdir={config.logdir!r} is a file, not a folder")
    _check_hacking(config)
    return b


def check_overrides(config: Any, fields: list[str]) -> None:
    """Fields set on the command line (dotted, no --config.) that the chosen setup would ignore."""
    algorithm = config.train.get("algorithm", "alignprop")
    if algorithm in RL:
        trunc = [f for f in fields if f == "truncation" or f.startswith("truncation.")]
        if trunc:
            raise ConfigError(
                f"{trunc[0]} is ignored under train.algorithm={algorithm}: it samples the whole "
                f"chain without autograd and trains train.{algorithm}.timestep_fraction of its "
                "steps, with no truncation K; drop it (or use train.algorithm=alignprop)"
            )


def resolve_moved_ids(config: Any) -> None:
    """Point model fields holding a hub id deleted upstream at its mirror (models.MOVED_HUB_IDS),
    so config.json, the model card and its licence record the weights actually loaded."""
    for field in ("model", "single_file_config", "vae"):
        value = config.pretrained.get(field, "")
        if value:
            config.pretrained[field] = models.current_hub_id(value, f"pretrained.{field}")
    r = config.get("reward_models")
    for section, field in (("imagereward", "repo"), ("imagereward", "tokenizer")):
        value = r.get(section, {}).get(field, "") if r is not None else ""
        if value:
            r[section][field] = models.current_hub_id(value, f"reward_models.{section}.{field}")


def _check_hacking(config: Any) -> None:
    """Reward-hacking guards: regularisers, early stopping, eval seeds, hub upload."""
    from alignprop import early_stop, model_card

    t = config.train
    for field in ("kl_coeff", "pretrain_coeff"):
        if not t.get(field, 0.0) >= 0:
            raise ConfigError(f"train.{field} must be >= 0 (0 = off), got {t[field]}")
    data = t.get("pretrain_data", "")
    if data and not Path(data).expanduser().is_dir():
        raise ConfigError(f"train.pretrain_data={data!r}: no such folder of images and captions")
    if data and t.get("pretrain_coeff", 0.0) > 0:
        from alignprop import pretrain

        pretrain.check_folder(data)  # a damaged image fails now, not after the models load
    if data and not t.get("pretrain_coeff", 0.0) > 0:
        warn_once(
            f"train.pretrain_data={data!r} is not read: train.pretrain_coeff=0 turns the pretraining "
            "loss off (set train.pretrain_coeff > 0 to use it)"
        )
    if t.get("kl_coeff", 0.0) > 0 and not config.lora.enabled:
        raise ConfigError(
            f"train.kl_coeff={t.kl_coeff} with lora.enabled=False: the KL is to the base model, which is "
            "the LoRA switched off, so without a LoRA it is exactly 0; set train.kl_coeff=0 or lora.enabled=True"
        )
    if config.get("eval_repeats", 1) < 1:
        raise ConfigError(f"eval_repeats must be >= 1, got {config.eval_repeats}")
    if "early_stop" in t:
        early_stop.validate_early_stop(config)
        metric = t.early_stop.metric
        if metric.startswith("eval/diversity") and config.get("eval_repeats", 1) < 2:
            raise ConfigError(
                f"train.early_stop.metric={metric!r} needs eval_repeats >= 2 (seeds per eval prompt)"
            )
    model_card.check_push_to_hub(config.get("push_to_hub", ""))


def apply_tiny(config: Any, explicit_model: bool = False) -> None:
    """Point every model field at the tiny random models (written on first use) when config.tiny is set.

    The pipeline is config.tiny_kit's ("" = the kit of pretrained.family, sd for auto).
    `explicit_model`: pretrained.model was given on the command line, which tiny would silently replace;
    a reward_models path other than its default would be replaced too: both are errors.
    """
    if not config.tiny:
        return
    from alignprop import tiny

    if explicit_model:
        raise ConfigError(
            f"tiny=True replaces pretrained.model={config.pretrained.model!r} by a tiny random model; "
            "drop one of them (--config.tiny=False to train that model)"
        )

    overrides = tiny.ensure_tiny()
    defaults = rewards.default_config()
    for field, value in overrides.items():
        if not field.startswith("reward_models."):
            continue
        given, default = _get(config, field), _get(defaults, field.removeprefix("reward_models."))
        if given not in (default, value):
            raise ConfigError(
                f"tiny=True replaces {field}={given!r} by a tiny random reward model; drop one of them "
                "(--config.tiny=False to use those weights)"
            )
    # a cache written by a newer alignprop may hold tiny rewards this version does not know
    known = {k: v for k, v in overrides.items() if not k.startswith("reward_models.") or
             k.split(".")[1] in defaults}  # fmt: skip
    tiny.apply_overrides(config, known)
    family = config.pretrained.get("family", "auto")
    if family != "auto":
        from alignprop import families

        families.get_family(family)  # pretrained.family=bogus is named as such, not as a kit
    kit = config.get("tiny_kit", "") or ("sd" if family == "auto" else family)
    if kit not in tiny.FAMILIES:
        raise ConfigError(f"tiny_kit={kit!r} is not known; valid: {', '.join(tiny.FAMILIES)}")
    config.pretrained.model = tiny.ensure_tiny_model(kit)
