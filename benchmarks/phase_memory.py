"""Peak memory of each phase of one AlignProp grad step on CPU (SD-1.5-sized random weights).

One phase per process; memory is the process's RSS (glibc mmap threshold pinned so freed
tensors go back to the OS). A TorchDispatchMode reads RSS after every op and keeps the op, the
innermost module running (forward or checkpoint recomputation) and whether autograd's backward
was running at the highest reading: that is where the phase's peak is.

  python benchmarks/phase_memory.py PHASE [--px 256] [--batch 1] [--ckpt step+block] [--dckpt layer]
PHASE: unet | decode | reward | loss
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignprop import cli

PAGE = os.sysconf("SC_PAGE_SIZE")


def pin_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc: allocations >= nbytes are mmapped and unmapped on free, so RSS follows live tensors
    (the default threshold grows with each freed block and freed memory then stays in the heap)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        ctypes.CDLL("libc.so.6").mallopt(
            -3, nbytes
        )  # -3: M_MMAP_THRESHOLD; fixing it stops the growth


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakWhere(TorchDispatchMode):
    def __init__(self, stack):
        super().__init__()
        self.stack, self.peak, self.where = stack, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        r = rss()
        if r > self.peak:
            self.peak = r
            bw = torch._C._current_autograd_node() is not None
            self.where = (str(func), self.stack[-1] if self.stack else "", "backward" if bw else "")
        return out


def track_modules(root: torch.nn.Module, prefix: str, stack: list) -> None:
    for name, m in root.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        m.register_forward_pre_hook(lambda mod, a, n=full: stack.append(n))
        m.register_forward_hook(lambda mod, a, o: (stack.pop(), None)[1])


def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser()
    p.add_argument("phase")
    p.add_argument("--px", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="B images (the UNet sees 2B with CFG)")
    p.add_argument("--ckpt", default="step+block")
    p.add_argument(
        "--dckpt",
        default=None,
        help="sample.decoder_checkpoint: none | block | layer (default: the config's)",
    )
    p.add_argument("--decode-chunk", type=int, default=0, help="sample.decode_chunk")
    p.add_argument("--outer", type=int, default=1)
    a = p.parse_args(argv)
    pin_mmap_threshold()
    torch.set_num_threads(2)
    from alignprop import solvers, tiny
    from benchmarks import benchmark as bm

    dtype, dev = torch.float32, torch.device("cpu")
    stack: list[str] = []
    tok = tiny.write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="pm_tok_")))
    fam = bm.sd15_family(dtype, dev, 0, tok)
    h = a.px // 8
    g = torch.Generator().manual_seed(0)
    if a.dckpt is None:
        from config.base import get_config

        a.dckpt = get_config().sample.decoder_checkpoint
    solvers.set_decoder_checkpointing(fam.vae, a.dckpt)

    def lora(fam):
        import ml_collections

        from alignprop import models

        c = ml_collections.ConfigDict(
            dict(enabled=True, rank=4, alpha=4.0, init="gaussian", target_modules=())
        )
        # B starts at zero: give it values so every LoRA grad path is exercised
        params = models.make_trainable(fam.denoiser, c, fam.lora_targets, fam.lora_exclude)
        return params

    track_modules(fam.unet, "unet", stack)
    track_modules(fam.vae, "vae", stack)
    base = rss()
    t0 = time.time()
    if a.phase == "decode":
        z = torch.randn(a.batch, 4, h, h, generator=g).requires_grad_()
        mode = PeakWhere(stack)
        with mode:
            if a.decode_chunk and a.outer:
                img = torch.cat(
                    [
                        torch.utils.checkpoint.checkpoint(fam.decode, c, use_reentrant=False)
                        for c in z.split(a.decode_chunk)
                    ]
                )
            elif a.decode_chunk:
                img = torch.cat([fam.decode(c) for c in z.split(a.decode_chunk)])
            else:
                img = fam.decode(z)
            fwd = rss()
            img.float().square().mean().backward()
    elif a.phase == "unet":
        lora(fam)
        cond = fam.encode(["a cat"] * a.batch)
        unc = fam.encode_negative("")
        opts = solvers.Sampling(
            2, 7.5, checkpoint=a.ckpt, height=a.px, width=a.px, decode_chunk=a.decode_chunk
        )
        solvers.set_block_checkpointing(fam.denoiser, a.ckpt in ("block", "step+block"))
        fn = solvers.guided(fam, fam.denoiser, 7.5, unc, cond, dtype)
        x = torch.randn(a.batch, 4, h, h, generator=g).requires_grad_()
        t = torch.tensor([500.0])
        mode = PeakWhere(stack)
        base = rss()
        with mode:
            if a.ckpt in ("step", "step+block"):
                out = torch.utils.checkpoint.checkpoint(fn, x, t, use_reentrant=False)
            else:
                out = fn(x, t)
            fwd = rss()
            out.square().mean().backward()
    elif a.phase == "reward":
        from config.base import get_config

        cfg = get_config()
        rfn = bm.sd15_aesthetic(cfg, dtype, dev, 0)
        img = torch.randn(a.batch, 3, a.px, a.px, generator=g).requires_grad_()
        mode = PeakWhere(stack)
        base = rss()
        with mode:
            r, info = rfn(img, ["a cat"] * a.batch)
            fwd = rss()
            info["loss"].mean().backward()
    elif a.phase == "loss":
        lora(fam)
        from config.base import get_config

        cfg = get_config()
        rfn = bm.sd15_aesthetic(cfg, dtype, dev, 0)
        cond = fam.encode(["a cat"] * a.batch)
        unc = fam.encode_negative("")
        opts = solvers.Sampling(
            2, 7.5, checkpoint=a.ckpt, height=a.px, width=a.px, decode_chunk=a.decode_chunk
        )
        tr = solvers.Truncation("fixed", 1, 1, 1, 0.0, 1.0)
        mode = PeakWhere(stack)
        base = rss()
        with mode:
            images, _ = solvers.sample(
                fam, cond, unc, opts, truncation=tr, generator=g, dtype=dtype
            )
            r, info = rfn(images, ["a cat"] * a.batch)
            fwd = rss()
            (0.01 * info["loss"].mean()).backward()
    gib = 2**30
    print(json.dumps(dict(
        phase=a.phase, px=a.px, batch=a.batch, ckpt=a.ckpt, dckpt=a.dckpt,
        peak_gib=round((mode.peak - base) / gib, 3), after_fwd_gib=round((fwd - base) / gib, 3),
        where=mode.where, s=round(time.time() - t0, 1),
    )))  # fmt: skip


if __name__ == "__main__":
    sys.exit(cli.run(main))
