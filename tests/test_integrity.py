"""A damaged checkpoint or LoRA is found and named, never used; a failed save (a full disk, here a
file-size limit) stops the run with `stopped:` and status 3, the last checkpoint intact and no
temporary folder left. One tiny run (3 updates, a checkpoint after each) is trained once and
copied for each case; the damage keeps every file's size (bytes flipped in the middle)."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignprop import checkpoints, lora_io
from alignprop.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "config" / "align_prop.py") + ":tiny",
    "--config.sample.num_steps=2", "--config.truncation.strategy=fixed", "--config.truncation.k=1",
    "--config.eval_freq=0", "--config.prompts.num_eval=2", "--config.keep_checkpoints=0",
]  # fmt: skip
STATE_FILES = (
    lora_io.LORA_WEIGHT_NAME,
    "optimizer.bin",
    "random_states_0.pkl",
    "custom_checkpoint_0.pkl",
)


def train(logdir: Path, name: str, *extra: str, fsize: int = 0) -> subprocess.CompletedProcess:
    """scripts/train.py as a user runs it; fsize > 0 limits every file it writes to that many bytes."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))  # Python ignores SIGXFSZ: EFBIG

    cmd = [*TRAIN, f"--config.logdir={logdir}", f"--config.run_name={name}", *extra]
    return subprocess.run(
        cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300, preexec_fn=limit if fsize else None,
    )  # fmt: skip


def damage(path: Path) -> None:
    """Flip 64 bytes in the middle: same size, other content."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(data)


def errors(proc) -> list[str]:
    return [x for x in proc.stderr.splitlines() if x.startswith(("error:", "stopped:"))]


def metric_steps(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "reward_mean" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_overrides):
    """The shared run, made as a pre-empted user's would be: its first save hits a full disk (the
    optimizer state, ~250 KB, passes no 100 KB file-size limit; the LoRA, ~84 KB, and the metrics
    do), then resume_from=latest finishes it. Returns (run folder, the stopped process)."""
    logdir = tmp_path_factory.mktemp("integrity")
    args = ("--config.train.num_epochs=3", "--config.save_freq=1")
    stopped = train(logdir, "run", *args, fsize=100_000)
    run = logdir / "run"
    steps_at_stop = metric_steps(run) if (run / "metrics.jsonl").exists() else None
    tmp_left = sorted(p.name for p in (run / "checkpoints").glob(".*"))
    resumed = train(logdir, "run", *args, "--config.resume_from=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run, (stopped, steps_at_stop, tmp_left)


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run (its checkpoints 1-3 and final/)."""
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    return out


