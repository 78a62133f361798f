"""Worker processes for the distributed tests (gloo on CPU): importable, so spawn can find them.

Each worker trains the digits MLP of ``helpers`` on its rank's half of every batch and saves
what the test compares (parameters, closure calls after every step, stats) to ``out_dir``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from helpers import batches, digits, make_closure, mlp
from torch import nn

from salsa_fast import SaLSA

STEPS = 40
BATCH = 64
OPTIONS = {}


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _finish() -> None:
    """Tear down only once every rank is done: a rank that destroys the group while a peer's
    collective (FSDP2's gathers in ``_save``) is still in flight makes gloo abort the peer
    ("terminate called without an active exception", SIGABRT)."""
    dist.barrier()
    dist.destroy_process_group()


def _disable_agreement() -> None:
    """What the optimizer would do without its collectives: decide on local numbers."""
    import salsa_fast.distributed as d

    d.agree_on_search = lambda group, loss, pp_full, pp_sharded: torch.stack([loss, pp_full + pp_sharded])
    d.agree_on_loss = lambda group, loss: loss
    d.agree_on_flag = lambda group, flag: flag
    import salsa_fast.salsa as o

    o.agree_on_search, o.agree_on_loss, o.agree_on_flag = d.agree_on_search, d.agree_on_loss, d.agree_on_flag


def train_shards(model, opt, rank: int, world: int, start: int, steps: int, calls: list[int]) -> None:
    """Train on this rank's contiguous share of each full batch (equal shares)."""
    plan = batches(len(digits()[0]), STEPS, BATCH, seed=1)[start : start + steps]
    share = BATCH // world
    count = [calls[-1] if calls else 0]
    for idx in plan:
        opt.zero_grad()
        opt.step(make_closure(model, "digits", idx[rank * share : (rank + 1) * share], torch.float32, count))
        calls.append(count[0])


def _save(out_dir, rank, model, opt, calls, **extra) -> None:
    params = [p.detach().clone() for p in model.parameters()]
    if params and hasattr(params[0], "full_tensor"):
        params = [p.full_tensor() for p in params]  # DTensor shards gathered
    torch.save({"params": params, "calls": calls, "stats": opt.stats, **extra}, os.path.join(out_dir, f"rank{rank}.pt"))


def ddp(rank: int, world: int, port: int, out_dir: str, agreement: bool = True, backend: str = "torch") -> None:
    _init(rank, world, port)
    if not agreement:
        _disable_agreement()
    model = nn.parallel.DistributedDataParallel(mlp())
    opt = SaLSA(model.parameters(), backend=backend, **OPTIONS)
    calls: list[int] = []
    train_shards(model, opt, rank, world, 0, STEPS, calls)
    _save(out_dir, rank, model.module, opt, calls)
    _finish()


def ddp_checkpoint(rank: int, world: int, port: int, out_dir: str) -> None:
    """Train half, rank 0 saves, every rank loads into fresh objects, train the rest."""
    _init(rank, world, port)
    model = nn.parallel.DistributedDataParallel(mlp())
    opt = SaLSA(model.parameters(), **OPTIONS)
    calls: list[int] = []
    train_shards(model, opt, rank, world, 0, STEPS // 2, calls)
    path = os.path.join(out_dir, "checkpoint.pt")
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    checkpoint = torch.load(path, weights_only=True)
    fresh = mlp(seed=123)
    fresh.load_state_dict(checkpoint["model"])
    model = nn.parallel.DistributedDataParallel(fresh)
    opt = SaLSA(model.parameters(), **OPTIONS)
    opt.load_state_dict(checkpoint["opt"])
    train_shards(model, opt, rank, world, STEPS // 2, STEPS - STEPS // 2, calls)
    _save(out_dir, rank, model.module, opt, calls)
    _finish()


def fsdp(rank: int, world: int, port: int, out_dir: str) -> None:
    """FSDP2 (fully_shard): every parameter is a DTensor sharded over the two ranks."""
    _init(rank, world, port)
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = SaLSA(model.parameters(), **OPTIONS)
    calls: list[int] = []
    train_shards(model, opt, rank, world, 0, STEPS, calls)
    sharded = [b.sharded for b in opt._buckets]
    _save(out_dir, rank, model, opt, calls, sharded=sharded)
    _finish()
