"""The same decision on every rank.

A line search whose ranks disagree hangs (one rank runs another trial forward, the others do
not) or silently diverges. SaLSA's decisions depend on a handful of numbers: the gradient
pass's loss, the preconditioned norm, each trial's loss and whether the gradient was finite.
Before each decision they are all-reduced over the process group in one small collective:

* losses are averaged (each rank computes the loss of its shard of the batch);
* the norm of parameters that every rank holds in full (DDP) is averaged, and the norm of
  sharded parameters (FSDP2 / DTensor ``Shard`` placements) is summed over the shards;
* the non-finite flag is the maximum over ranks.

LABPAL agrees the same way on its line's losses and its direction's norm and slope.

On CUDA the collectives are asynchronous: they add no host sync beyond the one the decision
needs anyway (none on a non-search step). Without ``torch.distributed`` all of it is skipped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def resolve_group(process_group):
    """The group to agree over: the given one, else the world when torch.distributed is
    initialised with more than one rank, else None (single process)."""
    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group was given but torch.distributed is not initialised")
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def is_sharded(p: torch.Tensor) -> bool:
    """A DTensor parameter split over ranks (FSDP2): its norm is a sum over the shards."""
    placements = getattr(p, "placements", None)
    return placements is not None and any(pl.is_shard() for pl in placements)


def agree_on_search(group, loss: torch.Tensor, pp_full: torch.Tensor, pp_sharded: torch.Tensor) -> torch.Tensor:
    """``[mean loss, mean full-parameter norm + summed sharded norm]``, identical on all ranks
    (fp64, one all-reduce). Single process: ``[loss, pp_full + pp_sharded]``."""
    return agree_on_sums(group, torch.stack([loss, pp_full]), torch.stack([torch.zeros_like(loss), pp_sharded]))


def agree_on_loss(group, loss: torch.Tensor) -> torch.Tensor:
    """The mean of ``loss`` over ranks (fp64, one all-reduce); ``loss`` itself in one process."""
    if group is None:
        return loss
    world = dist.get_world_size(group)
    mean = loss / world
    dist.all_reduce(mean, op=dist.ReduceOp.SUM, group=group)
    return mean


def agree_on_sums(group, full: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
    """``full`` (sums over parameters every rank holds whole) averaged over ranks plus
    ``sharded`` (sums over this rank's shards) summed over them: one all-reduce."""
    if group is None:
        return full + sharded
    numbers = full / dist.get_world_size(group) + sharded
    dist.all_reduce(numbers, op=dist.ReduceOp.SUM, group=group)
    return numbers


def agree_on_flag(group, flag: torch.Tensor) -> torch.Tensor:
    """1 on every rank when ``flag`` is 1 on any (an in-place MAX all-reduce)."""
    if group is not None:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag


def as_dtensor_like(param, local: torch.Tensor) -> torch.Tensor:
    """``local`` (state shaped like ``param``'s local shard) as a DTensor laid out like ``param``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def local_part(param, value: Any, what: str) -> Any:
    """A saved DTensor's local shard, if it is laid out like ``param`` (else ``ValueError``:
    torch's distributed checkpoint reshards, a plain load does not). Anything else as it is."""
    if not hasattr(value, "device_mesh"):
        return value
    if (
        not hasattr(param, "device_mesh")
        or value.placements != param.placements
        or value.device_mesh != param.device_mesh
    ):
        raise ValueError(
            f"{what} is a DTensor with placements {value.placements}, the parameter has "
            f"{getattr(param, 'placements', 'none (a plain tensor)')}: load it through torch.distributed.checkpoint "
            "(set_optimizer_state_dict), which reshards"
        )
    return value.to_local()
