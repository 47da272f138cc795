"""The AlignProp training step, evaluation and checkpointing; scripts/train.py strings them together."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignprop import inference, lora_io, models, prompts, rewards, sampler
from alignprop.errors import ConfigError

CHECKPOINT_RE = re.compile(r"checkpoint_(\d+)$")


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class Batching:
    """Per-process micro-batch, processes, accumulation and run length, all derived from the config."""

    micro: int
    processes: int
    accum: int
    total: int
    updates_per_epoch: int
    num_updates: int

    def describe(self) -> str:
        return (
            f"{self.total} samples per update = {self.processes} processes x {self.micro} per micro-batch "
            f"x {self.accum} accumulation steps; {self.updates_per_epoch} updates per epoch, {self.num_updates} updates"
        )


def batching(config: Any, processes: int) -> Batching:
    """Derive gradient accumulation and run length; raise ConfigError naming the field if they don't divide."""
    micro, total = config.sample.batch_size, config.train.total_batch_size
    if micro < 1:
        raise ConfigError(f"sample.batch_size must be >= 1, got {micro}")
    if total < 1 or total % (micro * processes):
        raise ConfigError(
            f"train.total_batch_size={total} must be a positive multiple of sample.batch_size x processes = "
            f"{micro} x {processes} = {micro * processes}"
        )
    per_epoch = config.train.samples_per_epoch
    if per_epoch < total or per_epoch % total:
        raise ConfigError(
            f"train.samples_per_epoch={per_epoch} must be a positive multiple of train.total_batch_size={total}"
        )
    if config.train.num_epochs < 1:
        raise ConfigError(f"train.num_epochs must be >= 1, got {config.train.num_epochs}")
    updates_per_epoch = per_epoch // total
    return Batching(
        micro,
        processes,
        total // (micro * processes),
        total,
        updates_per_epoch,
        updates_per_epoch * config.train.num_epochs,
    )


def truncation_of(config: Any) -> sampler.Truncation:
    """The sampler's Truncation from config.truncation."""
    t = config.truncation
    return sampler.Truncation(t.strategy, t.k, t.k_min, t.k_max, t.cut_mean, t.cut_std)


def validate_config(config: Any, processes: int = 1) -> Batching:
    """Check every cross-field rule before anything loads; raise ConfigError naming the field."""
    from alignprop.tracking import TRACKERS

    b = batching(config, processes)
    if config.mixed_precision not in ("fp16", "bf16", "no"):
        raise ConfigError(f"mixed_precision={config.mixed_precision!r}; valid: fp16, bf16, no")
    if config.log_with not in TRACKERS:
        raise ConfigError(f"log_with={config.log_with!r}; valid: {list(TRACKERS)}")
    if config.log_with != "none" and importlib.util.find_spec(config.log_with) is None:
        raise ConfigError(
            f"log_with={config.log_with!r} needs `pip install {config.log_with}` (or log_with=none)"
        )
    try:
        truncation_of(config).validate(config.sample.num_steps)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if config.sample.eta < 0:
        raise ConfigError(f"sample.eta must be >= 0, got {config.sample.eta}")
    if config.sample.resolution and config.sample.resolution % 8:
        raise ConfigError(
            f"sample.resolution={config.sample.resolution} must be a multiple of 8 (or 0 for native)"
        )
    for field in ("train.learning_rate", "train.loss_coeff"):
        section, name = field.split(".")
        if not config[section][name] > 0:
            raise ConfigError(f"{field} must be > 0, got {config[section][name]}")
    if config.train.max_grad_norm < 0:
        raise ConfigError(
            f"train.max_grad_norm must be >= 0 (0 = off), got {config.train.max_grad_norm}"
        )
    if config.lora.enabled and config.lora.rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {config.lora.rank}")
    if config.lora.init not in models.LORA_INITS:
        raise ConfigError(f"lora.init={config.lora.init!r}; valid: {list(models.LORA_INITS)}")
    for field, spec in (("reward", config.reward), ("eval_rewards", config.eval_rewards)):
        for part in [s for s in spec.split(",") if s] if field == "eval_rewards" else [spec]:
            try:
                rewards.validate_spec(part)
            except ValueError as err:
                raise ConfigError(f"{field}: {err}") from err
    for name in ("train", "eval"):
        prompts.check_spec(config.prompts[name], field=f"prompts.{name}")
    for field in ("pretrained.model",):
        value = config.pretrained.model
        if models._is_path(value) and not Path(value).exists():
            raise ConfigError(f"{field}={value!r}: no such file or folder")
    if config.resume_from not in ("", "latest") and not Path(config.resume_from).is_dir():
        raise ConfigError(
            f"resume_from={config.resume_from!r}: no such checkpoint folder (or use 'latest')"
        )
    for field in ("eval_freq", "save_freq", "keep_checkpoints", "prompts.num_eval", "cpu_threads"):
        node, name = (config.prompts, "num_eval") if "." in field else (config, field)
        if node[name] < 0:
            raise ConfigError(f"{field} must be >= 0, got {node[name]}")
    return b


