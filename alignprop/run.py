"""The training run: models, LoRA, optimizer, state, evaluation, save/resume; no loss.

`Run` holds what every objective shares and steps the optimizer for it; the objective (its
class from alignprop.objectives, chosen by train.algorithm and passed in by the caller: the
objectives sit above the run, which imports none of them) turns rewards into gradients in
`update(run)`. scripts/train.py strings the run together: config checks live in
alignprop.checks, LoRA files and checkpoint naming in alignprop.lora_io, sampling in
alignprop.solvers, the eval in alignprop.evaluation, compile/CUDA graphs in alignprop.fast.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignprop import (
    checkpoints,
    evaluation,
    families,
    fast,
    lora_io,
    models,
    prompts,
    rewards,
    solvers,
)
from alignprop.batching import Batching
from alignprop.early_stop import EarlyStop, replace_folder
from alignprop.errors import NonFiniteStop
from alignprop.run_dir import truncate_metrics, write_final


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


def make_optimizer(params: list[torch.nn.Parameter], t: Any) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters as config.train says (it updates them in place)."""
    return torch.optim.AdamW(
        params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
    )  # fmt: skip


class Run:
    """Models, reward, optimizer and state of one run; `update()` is one objective update."""

    def __init__(
        self,
        config: Any,
        accelerator: Any,
        batch: Batching,
        run_dir: Path,
        family: families.Family | None = None,
        reward_fn: rewards.RewardFn | None = None,
        *,
        objective: Any,
    ):
        """`objective`: the objective's class (alignprop.objectives.get(config.train.algorithm));
        `family` (loaded in the run's dtype) and `reward_fn` replace loading them from the config
        (benchmarks/benchmark.py passes full-size random-weight models built on the device)."""
        self.config, self.acc, self.batch, self.run_dir = config, accelerator, batch, run_dir
        objective_cls = objective
        self.device = accelerator.device
        self.dtype = models.resolve_dtype(config.mixed_precision, self.device)
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.allow_tf32

        self.family = family or families.load_family(config.pretrained, self.dtype, self.device)
        self.family.freeze(self.device)
        self.family.set_frames(
            config.sample.get("num_frames", 0), config.sample.get("reward_frames", "")
        )
        objective_cls.check_family(self.family)  # family=auto is known only now
        # The adapter's init must not depend on the process: seed it with the run seed alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.params = models.make_trainable(
                self.family.denoiser, config.lora, self.family.lora_targets,
                self.family.lora_exclude,
            )  # fmt: skip
        solvers.set_decoder_checkpointing(self.family.vae, config.sample.decoder_checkpoint)
        self.reward_fn = reward_fn or rewards.get_reward(
            config.reward, config.reward_models, self.device, self.dtype
        )
        denoiser, self.graphs = fast.fast_path(config, self.family, self.reward_fn, self.device)
        optimizer = make_optimizer(self.params, config.train)
        self.model, self.optimizer = accelerator.prepare(denoiser, optimizer)
        self.state = TrainState()
        accelerator.register_for_checkpointing(self.state)
        if config.lora.enabled:  # checkpoints hold the adapter, not the frozen base weights
            lora_io.checkpoint_adapter_only(accelerator, self.model, self.family)

        opts = solvers.Sampling.from_config(config.sample)
        height, width = opts.size(self.family)
        self.family.check_size(height, width)
        for bucket in opts.buckets:
            self.family.check_size(*bucket, field="sample.buckets")
        self.opts = dataclasses.replace(opts, height=height, width=width)
        self.prompt_sampler = prompts.PromptSampler(
            prompts.load_prompts(
                config.prompts.train, config.prompts.template, field="prompts.train"
            )
        )
        self.uncond = self.family.encode_negative(config.sample.negative_prompt)  # encoded once
        self._eval: evaluation.RunEval | None = None
        # reward-hacking guard: early stopping (saved with checkpoints, before the objective's state)
        self.early_stop = EarlyStop.from_config(config)
        if self.early_stop is not None:
            accelerator.register_for_checkpointing(self.early_stop)
        self.objective = objective_cls(self)
        line = self.objective.describe(self)
        if line:
            accelerator.print(line)

    def update(self) -> dict[str, float]:
        """One update of the objective (one row of metrics.jsonl)."""
        return self.objective.update(self)

    # ---- the optimizer step and the metrics every objective logs

    def step_metrics(
        self, t0: float, all_r: torch.Tensor, losses: list[torch.Tensor], grad_norm: torch.Tensor,
        **after_loss: float,
    ) -> dict[str, float]:  # fmt: skip
        """The metrics every update logs (all_r: every process's rewards); `after_loss` follows "loss"."""
        st = self.state
        return {
            "samples_seen": st.samples_seen,
            "epoch": st.samples_seen / self.config.train.samples_per_epoch,
            "reward_mean": all_r.mean().item(),
            "reward_std": all_r.std().item() if all_r.numel() > 1 else 0.0,
            "loss": self.acc.gather(torch.stack(losses).float()).mean().item(),
            **after_loss,
            "grad_norm": grad_norm.item(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped_nonfinite": st.nonfinite_total,
            "sec_per_step": time.perf_counter() - t0,
            "peak_mem_gib": peak_mem_gib(self.device),
        }

    def gathered_means(
        self, values: dict[str, list[torch.Tensor]], key: str = "{}"
    ) -> dict[str, float]:
        """{key.format(name): mean over every process of the name's tensors}."""
        g = self.acc.gather
        return {
            key.format(name): g(torch.cat(vs).float()).mean().item() for name, vs in values.items()
        }

    def step_or_skip(self) -> torch.Tensor:
        """Clip, then step; a non-finite gradient skips the step (counted). Returns the gradient norm."""
        st = self.state
        grad_norm = self._clip_and_check()
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            st.nonfinite_run = 0
        else:  # skip: a NaN/inf update would corrupt the LoRA for good
            st.nonfinite_run += 1
            st.nonfinite_total += 1
            if self.acc.scaler is not None:
                self.acc.scaler.update()  # fp16: back off the loss scale as a skipped scaler step would
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def stop_if_nonfinite(self) -> None:
        """train.max_nonfinite skipped steps in a row stop the run (0 = never), the last checkpoint intact."""
        st, limit = self.state, self.config.train.max_nonfinite
        if limit and st.nonfinite_run >= limit:
            last = checkpoints.list_checkpoints(self.run_dir)
            raise NonFiniteStop(
                f"{st.nonfinite_run} optimizer steps in a row had a NaN/inf loss or gradient (at update {st.update}); "
                f"stopped without applying them; last checkpoint: {last[-1] if last else 'none'} (intact). Lower "
                "train.learning_rate, use mixed_precision=bf16, or check the reward (train.max_nonfinite sets the limit)."
            )

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

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], torch.Tensor, list[str]]:
        """Score held-out prompts from fixed noise under every eval reward; return metrics, images, captions."""
        if self._eval is None:  # built on first use (alignprop.evaluation.RunEval)
            self._eval = evaluation.RunEval(
                self.config, self.family, self.opts, self.reward_fn, self.device, self.dtype
            )
        return self._eval(self.acc.unwrap_model(self.model))

    # ---- checkpoints

    def save(self) -> Path:
        """Save accelerate state (+ LoRA) on every rank to checkpoints/checkpoint_<update>, atomically; keep the newest N."""
        st = self.state
        out = checkpoints.save_checkpoint(
            self.acc, self.run_dir, st.update, {"samples_seen": st.samples_seen}
        )
        if self.acc.is_main_process:
            checkpoints.prune_checkpoints(self.run_dir, self.config.keep_checkpoints, st.update)
        self.acc.wait_for_everyone()
        return out

    def resume(self, checkpoint: Path) -> None:
        """Restore LoRA, optimizer, RNG and counters; drop metrics rows logged after the checkpoint."""
        for fresh in checkpoints.load_checkpoint(self.acc, checkpoint):
            print(f"{checkpoint} holds no {type(fresh).__name__} state: it starts afresh")
        if self.acc.is_main_process:
            truncate_metrics(self.run_dir, self.state.update)
        self.acc.wait_for_everyone()

    def save_best(self) -> Path:
        """The LoRA of the best evaluation so far under best/ (written aside, then swapped in)."""
        return self._save_weights("best", replace_folder)

    def save_final(self) -> Path:
        """The trained LoRA alone (diffusers format) under final/, or the full denoiser if LoRA is off."""
        return self._save_weights("final", write_final)

    def _save_weights(self, name: str, write_folder: Any) -> Path:
        """The main process writes the trained weights to run_dir/name through write_folder; all wait."""
        out = self.run_dir / name
        if self.acc.is_main_process:
            write_folder(out, self._write_weights)
        self.acc.wait_for_everyone()
        return out

    def _write_weights(self, out: Path) -> None:
        lora_io.save_weights(self.model, out, self.family, lora=self.config.lora.enabled)
