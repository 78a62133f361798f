"""The second stage of the kernels' deterministic reductions (no atomics): each program of a
first-stage kernel writes one partial sum; a torch sum over them, in a fixed order, finishes."""

from __future__ import annotations

import torch


def partials_buffer(
    workspace: dict, programs: int, dtype: torch.dtype, device: torch.device, name: str = "partials"
) -> torch.Tensor:
    """The bucket's reusable buffer ``name`` of one partial sum per program."""
    buf = workspace.get(name)
    if buf is None or buf.numel() != programs or buf.dtype != dtype:
        buf = workspace[name] = torch.empty(programs, dtype=dtype, device=device)
    return buf


def finish(partials: torch.Tensor) -> torch.Tensor:
    """Second stage: the partials summed in a fixed order, as a 0-dim fp64 tensor."""
    return partials.sum(dtype=torch.float64)