def apply_tiny(config: Any) -> None:
    """Point every model field at the tiny random models (written on first use) when config.tiny is set."""
    if not config.tiny:
        return
    from alignprop import tiny

    tiny.apply_overrides(config, tiny.ensure_tiny())


# ---------------------------------------------------------------- run folder and checkpoints


def find_checkpoint(config: Any) -> Path | None:
    """The checkpoint to resume from: config.resume_from as a path, or the newest one for 'latest'."""
    if not config.resume_from:
        return None
    if config.resume_from != "latest":
        return Path(config.resume_from)
    logdir = Path(config.logdir)
    if config.run_name:
        runs = [logdir / config.run_name]
    else:  # newest run folder of this experiment
        runs = sorted(
            logdir.glob(f"{config.name}_*"), key=lambda p: p.stat().st_mtime, reverse=True
        )[:1]
    ckpts = [c for r in runs for c in list_checkpoints(r)]
    return ckpts[-1] if ckpts else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoint folders, oldest first."""
    found = [
        p
        for p in (Path(run_dir) / "checkpoints").glob("checkpoint_*")
        if CHECKPOINT_RE.search(p.name)
    ]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.search(p.name).group(1)))


def run_dir_for(config: Any, checkpoint: Path | None) -> Path:
    """The run folder: the resumed run's, or logdir/run_name (run_name must be set by then)."""
    if checkpoint is not None:
        return checkpoint.parent.parent
    return Path(config.logdir) / config.run_name


