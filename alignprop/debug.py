"""Debug instruments kept out of the training step (tests attach them to a run)."""

from __future__ import annotations

from pathlib import Path

import torch


class GradDump:
    """Save each process's local and synchronised gradients per update to <run>/debug_grads/.

    Under DDP a communication hook sees every bucket before and after the all-reduce, so the
    local gradient is this process's own (accumulated) one and the synced one is what the
    optimizer gets before clipping; one process writes its gradient as both.
    """

    def __init__(self, run):
        self.run, self.local, self.synced = run, {}, {}
        self.index = {id(p): i for i, p in enumerate(run.params)}
        model = run.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.register_comm_hook(None, self._hook)
        optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
        optimizer.register_step_pre_hook(self._write)

    def _hook(self, state, bucket):
        import torch.distributed as dist

        params, grads = bucket.parameters(), bucket.gradients()
        for p, g in zip(params, grads, strict=True):
            self.local[id(p)] = g.detach().clone()
        buf = bucket.buffer().div_(dist.get_world_size())
        fut = dist.all_reduce(buf, async_op=True).get_future()

        def done(f):
            for p, g in zip(params, grads, strict=True):
                self.synced[id(p)] = g.detach().clone()
            return f.value()[0]

        return fut.then(done)

    def _write(self, optimizer, args, kwargs) -> None:
        run = self.run
        synced = [
            self.synced.get(id(p), p.grad if p.grad is not None else torch.zeros_like(p)).clone()
            for p in run.params
        ]
        local = [self.local.get(id(p), s) for p, s in zip(run.params, synced, strict=True)]
        out = (
            run.run_dir
            / "debug_grads"
            / f"rank{run.acc.process_index}_update{run.state.update + 1}.pt"
        )
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"local": local, "synced": synced}, out)
        self.local, self.synced = {}, {}
