"""DiffusionNFT (arXiv 2509.16117): online RL on the forward process of the flow families, with
no likelihoods and no reward gradient.

One `update()` (one row of metrics.jsonl):
  1. groups of train.diffusion_nft.group_size images per prompt (flow_grpo.group_texts) are
     sampled without autograd on the run's sampler (the ODE at sample.num_steps), CFG-free as in
     the paper (the conditional velocity alone; `sample_cfg=True` samples with the run's CFG),
     and scored (any reward);
  2. each image's optimality r in [0, 1]: its group-normalised advantage A (as Flow-GRPO's)
     mapped through r = 1/2 + 1/2 clip(A / adv_clip_max, -1, 1);
  3. for `timesteps` draws per micro-batch, the clean latent x0 is noised to a level t of the
     chain's schedule, x_t = (1 - t) x0 + t eps, with the velocity target v = eps - x0 and the
     sampling policy's velocity v_old (the LoRA before this update, no grad); the loss is

        r |v+ - v|^2 + (1 - r) |v- - v|^2,  v+ = (1 - beta) v_old + beta v_theta,
                                            v- = (1 + beta) v_old - beta v_theta,

     averaged over elements and images (the implicit positive and negative policies): at
     v_theta = v_old its gradient is 2 beta (2 r - 1) (v_old - v) dv_theta, the flow-matching
     loss's pull towards the image for r > 1/2 and a push away from it for r < 1/2;
  4. inner_epochs passes of minibatches optimizer steps over those draws.
The old policy is the sampling one (refreshed every update); the paper's slower EMA of it and
its adaptive loss weighting are not implemented.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch

from alignprop import solvers
from alignprop.errors import ConfigError
from alignprop.families.base import Cond
from alignprop.objectives.base import Objective, changed_fields, refuse_changed
from alignprop.objectives.ddpo import check_solver
from alignprop.objectives.flow_grpo import IGNORED as FLOW_GRPO_IGNORED
from alignprop.objectives.flow_grpo import NOT_READ, gathered_group_advantages, group_texts

# Flow-GRPO's ignored fields but sample.merge_lora: the images are sampled on merged weights too
IGNORED = {k: v for k, v in FLOW_GRPO_IGNORED.items() if k != "sample.merge_lora"}


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32 under a half-precision model, fp64 kept (the gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A / adv_clip_max, -1, 1): 1 for the group's best, 0 for its worst."""
    return 0.5 + 0.5 * (advantages / adv_clip_max).clamp(-1.0, 1.0)


def nft_loss(
    v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor, beta: float
) -> torch.Tensor:
    """DiffusionNFT's loss (B,): r |v+ - v|^2 + (1 - r) |v- - v|^2, each averaged over elements."""
    dims = tuple(range(1, v_theta.ndim))
    pos = (1.0 - beta) * v_old + beta * v_theta
    neg = (1.0 + beta) * v_old - beta * v_theta
    return r * (pos - target).pow(2).mean(dims) + (1.0 - r) * (neg - target).pow(2).mean(dims)


