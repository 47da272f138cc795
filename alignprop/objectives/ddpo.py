"""DDPO: PPO with the clipped objective on the DDIM chain, the RL baseline AlignProp is measured against.

The same run as every objective (alignprop.run.Run: family, LoRA, reward, prompts, logging,
checkpoints, evaluation); only the loss and the update schedule differ.

One `update()` (one row of metrics.jsonl):
  1. sample train.total_batch_size images over all processes (sample.batch_size per micro-batch)
     with no autograd on the DDIM chain at eta = sample.eta > 0 (DDPO: 1), so that each step
     x_i -> x_{i+1} is a Gaussian with the solver's mean and sigma; keep every latent and the
     log-probability of every step; score the images (any reward: no gradient is needed);
  2. advantages: rewards normalised per prompt by a buffer of its recent rewards
     (`PerPromptStatTracker`; batch statistics below a minimum count), clipped to adv_clip_max;
  3. train.ddpo.inner_epochs passes over the sampled images, shuffled; each pass is
     train.ddpo.minibatches optimizer steps, each accumulating over its images and over
     timestep_fraction of the chain's steps; the loss is PPO's clipped surrogate
     max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = p_new(x_{i+1} | x_i) / p_old(x_{i+1} | x_i).
Classifier-free guidance is applied as in sampling (one denoiser call on [uncond, cond]) both
when sampling and when the log-probabilities are recomputed, as DDPO does.

Reward queries per update = train.total_batch_size, as for AlignProp, so samples_seen counts
images scored for both. Differences from kvablack/ddpo-pytorch: the trained timesteps are drawn
per micro-batch rather than per image (the same when timestep_fraction = 1, the default), and
steps with sigma = 0 (none on SD's chain) are never trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from typing import Any

import torch

from alignprop import families, solvers
from alignprop.errors import ConfigError
from alignprop.families.base import Cond
from alignprop.objectives.base import Objective, refuse_changed


class PerPromptStatTracker:
    """Normalise rewards per prompt with a buffer of its recent rewards (batch stats until min_count)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def __call__(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Advantages (B,) for rewards (B,) of prompts (B); the buffers are updated first."""
        r = rewards.detach().double().cpu()
        out = torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):  # unique, in order: the same on every process
            idx = torch.tensor([k for k, p in enumerate(prompts) if p == prompt])
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = hist.mean(), hist.std(unbiased=False)
            out[idx] = (r[idx] - mean) / (std + 1e-6)
        return out.float().to(rewards.device)

    def state_dict(self) -> dict:
        return {"buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}


def batch_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(r - mean) / std over the batch (train.ddpo.per_prompt_stats=False)."""
    r = rewards.detach().float()
    return (r - r.mean()) / (r.std(unbiased=False) + 1e-6)


def ppo_loss(
    advantages: torch.Tensor,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    clip_range: float,
    adv_clip_max: float = float("inf"),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))); info: ratio, clipfrac, approx_kl."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info = {
            "ratio": ratio.detach(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
        }
    return loss, info


def check_ddpo(config: Any, b: Any) -> None:
    """Raise ConfigError naming the field for a DDPO setting that cannot run (called by validate_config)."""
    d = config.train.ddpo
    if not 0.0 < config.sample.eta <= 1.0:
        raise ConfigError(
            f"sample.eta={config.sample.eta}: train.algorithm=ddpo needs a stochastic chain, eta in "
            "(0, 1] (DDPO samples, trains and evaluates at 1.0)"
        )
    for field in ("inner_epochs", "minibatches", "buffer_size", "min_count"):
        if d[field] < 1:
            raise ConfigError(f"train.ddpo.{field} must be >= 1, got {d[field]}")
    if b.accum % d.minibatches:
        raise ConfigError(
            f"train.ddpo.minibatches={d.minibatches} must divide the micro-batches each process samples "
            f"per update ({b.accum} = train.total_batch_size / (sample.batch_size x processes))"
        )
    for field in ("clip_range", "adv_clip_max"):
        if not d[field] > 0:
            raise ConfigError(f"train.ddpo.{field} must be > 0, got {d[field]}")
    if not 0.0 < d.timestep_fraction <= 1.0:
        raise ConfigError(f"train.ddpo.timestep_fraction={d.timestep_fraction} must be in (0, 1]")
    if d.per_prompt_stats and d.min_count > d.buffer_size:
        raise ConfigError(
            f"train.ddpo.min_count={d.min_count} > train.ddpo.buffer_size={d.buffer_size}: a prompt never "
            "holds enough rewards, so the per-prompt statistics are never used; lower min_count (or "
            "set train.ddpo.per_prompt_stats=False for batch statistics)"
        )
    for field in ("kl_coeff", "pretrain_coeff"):
        if config.train.get(field, 0.0) > 0:
            raise ConfigError(
                f"train.{field}={config.train[field]}: DDPO's PPO update adds no regulariser, so it would "
                f"be ignored; set train.{field}=0 (KL and pretraining losses are the pathwise objectives')"
            )
    refuse_changed(config, UNUSED_UNDER_DDPO, "ddpo")


