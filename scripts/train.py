"""AlignProp training: setup, build, loop, save.

accelerate launch scripts/train.py --config config/align_prop.py:aesthetic [--config.a.b=value ...]
python scripts/train.py --config config/align_prop.py:tiny          # one process, CPU, ~1 minute
python scripts/train.py --check --config ...    # every check below, nothing loaded (scripts/launch.sh)
"""

import datetime
import json
import os
import sys

DEFAULT_CONFIG = "config/align_prop.py:aesthetic"


def main(argv: list[str]) -> int:
    """Train; returns the exit status (user errors raise ConfigError, which alignprop.cli.run reports)."""
    check = "--check" in argv
    config = parse([a for a in argv if a != "--check"])
    if check:  # the launch scripts ask before `accelerate launch`: a user error is one line there
        batch, plan, _ = plan_run(config, int(os.environ.get("WORLD_SIZE", "1")), config.name)
        print(f"config ok: {plan.message or plan.run_dir}; {batch.describe()}")
        return 0
    acc, batch, plan = setup(config)
    if plan.finished:
        return 0
    run, tracker = build(config, acc, batch, plan)
    watched = loop(run, tracker)
    save(run, tracker, watched)
    return 0


def parse(argv: list[str]):
    """The config, with every check done before anything loads."""
    from alignprop import checks, cli
    from alignprop.errors import ConfigError

    config, rest = cli.parse_config(argv, DEFAULT_CONFIG, "train.py")
    if rest:
        raise ConfigError(f"unexpected argument {rest[0]!r} (config fields are --config.a.b=value)")
    fields = [
        a.removeprefix("--config.").split("=", 1)[0] for a in argv if a.startswith("--config.")
    ]
    checks.apply_tiny(config, explicit_model="pretrained.model" in fields)
    # WORLD_SIZE is set by accelerate launch and torchrun: check everything before it is used
    checks.validate_config(config, int(os.environ.get("WORLD_SIZE", "1")))
    checks.check_overrides(config, fields)
    checks.check_writable(config.logdir, "logdir")
    return config