@dataclass
class TrainState:
    """Counters saved with every checkpoint (accelerate's custom state)."""

    update: int = 0
    samples_seen: int = 0
    nonfinite_run: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def peak_mem_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated on a GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def load_adapter_weights(unet: torch.nn.Module, lora_dir: str | os.PathLike) -> None:
    """Load a saved LoRA into the UNet's existing "default" adapter in place (exact resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    state, _, _ = lora_io.read_lora_state_dict(lora_dir)
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = getattr(result, "unexpected_keys", [])
    if missing or unexpected:
        raise RuntimeError(
            f"LoRA in {lora_dir} does not match this run's adapter: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


# ---------------------------------------------------------------- the trainer


class AlignProp:
    """Models, reward, optimizer and state of one run; `update()` is one optimizer step."""

    def __init__(
        self,
        config: Any,
        accelerator: Any,
        batch: Batching,
        run_dir: Path,
        parts: models.SDParts | None = None,
        reward_fn: rewards.RewardFn | None = None,
    ):
        """`parts` (already in the run's dtype) and `reward_fn` replace loading them from the config
        (scripts/benchmark.py passes SD-sized random-weight models built in memory)."""
        self.config, self.acc, self.batch, self.run_dir = config, accelerator, batch, run_dir
        self.device = accelerator.device
        self.dtype = models.resolve_dtype(config.mixed_precision)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise ConfigError("mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.allow_tf32

        p = config.pretrained
        self.parts = parts or models.load_sd(
            p.model, revision=p.revision or None, variant=p.variant or None,
            single_file_config=p.single_file_config or None, dtype=self.dtype,
        )  # fmt: skip
        models.freeze(self.parts, self.device)
        # The adapter's init must not depend on the process: seed it with the run seed alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.params = models.trainable_unet(self.parts.unet, config.lora)
        if config.sample.decoder_checkpoint:
            self.parts.vae.enable_gradient_checkpointing()
        unet = self.parts.unet
        if config.train.compile_unet:
            unet = torch.compile(unet)
        t = config.train
        optimizer = torch.optim.AdamW(
            self.params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
        )  # fmt: skip
        self.unet, self.optimizer = accelerator.prepare(unet, optimizer)
        self.state = TrainState()
        accelerator.register_for_checkpointing(self.state)
        if config.lora.enabled:  # checkpoints hold the adapter, not the frozen 3.4 GB UNet
            accelerator.register_save_state_pre_hook(self._save_hook)
            accelerator.register_load_state_pre_hook(self._load_hook)

        self.truncation = truncation_of(config)
        self.reward_fn = reward_fn or rewards.get_reward(
            config.reward, config.reward_models, self.device, self.dtype
        )
        self.prompt_sampler = prompts.PromptSampler(
            prompts.load_prompts(
                config.prompts.train, config.prompts.template, field="prompts.train"
            )
        )
        self.uncond = self.encode([config.sample.negative_prompt])  # (1, 77, D), encoded once
        self.resolution = config.sample.resolution or inference.native_resolution(self.parts)
        self._eval: dict | None = None

    # ---- pieces

    def encode(self, texts: list[str]) -> torch.Tensor:
        return models.encode_prompts(
            self.parts.tokenizer, self.parts.text_encoder, texts, self.device
        )

    def _save_hook(self, models_: list, weights: list, output_dir: str) -> None:
        if self.acc.is_main_process:
            lora_io.save_lora(self.unet, output_dir)  # save_lora unwraps DDP and compile
        weights.clear()
        models_.clear()

    def _load_hook(self, models_: list, input_dir: str) -> None:
        load_adapter_weights(lora_io.unwrap(self.unet), input_dir)
        models_.clear()

    def loss_on(
        self, texts: list[str], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Sample with truncated backprop, score, and return (loss, rewards, info): the differentiable core."""
        cond = self.encode(texts)  # (B, 77, D), no grad
        s = self.config.sample
        with self.acc.autocast():
            images, sinfo = sampler.sample(
                self.unet, self.parts.vae, self.parts.scheduler, cond, self.uncond,
                num_steps=s.num_steps, guidance_scale=s.guidance_scale, eta=s.eta,
                truncation=self.truncation, generator=generator, grad_checkpoint=s.grad_checkpoint,
                height=self.resolution, width=self.resolution, dtype=self.dtype,
            )  # fmt: skip
            reward, info = self.reward_fn(images, texts)
        loss = self.config.train.loss_coeff * info["loss"].mean()
        return loss, reward, {**info, "K": sinfo["K"]}

    # ---- one update

    def update(self) -> dict[str, float]:
        """One optimizer update over accum micro-batches; non-finite gradients skip it (counted)."""
        t0 = time.perf_counter()
        accum, st = self.batch.accum, self.state
        rewards_, losses, ks, parts = [], [], [], {}
        for i in range(accum):
            sync = i == accum - 1
            ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.unet)
            with ctx:
                loss, reward, info = self.loss_on(self.prompt_sampler(self.batch.micro))
                if self.config.train.debug_dump_grads:
                    self._record_local_grads(loss / accum)
                self.acc.backward(loss / accum)
            rewards_.append(reward.detach())
            losses.append(loss.detach())
            ks.append(float(info["K"]))
            for name, v in info["parts"].items():
                parts.setdefault(name, []).append(v.detach())
        if self.config.train.debug_dump_grads:
            self._dump_grads()
        grad_norm = self._clip_and_check()
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            st.nonfinite_run = 0
        else:  # skip: a NaN/inf update would corrupt the LoRA for good
            st.nonfinite_run += 1
            st.nonfinite_total += 1
            if self.acc.scaler is not None:
                self.acc.scaler.update()  # fp16: back off the loss scale as a skipped scaler step would
        self.optimizer.zero_grad(set_to_none=True)
        st.update += 1
        st.samples_seen += self.batch.total

        all_r = self.acc.gather(torch.cat(rewards_).float())
        metrics = {
            "samples_seen": st.samples_seen,
            "epoch": st.samples_seen / self.config.train.samples_per_epoch,
            "reward_mean": all_r.mean().item(),
            "reward_std": all_r.std().item() if all_r.numel() > 1 else 0.0,
            "loss": self.acc.gather(torch.stack(losses).float()).mean().item(),
            "K_mean": self.acc.gather(torch.tensor(ks, device=self.device)).mean().item(),
            "grad_norm": grad_norm.item(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped_nonfinite": st.nonfinite_total,
            "sec_per_step": time.perf_counter() - t0,
            "peak_mem_gib": peak_mem_gib(self.device),
        }
        for name, vs in parts.items():
            metrics[f"reward/{name}_mean"] = self.acc.gather(torch.cat(vs).float()).mean().item()
        if st.nonfinite_run >= self.config.train.max_nonfinite:
            raise FloatingPointError(
                f"{st.nonfinite_run} updates in a row had a NaN/inf loss or gradient (at update {st.update}); "
                "stopped without applying them, so the last checkpoint's LoRA is intact. Lower "
                "train.learning_rate, use mixed_precision=bf16, or check the reward (train.max_nonfinite sets the limit)."
            )
        return metrics

    def _record_local_grads(self, loss: torch.Tensor) -> None:
        """Debug: this process's own gradient, taken before DDP averages it (autograd.grad skips the hooks)."""
        grads = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
        local = getattr(self, "_local_grads", None) or [torch.zeros_like(p) for p in self.params]
        self._local_grads = [
            acc + (g if g is not None else 0) for acc, g in zip(local, grads, strict=True)
        ]

    def _dump_grads(self) -> None:
        """Debug: save local and synchronised gradients to <run>/debug_grads/rank<r>_update<u>.pt."""
        out = (
            self.run_dir
            / "debug_grads"
            / f"rank{self.acc.process_index}_update{self.state.update + 1}.pt"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        synced = [
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for p in self.params
        ]
        torch.save({"local": self._local_grads, "synced": synced}, out)
        self._local_grads = None

    def _clip_and_check(self) -> torch.Tensor:
        """Unscale, clip to max_grad_norm (if > 0) and return the total gradient norm (inf/nan if non-finite)."""
        max_norm = self.config.train.max_grad_norm
        if max_norm > 0:
            return torch.as_tensor(self.acc.clip_grad_norm_(self.params, max_norm)).float()
        self.acc.unscale_gradients()
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        )

    # ---- evaluation

    def _eval_setup(self) -> dict:
        """Held-out prompts, fixed noise from a separate generator, and the eval rewards (built once)."""
        c = self.config
        texts = prompts.load_prompts(c.prompts.eval, c.prompts.template, field="prompts.eval")
        texts = texts[: c.prompts.num_eval] if c.prompts.num_eval else texts
        # Fixed noise from its own generator: never touches the training RNG.
        noise = inference.fixed_noise(
            self.parts, len(texts), self.resolution, c.eval_seed
        )  # (N, 4, H/8, W/8)
        fns = {"reward": self.reward_fn}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # loading must not advance the training RNG
            for name in [s for s in c.eval_rewards.split(",") if s]:
                fns[name] = rewards.get_reward(name, c.reward_models, self.device, self.dtype)
        return {"prompts": texts, "noise": noise, "rewards": fns}

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], torch.Tensor, list[str]]:
        """Score held-out prompts from fixed noise under every eval reward; return metrics, images, captions."""
        if self._eval is None:
            self._eval = self._eval_setup()
        ev, s = self._eval, self.config.sample
        unet = self.acc.unwrap_model(self.unet)
        scores: dict[str, list[torch.Tensor]] = {}
        images = []
        for i in range(0, len(ev["prompts"]), s.batch_size):
            texts = ev["prompts"][i : i + s.batch_size]
            with self.acc.autocast():
                imgs, _ = sampler.sample(
                    unet, self.parts.vae, self.parts.scheduler, self.encode(texts), self.uncond,
                    num_steps=s.num_steps, guidance_scale=s.guidance_scale, eta=0.0,
                    latents=ev["noise"][i : i + s.batch_size], dtype=self.dtype,
                )  # fmt: skip
                for name, fn in ev["rewards"].items():
                    r, info = fn(imgs, texts)
                    scores.setdefault(name, []).append(r.float().cpu())
                    if name == "reward" and len(info["parts"]) > 1:
                        for part, v in info["parts"].items():
                            scores.setdefault(part, []).append(v.float().cpu())
            images.append(imgs.cpu())
        metrics = {}
        for name, vs in scores.items():
            v = torch.cat(vs)
            metrics[f"eval/{name}_mean"] = v.mean().item()
            metrics[f"eval/{name}_std"] = v.std().item() if v.numel() > 1 else 0.0
        r = torch.cat(scores["reward"])
        captions = [f"{p} | {x:.3f}" for p, x in zip(ev["prompts"], r.tolist(), strict=True)]
        return metrics, torch.cat(images), captions

    # ---- checkpoints

    def save(self) -> Path:
        """Save accelerate state (+ LoRA) on every rank to checkpoints/checkpoint_<update>; keep the newest N."""
        out = self.run_dir / "checkpoints" / f"checkpoint_{self.state.update}"
        self.acc.save_state(str(out))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process and self.config.keep_checkpoints:
            for old in list_checkpoints(self.run_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return out

    def resume(self, checkpoint: Path) -> None:
        """Restore LoRA, optimizer, RNG and counters; drop metrics rows logged after the checkpoint."""
        self.acc.load_state(str(checkpoint))
        if self.acc.is_main_process:
            path = self.run_dir / "metrics.jsonl"
            if path.exists():
                rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                keep = [r for r in rows if r.get("step", 0) <= self.state.update]
                path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.acc.wait_for_everyone()

    def save_final(self) -> Path:
        """The trained LoRA alone (diffusers format) under final/, or the full UNet if LoRA is off."""
        out = self.run_dir / "final"
        if self.acc.is_main_process:
            unet = lora_io.unwrap(self.unet)
            if self.config.lora.enabled:
                lora_io.save_lora(unet, out)
            else:
                unet.save_pretrained(out / "unet")
        self.acc.wait_for_everyone()
        return out
