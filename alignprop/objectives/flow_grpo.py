"""Flow-GRPO (arXiv 2505.05470): GRPO on the flow-matching families, through the flow ODE turned
into an SDE with the same marginals (solvers.Flow at eta = train.flow_grpo.noise_level).

One `update()` (one row of metrics.jsonl), DDPO's loop with Flow-GRPO's choices:
  1. train.total_batch_size / group_size prompts are drawn (the same on every process, from a
     generator of the run seed and the update, so that a group may span processes), and
     group_size images of each are sampled (independent x_T and step noise) on the SDE at
     train.flow_grpo.num_steps steps, fewer than evaluation's sample.num_steps ("denoising
     reduction"), keeping every latent and every step's Gaussian log-probability; scores them
     (any reward: no gradient is needed);
  2. advantages: each reward normalised within its prompt's group over every process,
     (r - mean) / (std + 1e-4), then clipped to adv_clip_max;
  3. inner_epochs passes of minibatches optimizer steps over the sampled images, each on
     timestep_fraction of the chain's steps, with PPO's clipped ratio loss per step plus
     beta x the KL of the step's Gaussian to the base model's (the adapter off, same x_i):
     KL = |mean_lora - mean_base|^2 / (2 std^2), averaged over elements (the exact KL of two
     Gaussians with one std, per element).
Evaluation runs the ODE (sample.eta = 0) at sample.num_steps, as Flow-GRPO evaluates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from alignprop import solvers
from alignprop.errors import ConfigError
from alignprop.families.base import Cond
from alignprop.objectives.base import changed_fields, refuse_changed
from alignprop.objectives.ddpo import DDPO, UNUSED_UNDER_DDPO

# the ignored fields DDPO refuses, but the reward-gradient ones: `tiny_sd3 --config.train.
# algorithm=flow_grpo` runs as is, and the start line names them as not read
NOT_READ = ("truncation", "train.loss_coeff")
IGNORED = {k: v for k, v in UNUSED_UNDER_DDPO.items() if k not in NOT_READ}


def group_advantages(texts: list[str], rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """GRPO's advantages (B,) of rewards (B,) grouped by prompt, and the groups' statistics:
    reward_std_in_group (the mean of the groups' stds) and zero_std_groups (the fraction of
    groups whose images all scored alike: no signal from them)."""
    r = rewards.detach().double().cpu()
    adv, stds = torch.empty_like(r), []
    for prompt in dict.fromkeys(texts):  # unique, in order: the same on every process
        idx = torch.tensor([k for k, p in enumerate(texts) if p == prompt])
        mean, std = r[idx].mean(), r[idx].std(unbiased=False)
        adv[idx] = (r[idx] - mean) / (std + 1e-4)
        stds.append(float(std))
    stats = {
        "reward_std_in_group": sum(stds) / len(stds),
        "zero_std_groups": sum(s < 1e-8 for s in stds) / len(stds),
        "groups": float(len(stds)),
    }
    return adv.float().to(rewards.device), stats


def group_texts(run: Any, group_size: int) -> list[str]:
    """This process's share of one update's groups: group_size consecutive copies of each prompt
    (a group may span micro-batches and processes). The draw is the same on every process and a
    function of (seed, update), so that a resumed run draws the same prompts."""
    b = run.batch
    gen = torch.Generator().manual_seed(run.config.seed * 1_000_003 + run.state.update)
    pool = run.prompt_sampler.prompts
    idx = torch.randint(len(pool), (b.total // group_size,), generator=gen).tolist()
    texts = [pool[i] for i in idx for _ in range(group_size)]
    per = b.micro * b.accum
    return texts[run.acc.process_index * per : (run.acc.process_index + 1) * per]


def gathered_group_advantages(run: Any, texts: list[str], rewards: torch.Tensor):
    """group_advantages over every process's images; this process's share and the statistics."""
    from accelerate.utils import gather_object

    all_r = run.acc.gather(rewards)
    all_texts = gather_object(texts) if run.acc.num_processes > 1 else texts
    adv, stats = group_advantages(all_texts, all_r)
    n = len(texts)
    return adv[run.acc.process_index * n : (run.acc.process_index + 1) * n], stats


class FlowGRPO(DDPO):
    """Flow-GRPO's update: group sampling on the flow SDE, group advantages, PPO + KL passes."""

    name = "flow_grpo"
    paper = "Flow-GRPO, arXiv 2505.05470"
    differentiable_reward = False
    section = "flow_grpo"
    IGNORED = IGNORED

    @classmethod
    def check(cls, config: Any, batch: Any) -> None:
        d, per_process = config.train.flow_grpo, batch.micro * batch.accum
        if not 0.0 < d.noise_level <= 1.0:
            raise ConfigError(
                f"train.flow_grpo.noise_level={d.noise_level} must be in (0, 1] (the SDE's noise; "
                "Flow-GRPO trains at 0.7)"
            )
        for field in ("group_size", "inner_epochs", "minibatches"):
            if d[field] < (2 if field == "group_size" else 1):
                raise ConfigError(
                    f"train.flow_grpo.{field} must be >= {2 if field == 'group_size' else 1}, got {d[field]}"
                )
        if batch.total % d.group_size:
            raise ConfigError(
                f"train.flow_grpo.group_size={d.group_size} must divide train.total_batch_size="
                f"{batch.total} (the images of one update: total / group_size prompts)"
            )
        if per_process % d.minibatches:
            raise ConfigError(
                f"train.flow_grpo.minibatches={d.minibatches} must divide the images each process "
                f"samples per update ({per_process} = train.total_batch_size / processes)"
            )
        if d.num_steps < 0:
            raise ConfigError(
                f"train.flow_grpo.num_steps must be >= 0 (0 = sample.num_steps), got {d.num_steps}"
            )
        for field in ("clip_range", "adv_clip_max"):
            if not d[field] > 0:
                raise ConfigError(f"train.flow_grpo.{field} must be > 0, got {d[field]}")
        if not 0.0 < d.timestep_fraction <= 1.0:
            raise ConfigError(
                f"train.flow_grpo.timestep_fraction={d.timestep_fraction} must be in (0, 1]"
            )
        if d.beta < 0:
            raise ConfigError(f"train.flow_grpo.beta must be >= 0 (0 = no KL), got {d.beta}")
        for field in ("kl_coeff", "pretrain_coeff"):
            if config.train.get(field, 0.0) > 0:
                raise ConfigError(
                    f"train.{field}={config.train[field]} is not read by train.algorithm=flow_grpo: "
                    "its KL to the base model is train.flow_grpo.beta; set train."
                    f"{field}=0"
                )
        refuse_changed(config, cls.IGNORED, cls.name)

    def init_stats(self, run: Any) -> None:
        self.group_stats: list[dict] = []  # group statistics: nothing to resume

    def sample_opts(self, run: Any) -> Any:
        d = self.hp(run)
        return dataclasses.replace(
            run.opts, num_steps=d.num_steps or run.opts.num_steps, eta=d.noise_level,
            decode_chunk=0,
        )  # fmt: skip

    def describe(self, run: Any) -> str:
        d = self.hp(run)
        line = (
            f"{super().describe(run)}; groups of {d.group_size} images per prompt, KL beta "
            f"{d.beta}; evaluated on the ODE at {run.opts.num_steps} steps"
        )
        unread = [n for f in NOT_READ for n, _, _ in changed_fields(run.config, f)]
        if unread:
            line += f"; not read by flow_grpo: {', '.join(unread)}"
        return line

    def draw_texts(self, run: Any) -> list[str]:
        return group_texts(run, self.hp(run).group_size)

    def _advantages(self, run: Any, texts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        adv, self.last_group_stats = gathered_group_advantages(run, texts, rewards)
        return adv

    def penalty(self, run: Any, cond: Cond, i: int, x: torch.Tensor, out: torch.Tensor, log: dict):
        """beta x the KL of step i's Gaussian under the LoRA to the base model's (adapter off)."""
        beta = self.hp(run).beta
        if not beta:
            return 0.0
        from alignprop.lora_io import adapters_disabled, unwrap

        base = unwrap(run.model)
        if getattr(self, "_base_cond", None) is not cond:  # one guided call per micro-batch
            self._base_cond, self._base_fn = cond, solvers.guided(
                run.family, base, run.opts.guidance_scale, run.uncond, cond, run.dtype,
                run.opts.true_cfg_scale,
            )  # fmt: skip
        fn = self._base_fn
        with torch.no_grad(), adapters_disabled(base), run.acc.autocast():
            base_out = fn(x, self.t_dev[i : i + 1])
        dtype = torch.promote_types(out.dtype, torch.float32)
        diff = self.solver.mean(i, x, out).to(dtype) - self.solver.mean(i, x, base_out).to(dtype)
        kl = diff.pow(2).mean(dim=tuple(range(1, diff.ndim))) / (2 * self.solver.sigma(i) ** 2)
        log["kl"].append(kl.detach().mean())
        return beta * kl.mean()

    def _ppo_metrics(self, run, t0, trajs, rewards, advantages, log) -> dict[str, float]:
        metrics = super()._ppo_metrics(run, t0, trajs, rewards, advantages, log)
        metrics.update(self.last_group_stats)
        if log["kl"]:
            metrics["kl"] = run.acc.gather(torch.stack(log["kl"]).float()).mean().item()
        return metrics