# AlignProp's fields that DDPO never reads, and why: a value other than config/base.py's default,
# from the command line or a config file, would be silently ignored
UNUSED_UNDER_DDPO = {
    "truncation": "DDPO samples the whole chain without autograd and trains "
    "train.ddpo.timestep_fraction of its steps with its own PPO loss, with no truncation K",
    "train.loss_coeff": "DDPO's PPO loss has no reward-loss scale",
    "sample.buckets": "the RL objectives sample every image at sample.resolution (one size per "
    "update)",
    "sample.merge_lora": "the RL objectives sample on the unmerged adapter, so that the sampled "
    "and the recomputed step log-probabilities agree",
    "train.cuda_graphs": "the RL objectives' sampling does not replay CUDA graphs",
    "sample.decode_chunk": "the RL objectives decode without autograd, each micro-batch at once",
}


def check_family_solver(config: Any, known: str | None = None) -> None:
    """DDPO on a flow family, or Flow-GRPO on a DDIM one, is an error naming the objective that
    fits; `known`: the family of a local model folder, when pretrained.family=auto."""
    name = config.get("tiny_kit", "") if config.get("tiny", False) else ""
    name = name or config.pretrained.get("family", "auto")
    name = known if name == "auto" and known else name
    name = {"sd2": "sd", "flux_schnell": "flux"}.get(name, name)  # tiny kits -> their family
    if name in families.FAMILIES:
        algorithm = config.train.get("algorithm", "alignprop")
        check_solver(families.FAMILIES[name].solver, name, algorithm)


# the solver each RL objective is for: DDPO's PPO on the DDIM chain, Flow-GRPO's on the flow
# SDE, DiffusionNFT's velocity targets
RL_SOLVER = {"ddpo": "ddim", "flow_grpo": "flow", "diffusion_nft": "flow"}


def check_solver(solver: str, family: str, algorithm: str) -> None:
    """Refuse an RL objective on a family whose solver is not the one its step density is for."""
    want = RL_SOLVER[algorithm]
    if solver != want:
        other = next(a for a, s in RL_SOLVER.items() if s == solver)
        raise ConfigError(
            f"train.algorithm={algorithm} is for the {want!r} solver's families; the "
            f"{family} family samples with {solver!r}: use train.algorithm={other} (its RL "
            "objective) or alignprop"
        )


def _index(cond: Cond, idx: torch.Tensor) -> Cond:
    return Cond({k: v[idx.to(v.device)] for k, v in cond.tensors.items()})


