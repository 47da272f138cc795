"""THE one chain loop: `sample()` is one trajectory of B images, with autograd where the
objective says (`how`, HOWS), classifier-free guidance (`guided`), and the decode.

The truncation point is drawn once for it: the steps before the first differentiable one run
with no autograd at all (no graph, no checkpoint), the differentiable calls are checkpointed
as `sample.checkpoint` says (CHECKPOINTS; the default keeps memory flat in K). Under
`torch.no_grad()` (or with `truncation=None`) the same function is the evaluation sampler.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from alignprop import fast
from alignprop.errors import ConfigError
from alignprop.solvers.checkpointing import set_block_checkpointing
from alignprop.solvers.rules import make_solver
from alignprop.solvers.settings import Sampling, Truncation


def guided(
    family: Any, model: torch.nn.Module, guidance_scale: float, uncond: Any, cond: Any, dtype,
    true_cfg_scale: float = 1.0,
):  # fmt: skip
    """The guided model output f(x, t) for one step: one denoiser call on [uncond, cond].

    FLUX (family.true_cfg_only) is guided as FluxPipeline guides it: CFG only when
    true_cfg_scale > 1; FLUX.1-dev (distilled guidance) gets guidance_scale as an input, and
    FLUX.1-schnell (no guidance embedding) ignores it.
    """
    from alignprop.families.base import Cond

    bsz = len(cond)
    distilled = family.distilled_guidance
    cfg_scale = family.cfg_scale(guidance_scale, true_cfg_scale)
    use_cfg = uncond is not None and cfg_scale != 1.0

    c = Cond.cat([uncond.expand(bsz), cond]) if use_cfg else cond  # (2B, ...) with guidance
    c = c.to(dtype=dtype)
    if distilled:  # the guidance input, one fp32 value per row as the pipeline passes it
        g = torch.full((len(c),), float(guidance_scale), device=family.device)
        c = Cond({**c.tensors, "guidance": g})

    def fn(x: torch.Tensor, t: torch.Tensor, cond_in: Cond = c) -> torch.Tensor:
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = t.expand(x_in.shape[0])
        out = family.denoise(model, x_in.to(dtype), t_in, cond_in).to(x.dtype)
        if use_cfg:
            out_u, out_c = out.chunk(2)
            out = family.combine_cfg(out_u, out_c, cfg_scale)
        return out

    fn.cond = c  # the guided conditioning: CUDA graphs copy it into their static inputs
    return fn


# where the gradient enters the chain (solvers.sample's `how`); K = truncation.draw, T = num_steps
HOWS = {
    "last": "the last K steps carry gradient (AlignProp, DRaFT-K)",
    "spread": "K steps spread over the whole chain carry gradient, each with a stop-gradient on "
    "its denoiser input (DRTune)",
    "x0": "the chain stops at step T - K, whose one differentiable call predicts x0 (ReFL)",
    "renoise": "the whole chain without autograd; `copies` re-noisings of x0 to step T - K's "
    "level, each denoised by the last K steps with gradient (DRaFT-LV)",
    "inject": "the whole chain without autograd; x0 noised with known noise to step T - K's "
    "level, one differentiable deterministic step, x0 recovered with that noise (Direct-Align)",
}


def sample(
    family: Any,
    cond: Any,
    uncond: Any,
    opts: Sampling,
    *,
    model: torch.nn.Module | None = None,
    truncation: Truncation | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    graphs: Any = None,
    kl: bool = False,
    record: bool = False,
    how: str = "last",
    copies: int = 1,
) -> tuple[torch.Tensor, dict]:
    """Sample B images (in [-1, 1], before clamping) for B prompts' conditioning; return (images, info).

    `model` is the denoiser to call (a DDP/compiled wrapper in training; default the family's).
    `generator` (CPU) draws x_T, K and the eta noise; `latents` overrides x_T. info["K"] is the
    K drawn by `truncation` (0 without autograd or truncation). `how` (HOWS) says where the
    gradient enters; every `how` is the plain chain without autograd. `graphs`
    (alignprop.fast.GuidedGraphs) replays the steps before the first differentiable one
    without autograd as CUDA graphs. "renoise" returns copies x B images, copy-major.

    `kl=True` adds info["kl"], the mean over the differentiable denoiser calls of the pull of
    the LoRA's outputs to the base model's (`_Chain.grad_call` says what it is per eta).

    `record=True` (RL objectives; no autograd) keeps the trajectory: info["trajectory"] holds
    every latent x_T .. x_0 as (B, T+1, C, h, w) and info["log_probs"] each step's Gaussian
    log-probability log p(x_{i+1} | x_i) as (B, T) (0 for a deterministic step), both on the
    unmerged adapter (no merged weights, no CUDA graphs), so that a later recomputation of a
    step's log-probability with the same weights gives the same value.
    """
    if record and (torch.is_grad_enabled() and truncation is not None or kl):
        raise ValueError(
            "sample(record=True) keeps a trajectory without autograd: no truncation, no kl"
        )
    if how not in HOWS:
        raise ValueError(f"sample(how={how!r}): valid: {list(HOWS)}")
    device = family.device
    # diffusers' ModelMixin.dtype skips the modules it keeps in fp32 (Wan's time embedder)
    dtype = (
        dtype or getattr(family.denoiser, "dtype", None) or next(family.denoiser.parameters()).dtype
    )
    builds_graph = torch.is_grad_enabled() and truncation is not None
    k = truncation.draw(opts.num_steps, generator) if builds_graph else 0
    if latents is None:
        shape = family.latent_shape(*opts.size(family))
        latents = torch.randn((len(cond), *shape), generator=generator)  # (B, C, H/f, W/f)
    # the chain's state: fp32 under a half-precision model, fp64 under an fp64 one (gradient checks)
    x = latents.to(device=device, dtype=torch.promote_types(dtype, torch.float32))
    ch = _Chain(family, cond, uncond, opts, model, dtype, tuple(x.shape), kl, generator)
    if record and not hasattr(ch.solver, "log_prob"):
        raise ConfigError(
            f"the {family.solver!r} solver of the {family.name} family has no step log-probabilities "
            "to record (an RL objective needs a stochastic solver)"
        )
    grad_steps, end = _grad_plan(how, k, opts.num_steps, generator)
    if builds_graph and k:
        set_block_checkpointing(family.denoiser, ch.mode in ("block", "step+block"))
    first = min(grad_steps, default=end)
    x, trajectory, log_probs = ch.prefix(x, first, graphs, record)
    x = ch.steps(x, range(first, end), grad_steps, stop_input=how == "spread")
    if builds_graph and k:
        x = _tail(ch, how, x, opts.num_steps - k, copies)
    with torch.set_grad_enabled(builds_graph):
        images = decode(family, x, opts.decode_chunk)  # (B, 3, H, W); "renoise": (copies x B, ...)
    info = {"K": k, "latents": x.detach(), "grad_steps": sorted(grad_steps)}
    if record:
        info["trajectory"] = torch.stack(trajectory, dim=1)  # (B, T+1, C, h, w)
        info["log_probs"] = torch.stack(log_probs, dim=1)  # (B, T)
    if kl:
        info["kl"] = torch.stack(ch.kl_terms).mean() if ch.kl_terms else x.new_zeros(())
    return images, info


def _grad_plan(how: str, k: int, num_steps: int, generator: Any) -> tuple[set[int], int]:
    """(the chain steps whose denoiser call carries gradient, the step the chain stops before)."""
    if not k:
        return set(), num_steps
    if how == "last":
        return set(range(num_steps - k, num_steps)), num_steps
    if how == "spread":  # one step in each of K strides, at an offset drawn once per trajectory
        stride = num_steps // k
        offset = int(torch.randint(stride, (1,), generator=generator))
        return {offset + j * stride for j in range(k)}, num_steps
    if how == "x0":
        return set(), num_steps - k
    return set(), num_steps  # "renoise" / "inject": the whole chain without autograd, then _tail


class _Chain:
    """One trajectory's solver, guided denoiser and differentiable calls (with their KL terms)."""

    def __init__(self, family, cond, uncond, opts, model, dtype, shape, kl, generator):
        self.family, self.cond, self.uncond, self.opts = family, cond, uncond, opts
        self.dtype = dtype
        self.model = model if model is not None else family.denoiser
        self.solver = make_solver(family, opts.num_steps, opts.eta, shape)
        self.fn = self.guided_for(cond)
        self._base_fns: dict[int, Any] = {}  # the base model's guided call per conditioning
        self.t_dev = torch.tensor(
            [self.solver.model_time(i) for i in range(opts.num_steps)], device=family.device
        )  # one copy to the device, not one per step
        self.mode, self.generator = opts.checkpoint_mode, generator
        self.kl, self.kl_terms = kl, []

    def guided_for(self, cond: Any) -> Any:
        """The guided denoiser of `cond` (the chain's own, or its prompts repeated: DRaFT-LV)."""
        o = self.opts
        return guided(self.family, self.model, o.guidance_scale, self.uncond, cond, self.dtype, o.true_cfg_scale)  # fmt: skip

    def grad_call(self, i: int, x: torch.Tensor, fn: Any = None, cond: Any = None) -> torch.Tensor:
        """The guided output at step i with autograd (under the step checkpoint when on); with
        kl, the base model's output at the same x is kept beside it.

        The KL term: the mean over the differentiable denoiser calls of the mean over
        elements of (out_lora - out_base)^2, the guided outputs (after CFG, what the step uses) of
        the LoRA model and of the base model (adapters off, weights frozen) at the same x: one
        extra denoiser call per step. The base call is differentiable in x, since from the second
        differentiable step on x itself depends on the LoRA. What the term is, per eta: for a
        Gaussian DDIM step (eta > 0) the true per-step KL is ||mu_lora - mu_base||^2 / (2 sigma_t^2)
        with mu_lora - mu_base = c_t (out_lora - out_base), c_t = sqrt(1 - a_prev - sigma_t^2) -
        sqrt(a_prev (1 - a_t) / a_t) (eps) or sqrt(a_t (1 - a_prev - sigma_t^2)) - sqrt(a_prev (1 -
        a_t)) (v): the term weights every step alike where the KL weights step t by c_t^2 /
        (2 sigma_t^2) (times the element count), a weight that varies 77x (eps) to 6,900x (v) over a
        50-step chain at eta 1. At eta = 0 (and for the deterministic flow solver) the steps carry no
        noise, there is no KL, and the term is a plain L2 pull of the outputs towards the base.
        """
        fn, t = fn or self.fn, self.t_dev[i : i + 1]
        step_ckpt = self.mode in ("step", "step+block")
        with torch.enable_grad():
            out = _checkpoint(fn, x, t, use_reentrant=False) if step_ckpt else fn(x, t)
            if (
                self.kl
            ):  # the base output's dependence on x (on the LoRA, from the 2nd step on) counts
                base_fn = self._base_fn(self.cond if cond is None else cond)
                if step_ckpt:
                    base = _checkpoint(_base_call, base_fn, self.model, x, t, use_reentrant=False)
                else:
                    base = _base_call(base_fn, self.model, x, t)
                self.kl_terms.append((out - base).pow(2).mean())
        return out

    def _base_fn(self, cond: Any) -> Any:
        """The bare denoiser's guided call for cond, built once per trajectory."""
        if id(cond) not in self._base_fns:
            o = self.opts
            self._base_fns[id(cond)] = _base_model_fn(
                self.family, self.model, o, self.uncond, cond, self.dtype
            )
        return self._base_fns[id(cond)]

    def prefix(self, x: torch.Tensor, first: int, graphs: Any, record: bool):
        """Steps 0 .. first-1 without autograd (merged LoRA and CUDA graphs when on, unless
        recording); returns (x_first, the latents so far, their step log-probabilities)."""
        fn = self.fn
        if graphs is not None and not record:
            fn = graphs.wrap(self.fn, self.model, self.opts.guidance_scale)
        merging = self.opts.merge_lora and first and not record
        merge = fast.merged_lora(self.model) if merging else contextlib.nullcontext()
        trajectory, log_probs = [x], []
        with merge, torch.no_grad():
            for i in range(first):
                out = fn(x, self.t_dev[i : i + 1])
                x_next = self.solver.step(i, x, out, self.generator)
                if record:
                    trajectory.append(x_next)
                    log_probs.append(_step_log_prob(self.solver, i, x, out, x_next))
                x = x_next
        return x, trajectory, log_probs

    def steps(
        self, x, span: range, grad_steps: set[int], stop_input: bool = False, fn=None, cond=None
    ):
        """Steps `span` of the chain from x: those in grad_steps call the denoiser with autograd
        (on x detached when stop_input), the others without; every update x -> x_{i+1} is kept
        in the graph, so the gradient also flows along the solver's linear path in x."""
        for i in span:
            if i in grad_steps:
                if not stop_input and not x.requires_grad:
                    # every grad step's input then requires grad: one compiled graph serves any K
                    x = x.detach().requires_grad_()
                out = self.grad_call(i, x.detach() if stop_input else x, fn, cond)
            else:
                with torch.no_grad():
                    out = (fn or self.fn)(x.detach(), self.t_dev[i : i + 1])
            with torch.set_grad_enabled(x.requires_grad or out.requires_grad):
                x = self.solver.step(i, x, out, self.generator)
        return x


def _tail(ch: _Chain, how: str, x: torch.Tensor, start: int, copies: int) -> torch.Tensor:
    """The differentiable end of the "x0", "renoise" and "inject" chains from step `start` = T - K."""
    s, g = ch.solver, ch.generator
    if how == "x0":  # x is the chain's x_start: one differentiable call predicts x0 from it
        return s.predict_x0(start, x, ch.grad_call(start, x))
    if how == "renoise":
        x0 = x.detach().repeat(copies, *([1] * (x.ndim - 1)))
        eps = torch.randn(x0.shape, generator=g).to(x0)
        cond = type(ch.cond).cat([ch.cond] * copies)
        fn = ch.guided_for(cond)
        span = range(start, ch.opts.num_steps)
        return ch.steps(s.add_noise(start, x0, eps), span, set(span), fn=fn, cond=cond)
    if how == "inject":  # the step is deterministic (eta 0) so that the known noise recovers x0
        det = s if s.eta == 0.0 else make_solver(ch.family, ch.opts.num_steps, 0.0, tuple(x.shape))
        eps = torch.randn(x.shape, generator=g).to(x)
        x_in = det.add_noise(start, x.detach(), eps)
        x_next = det.step(start, x_in, ch.grad_call(start, x_in), None)
        return det.recover_x0(start + 1, x_next, eps)
    return x


def _step_log_prob(solver: Any, i: int, x: torch.Tensor, out: torch.Tensor, x_next: torch.Tensor):
    """log p(x_next | x) of step i, (B,); 0 where the step is deterministic (sigma = 0)."""
    if solver.sigma(i) > 0:
        return solver.log_prob(i, x, out, x_next)
    return torch.zeros(len(x), device=x.device)


def decode(family: Any, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """family.decode of the latents x, `chunk` images at a time (0 = all at once).

    The decoder's backward is a training step's memory peak: the recomputation of its last
    up-block (128 channels at full resolution) holds every image of the batch at once. With grad,
    each chunk is decoded under its own checkpoint, so the forward keeps only the latents and
    the backward recomputes one chunk at a time (one more decoder forward per image).
    """
    if not chunk or chunk >= len(x):
        return family.decode(x)
    if not torch.is_grad_enabled():
        return torch.cat([family.decode(c) for c in x.split(chunk)])
    return torch.cat([_checkpoint(family.decode, c, use_reentrant=False) for c in x.split(chunk)])


def _base_model_fn(family, model, opts, uncond, cond, dtype):
    """The guided call of the bare denoiser (no DDP sync, no compiled graph), built once per trajectory."""
    from alignprop.lora_io import unwrap

    return guided(
        family, unwrap(model), opts.guidance_scale, uncond, cond, dtype, opts.true_cfg_scale
    )


def _base_call(base_fn, model, x, t) -> torch.Tensor:
    """The base model's guided output at x (adapters off, its weights frozen; differentiable in x)."""
    from alignprop.lora_io import adapters_disabled, unwrap

    with adapters_disabled(unwrap(model)):
        return base_fn(x, t)
