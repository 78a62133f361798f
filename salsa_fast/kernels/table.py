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
start at 128-byte boundaries; in a bucket without a backup, packed without gaps, of what they happen to be),
parameter offsets are multiples of ``16 bytes / element size``
when every parameter is 16-byte aligned (PyTorch allocates at 256 or more; a view at an odd
offset may not be). When one is not, the whole bucket takes the unhinted variant. A parameter
whose elements are not one dense run of memory (a strided view made a parameter) is *staged*:
copied into a contiguous tensor before a launch and back after a launch that writes it.

The table is cached in ``bucket.workspace["table"]`` and rebuilt when a parameter moves
(``FlatBucket.rebind`` drops it). It costs 24 bytes per row, kept on the device. A bucket of
``keep_backup=False`` (which promises Adam's memory) keeps none of it on the device: its rows
stay on the host, pinned, and are copied in for each launch without a sync; to keep that copy
short each row covers up to ``HOST_ROW_BLOCKS`` blocks (a 2-D grid, one program per block;
programs past a parameter's end do nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..flat import dense_strides
from ._common import BLOCK, on_device

VECTOR_BYTES = 16  # one 128-bit access
ROW = 3  # int64 entries per chunk: parameter offset, flat offset, length
HOST_ROW_BLOCKS = 16  # most blocks per row of a table kept on the host (keep_backup=False), see _blocks_per_row


@dataclass
class ParamTable:
    base: torch.Tensor  # the tensor the parameter offsets count from
    chunks: int  # rows
    sub: int  # programs per row, each one block of BLOCK elements (grid: (chunks, sub))
    p_align: int  # elements every parameter offset is a multiple of (1: no hint)
    f_align: int  # elements every flat offset is a multiple of (16, less with keep_backup=False)
    staged: list[tuple[torch.Tensor, torch.Tensor]]  # (parameter, its contiguous stand-in)
    device_rows: torch.Tensor | None  # (chunks, ROW) int64 on the bucket's device, kept; or
    host_rows: torch.Tensor | bytearray | None  # with keep_backup=False, kept off the device (pinned
    # on CUDA; plain bytes for CPU tensors), copied or viewed for each launch without a sync

    @property
    def programs(self) -> int:
        return self.chunks * self.sub

    def rows(self) -> torch.Tensor:
        if self.device_rows is not None:
            return self.device_rows
        if isinstance(self.host_rows, bytearray):  # (CPU tensors, the interpreter) a transient view
            return torch.frombuffer(self.host_rows, dtype=torch.int64).view(-1, ROW)
        return self.host_rows.to(self.base.device, non_blocking=True)

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
    sub = _blocks_per_row([t.numel() for t in targets]) if b.adams_memory else 1
    span = sub * BLOCK
    rows = []
    for start, t, offset in zip(starts, targets, b.offsets):
        delta = (start - base.data_ptr()) // esize
        n = t.numel()
        rows += [(delta + c, offset + c, min(span, n - c)) for c in range(0, n, span)]
    p_align = max(1, VECTOR_BYTES // esize) if aligned else 1
    f_align = math.gcd(16, *(offset for offset, t in zip(b.offsets, targets) if t.numel()))
    rows_t = torch.tensor(rows or [(0, 0, 0)], dtype=torch.int64)
    if not b.adams_memory:
        return ParamTable(base, len(rows), sub, p_align, f_align, staged, rows_t.to(b.device), None)
    if b.device.type == "cpu":  # no tensor storage between steps: bytes, viewed per launch
        host = bytearray(rows_t.numpy().tobytes())
    else:
        host = rows_t.pin_memory() if torch.cuda.is_available() else rows_t
    return ParamTable(base, len(rows), sub, p_align, f_align, staged, None, host)


def _blocks_per_row(sizes: list[int]) -> int:
    """Blocks per row of a table kept on the host, whose rows are copied in for every launch: as
    many as ``HOST_ROW_BLOCKS`` (a 16x shorter copy), as long as at most a quarter more programs run than
    there are blocks (each parameter's last row may end early)."""
    blocks = [-(-n // BLOCK) for n in sizes]
    total = sum(blocks)
    sub = HOST_ROW_BLOCKS
    while sub > 1 and sum(-(-k // sub) for k in blocks) * sub > 1.25 * total:
        sub //= 2
    return sub


@torch.no_grad()
def launch(kernel, b, *args, writes: bool, **meta) -> None:
    """``kernel[(chunks, sub)](base, rows, *args, P_ALIGN=..., F_ALIGN=..., BLOCK=..., **meta)`` over the bucket's
    parameter table, staging the parameters that need it."""
    table = param_table(b)
    if table.chunks == 0:
        return
    table.stage_in()
    with on_device(table.base):
        kernel[(table.chunks, table.sub)](
            table.base, table.rows(), *args, P_ALIGN=table.p_align, F_ALIGN=table.f_align, BLOCK=BLOCK, **meta
        )
    if writes:
        table.stage_out()


@triton.jit
def chunk(rows_ptr, P_ALIGN: tl.constexpr, F_ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block: (program id, parameter offsets, flat offsets, length). Program
    ``(r, j)`` takes block ``j`` of row ``r``; its length is ``<= 0`` past the row's end (every
    lane masked off: it does nothing, and a partial sum it writes is 0). A block is full, to run
    unmasked, when the length is ``>= BLOCK`` (in a row of several blocks, all but the last)."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    row = rows_ptr + r * 3
    shift = j * BLOCK
    p_start = tl.multiple_of(tl.load(row), P_ALIGN) + shift
    f_start = tl.multiple_of(tl.load(row + 1), F_ALIGN) + shift
    lanes = tl.arange(0, BLOCK)
    return r * tl.num_programs(1) + j, p_start + lanes, f_start + lanes, tl.load(row + 2) - shift