def setup(config):
    """Processes, the batch arithmetic and the run folder (new, resumed, started over or finished)."""
    import torch
    from absl import logging
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from alignprop import run_dir as runs
    from alignprop.errors import ConfigError

    logging.set_verbosity(logging.WARNING)  # absl would print every library's INFO lines
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    acc = Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")
    name = [f"{config.name}_{datetime.datetime.now():%Y%m%d_%H%M%S}"]  # one name for all processes
    broadcast_object_list(name)
    batch, plan, changes = plan_run(config, acc.num_processes, name[0])
    acc.wait_for_everyone()  # every process has decided before the main process writes the folder
    if plan.message:
        acc.print(plan.message)
    if plan.finished:
        return acc, batch, plan
    run_dir = plan.run_dir
    config.run_name = run_dir.name
    if acc.is_main_process:
        if plan.start_over:
            runs.start_over(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if (
                changes is None or not (run_dir / "config.json").exists()
            ):  # a resume keeps the record
                (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
        except OSError as err:
            raise ConfigError(f"logdir: cannot write the run folder {run_dir} ({err})") from None
        if changes is not None:
            runs.record_resume(run_dir, plan.checkpoint, plan.done, changes)
    acc.wait_for_everyone()
    acc.print(f"run folder: {run_dir}\n{batch.describe()}")
    return acc, batch, plan


def plan_run(config, processes: int, name: str):
    """The batch arithmetic, the run plan and, when resuming, the config's changes to the run's record."""
    from alignprop import checks
    from alignprop import run_dir as runs

    batch = checks.batching(config, processes)
    plan = runs.plan(config, batch.num_updates, name)
    resuming = plan.checkpoint is not None and not plan.finished
    changes = runs.resume_changes(config, plan.run_dir, plan.done) if resuming else None
    return batch, plan, changes


def build(config, acc, batch, plan):
    """Models, LoRA, reward, optimizer; then seed this process's stream once, resume, and log step 0."""
    from accelerate.utils import set_seed

    from alignprop import checks, objectives
    from alignprop.prompts import load_prompts
    from alignprop.run import Run
    from alignprop.tracking import Tracker

    run = Run(config, acc, batch, plan.run_dir, objective=objectives.get(config.train.algorithm))
    checks.note_ignored_guidance(
        run.family, config.sample.guidance_scale, "sample.guidance_scale", "sample.true_cfg_scale"
    )
    # pretrained.family=auto with a hub id: known only now (checks.validate_config did local folders)
    checks.check_true_cfg(config, run.family.name, run.family.true_cfg_only)
    for field in ("train", "eval"):  # the text encoder cuts long prompts without a word
        texts = load_prompts(config.prompts[field], config.prompts.template, f"prompts.{field}")
        checks.warn_long_prompts(run.family, texts, f"prompts.{field}")
    if config.train.debug_dump_grads:  # tests: each process's local and synced gradients
        from alignprop.debug import GradDump

        GradDump(run)
    set_seed(config.seed, device_specific=True)
    if plan.checkpoint is not None:
        run.resume(plan.checkpoint)
        acc.print(f"resumed from {plan.checkpoint} at update {run.state.update}")
    tracker = Tracker(
        plan.run_dir, config.log_with, json.loads(config.to_json_best_effort()),
        config.wandb_project, config.run_name, enabled=acc.is_main_process,
    )  # fmt: skip
    if run.state.update == 0:  # step 0: the batch arithmetic and the untrained model's eval reward
        start = {"batch/total": batch.total, "batch/accum": batch.accum, "batch/processes": batch.processes,
                 "batch/micro": batch.micro, "num_updates": batch.num_updates, "samples_seen": 0}  # fmt: skip
        if config.eval_freq:
            start.update(evaluate(run, tracker, 0, config.log_images))
        tracker.log(start, step=0)
    return run, tracker


def loop(run, tracker) -> int | None:
    """Update, evaluate, log, checkpoint until the last update or an early stop; returns the last
    evaluated step (a stop mid-way leaves the last checkpoint and the metrics logged so far intact)."""
    from tqdm.auto import tqdm

    config, batch = run.config, run.batch
    watched = run.early_stop.last_step if run.early_stop is not None else None
    bar = tqdm(range(run.state.update, batch.num_updates), initial=run.state.update, total=batch.num_updates,
               disable=not run.acc.is_local_main_process, desc="updates")  # fmt: skip
    for _ in bar:
        if run.early_stop is not None and run.early_stop.should_stop:
            break  # early stopping: `patience` evaluations without a new best
        try:
            metrics = run.update()
        except BaseException:
            tracker.finish()
            raise
        step = run.state.update
        if config.eval_freq and step % config.eval_freq == 0 and step < batch.num_updates:
            metrics.update(evaluate(run, tracker, step, config.log_images))
            watched = step
        tracker.log(metrics, step=step)
        bar.set_postfix(samples=metrics["samples_seen"], reward=f"{metrics['reward_mean']:.3f}")
        if config.save_freq and step % config.save_freq == 0 and step < batch.num_updates:
            run.save()
    return watched


def save(run, tracker, watched: int | None) -> None:
    """Final eval (unless early stopping just evaluated), LoRA, checkpoint, report, model cards."""
    from alignprop import model_card
    from alignprop.report import write_report

    config, acc = run.config, run.acc
    if watched != run.state.update:
        final = evaluate(run, tracker, run.state.update, config.log_images)
        tracker.log({"samples_seen": run.state.samples_seen, **final}, step=run.state.update)
    out = run.save_final()
    run.save()  # last: a checkpoint at the last update means final/ is written too (resume: "finished")
    if acc.is_main_process:
        from alignprop.errors import writing

        again = f"free space, then `python scripts/report.py {run.run_dir}` writes the report again"
        with writing(f"the report of {run.run_dir}", run.run_dir, again):
            write_report(run.run_dir)  # report.html + plots in the run folder
        if config.lora.enabled:
            with writing(f"the model cards of {run.run_dir}", run.run_dir, "free space"):
                publish = model_card.write_run_cards(config, run.family, run.run_dir)
            if config.push_to_hub:
                url = model_card.push_to_hub(publish, config.push_to_hub)
                acc.print(f"pushed {publish} to {url}")
    tracker.finish()
    acc.print(f"done: {run.state.update} updates, {run.state.samples_seen} samples; LoRA in {out}")
    acc.end_training()


def evaluate(run, tracker, step: int, n_images: int) -> dict:
    """Evaluate on every process's turn (main process does the work) and log the captioned grid.

    With early stopping on, the evaluation is recorded and a new best LoRA saved to best/.
    """
    from alignprop.early_stop import observe

    metrics = {}
    if run.acc.is_main_process:
        metrics, images, captions = run.evaluate()
        if n_images > 0:  # log_images=0: no panel
            tracker.log_images("eval", images[:n_images], captions[:n_images], step)
    run.acc.wait_for_everyone()
    if run.early_stop is not None:
        if observe(run.early_stop, step, metrics, run.acc):
            run.save_best()
        metrics.update(run.early_stop.summary() if run.acc.is_main_process else {})
    return metrics


if __name__ == "__main__":
    from alignprop.cli import run

    sys.exit(run(main))