def test_a_full_disk_at_a_checkpoint_stops_with_status_3_and_resumes(trained):
    run, (proc, steps_at_stop, tmp_left) = trained
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len(errors(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = errors(proc)[0]
    assert line.startswith("stopped: could not write checkpoint") and "checkpoint_1" in line
    assert "MiB free there" in line and "resume_from=latest" in line
    assert tmp_left == []  # the temporary folder is gone
    assert steps_at_stop == [1]
    assert metric_steps(run) == [1, 2, 3]  # and the resume did each update once


def test_the_record_holds_each_files_sha256(trained):
    trained = trained[0]
    ckpt = trained / "checkpoints" / "checkpoint_3"
    files = json.loads((ckpt / checkpoints.COMPLETE_MARKER).read_text())["files"]
    assert set(STATE_FILES) <= set(files)
    for name, rec in files.items():
        assert rec["size"] == (ckpt / name).stat().st_size
        assert rec["sha256"] == checkpoints.file_sha256(ckpt / name)
    manifest = json.loads((trained / "final" / checkpoints.MANIFEST).read_text())["files"]
    assert lora_io.LORA_WEIGHT_NAME in manifest


@pytest.mark.parametrize("name", STATE_FILES)
def test_damage_at_equal_size_in_each_state_file_is_named(run, name):
    ckpt = run / "checkpoints" / "checkpoint_2"
    assert checkpoints.checkpoint_info(ckpt)["update"] == 2
    damage(ckpt / name)
    with pytest.raises(ConfigError, match=f"{name} is damaged .*sha256"):
        checkpoints.checkpoint_info(ckpt)


def test_latest_resumes_from_the_newest_good_checkpoint(run):
    """An unattended requeue after the newest checkpoint was damaged: it warns, naming the
    checkpoint, resumes from the one before and finishes; nothing damaged reaches final/."""
    damage(run / "checkpoints" / "checkpoint_3" / lora_io.LORA_WEIGHT_NAME)
    proc = train(
        run.parent, "run", "--config.train.num_epochs=4", "--config.save_freq=1",
        "--config.resume_from=latest",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "skipping damaged checkpoint" in out and "checkpoint_3" in out, out[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'checkpoint_2'} at update 2" in out
    assert metric_steps(run) == [1, 2, 3, 4]  # the rows after update 2 were logged again
    checkpoints.checkpoint_info(run / "checkpoints" / "checkpoint_3")  # written again, whole
    final = lora_io.check_lora_file(run / "final")  # its manifest checked
    state, _, _ = lora_io.read_lora_state_dict(final)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_latest_with_every_checkpoint_damaged_is_an_error_that_deletes_nothing(run):
    for ckpt in checkpoints.list_checkpoints(run):
        damage(ckpt / "optimizer.bin")
    with pytest.raises(ConfigError, match="every checkpoint .* is damaged"):
        checkpoints.latest_checkpoint(run, warn=lambda msg: None)
    assert len(checkpoints.list_checkpoints(run)) == 3  # not "started over"


def test_a_damaged_checkpoint_named_explicitly_is_one_line_before_any_model_loads(run):
    ckpt = run / "checkpoints" / "checkpoint_3"
    damage(ckpt / "random_states_0.pkl")
    proc = train(run.parent, "run", "--config.train.num_epochs=4", f"--config.resume_from={ckpt}",
                 "--check")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors(proc) == [x for x in proc.stderr.splitlines() if x.strip()][-1:]
    assert "random_states_0.pkl is damaged" in errors(proc)[0] and "Traceback" not in proc.stderr


def test_a_checkpoint_without_checksums_that_fails_to_load_is_one_line(run):
    """Checkpoints written before checksums record sizes only: a file that cannot be read is then
    found when it is loaded (accelerate itself only logs a bad RNG file at INFO and goes on)."""
    ckpt, name = run / "checkpoints" / "checkpoint_3", "random_states_0.pkl"
    marker = json.loads((ckpt / checkpoints.COMPLETE_MARKER).read_text())
    marker["files"] = {k: v["size"] for k, v in marker["files"].items()}
    (ckpt / checkpoints.COMPLETE_MARKER).write_text(json.dumps(marker))
    data = bytearray((ckpt / name).read_bytes())
    data[:64] = bytes(b ^ 0xFF for b in data[:64])  # the pickle's / zip's own header
    (ckpt / name).write_bytes(data)
    proc = train(run.parent, "run", "--config.train.num_epochs=4", "--config.resume_from=latest")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{ckpt / name} cannot be read" in errors(proc)[0]
    assert "another checkpoint" in errors(proc)[0]


def test_a_checkpoint_saved_with_nonfinite_weights_is_not_blamed_on_the_learning_rate(run):
    """Checksums that match (the weights were NaN when saved): the resume names the checkpoint
    and its non-finite tensors, one line, instead of training on and stopping on the step's NaN."""
    from safetensors.torch import load_file, save_file

    ckpt = run / "checkpoints" / "checkpoint_3"
    state = load_file(str(ckpt / lora_io.LORA_WEIGHT_NAME))
    key = sorted(state)[0]
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(ckpt / lora_io.LORA_WEIGHT_NAME))
    marker = json.loads((ckpt / checkpoints.COMPLETE_MARKER).read_text())
    marker["files"] = checkpoints.record_files(ckpt)
    (ckpt / checkpoints.COMPLETE_MARKER).write_text(json.dumps(marker))
    proc = train(run.parent, "run", "--config.train.num_epochs=4", f"--config.resume_from={ckpt}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = errors(proc)[0]
    assert "checkpoint_3" in line and ("NaN or inf" in line or "non-finite" in line), line
    assert "learning_rate" not in line


def test_a_damaged_or_nonfinite_lora_is_refused_where_it_is_loaded(run, tmp_path):
    lora = run / "final" / lora_io.LORA_WEIGHT_NAME
    lora_io.check_lora_file(run / "final")
    damage(lora)  # its manifest names the change
    with pytest.raises(ConfigError, match="is damaged .*sha256"):
        lora_io.check_lora_file(run / "final", "--lora")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sample.py"), "--tiny", "a cat",
         "--lora", str(run / "final"), "--out", str(tmp_path / "s")],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and len(errors(proc)) == 1, proc.stderr[-3000:]
    assert "damaged" in errors(proc)[0] and not (tmp_path / "s" / "grid.png").exists()
    # a copy without its manifest: the NaN values themselves are refused
    from safetensors.torch import load_file, save_file

    good = load_file(str(run / "checkpoints" / "checkpoint_1" / lora_io.LORA_WEIGHT_NAME))
    key = sorted(good)[0]
    good[key] = torch.full_like(good[key], float("nan"))
    alone = tmp_path / "copied" / lora_io.LORA_WEIGHT_NAME
    alone.parent.mkdir()
    save_file(good, str(alone))
    with pytest.raises(ConfigError, match="1 of its .* tensors hold NaN or inf"):
        lora_io.read_lora_state_dict(alone)


def test_a_full_disk_at_final_stops_with_status_3_and_no_temporary_folder(run, tmp_path):
    shutil.rmtree(run)
    proc = train(run.parent, "run", "--config.train.num_epochs=1", "--config.save_freq=0",
                 fsize=50_000)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len(errors(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors(proc)[0].startswith(f"stopped: could not write {run / 'final'}")
    assert not (run / "final").exists() and not (run / ".final.tmp").exists()
    # sample.py: the grid (~20 KB for one 64 px image and its caption) passes no 5 KB limit
    out = tmp_path / "samples"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sample.py"), "--tiny", "a cat", "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (5_000, 5_000)),
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len(errors(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors(proc)[0].startswith(f"stopped: could not write the images in {out}")