class DiffusionNFT(Objective):
    """DiffusionNFT's update: sample groups, optimality per image, the forward-process loss."""

    name = "diffusion_nft"
    paper = "DiffusionNFT, arXiv 2509.16117"
    differentiable_reward = False
    IGNORED = IGNORED

    @classmethod
    def check(cls, config: Any, batch: Any) -> None:
        d = config.train.diffusion_nft
        if d.group_size < 2:
            raise ConfigError(f"train.diffusion_nft.group_size must be >= 2, got {d.group_size}")
        if batch.total % d.group_size:
            raise ConfigError(
                f"train.diffusion_nft.group_size={d.group_size} must divide train.total_batch_size="
                f"{batch.total} (the images of one update: total / group_size prompts)"
            )
        for field in ("timesteps", "inner_epochs", "minibatches"):
            if d[field] < 1:
                raise ConfigError(f"train.diffusion_nft.{field} must be >= 1, got {d[field]}")
        if batch.accum % d.minibatches:
            raise ConfigError(
                f"train.diffusion_nft.minibatches={d.minibatches} must divide the micro-batches each "
                f"process samples per update ({batch.accum})"
            )
        if not 0.0 < d.beta <= 1.0:
            raise ConfigError(
                f"train.diffusion_nft.beta={d.beta} must be in (0, 1] (the paper's 1)"
            )
        if not d.adv_clip_max > 0:
            raise ConfigError(f"train.diffusion_nft.adv_clip_max must be > 0, got {d.adv_clip_max}")
        for field in ("kl_coeff", "pretrain_coeff"):
            if config.train.get(field, 0.0) > 0:
                raise ConfigError(
                    f"train.{field}={config.train[field]} is not read by train.algorithm="
                    f"diffusion_nft (its loss has no regulariser here); set train.{field}=0"
                )
        refuse_changed(config, cls.IGNORED, cls.name)

    @classmethod
    def check_family(cls, family: Any) -> None:
        check_solver(family.solver, family.name, cls.name)  # velocity targets: the flow families

    def __init__(self, run: Any):
        opts = run.opts
        shape = (1, *run.family.latent_shape(opts.height, opts.width))
        self.solver = solvers.make_solver(run.family, opts.num_steps, 0.0, shape)
        self.t_dev = torch.tensor(
            [self.solver.model_time(i) for i in range(opts.num_steps)], device=run.device
        )

    def hp(self, run: Any) -> Any:
        return run.config.train.diffusion_nft

    def describe(self, run: Any) -> str:
        d, b = self.hp(run), run.batch
        line = (
            f"DiffusionNFT: {b.total} images sampled ({'with' if d.sample_cfg else 'without'} CFG) "
            f"and scored per update, groups of {d.group_size}; {d.timesteps} noise level(s) per "
            f"micro-batch, {d.inner_epochs} pass(es) x {d.minibatches} optimizer step(s), beta {d.beta}"
        )
        unread = [n for f in NOT_READ for n, _, _ in changed_fields(run.config, f)]
        return line + (f"; not read by diffusion_nft: {', '.join(unread)}" if unread else "")

    def _fn(self, run: Any, model: Any, cond: Cond):
        """The conditional velocity (no CFG; FLUX-dev's guidance input as the run sets it)."""
        return solvers.guided(run.family, model, run.opts.guidance_scale, None, cond, run.dtype)

    @torch.no_grad()
    def collect(self, run: Any, texts: list[str]) -> dict[str, Any]:
        """One micro-batch: x0 sampled by the current policy, its rewards."""
        d = self.hp(run)
        cond = run.family.encode(texts)
        opts = dataclasses.replace(run.opts, decode_chunk=0)
        with run.acc.autocast():
            images, info = solvers.sample(
                run.family, cond, run.uncond if d.sample_cfg else None, opts, model=run.model,
                dtype=run.dtype,
            )  # fmt: skip
            reward, rinfo = run.reward_fn(images, texts)
        return {"cond": cond, "x0": info["latents"], "rewards": reward.detach().float(),
                "parts": {k: v.detach() for k, v in rinfo["parts"].items()}}  # fmt: skip

    @torch.no_grad()
    def draws(self, run: Any, item: dict, r: torch.Tensor) -> list[dict]:
        """`timesteps` noised copies of one micro-batch with their targets and the old velocity."""
        out, x0 = [], item["x0"]
        fn = self._fn(run, run.model, item["cond"])
        for _ in range(self.hp(run).timesteps):
            i = int(torch.randint(self.solver_steps, (1,)))
            eps = torch.randn(x0.shape).to(x0)
            x_t = self.solver.add_noise(i, x0, eps)
            with run.acc.autocast():
                v_old = _wide(fn(x_t, self.t_dev[i : i + 1]))
            out.append({"cond": item["cond"], "x_t": x_t, "i": i, "target": eps - x0,
                        "v_old": v_old, "r": r})  # fmt: skip
        return out

    @property
    def solver_steps(self) -> int:
        return len(self.solver.timesteps)

    def update(self, run: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        d, micro = self.hp(run), run.batch.micro
        texts = group_texts(run, d.group_size)
        items = [self.collect(run, texts[s : s + micro]) for s in range(0, len(texts), micro)]
        rewards = torch.cat([it["rewards"] for it in items])
        adv, stats = gathered_group_advantages(run, texts, rewards)
        r = optimality(adv, d.adv_clip_max)
        batches = [
            self.draws(run, it, r[k * micro : (k + 1) * micro]) for k, it in enumerate(items)
        ]
        losses, norms = [], []
        per_step = len(batches) // d.minibatches  # micro-batches per optimizer step
        for _ in range(d.inner_epochs):
            order = torch.randperm(len(batches)).tolist()
            for m in range(d.minibatches):
                chunk = [batches[k] for k in order[m * per_step : (m + 1) * per_step]]
                losses += self._backward(run, chunk)
                norms.append(run.step_or_skip())
                run.stop_if_nonfinite()
        run.state.update += 1
        run.state.samples_seen += run.batch.total
        metrics = run.step_metrics(t0, run.acc.gather(rewards), losses, torch.stack(norms).mean())
        metrics.update(stats)
        metrics["optimizer_steps"] = len(norms)
        metrics["optimality_mean"] = run.acc.gather(r).mean().item()
        parts = {name: [it["parts"][name] for it in items] for name in items[0]["parts"]}
        metrics.update(run.gathered_means(parts, "reward/{}_mean"))
        return metrics

    def _backward(self, run: Any, chunk: list[list[dict]]) -> list[torch.Tensor]:
        """Accumulate the NFT loss over the chunk's micro-batches and their noise draws."""
        beta, losses = self.hp(run).beta, []
        n = sum(len(draws) for draws in chunk)
        k = 0
        for draws in chunk:
            fn = self._fn(run, run.model, draws[0]["cond"])
            for dr in draws:
                k += 1
                ctx = contextlib.nullcontext() if k == n else run.acc.no_sync(run.model)
                with ctx:
                    with run.acc.autocast():
                        v = _wide(fn(dr["x_t"], self.t_dev[dr["i"] : dr["i"] + 1]))
                    loss = nft_loss(v, dr["v_old"], _wide(dr["target"]), dr["r"], beta).mean()
                    run.acc.backward(loss / n)
                losses.append(loss.detach())
        return losses
