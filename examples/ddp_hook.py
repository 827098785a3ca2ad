"""Plain DistributedDataParallel training with a sparsecomm method as its communication hook.

    torchrun --nproc_per_node 2 examples/ddp_hook.py --method exdyna --density 0.01
    torchrun --nproc_per_node 2 examples/ddp_hook.py --method topk --scope bucket --save ckpt
    torchrun --nproc_per_node 2 examples/ddp_hook.py --method topk --scope bucket --load ckpt

gloo on CPU, NCCL when there are GPUs (one per worker). The data are random 28x28 images
labelled by a fixed random linear teacher, different on every worker, so the loss must fall.
``--scope``: ``bucket`` reduces each DDP bucket while backward goes on, ``model`` the whole
model after it, ``auto`` (default) the first for methods whose result on a tensor depends on
that tensor alone. ``--save``/``--load``: one checkpoint file per rank (residuals differ).
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsecomm import reducers
from sparsecomm.ddp import SCOPES, ReducerHookState, reducer_hook

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--method", default="exdyna", choices=reducers.available())
parser.add_argument("--density", type=float, default=0.01)
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--scope", default="auto", choices=SCOPES)
parser.add_argument("--bucket-mb", type=float, default=25.0, help="DDP's bucket_cap_mb")
parser.add_argument("--save", help="write each worker's checkpoint to SAVE.rank<r>.pt at the end")
parser.add_argument("--load", help="resume from LOAD.rank<r>.pt (each worker its own)")
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)

torch.manual_seed(0)  # the same teacher and initial model on every worker
teacher = nn.Linear(784, 10).to(device).requires_grad_(False)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
model = DDP(model, device_ids=[device.index] if cuda else None, bucket_cap_mb=args.bucket_mb)
state = ReducerHookState(args.method, density=args.density, scope=args.scope)  # method options go here as keywords
model.register_comm_hook(state, reducer_hook)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
first = 0
gen = torch.Generator(device).manual_seed(1 + rank)  # every worker its own data
if args.load:  # every rank loads its own file; load_state_dict is a collective that refuses another rank's
    saved = torch.load(f"{args.load}.rank{rank}.pt", map_location="cpu", weights_only=True)
    model.module.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    state.load_state_dict(saved["hook"])
    gen.set_state(saved["data"])
    first = saved["step"]
if rank == 0:
    print(f"{args.method} in {state.scope} scope, {dist.get_world_size()} workers")
for step in range(first, first + args.steps):
    x = torch.randn(64, 1, 28, 28, generator=gen, device=device)
    loss = nn.functional.cross_entropy(model(x), teacher(x.flatten(1)).argmax(1))
    optimizer.zero_grad()
    loss.backward()  # the hook averages the compressed gradients over the workers here
    if not state.skipped:  # only with nonfinite="skip": a NaN/Inf step, zeroed on every worker
        optimizer.step()
    if rank == 0 and (step % 50 == 0 or step == first + args.steps - 1):
        print(f"step {step:4d}  loss {loss.item():.4f}  density {state.stats['density']:.4f}")

if args.save:  # residuals differ between workers: each saves (and later loads) its own
    torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(), "hook": state.state_dict(),
                "data": gen.get_state(), "step": first + args.steps}, f"{args.save}.rank{rank}.pt")
dist.destroy_process_group()
