"""Nothing lost: SIGKILL inside every stage of a checkpoint save and at random moments, then
resume_from=latest, until the run ends with the LoRA of an uninterrupted run, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from alignprop import checkpoints, lora_io

ROOT = Path(__file__).resolve().parents[1]
UPDATES = 8
# 2 denoising steps, K = 1, a checkpoint after every update: start-up dominates each process
COMMON = [
    sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "config" / "align_prop.py") + ":tiny",
    "--config.sample.num_steps=2", "--config.truncation.strategy=fixed", "--config.truncation.k=1",
    f"--config.train.num_epochs={UPDATES}", "--config.save_freq=1", "--config.eval_freq=0",
    "--config.prompts.num_eval=2", "--config.keep_checkpoints=2",
]  # fmt: skip


def start(logdir: Path, name: str, pause: str = "", resume: bool = True) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", ALIGNPROP_TEST_PAUSE_IN_SAVE=pause)
    cmd = [*COMMON, f"--config.logdir={logdir}", f"--config.run_name={name}"]
    if resume:
        cmd.append("--config.resume_from=latest")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "reward_mean" in row:
            out.append(row["step"])
    return out


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll cond() until true; False if the process ended first."""
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            return cond()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)
    return True


def kill_in_save(run: Path, proc: subprocess.Popen) -> str:
    marker = run / "paused_in_save"
    assert wait_for(marker.exists, proc), proc.stdout.read()[-3000:]
    kill(proc)
    where = marker.read_text()
    marker.unlink()
    return where


def lora(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "final" / lora_io.LORA_WEIGHT_NAME))


def test_sigkill_anywhere_then_latest_resumes_exactly(tmp_path, tiny_overrides):
    ref = start(tmp_path, "straight", resume=False)  # runs beside the chain of killed runs
    run = tmp_path / "crash"
    rng = random.Random(13)

    # killed inside its first save: nothing complete, so latest starts the folder over
    assert kill_in_save(run, start(tmp_path, "crash", "begin@1")) == "begin@1"
    assert checkpoints.latest_checkpoint(run) is None
    for point, update in (("state", 2), ("marker", 3), ("renamed", 3)):
        proc = start(tmp_path, "crash", f"{point}@{update}")
        assert kill_in_save(run, proc) == f"{point}@{update}"
        newest = checkpoints.latest_checkpoint(run)
        expected = update if point == "renamed" else update - 1  # the interrupted one is not there
        assert newest is not None and newest.name == f"checkpoint_{expected}", (point, newest)
        assert max(steps(run)) - expected <= 1  # at most one checkpoint interval lost
        if point == "state":  # a half-written folder exists, is skipped, and says so next time
            assert (run / "checkpoints" / ".checkpoint_2.tmp").is_dir()
            with open(
                run / "metrics.jsonl", "a"
            ) as f:  # and a torn last line, as a kill mid-write leaves
                f.write('{"step": 99, "rew')
    for _ in range(1):  # a random moment: after the first update of this process, 0-0.6 s on
        proc = start(tmp_path, "crash")
        done = len(steps(run))
        if wait_for(lambda done=done: len(steps(run)) > done, proc):
            time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            kill(proc)
        newest = checkpoints.latest_checkpoint(run)
        if newest is not None and steps(run):
            assert max(steps(run)) - int(newest.name.split("_")[1]) <= 1
    proc = start(tmp_path, "crash")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]

    assert steps(run) == list(range(1, UPDATES + 1))  # each step once, in order
    got, want = lora(run), lora(tmp_path / "straight")
    assert got.keys() == want.keys()
    for k in want:  # same ops, same RNG stream restored from the checkpoints: bitwise equal
        assert torch.equal(got[k], want[k]), k
    # keep_checkpoints=2 counted only complete checkpoints; no temporary folder is left behind
    assert [p.name for p in checkpoints.list_checkpoints(run, complete=False)] == [
        f"checkpoint_{UPDATES - 1}",
        f"checkpoint_{UPDATES}",
    ]
    assert not list((run / "checkpoints").glob(".*"))
    # the finished run, resumed again, has nothing to do
    again = start(tmp_path, "crash")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "already finished" in out, out[-2000:]


def test_nonfinite_stop_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_overrides):
    """A learning rate of 1e30 blows the LoRA up after one update: the run stops with status 3."""
    cmd = [*COMMON, f"--config.logdir={tmp_path}", "--config.run_name=nan",
           "--config.train.learning_rate=1e30", "--config.train.max_nonfinite=2"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    stops = [x for x in proc.stderr.splitlines() if x.startswith("stopped: ")]
    assert len(stops) == 1 and "NaN/inf" in stops[0] and "Traceback" not in proc.stderr
    run = tmp_path / "nan"
    newest = checkpoints.latest_checkpoint(run)
    assert newest is not None and str(newest) in stops[0]
    checkpoints.checkpoint_info(newest)  # complete, every file whole
    assert steps(run) == sorted(set(steps(run)))  # metrics parse, each step once
