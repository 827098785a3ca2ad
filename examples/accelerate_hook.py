"""Hugging Face Accelerate training with a sparsecomm method as DDP's communication hook, its
checkpoints keeping every rank's hook state, resumed exactly.

    torchrun --nproc_per_node 2 examples/accelerate_hook.py --method topk --epochs 2 --save ckpt
    torchrun --nproc_per_node 2 examples/accelerate_hook.py --method topk --epochs 2 --load ckpt

(``accelerate launch`` starts it as well.) Needs ``pip install accelerate`` (the ``accelerate``
extra of this project); gloo on CPU, NCCL with one GPU per process.

Where the hook goes: ``DistributedDataParallelKwargs(comm_hook=...)`` takes only Accelerate's
enum of PyTorch's own hooks, so the hook is registered on the DDP module
``accelerator.prepare`` returns, before the first backward.

Checkpoints: ``accelerator.save_state`` writes the model and optimizer, and objects given to
``register_for_checkpointing``, from the main process only (Accelerate 1.15), so rank 0's hook
state alone would reach them. Each rank therefore writes its own hook state beside them
(``sparsecomm_hook.rank<r>.pt``) and loads its own after ``load_state`` (``load_state_dict`` is
a collective that refuses another rank's state on every rank). Resumed at an epoch's end, a run
ends with the parameters of an uninterrupted one, bit for bit (tests/test_frameworks.py).
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from accelerate import Accelerator

from sparsecomm import reducers
from sparsecomm.ddp import SCOPES, ReducerHookState, reducer_hook
from teacher import Teacher, digest  # examples/teacher.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="topk", choices=reducers.available())
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--scope", default="auto", choices=SCOPES)
    parser.add_argument("--epochs", type=int, default=2, help="epochs to train (after the loaded ones)")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--save", help="write a checkpoint folder here at the end")
    parser.add_argument("--load", help="resume from this checkpoint folder")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank = accelerator.process_index
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    data = torch.utils.data.DataLoader(Teacher(args.examples), batch_size=args.batch)
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise SystemExit(f"start more than one process (torchrun --nproc_per_node 2 ...); got a {type(model).__name__}")
    state = ReducerHookState(args.method, density=args.density, scope=args.scope)  # method options as keywords
    model.register_comm_hook(state, reducer_hook)  # before the first backward
    first = 0
    if args.load:
        accelerator.load_state(args.load)
        state.load_state_dict(torch.load(os.path.join(args.load, f"sparsecomm_hook.rank{rank}.pt"),
                                         map_location="cpu", weights_only=True))
        first = int(torch.load(os.path.join(args.load, "epoch.pt"), weights_only=True))
    for epoch in range(first, first + args.epochs):
        state.begin_epoch(epoch, args.lr, float(first + args.epochs))
        for x, y in data:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)  # the hook averages the compressed gradients here
            if not state.skipped:  # only with nonfinite="skip": a NaN/Inf bucket, zeroed on every rank
                optimizer.step()
    if args.save:
        accelerator.save_state(args.save)  # model, optimizer, RNG: written by the main process
        torch.save(state.state_dict(), os.path.join(args.save, f"sparsecomm_hook.rank{rank}.pt"))  # every rank its own
        if accelerator.is_main_process:
            torch.save(first + args.epochs, os.path.join(args.save, "epoch.pt"))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"{args.method} in {state.scope} scope, {accelerator.num_processes} processes, epoch {first + args.epochs}: "
              f"loss {loss.item():.4f}, density {state.stats.get('density', 0):.4f}, "
              f"parameters {digest(accelerator.unwrap_model(model).parameters())}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
