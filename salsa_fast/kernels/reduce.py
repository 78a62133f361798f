"""Block sums: the first stage of a deterministic reduction (no atomics)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, NUM_WARPS, grid, offsets


@triton.jit
def _block_sum_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    ST: tl.constexpr = partial_ptr.dtype.element_ty
    pid, offs, mask = offsets(n, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(ST)
    tl.store(partial_ptr + pid, tl.sum(x, axis=0))


def partials_buffer(workspace: dict, programs: int, dtype: torch.dtype, device: torch.device,
                    name: str = "partials") -> torch.Tensor:  # fmt: skip
    """The bucket's reusable buffer ``name`` of one partial sum per program."""
    buf = workspace.get(name)
    if buf is None or buf.numel() != programs or buf.dtype != dtype:
        buf = workspace[name] = torch.empty(programs, dtype=dtype, device=device)
    return buf


def finish(partials: torch.Tensor) -> torch.Tensor:
    """Second stage: the partials summed in a fixed order, as a 0-dim fp64 tensor."""
    return partials.sum(dtype=torch.float64)


def buffer_sum(x: torch.Tensor, partials: torch.Tensor) -> torch.Tensor:
    """Sum of a flat buffer (accumulated in ``partials.dtype``), non-finite iff an element is."""
    n = x.numel()
    if n:
        _block_sum_kernel[grid(n)](x, partials, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return finish(partials)
