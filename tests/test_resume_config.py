"""Resume with a changed config: a field that changes what the checkpoint means is a one-line error
naming both values; any other change resumes, is appended to resumes.jsonl, and config.json keeps
what the run started with."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignprop import run_dir as runs
from alignprop.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "config"))
import align_prop  # noqa: E402

# one update of two images on 2 DDIM steps, K = 1, a checkpoint at the end
SHORT = [
    sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "config" / "align_prop.py") + ":tiny",
    "--config.sample.num_steps=2", "--config.truncation.strategy=fixed", "--config.truncation.k=1",
    "--config.train.num_epochs=1", "--config.eval_freq=0", "--config.eval_rewards=",
    "--config.prompts.num_eval=1", "--config.run_name=r",
]  # fmt: skip


def train(logdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SHORT, f"--config.logdir={logdir}", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_overrides) -> Path:
    logdir = tmp_path_factory.mktemp("resume")
    proc = train(logdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return logdir


# ---------------------------------------------------------------- through train.py


@pytest.mark.parametrize(
    "override,field,old,new",
    [
        ("--config.reward=hps", "reward", "'aesthetic'", "'hps'"),
        ("--config.lora.alpha=8.0", "lora.alpha", "4.0", "8.0"),
        ("--config.lora.rank=8", "lora.rank", "4", "8"),
    ],
)
def test_a_change_of_meaning_is_one_line_naming_both_values(trained, override, field, old, new):
    before = (trained / "r" / "config.json").read_bytes()
    proc = train(trained, "--config.resume_from=latest", "--config.train.num_epochs=2", override)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: resume: "), proc.stderr
    assert f"{field}={new}" in lines[0] and f"trained with {field}={old}" in lines[0], lines[0]
    assert "run_name" in lines[0] and "put the old value back" in lines[0]
    assert (trained / "r" / "config.json").read_bytes() == before
    assert not (trained / "r" / runs.RESUMES).exists()


def test_a_longer_run_resumes_and_is_recorded_beside_the_record(trained):
    run = trained / "r"
    before = (run / "config.json").read_bytes()
    proc = train(
        trained,
        "--config.resume_from=latest",
        "--config.train.num_epochs=2",
        "--config.train.learning_rate=0.01",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "config.json").read_bytes() == before  # what the run started with, untouched
    assert json.loads(before)["train"]["num_epochs"] == 1
    (event,) = [json.loads(x) for x in (run / runs.RESUMES).read_text().splitlines()]
    assert event["update"] == 1 and event["checkpoint"] == "checkpoint_1"
    assert event["changes"] == {"train.num_epochs": [1, 2], "train.learning_rate": [0.05, 0.01]}
    warned = [x for x in proc.stderr.splitlines() if x.startswith("warning: resume at update 1")]
    assert len(warned) == 1 and "train.learning_rate 0.05 -> 0.01" in warned[0], proc.stderr
    assert "num_epochs" not in warned[0]  # run length is no change to the training
    assert (run / "checkpoints" / "checkpoint_2").is_dir()
    card = (run / "final" / "README.md").read_text()
    assert "changed on resume" in card and "train.learning_rate: 0.05 → 0.01 at update 1" in card


# ---------------------------------------------------------------- the rules, no model loaded


@pytest.fixture
def record(tmp_path, tiny_overrides):
    """A run folder holding only the config.json of a tiny run."""
    config = align_prop.get_config("tiny")
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    return tmp_path, config


FIXED = [
    ("reward", "hps"),
    ("lora.alpha", 16.0),
    ("lora.rank", 16),
    ("lora.enabled", False),
    ("lora.target_modules", ("to_q",)),
    ("pretrained.model", "/another/model"),
    ("pretrained.revision", "abc123"),
    ("pretrained.family", "sdxl"),
    ("reward_models.aesthetic.loss", "hinge"),
    ("train.algorithm", "ddpo"),
]
QUIET = [
    ("train.num_epochs", 99),
    ("eval_freq", 3),
    ("save_freq", 7),
    ("log_with", "tensorboard"),
    ("keep_checkpoints", 9),
    ("resume_from", "latest"),
    ("run_name", "other"),
]
WARNED = [("train.learning_rate", 1e-4), ("truncation.k_max", 2), ("train.kl_coeff", 0.5)]


def set_field(config, field: str, value) -> None:
    *path, name = field.split(".")
    node = config
    for part in path:
        node = node[part]
    node[name] = value


@pytest.mark.parametrize("field,value", FIXED, ids=[f for f, _ in FIXED])
def test_fields_that_fix_what_the_checkpoint_means(record, field, value):
    run, config = record
    set_field(config, field, value)
    with pytest.raises(ConfigError, match=f"resume: {field}=") as err:
        runs.resume_changes(config, run, 5)
    assert "was trained with" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("field,value", QUIET + WARNED, ids=[f for f, _ in QUIET + WARNED])
def test_other_changes_resume(record, field, value, capsys):
    run, config = record
    set_field(config, field, value)
    changes = runs.resume_changes(config, run, 5)
    err = capsys.readouterr().err
    if field in ("resume_from", "run_name"):  # where the run is, not what it is
        assert changes == {} and err == ""
    else:
        assert list(changes) == [field]
        assert (f"warning: resume at update 5 changes how training continues: {field}" in err) == (
            (field, value) in WARNED
        ), err


def test_a_recorded_change_is_the_record_for_the_next_resume(record, capsys):
    run, config = record
    config.train.learning_rate = 3e-4
    runs.record_resume(run, run / "checkpoint_6", 6, runs.resume_changes(config, run, 6))
    assert "train.learning_rate" in capsys.readouterr().err
    assert runs.resume_changes(config, run, 9) == {}  # the same config again: nothing new
    assert capsys.readouterr().err == ""
