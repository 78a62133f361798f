"""How the kernels reach parameters that own their storage: a table of chunks.

The optimizer's buffers are flat, but every parameter is its own tensor. As torch's fused
optimizers do with ``multi_tensor_apply``, a kernel that reads or writes parameters is launched
once per bucket over a table built once per layout: one row per chunk of ``BLOCK`` elements of
one parameter (a chunk never straddles two tensors), holding

* the chunk's element offset from a *base* parameter's address (parameters of one bucket share
  a device and a dtype, so any one of them is a base; the others are reached by int64 pointer
  arithmetic across allocations),
* the chunk's offset in the flat index space (where its gradient, moments and backup are),
* its length (``BLOCK``, or less for the last chunk of a parameter).

A full chunk runs unmasked; its offsets carry the alignment hints (``tl.multiple_of``) that let
the compiler emit 128-bit loads and stores: flat offsets are multiples of 16 elements (regions
start at 128-byte boundaries; in a lean bucket, packed without gaps, of what they happen to be),
parameter offsets are multiples of ``16 bytes / element size``
when every parameter is 16-byte aligned (PyTorch allocates at 256 or more; a view at an odd
offset may not be). When one is not, the whole bucket takes the unhinted variant. A parameter
whose elements are not one dense run of memory (a strided view made a parameter) is *staged*:
copied into a contiguous tensor before a launch and back after a launch that writes it.

The table is cached in ``bucket.workspace["table"]`` and rebuilt when a parameter moves
(``FlatBucket.rebind`` drops it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..flat import dense_strides
from ._common import BLOCK

VECTOR_BYTES = 16  # one 128-bit access
ROW = 3  # int64 entries per chunk: parameter offset, flat offset, length


@dataclass
class ParamTable:
    base: torch.Tensor  # the tensor the parameter offsets count from
    rows: torch.Tensor  # (chunks, ROW) int64, on the bucket's device
    chunks: int
    p_align: int  # elements every parameter offset is a multiple of (1: no hint)
    f_align: int  # elements every flat offset is a multiple of (16, less in a lean bucket)
    staged: list[tuple[torch.Tensor, torch.Tensor]]  # (parameter, its contiguous stand-in)

    def stage_in(self) -> None:
        for param, stand_in in self.staged:
            stand_in.copy_(param)

    def stage_out(self) -> None:
        for param, stand_in in self.staged:
            param.copy_(stand_in)


def param_table(b) -> ParamTable:
    """The bucket's table (built on first use after each layout change)."""
    table = b.workspace.get("table")
    if table is None:
        table = b.workspace["table"] = _build(b)
    return table


def _build(b) -> ParamTable:
    tensors = b.tensors()
    esize = tensors[0].element_size()
    staged, targets = [], []
    for t in tensors:
        if t.numel() and not dense_strides(t):
            stand_in = torch.empty(t.shape, dtype=t.dtype, device=t.device)
            staged.append((t, stand_in))
            t = stand_in
        targets.append(t)
    with_elements = [t for t in targets if t.numel()]
    base = with_elements[0] if with_elements else targets[0]
    # a dense tensor's elements start at its lowest address (a permuted one's too)
    starts = [t.data_ptr() for t in targets]
    if any((s - base.data_ptr()) % esize for s in starts):  # (never seen: element-misaligned views)
        raise RuntimeError("a parameter is not aligned to its element size; use backend='torch'")
    aligned = all(s % VECTOR_BYTES == 0 for s, t in zip(starts, targets) if t.numel())
    rows = []
    for start, t, offset in zip(starts, targets, b.offsets):
        delta = (start - base.data_ptr()) // esize
        n = t.numel()
        rows += [(delta + c, offset + c, min(BLOCK, n - c)) for c in range(0, n, BLOCK)]
    rows_t = torch.tensor(rows or [(0, 0, 0)], dtype=torch.int64).to(b.device)
    p_align = max(1, VECTOR_BYTES // esize) if aligned else 1
    f_align = math.gcd(16, *(offset for offset, t in zip(b.offsets, targets) if t.numel()))
    return ParamTable(base, rows_t, len(rows), p_align, f_align, staged)


@torch.no_grad()
def launch(kernel, b, *args, writes: bool, **meta) -> None:
    """``kernel[(chunks,)](base, rows, *args, P_ALIGN=..., F_ALIGN=..., BLOCK=..., **meta)`` over the bucket's
    parameter table, staging the parameters that need it."""
    table = param_table(b)
    if table.chunks == 0:
        return
    table.stage_in()
    kernel[(table.chunks,)](
        table.base, table.rows, *args, P_ALIGN=table.p_align, F_ALIGN=table.f_align, BLOCK=BLOCK, **meta
    )
    if writes:
        table.stage_out()


@triton.jit
def chunk(rows_ptr, P_ALIGN: tl.constexpr, F_ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """This program's chunk: (program id, parameter offsets, flat offsets, length)."""
    pid = tl.program_id(0).to(tl.int64)
    row = rows_ptr + pid * 3
    p_start = tl.multiple_of(tl.load(row), P_ALIGN)
    f_start = tl.multiple_of(tl.load(row + 1), F_ALIGN)
    lanes = tl.arange(0, BLOCK)
    return pid, p_start + lanes, f_start + lanes, tl.load(row + 2)
