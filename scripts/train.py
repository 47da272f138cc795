"""AlignProp training: setup, build, loop, save.

accelerate launch scripts/train.py --config config/align_prop.py:aesthetic [--config.a.b=value ...]
python scripts/train.py --config config/align_prop.py:tiny          # one process, CPU, ~1 minute
"""

import datetime
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", "config/align_prop.py:aesthetic", "experiment config file:NAME"
)


def main(_argv) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, set_seed
    from tqdm.auto import tqdm

    from alignprop import checks, lora_io, model_card
    from alignprop import trainer as T
    from alignprop.report import write_report
    from alignprop.tracking import Tracker

    # ---- setup: config, processes, run folder, seed
    logging.set_verbosity(logging.WARNING)  # absl would print every library's INFO lines
    config = FLAGS.config
    checks.apply_tiny(config)
    # WORLD_SIZE is set by accelerate launch and torchrun: check everything before it is used
    checks.validate_config(config, int(os.environ.get("WORLD_SIZE", "1")))
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    acc = Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")
    batch = checks.batching(config, acc.num_processes)
    checkpoint = lora_io.find_checkpoint(config)
    if checkpoint is None and config.resume_from == "latest":
        acc.print("resume_from=latest: no checkpoint found, starting a new run")
    if checkpoint is None and not config.run_name:  # one name for all processes
        name = [f"{config.name}_{datetime.datetime.now():%Y%m%d_%H%M%S}"]
        broadcast_object_list(name)
        config.run_name = name[0]
    run_dir = lora_io.run_dir_for(config, checkpoint)
    config.run_name = run_dir.name
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
    acc.wait_for_everyone()
    acc.print(f"run folder: {run_dir}\n{batch.describe()}")

    # ---- build: models, LoRA, reward, optimizer; then seed this process's stream once
    run = T.AlignProp(config, acc, batch, run_dir)
    if config.train.debug_dump_grads:  # tests: each process's local and synced gradients
        from alignprop.debug import GradDump

        GradDump(run)
    set_seed(config.seed, device_specific=True)
    if checkpoint is not None:
        run.resume(checkpoint)
        acc.print(f"resumed from {checkpoint} at update {run.state.update}")
    tracker = Tracker(
        run_dir, config.log_with, json.loads(config.to_json_best_effort()), config.wandb_project,
        config.run_name, enabled=acc.is_main_process,
    )  # fmt: skip
    if run.state.update == 0:  # step 0: the batch arithmetic and the untrained model's eval reward
        start = {"batch/total": batch.total, "batch/accum": batch.accum, "batch/processes": batch.processes,
                 "batch/micro": batch.micro, "num_updates": batch.num_updates, "samples_seen": 0}  # fmt: skip
        if config.eval_freq:
            start.update(evaluate(run, tracker, 0, config.log_images))
        tracker.log(start, step=0)
    watched = run.early_stop.last_step if run.early_stop is not None else None

    # ---- loop
    bar = tqdm(range(run.state.update, batch.num_updates), initial=run.state.update, total=batch.num_updates,
               disable=not acc.is_local_main_process, desc="updates")  # fmt: skip
    for _ in bar:
        if run.early_stop is not None and run.early_stop.should_stop:
            break  # early stopping: `patience` evaluations without a new best
        metrics = run.update()
        step = run.state.update
        if config.eval_freq and step % config.eval_freq == 0 and step < batch.num_updates:
            metrics.update(evaluate(run, tracker, step, config.log_images))
            watched = step
        tracker.log(metrics, step=step)
        bar.set_postfix(samples=metrics["samples_seen"], reward=f"{metrics['reward_mean']:.3f}")
        if config.save_freq and step % config.save_freq == 0 and step < batch.num_updates:
            run.save()

    # ---- save: final eval (unless early stopping just evaluated), checkpoint, LoRA, report, cards
    if watched != run.state.update:
        final = evaluate(run, tracker, run.state.update, config.log_images)
        tracker.log({"samples_seen": run.state.samples_seen, **final}, step=run.state.update)
    run.save()
    out = run.save_final()
    if acc.is_main_process:
        write_report(run_dir)  # report.html + plots in the run folder
        if config.lora.enabled:
            publish = model_card.write_run_cards(config, run.family, run_dir)
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
        tracker.log_images("eval", images[:n_images], captions[:n_images], step)
    run.acc.wait_for_everyone()
    if run.early_stop is not None:
        if observe(run.early_stop, step, metrics, run.acc):
            run.save_best()
        metrics.update(run.early_stop.summary() if run.acc.is_main_process else {})
    return metrics


if __name__ == "__main__":
    from alignprop.errors import user_errors_exit

    app.run(user_errors_exit(main))
