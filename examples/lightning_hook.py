"""PyTorch Lightning (DDPStrategy) training with a sparsecomm method as DDP's communication hook,
on CPU or GPU, with checkpoints that keep every rank's hook state and resume exactly.

    python examples/lightning_hook.py --method topk --devices 2 --epochs 2 --save run.ckpt
    python examples/lightning_hook.py --method topk --devices 2 --epochs 4 --resume run.ckpt

Needs ``pip install lightning`` (the ``lightning`` extra of this project). Lightning starts the
other processes itself (gloo on CPU, NCCL with one GPU per process).

Where the hook is registered:

- **GPU**: ``DDPStrategy(ddp_comm_state=state, ddp_comm_hook=reducer_hook)`` registers it when it
  wraps the model.
- **CPU**: DDPStrategy registers a communication hook only when its device is CUDA and ignores it
  without a word otherwise (``DDPStrategy._register_ddp_hooks``, Lightning 2.6; the hook itself
  works with gloo), so :class:`SparsecommHook` registers it at ``on_fit_start``: the model is
  wrapped in DDP by then and no backward has run.

Checkpoints: Lightning writes a checkpoint from rank 0 alone, but every rank builds it (calls
the callbacks' ``on_save_checkpoint``), so the callback gathers every rank's hook state there
(residuals differ between ranks) and the checkpoint holds them all; at a resume every rank
loads its own entry in ``on_load_checkpoint`` (``load_state_dict`` is a collective that
refuses another rank's state on every rank). Resumed at an epoch's end, a run ends with the
parameters of an uninterrupted one, bit for bit (tests/test_frameworks.py).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from sparsecomm import reducers
from sparsecomm.ddp import SCOPES, ReducerHookState, reducer_hook
from teacher import Teacher, digest  # examples/teacher.py


class SparsecommHook(Callback):
    """Keeps a :class:`ReducerHookState` with the training: registers its hook on Lightning's
    DDP model at ``on_fit_start`` when the strategy did not (``register``: True on CPU, where
    DDPStrategy ignores ``ddp_comm_hook``), passes the epoch and learning rate to it, and saves
    and loads every rank's hook state with the checkpoint (under ``"sparsecomm_hook"``, one
    entry per rank)."""

    def __init__(self, state: ReducerHookState, register: bool) -> None:
        self.state = state
        self.register = register

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.register:
            model = trainer.strategy.model
            if not isinstance(model, DDP):
                raise ValueError(f"SparsecommHook needs a DDP strategy (the model is a {type(model).__name__})")
            model.register_comm_hook(self.state, reducer_hook)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.state.begin_epoch(trainer.current_epoch, lr, float(trainer.max_epochs or 1))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(states, self.state.state_dict())  # every rank builds the checkpoint; rank 0 writes it
        checkpoint["sparsecomm_hook"] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.state.load_state_dict(checkpoint["sparsecomm_hook"][trainer.global_rank])


class Classifier(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="topk", choices=reducers.available())
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--scope", default="auto", choices=SCOPES)
    parser.add_argument("--devices", type=int, default=2, help="processes (GPUs when there are any)")
    parser.add_argument("--epochs", type=int, default=2, help="train to this epoch count")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--bucket-mb", type=float, default=0.1, help="DDP's bucket_cap_mb (small: several buckets)")
    parser.add_argument("--save", help="write a checkpoint here at the end (every rank's hook state in it)")
    parser.add_argument("--resume", help="resume from this checkpoint")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)  # the same initial model on every rank
    state = ReducerHookState(args.method, density=args.density, scope=args.scope)  # method options as keywords
    if cuda:
        strategy = DDPStrategy(ddp_comm_state=state, ddp_comm_hook=reducer_hook, bucket_cap_mb=args.bucket_mb)
    else:
        strategy = DDPStrategy(process_group_backend="gloo", bucket_cap_mb=args.bucket_mb)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=args.devices, strategy=strategy,
                        max_epochs=args.epochs, callbacks=[SparsecommHook(state, register=not cuda)],
                        enable_checkpointing=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = Classifier(args.lr)
    data = torch.utils.data.DataLoader(Teacher(args.examples), batch_size=args.batch)
    trainer.fit(model, data, ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)  # on every rank: each adds its hook state, rank 0 writes
    if trainer.is_global_zero:
        print(f"{args.method} in {state.scope} scope, {trainer.world_size} processes, epoch {trainer.current_epoch}: "
              f"loss {float(trainer.callback_metrics['loss']):.4f}, density {state.stats.get('density', 0):.4f}, "
              f"parameters {digest(model.parameters())}")


if __name__ == "__main__":
    main()
