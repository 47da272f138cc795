"""The objective interface, the pathwise update every reward-gradient objective shares, and the
refusal of settings an objective would ignore.

An objective turns rewards into gradients of the LoRA. It has a name (its `train.algorithm`
value), a config section of its own (`train.<name>`, when it has fields), class-level checks
run before any model loads (`check(config, batch)`, one-line ConfigErrors) and after the family
loads (`check_family(family)`), and `update(run) -> metrics`, one optimizer update (or several,
DDPO) on the alignprop.run.Run it is given. It keeps its own state and registers what resume
needs with `run.acc.register_for_checkpointing` in its __init__.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import torch

from alignprop import solvers
from alignprop.errors import ConfigError
from alignprop.pretrain import Regularisers


class Objective:
    """What every objective declares; subclasses set the class fields and `update`."""

    name = ""
    paper = ""  # what it implements, for the README's table and errors
    # the reward's gradient is used (False: any reward, a non-differentiable one included)
    differentiable_reward = True
    # fields this objective never reads, each with the reason: any value other than
    # config/base.py's is refused (dotted names; a section stands for each of its fields)
    IGNORED: dict[str, str] = {}

    @classmethod
    def check(cls, config: Any, batch: Any) -> None:
        """Raise ConfigError naming the field for a setting that cannot run or would be ignored."""
        refuse_changed(config, cls.IGNORED, cls.name)

    @classmethod
    def check_family(cls, family: Any) -> None:
        """Raise ConfigError when the objective's math does not hold on the loaded family."""

    def __init__(self, run: Any):
        pass

    def describe(self, run: Any) -> str:
        """One line printed when the run starts ("" = none)."""
        return ""

    def update(self, run: Any) -> dict[str, float]:
        raise NotImplementedError


@functools.cache
def base_defaults() -> Any:
    """config/base.py's ConfigDict (None outside a checkout, where no base file ships)."""
    from alignprop.config_files import load_config

    path = Path(__file__).resolve().parents[2] / "config" / "base.py"
    return load_config(path) if path.is_file() else None


def changed_fields(config: Any, field: str) -> list[tuple[str, Any, Any]]:
    """(name, value, base.py's value) for field (or each field of the section) that differs."""
    base = base_defaults()
    if base is None:
        return []
    given, default = config, base
    for part in field.split("."):
        if part not in given or part not in default:
            return []
        given, default = given[part], default[part]
    if hasattr(given, "items"):  # a section: each of its fields
        pairs = [(f"{field}.{k}", v, default[k]) for k, v in given.items() if k in default]
    else:
        pairs = [(field, given, default)]
    return [(n, v, want) for n, v, want in pairs if v != want]


def refuse_changed(config: Any, ignored: dict[str, str], algorithm: str) -> None:
    """A field in `ignored` set away from config/base.py's value is an error naming it."""
    for field, why in ignored.items():
        for name, value, want in changed_fields(config, field):
            raise ConfigError(
                f"{name} is ignored under train.algorithm={algorithm} ({value!r}; config/base.py: "
                f"{want!r}): {why}; drop it (or use an objective that reads it)"
            )


class Pathwise(Objective):
    """An objective whose loss is the reward of images that depend differentiably on the LoRA.

    The subclass says where the gradient enters the chain (`how`, solvers.HOWS) and may weight
    the reward loss; the update, the truncation draw of K (what K means per `how`: HOWS) and the
    regularisers (train.kl_coeff, train.pretrain_coeff) are shared.
    """

    how = "last"

    def __init__(self, run: Any):
        config = run.config
        self.truncation = solvers.Truncation.from_config(config.truncation)
        self.regularisers = Regularisers(
            config.train, run.family, run.opts, run.uncond, config.seed
        )
        self.pretrain = self.regularisers.pretrain  # None when train.pretrain_coeff = 0

    def sample_kwargs(self, run: Any) -> dict:
        """Extra solvers.sample arguments of this objective."""
        return {}

    def texts_for(self, texts: list[str]) -> list[str]:
        """The captions of the sampled images (DRaFT-LV: one per re-noised copy)."""
        return texts

    def weight(self, run: Any, sinfo: dict) -> float:
        """The reward loss's weight for this trajectory (Direct-Align's discount)."""
        return 1.0

    def loss_on(
        self,
        run: Any,
        texts: list[str],
        generator: torch.Generator | None = None,
        size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Sample (at size (H, W), default the configured one) with the gradient where `how`
        says, score, and return (loss, rewards, info)."""
        cond = run.family.encode(texts)  # no grad
        opts = run.opts if size is None else dataclasses.replace(run.opts, height=size[0], width=size[1])  # fmt: skip
        with run.acc.autocast():
            images, sinfo = solvers.sample(
                run.family, cond, run.uncond, opts, model=run.model,
                truncation=self.truncation, generator=generator, dtype=run.dtype,
                graphs=run.graphs, kl=self.regularisers.kl, how=self.how,
                **self.sample_kwargs(run),
            )  # fmt: skip
            reward, info = run.reward_fn(images, self.texts_for(texts))
        weight = self.weight(run, sinfo)
        loss = run.config.train.loss_coeff * weight * info["loss"].mean()
        info = {**info, "K": sinfo["K"], "weight": weight}
        loss = self.regularisers.add(
            loss, info, sinfo, texts, run.model, run.dtype, run.acc.autocast
        )
        return loss, reward, info

    def update(self, run: Any) -> dict[str, float]:
        """One optimizer update over accum micro-batches; non-finite gradients skip it (counted)."""
        t0 = time.perf_counter()
        accum, st, acc = run.batch.accum, run.state, run.acc
        rewards_, losses, ks, parts, regs = [], [], [], {}, {}
        for i in range(accum):
            sync = i == accum - 1
            ctx = contextlib.nullcontext() if sync else acc.no_sync(run.model)
            with ctx:
                texts = run.prompt_sampler(run.batch.micro)
                loss, reward, info = self.loss_on(run, texts, size=run.opts.draw_bucket())
                acc.backward(loss / accum)
            rewards_.append(reward.detach())
            losses.append(loss.detach())
            ks.append(float(info["K"]))
            for name, v in info["parts"].items():
                parts.setdefault(name, []).append(v.detach())
            for name in Regularisers.NAMES:  # the regularisers, when on
                if name in info:
                    regs.setdefault(name, []).append(info[name].detach().reshape(1))
        grad_norm = run.step_or_skip()
        st.update += 1
        st.samples_seen += run.batch.total

        all_r = acc.gather(torch.cat(rewards_).float())
        k_mean = acc.gather(torch.tensor(ks, device=run.device)).mean().item()
        metrics = run.step_metrics(t0, all_r, losses, grad_norm, K_mean=k_mean)
        metrics.update(run.gathered_means(parts, "reward/{}_mean"))
        metrics.update(run.gathered_means(regs))
        run.stop_if_nonfinite()
        return metrics
