"""SaLSA (or LABPAL) under FSDP2, checkpointed with torch.distributed.checkpoint: a starting point
for training on several nodes.

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_dcp.py                  # CPU, gloo
    torchrun --nnodes N --nproc_per_node G --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/fsdp2_dcp.py --device cuda                                         # nccl
    torchrun ... examples/fsdp2_dcp.py --resume                                     # from the newest checkpoint
    torchrun ... examples/fsdp2_dcp.py --resume salsa_fsdp2_checkpoints/step-50     # from that one

Every parameter is sharded over all ranks (``fully_shard``); each rank trains on its share of
every batch of scikit-learn's digits, and the optimizer makes every decision on numbers agreed
over the ranks. Every ``--save-every`` steps all ranks write one distributed checkpoint together
(``dcp.save`` of the model's and the optimizer's state dicts: each rank writes its shards), into
``--checkpoint-dir/step-N``. ``--resume`` loads the newest one (or the one given), on any number
of ranks (DCP reshards), and continues exactly where it stopped. At the end rank 0 prints a checksum of the
parameters, for comparing runs.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from salsa_fast import LABPAL, SaLSA


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--optimizer", choices=["salsa", "labpal"], default="salsa")
    parser.add_argument("--steps", type=int, default=200, help="the step to train up to")
    parser.add_argument("--batch", type=int, default=128, help="global batch, split over the ranks")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--checkpoint-dir", default="salsa_fsdp2_checkpoints")
    parser.add_argument("--resume", nargs="?", const="newest", help="continue from the newest checkpoint, or this one")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a collective may wait for a peer")
    return parser.parse_args()


def state_dicts(model, optimizer) -> dict:
    """What a checkpoint holds; DCP saves into and loads into exactly this structure."""
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def checkpoint_to_resume(resume: str | None, directory: str) -> tuple[int, str] | None:
    """``(its step, its path)``: the one named, the newest in ``directory``, or None."""
    if resume is None:
        return None
    if resume != "newest":
        return int(os.path.basename(os.path.normpath(resume)).split("-")[1]), resume
    steps = (
        [int(d.split("-")[1]) for d in os.listdir(directory) if d.startswith("step-")]
        if os.path.isdir(directory)
        else []
    )
    return (max(steps), os.path.join(directory, f"step-{max(steps)}")) if steps else None


def main() -> None:
    args = arguments()
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    train(args)
    dist.barrier()  # (tear down once every rank is done)
    dist.destroy_process_group()


def build(args: argparse.Namespace, device: torch.device, x: torch.Tensor):
    """The model, sharded on every rank, and its optimizer (made after sharding: it works on each
    rank's shards)."""
    torch.manual_seed(0)  # the same initial weights on every rank, before sharding
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    if args.optimizer == "salsa":
        return model, SaLSA(model.parameters())
    return model, LABPAL(model.parameters(), training_set_size=len(x), batch_size=args.batch)


def resume(args: argparse.Namespace, model: nn.Module, optimizer) -> int:
    """Load the latest checkpoint (or the one asked for), if any; the step to go on from."""
    found = checkpoint_to_resume(args.resume, args.checkpoint_dir)
    if not found:
        return 0
    start, path = found
    checkpoint = state_dicts(model, optimizer)
    dcp.load(checkpoint, checkpoint_id=path)  # each rank reads its shards (resharded if the world changed)
    set_model_state_dict(model, checkpoint["model"])
    set_optimizer_state_dict(model, optimizer, checkpoint["optim"])
    if dist.get_rank() == 0:
        print(f"resumed from {path}")
    return start


def train(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(y, device=device)
    model, optimizer = build(args, device, x)
    start = resume(args, model, optimizer)

    order = torch.Generator().manual_seed(1)  # the same batches on every rank; each takes its share
    plan = [torch.randint(0, len(x), (args.batch,), generator=order) for _ in range(args.steps)]
    share = args.batch // world
    for step in range(start, args.steps):
        mine = plan[step][rank * share : (rank + 1) * share].to(device)

        def closure(backwards=False, mine=mine):  # (bound now: LABPAL may call it again later)
            loss = nn.functional.cross_entropy(model(x[mine]), y[mine])
            if backwards:
                loss.backward()
            return loss

        optimizer.zero_grad()
        loss = optimizer.step(closure)
        done = step + 1
        if rank == 0 and done % 25 == 0:
            print(f"step {done:4d}  loss (rank 0's share) {loss.item():.4f}  step size {optimizer.step_size}")
        if done % args.save_every == 0 or done == args.steps:
            dcp.save(state_dicts(model, optimizer), checkpoint_id=os.path.join(args.checkpoint_dir, f"step-{done}"))

    checksum = sum(p.full_tensor().double().sum().item() for p in model.parameters())  # (gathers every shard)
    if rank == 0:
        print(f"parameter checksum: {checksum!r}; closure calls: {optimizer.stats['forwards']}")


if __name__ == "__main__":
    main()
