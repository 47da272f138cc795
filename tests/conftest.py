"""Shared test setup: offline hub, a per-session tiny model cache, quiet progress bars."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the two cores: one thread each, in this process and in the ones it starts
    # (OpenMP spin-waiting on an oversubscribed core makes tiny convs ~100x slower)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on two shared cores OpenMP spin-waiting makes tiny convs ~100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_overrides(tmp_path_factory) -> dict:
    """The tiny models written once per session; subprocesses find them through ALIGNPROP_TINY_DIR."""
    from alignprop import tiny

    root = tmp_path_factory.mktemp("tiny_cache") / "tiny"
    os.environ["ALIGNPROP_TINY_DIR"] = str(root)
    return tiny.ensure_tiny(root)


@pytest.fixture(scope="session")
def random_lora():
    """add(family, dtype) -> params: a LoRA on the denoiser whose B is random (seed 0), in dtype,
    so that every LoRA weight gets a gradient and the LoRA changes every output."""
    import torch

    from alignprop import models

    def add(family, dtype):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            params = models.add_lora(
                family.denoiser, target_modules=family.lora_targets,
                exclude_modules=family.lora_exclude,
            )  # fmt: skip
            with torch.no_grad():
                for n, p in family.denoiser.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
        for p in params:
            p.data = p.data.to(dtype)  # add_lora makes them fp32
        return params

    return add


@pytest.fixture(scope="session")
def central_difference():
    """fd(loss_fn, param, index, eps) -> (loss(p + eps) - loss(p - eps)) / (2 eps) for one entry
    of a parameter tensor, under no_grad; the entry is restored exactly (the same additions undone)."""
    import torch

    def fd(loss_fn, param, index: int, eps: float) -> float:
        p = param.data.view(-1)
        with torch.no_grad():
            p[index] += eps
            up = loss_fn().item()
            p[index] -= 2 * eps
            down = loss_fn().item()
            p[index] += eps
        return (up - down) / (2 * eps)

    return fd
