"""The pretraining-loss mix (ReFL): the ordinary denoising loss, added to the reward loss; and
`Regularisers`, the one place that adds it and the KL-to-base term to the trainer's loss.

`train.pretrain_coeff > 0` adds `pretrain_coeff * mse(model(x_t, t, c), target)` at each
micro-batch, where x_0 is a clean latent, t a uniform training timestep and x_t its noised form
(the scheduler's `add_noise`); the target is the noise for eps models and the velocity
(`get_velocity`) for v models. It keeps the LoRA a good denoiser of ordinary images while the
reward pulls it elsewhere. x_0 comes from

- `train.pretrain_data = ""`: the base model's own samples for the micro-batch's prompts
  (adapter disabled, no grad), one per prompt from a seed fixed by the prompt, cached; or
- a folder of images with same-name .txt captions: random items, their VAE latents cached.

All randomness of the loss (t, the noise, the folder items) comes from the run's stream, so
resume stays exact; the cached base samples use their own per-prompt generators.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alignprop import inference, solvers
from alignprop.errors import ConfigError
from alignprop.lora_io import adapters_disabled, unwrap

PREDICTIONS = ("epsilon", "v_prediction")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_family(family: Any) -> None:
    """The denoising loss is defined here for eps and v models only; raise ConfigError otherwise."""
    if family.prediction_type not in PREDICTIONS:
        raise ConfigError(
            f"train.pretrain_coeff > 0: the pretraining loss is not available for family "
            f"{family.name!r} (prediction_type={family.prediction_type!r}; it needs one of "
            f"{list(PREDICTIONS)}); set train.pretrain_coeff=0"
        )


def read_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs: every image file with a same-name .txt caption beside it."""
    root = Path(folder).expanduser()
    items = []
    for p in sorted(root.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file():
            try:
                caption = p.with_suffix(".txt").read_text(encoding="utf-8-sig").strip()
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(
                    f"train.pretrain_data: cannot read the caption {p.with_suffix('.txt')} ({err}); "
                    "save it as UTF-8 text"
                ) from None
            items.append((p, caption))
    if not items:
        raise ConfigError(
            f"train.pretrain_data={str(folder)!r} holds no image with a same-name .txt caption"
        )
    return items


def check_folder(folder: str | Path) -> int:
    """Before any model loads: every captioned image opens and passes PIL's integrity check (a
    truncated or non-image file is a ConfigError naming it). Returns the number of items."""
    from PIL import Image, UnidentifiedImageError

    items = read_folder(folder)
    for path, _ in items:
        try:
            with Image.open(path) as image:
                image.verify()  # the header and, for PNG, every chunk's CRC; no full decode
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise ConfigError(
                f"train.pretrain_data: {path} is not a readable image ({err}); replace or remove it"
            ) from None
    return len(items)


class PretrainLoss:
    """`loss(texts)` -> the denoising loss (scalar, with grad through `model`) on clean latents."""

    def __init__(self, family: Any, opts: solvers.Sampling, uncond: Any, seed: int, data: str = ""):
        check_family(family)
        self.family, self.uncond, self.seed = family, uncond, seed
        # eta = 0: a base sample depends on its prompt's seed alone, never on the batch it came in
        self.opts = dataclasses.replace(opts, eta=0.0)
        self.items = read_folder(data) if data else None
        self.cache: dict[Any, torch.Tensor] = {}

    def _base_latent(self, text: str) -> torch.Tensor:
        if text not in self.cache:
            fam = self.family
            noise = inference.fixed_noise(
                fam, 1, self.opts.size(fam), self.seed + zlib.crc32(text.encode())
            )
            with torch.no_grad(), adapters_disabled(fam.denoiser):
                _, info = solvers.sample(
                    fam, fam.encode([text]), self.uncond, self.opts, latents=noise,
                    model=unwrap(fam.denoiser),
                )  # fmt: skip
            self.cache[text] = info["latents"][0]  # (C, H/f, W/f)
        return self.cache[text]

    def _folder_latent(self, index: int) -> torch.Tensor:
        if index not in self.cache:
            from PIL import Image

            fam = self.family
            h, w = self.opts.size(fam)
            path = self.items[index][0]
            try:  # verify() passed it before the run; a JPEG cut short shows only when decoded
                image = Image.open(path).convert("RGB")
            except OSError as err:
                raise ConfigError(
                    f"train.pretrain_data: {path} is not a readable image ({err}); replace or "
                    "remove it and resume"
                ) from None
            scale = max(h / image.height, w / image.width)  # cover, then centre crop
            size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (size[0] - w) // 2, (size[1] - h) // 2
            image = image.crop((left, top, left + w, top + h))
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            x = x.view(h, w, 3).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W)
            vae = fam.vae
            with torch.no_grad():
                p = next(vae.parameters())
                z = vae.encode(x.to(p.device, p.dtype)).latent_dist.mean.float()
            if vae.config.get("shift_factor") is not None:
                z = z - vae.config.shift_factor
            self.cache[index] = (z * vae.config.scaling_factor)[0]  # (C, H/f, W/f)
        return self.cache[index]

    def __call__(
        self, texts: list[str], model: torch.nn.Module, dtype: torch.dtype
    ) -> torch.Tensor:
        fam = self.family
        if self.items is None:
            x0 = torch.stack([self._base_latent(t) for t in texts])
        else:
            picks = torch.randint(len(self.items), (len(texts),)).tolist()
            x0 = torch.stack([self._folder_latent(i) for i in picks])
            texts = [self.items[i][1] for i in picks]
        sched = fam.scheduler
        t = torch.randint(sched.config.num_train_timesteps, (len(texts),))
        noise = torch.randn(x0.shape).to(x0.device)
        t = t.to(x0.device)
        x_t = sched.add_noise(x0, noise, t)
        target = noise if fam.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        cond = fam.encode(texts).to(dtype=dtype)
        pred = fam.denoise(model, x_t.to(dtype), t, cond).float()
        return F.mse_loss(pred, target.float())


class Regularisers:
    """The losses added to the reward loss, each only when on: train.kl_coeff x the pull of the outputs
    to the base model's along the chain (solvers.sample(kl=True) computes it; what it is per eta) and train.pretrain_coeff x `PretrainLoss`.

    Off, they add nothing (not even a zero), so the plain step stays bitwise the same.
    """

    NAMES = ("kl", "pretrain_loss")  # their info keys; the trainer logs their means

    def __init__(self, train: Any, family: Any, opts: solvers.Sampling, uncond: Any, seed: int):
        self.kl_coeff, self.pretrain_coeff = train.kl_coeff, train.pretrain_coeff
        self.pretrain = None
        if train.pretrain_coeff > 0:
            self.pretrain = PretrainLoss(family, opts, uncond, seed, train.pretrain_data)

    @property
    def kl(self) -> bool:
        """Whether the sampler must compute the KL term."""
        return self.kl_coeff > 0

    def add(
        self, loss: torch.Tensor, info: dict, sample_info: dict, texts: list[str], model: Any,
        dtype: torch.dtype, autocast: Any,
    ) -> torch.Tensor:  # fmt: skip
        """loss plus the regularisers that are on; their values go into info under NAMES."""
        if self.kl:
            info["kl"] = sample_info["kl"]
            loss = loss + self.kl_coeff * sample_info["kl"]
        if self.pretrain is not None:
            with autocast():
                info["pretrain_loss"] = self.pretrain(texts, model, dtype)
            loss = loss + self.pretrain_coeff * info["pretrain_loss"]
        return loss
