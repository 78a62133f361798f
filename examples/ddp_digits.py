"""SaLSA under DistributedDataParallel: every rank takes the same line-search decisions.

    torchrun --nproc_per_node 2 examples/ddp_digits.py             # CPU, gloo
    torchrun --nproc_per_node 4 examples/ddp_digits.py --device cuda   # one GPU per rank, nccl

Each rank trains on its share of every batch of scikit-learn's digits. DDP averages the
gradients; SaLSA averages the losses it decides on (the gradient pass's and each trial's) over
the ranks, so all ranks search the same way and keep identical parameters. At the end the
ranks compare parameter checksums, and rank 0 saves a checkpoint every rank can resume from.
"""

from __future__ import annotations

import argparse
import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

from salsa_fast import SaLSA


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128, help="global batch, split over the ranks")
    parser.add_argument("--checkpoint", default="salsa_ddp_checkpoint.pt")
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=timedelta(minutes=5))
    train(args)
    # Tear down once every rank is done, and after train()'s DDP model is gone (collected: it may
    # sit in reference cycles): DDP holds the process group, and a group destroyed as the model is
    # freed at exit can hang gloo.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(y, device=device)
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = nn.parallel.DistributedDataParallel(model.to(device))
    optimizer = SaLSA(model.parameters())  # after wrapping; averages over the default group

    order = torch.Generator().manual_seed(1)  # the same batches on every rank; each takes its share
    share = args.batch // world
    for step in range(args.steps):
        batch = torch.randint(0, len(x), (args.batch,), generator=order).to(device)
        mine = batch[rank * share : (rank + 1) * share]

        def closure(backwards=False, mine=mine):
            loss = nn.functional.cross_entropy(model(x[mine]), y[mine])
            if backwards:
                loss.backward()
            return loss

        optimizer.zero_grad()
        loss = optimizer.step(closure)
        if rank == 0 and step % 25 == 0:
            info = optimizer.last_step
            print(
                f"step {step:4d}  loss (rank 0's share) {loss.item():.4f}  step size {info.step_size:.3g}  "
                f"{'searched, ' + str(info.trials) + ' trials' if info.searched else ''}"
            )

    # Every rank must hold the same parameters: compare checksums.
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        agree = all(torch.equal(s, sums[0]) for s in sums)
        print(f"ranks hold identical parameters: {agree}; closure calls: {optimizer.stats['forwards']}")
        torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}, args.checkpoint)
        print(f"checkpoint written to {args.checkpoint} (load it on every rank to resume)")


if __name__ == "__main__":
    main()
