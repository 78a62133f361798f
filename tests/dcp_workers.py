"""Checkpoints through ``torch.distributed.checkpoint`` (DCP): train half, save, load into fresh
objects, train the rest, next to the uninterrupted run. Run in one process (``resume_all``
with ``kind="plain"``) or on every rank (``resume``, spawned by ``multiprocess.spawn``).

Three ways to save, each as its users write it:

* ``"dcp"``: ``dcp.save`` / ``dcp.load`` of ``get_model_state_dict`` and
  ``get_optimizer_state_dict`` (FSDP2's and torchtitan's way; DTensor state is saved sharded);
* ``"dcp-flat"``: the same with ``flatten_optimizer_state_dict=True`` (torchtitan's default);
* ``"full-rank0"``: full state dicts gathered to rank 0 (``full_state_dict=True,
  cpu_offload=True``), ``torch.save`` there, then ``broadcast_from_rank0=True`` on load;
* ``"per-rank"``: no DCP: each rank ``torch.save``s its own ``state_dict()``s (FSDP2's hold
  DTensors) and loads them back with ``weights_only=True``;
* ``"per-rank-previous"``: the same, with the optimizer's checkpoint as the previous release
  wrote it (the scalars at its top level, FSDP2 state as plain local shards).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_workers import OPTIMIZERS, STEPS, _save, result, train_shards, wrapped
from helpers import as_previous_release
from multiprocess import finish, init
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

HALF = STEPS // 2
SAVES = ("dcp", "dcp-flat", "full-rank0", "per-rank", "per-rank-previous")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save(how: str, model, opt, path: str) -> None:
    if how.startswith("per-rank"):
        optim = opt.state_dict() if how == "per-rank" else as_previous_release(opt.state_dict(), opt.entry)
        torch.save({"model": model.state_dict(), "optim": optim}, f"{path}-rank{_rank()}.pt")
        return
    if how == "full-rank0":
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = {
            "model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, opt, options=options),
        }
        if dist.get_rank() == 0:
            torch.save(sd, path + ".pt")
        dist.barrier()
        return
    options = StateDictOptions(flatten_optimizer_state_dict=how == "dcp-flat")
    sd = {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    dcp.save(sd, checkpoint_id=path)


def load(how: str, model, opt, path: str) -> None:
    if how.startswith("per-rank"):
        sd = torch.load(f"{path}-rank{_rank()}.pt", weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        return
    if how == "full-rank0":
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True)
        sd = torch.load(path + ".pt", weights_only=True) if dist.get_rank() == 0 else {"model": {}, "optim": {}}
        set_model_state_dict(model, sd["model"], options=options)
        set_optimizer_state_dict(model, opt, sd["optim"], options=options)
        return
    options = StateDictOptions(flatten_optimizer_state_dict=how == "dcp-flat")
    sd = {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"], options=options)
    set_optimizer_state_dict(model, opt, sd["optim"], options=options)


def resume_all(kind: str, rank: int, world: int, out_dir: str, saves=SAVES) -> dict:
    """``{(optimizer, "uninterrupted" or a way to save): result}`` on this rank."""
    results = {}
    for name, make in OPTIMIZERS.items():
        model, module = wrapped(kind)
        opt = make(model.parameters())
        calls: list[int] = []
        train_shards(model, opt, rank, world, 0, STEPS, calls)
        results[name, "uninterrupted"] = result(module, opt, calls)
        for how in saves:
            model, module = wrapped(kind)
            opt = make(model.parameters())
            calls = []
            train_shards(model, opt, rank, world, 0, HALF, calls)
            measuring = bool(getattr(opt, "measuring", False))
            path = os.path.join(out_dir, f"{kind}-{name}-{how}")
            save(how, model, opt, path)
            model, module = wrapped(kind, seed=123)  # (other weights, until loaded)
            opt = make(model.parameters())
            load(how, model, opt, path)
            train_shards(model, opt, rank, world, HALF, STEPS - HALF, calls)
            results[name, how] = result(module, opt, calls, measuring_at_save=measuring, path=path)
    return results


def resume(rank, world, store, out_dir, kind):
    init(rank, world, store)
    _save(out_dir, rank, resume_all(kind, rank, world, out_dir))
    finish()