class DDPO(Objective):
    """DDPO's update: sample, normalise rewards per prompt, PPO passes."""

    name = "ddpo"
    paper = "DDPO, arXiv 2305.13301"
    differentiable_reward = False
    section = "ddpo"  # the config section of its PPO fields (train.<section>)

    @classmethod
    def check(cls, config: Any, batch: Any) -> None:
        check_ddpo(config, batch)

    @classmethod
    def check_family(cls, family: Any) -> None:
        check_solver(family.solver, family.name, cls.name)

    def __init__(self, run: Any):
        d = self.hp(run)
        opts = self.sample_opts(run)
        shape = (1, *run.family.latent_shape(opts.height, opts.width))
        self.solver = solvers.make_solver(run.family, opts.num_steps, opts.eta, shape)
        self.trainable_steps = [i for i in range(opts.num_steps) if self.solver.sigma(i) > 0]
        self.steps_per_sample = max(1, int(d.timestep_fraction * len(self.trainable_steps)))
        self.t_dev = torch.tensor(
            [self.solver.model_time(i) for i in range(opts.num_steps)], device=run.device
        )
        self.init_stats(run)

    def init_stats(self, run: Any) -> None:
        d = self.hp(run)
        self.stats = PerPromptStatTracker(d.buffer_size, d.min_count)
        run.acc.register_for_checkpointing(self.stats)  # resume stays exact

    def hp(self, run: Any) -> Any:
        """The objective's config section (train.ddpo; Flow-GRPO: train.flow_grpo)."""
        return run.config.train[self.section]

    def sample_opts(self, run: Any) -> Any:
        """The sampler of the training trajectories: the run's, each micro-batch decoded at once."""
        return dataclasses.replace(run.opts, decode_chunk=0)

    def describe(self, run: Any) -> str:
        d, b, opts = self.hp(run), run.batch, self.sample_opts(run)
        return (
            f"{self.paper.split(',')[0]}: {b.total} images sampled and scored per update "
            f"({b.processes} processes x {b.micro} x {b.accum} micro-batches), then "
            f"{d.inner_epochs} pass(es) x {d.minibatches} optimizer step(s) of "
            f"{b.total // d.minibatches} images x {self.steps_per_sample} of {opts.num_steps} "
            f"steps each (eta {opts.eta})"
        )

    # ---- sampling: the old policy's trajectories

    @torch.no_grad()
    def sample_trajectories(self, run: Any, texts: list[str]) -> dict[str, Any]:
        """Sample one micro-batch with eta > 0 on the one chain loop (solvers.sample, record=True):
        latents (B, T+1, ...) and step log-probs (B, T) kept; score it."""
        cond = run.family.encode(texts)
        # x_T and the eta noise from the global RNG (the stream checkpoints save); the batch
        # decoded at once, as DDPO decodes it
        opts = self.sample_opts(run)
        with run.acc.autocast():
            images, sinfo = solvers.sample(
                run.family,
                cond,
                run.uncond,
                opts,
                model=run.model,
                dtype=run.dtype,
                record=True,
            )  # (B, 3, H, W)
            reward, info = run.reward_fn(images, texts)
        return {
            "cond": cond,
            "latents": sinfo["trajectory"],  # (B, T+1, C, H/f, W/f)
            "log_probs": sinfo["log_probs"],  # (B, T)
            "rewards": reward.detach().float(),  # (B,)
            "parts": {k: v.detach() for k, v in info["parts"].items()},
        }

    def _advantages(self, run: Any, texts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Advantages of this process's samples, normalised over every process's batch."""
        from accelerate.utils import gather_object

        all_r = run.acc.gather(rewards)
        all_texts = gather_object(texts) if run.acc.num_processes > 1 else texts
        if self.hp(run).per_prompt_stats:
            adv = self.stats(all_texts, all_r)
        else:
            adv = batch_advantages(all_r)
        n = len(texts)
        return adv[run.acc.process_index * n : (run.acc.process_index + 1) * n]

    # ---- one update

    def update(self, run: Any) -> dict[str, float]:
        """Sample train.total_batch_size images, then inner_epochs x minibatches PPO optimizer steps."""
        t0 = time.perf_counter()
        st, micro = run.state, run.batch.micro
        texts = self.draw_texts(run)
        trajs = [
            self.sample_trajectories(run, texts[s : s + micro]) for s in range(0, len(texts), micro)
        ]
        rewards = torch.cat([tr["rewards"] for tr in trajs])  # (N,)
        advantages = self._advantages(run, texts, rewards)
        log = self._ppo_passes(run, trajs, advantages)
        st.update += 1
        st.samples_seen += run.batch.total
        return self._ppo_metrics(run, t0, trajs, rewards, advantages, log)

    def draw_texts(self, run: Any) -> list[str]:
        """This process's prompts of one update: accum micro-batches of micro, drawn independently."""
        return [p for _ in range(run.batch.accum) for p in run.prompt_sampler(run.batch.micro)]

    def _ppo_passes(self, run: Any, trajs: list[dict], advantages: torch.Tensor) -> dict[str, Any]:
        """inner_epochs shuffled passes, each minibatches optimizer steps; returns the steps' statistics."""
        d, micro = self.hp(run), run.batch.micro
        batch = {
            "cond": Cond.cat([tr["cond"] for tr in trajs]),
            "latents": torch.cat([tr["latents"] for tr in trajs]),  # (N, T+1, C, H/f, W/f)
            "old_logp": torch.cat([tr["log_probs"] for tr in trajs]),  # (N, T)
            "advantages": advantages,  # (N,)
        }
        n = len(advantages)
        per_step = n // d.minibatches  # images per optimizer step on this process
        chunks = -(-per_step // micro)  # micro-batches per optimizer step
        log = {
            "loss": [],
            "ratio": [],
            "approx_kl": [],
            "clipfrac": [],
            "norms": [],
            "kl": [],
            "mismatch": None,
        }
        for _ in range(d.inner_epochs):
            perm = torch.randperm(n)
            for m in range(d.minibatches):
                idx_step = perm[m * per_step : (m + 1) * per_step]
                for c in range(chunks):
                    idx = idx_step[c * micro : (c + 1) * micro]
                    self._ppo_backward(run, batch, idx, chunks, c == chunks - 1, log)
                log["norms"].append(run.step_or_skip())
                run.stop_if_nonfinite()
        return log

    def _ppo_backward(
        self, run: Any, batch: dict, idx: torch.Tensor, chunks: int, last_chunk: bool, log: dict
    ) -> None:
        """Accumulate the PPO loss of images idx at steps_per_sample random trainable steps."""
        d = self.hp(run)
        latents, old_logp, advantages = batch["latents"], batch["old_logp"], batch["advantages"]
        chosen = torch.randperm(len(self.trainable_steps))[: self.steps_per_sample]
        cond = _index(batch["cond"], idx)
        fn = solvers.guided(
            run.family, run.model, run.opts.guidance_scale, run.uncond, cond, run.dtype,
            run.opts.true_cfg_scale,
        )  # fmt: skip
        dev_idx = idx.to(run.device)
        for j, k in enumerate(chosen.tolist()):
            i = self.trainable_steps[k]
            last = last_chunk and j == len(chosen) - 1
            ctx = contextlib.nullcontext() if last else run.acc.no_sync(run.model)
            with ctx:
                x, x_next = latents[dev_idx, i], latents[dev_idx, i + 1]
                with run.acc.autocast():
                    out = fn(x, self.t_dev[i : i + 1])
                    logp = self.solver.log_prob(i, x, out, x_next)
                loss, info = ppo_loss(
                    advantages[dev_idx], logp, old_logp[dev_idx, i], d.clip_range, d.adv_clip_max
                )
                loss = loss + self.penalty(run, cond, i, x, out, log)
                run.acc.backward(loss / (chunks * len(chosen)))
            log["loss"].append(loss.detach())
            for name in ("ratio", "approx_kl", "clipfrac"):
                log[name].append(info[name])
            if not log["norms"]:  # before the first optimizer step: the policy has not moved
                dev = (logp.detach() - old_logp[dev_idx, i]).abs().max()
                mismatch = log["mismatch"]
                log["mismatch"] = dev if mismatch is None else torch.maximum(mismatch, dev)

    def penalty(self, run: Any, cond: Cond, i: int, x: torch.Tensor, out: torch.Tensor, log: dict):
        """A term added to step i's PPO loss (DDPO: none; Flow-GRPO: its KL to the base model)."""
        return 0.0

    def _ppo_metrics(
        self,
        run: Any,
        t0: float,
        trajs: list[dict],
        rewards: torch.Tensor,
        advantages: torch.Tensor,
        log: dict,
    ) -> dict[str, float]:
        """The update's metrics, gathered over processes: AlignProp's, then PPO's own."""
        g = run.acc.gather
        all_ratio = g(torch.cat(log["ratio"]).float())
        grad_norm = torch.stack(log["norms"]).mean()
        metrics = run.step_metrics(t0, g(rewards), log["loss"], grad_norm)
        metrics.update({
            "optimizer_steps": len(log["norms"]),
            "approx_kl": g(torch.stack(log["approx_kl"]).float()).mean().item(),
            "clipfrac": g(torch.stack(log["clipfrac"]).float()).mean().item(),
            "ratio_mean": all_ratio.mean().item(),
            "ratio_min": all_ratio.min().item(),
            "ratio_max": all_ratio.max().item(),
            # |recomputed - sampled| step log-prob before the first optimizer step: 0 up to float
            # error (the policy has not moved); a large value means sampling and training disagree
            "logprob_mismatch": g(log["mismatch"].float().reshape(1)).max().item(),
            "advantage_abs_mean": g(advantages.abs()).mean().item(),
        })  # fmt: skip
        parts = {name: [tr["parts"][name] for tr in trajs] for name in trajs[0]["parts"]}
        metrics.update(run.gathered_means(parts, "reward/{}_mean"))
        return metrics
