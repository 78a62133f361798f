"""LABPAL's passes: the direction's sums, the update, a point on the measured line.

The direction ``D = src / count + momentum * buf`` is rebuilt in registers by every pass and never
stored (``src``: the gradient buffer, or the sum of ``count`` batches' gradients; ``buf``: the
momentum buffer, read only with momentum).

bytes per fp32 parameter (no momentum; momentum adds 4 to each pass that reads ``buf`` and 4 to
each that writes it):
sums     reads src; one partial of sum(D*D) (and of sum(d*D)) per program       4 B
update   reads p, src; writes p (and buf)                                        12 B
         (LABPAL(keep_backup=False) moves along the measured line with it, buf left)
point    reads backup (or p, then writes backup), src; writes p                 12 B (16 B)
The torch backend's update builds ``D``, and for bf16/fp16 parameters an fp32 copy of them, in
temporaries first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import table
from ._common import BLOCK, NUM_WARPS, div, flat_block, grid, load, on_device, rounded, run_chunk, scalar, split, store
from .reduce import finish, partials_buffer


@triton.jit
def _direction(src_ptrs, buf_ptrs, mask, count, mom, ST: tl.constexpr, AVERAGE: tl.constexpr, MOMENTUM: tl.constexpr):
    """(d, D) at these pointers, in the math dtype ``ST``."""
    d = load(src_ptrs, mask).to(ST)
    if AVERAGE:
        d = div(d, count, ST)
    if MOMENTUM:
        D = d + mom * load(buf_ptrs, mask)
    else:
        D = d
    return d, D


@triton.jit
def _chunk_sums(mask, src_ptrs, buf_ptrs, count, mom, ST: tl.constexpr, AVERAGE: tl.constexpr, MOMENTUM: tl.constexpr):
    """The chunk's partials of sum(D * D) and (with momentum; else 0) sum(d * D)."""
    d, D = _direction(src_ptrs, buf_ptrs, mask, count, mom, ST, AVERAGE, MOMENTUM)
    if MOMENTUM:
        return tl.sum(D * D, axis=0), tl.sum(d * D, axis=0)
    else:
        return tl.sum(D * D, axis=0), 0.0


@triton.jit(do_not_specialize=["n"])  # (see _common.flat_block)
def _sums_kernel(
    src_ptr,
    buf_ptr,
    sq_ptr,
    dot_ptr,
    n,
    count,
    mom,
    AVERAGE: tl.constexpr,
    MOMENTUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``count``, ``mom``: (high, low) pairs."""
    ST: tl.constexpr = buf_ptr.dtype.element_ty
    pid, offs, left = flat_block(n, BLOCK)
    count, mom = scalar(count, ST), scalar(mom, ST)
    src, buf = src_ptr + offs, buf_ptr + offs
    sq, dot = run_chunk(_chunk_sums, left, BLOCK, (src, buf, count, mom, ST, AVERAGE, MOMENTUM))
    tl.store(sq_ptr + pid, sq)
    if MOMENTUM:
        tl.store(dot_ptr + pid, dot)


@triton.jit
def _chunk_update(
    mask,
    p_ptrs,
    src_ptrs,
    buf_ptrs,
    count,
    mom,
    c,
    ST: tl.constexpr,
    AVERAGE: tl.constexpr,
    MOMENTUM: tl.constexpr,
    WRITE_BUF: tl.constexpr,
):
    _, D = _direction(src_ptrs, buf_ptrs, mask, count, mom, ST, AVERAGE, MOMENTUM)
    p = load(p_ptrs, mask).to(ST) - c * D
    store(p_ptrs, rounded(p, p_ptrs.dtype.element_ty), mask)
    if WRITE_BUF:
        store(buf_ptrs, D, mask)


@triton.jit
def _update_kernel(
    p_base,
    rows_ptr,
    src_ptr,
    buf_ptr,
    coef_ptr,
    ok_ptr,
    count,
    mom,
    s,
    AVERAGE: tl.constexpr,
    MOMENTUM: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_OK: tl.constexpr,
    WRITE_BUF: tl.constexpr,
    P_ALIGN: tl.constexpr,
    F_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``count``, ``mom``, ``s``: (high, low) pairs."""
    ST: tl.constexpr = buf_ptr.dtype.element_ty
    pid, p_offs, f_offs, n = table.chunk(rows_ptr, P_ALIGN, F_ALIGN, BLOCK)
    run = True
    if HAS_OK:
        run = tl.load(ok_ptr) != 0
    if run:
        c = scalar(s, ST)
        if HAS_COEF:
            c = tl.load(coef_ptr).to(ST) * c
        p, src, buf = p_base + p_offs, src_ptr + f_offs, buf_ptr + f_offs
        count_st, mom_st = scalar(count, ST), scalar(mom, ST)
        run_chunk(_chunk_update, n, BLOCK, (p, src, buf, count_st, mom_st, c, ST, AVERAGE, MOMENTUM, WRITE_BUF))


@triton.jit
def _chunk_point(
    mask,
    p_ptrs,
    backup_ptrs,
    src_ptrs,
    buf_ptrs,
    count,
    mom,
    c,
    ST: tl.constexpr,
    SAVE: tl.constexpr,
    WRITE_BUF: tl.constexpr,
    AVERAGE: tl.constexpr,
    MOMENTUM: tl.constexpr,
):
    if SAVE:
        raw = load(p_ptrs, mask)
        store(backup_ptrs, raw, mask)
    else:
        raw = load(backup_ptrs, mask)
    _, D = _direction(src_ptrs, buf_ptrs, mask, count, mom, ST, AVERAGE, MOMENTUM)
    store(p_ptrs, rounded(raw.to(ST) - c * D, p_ptrs.dtype.element_ty), mask)
    if WRITE_BUF:
        store(buf_ptrs, D, mask)


@triton.jit
def _point_kernel(
    p_base,
    rows_ptr,
    backup_ptr,
    src_ptr,
    buf_ptr,
    count,
    mom,
    s,
    SAVE: tl.constexpr,
    WRITE_BUF: tl.constexpr,
    AVERAGE: tl.constexpr,
    MOMENTUM: tl.constexpr,
    P_ALIGN: tl.constexpr,
    F_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``count``, ``mom``, ``s``: (high, low) pairs."""
    ST: tl.constexpr = buf_ptr.dtype.element_ty
    pid, p_offs, f_offs, n = table.chunk(rows_ptr, P_ALIGN, F_ALIGN, BLOCK)
    count, mom, c = scalar(count, ST), scalar(mom, ST), scalar(s, ST)
    p, bk, src, buf = p_base + p_offs, backup_ptr + f_offs, src_ptr + f_offs, buf_ptr + f_offs
    run_chunk(_chunk_point, n, BLOCK, (p, bk, src, buf, count, mom, c, ST, SAVE, WRITE_BUF, AVERAGE, MOMENTUM))


def _flags(count: int, momentum: float) -> dict:
    return dict(AVERAGE=count != 1, MOMENTUM=momentum != 0, num_warps=NUM_WARPS)


def sums(b, src: torch.Tensor, *, count: int, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||D||^2, <d, D>)`` over the bucket, 0-dim fp64 device tensors."""
    n = b.numel
    sq_partials = partials_buffer(b.work, grid(n)[0], b.state_dtype, b.device, "labpal_sq")
    # without momentum <d, D> is ||D||^2: no second buffer (the kernel gets a pointer it never uses)
    dot_partials = (
        partials_buffer(b.work, grid(n)[0], b.state_dtype, b.device, "labpal_dot") if momentum else sq_partials
    )
    if n:
        with on_device(src):
            _sums_kernel[grid(n)](
                src,
                b.exp_avg,
                sq_partials,
                dot_partials,
                n,
                split(count),
                split(momentum),
                BLOCK=BLOCK,
                **_flags(count, momentum),
            )
    sq = finish(sq_partials)
    return sq, (finish(dot_partials) if momentum else sq)


def update(
    b,
    src: torch.Tensor,
    *,
    count: int,
    momentum: float,
    scale: float,
    coef: torch.Tensor | None,
    ok: torch.Tensor | None,
    write_buffer: bool = True,
) -> None:
    """``p -= scale * coef * D``; buf = D with momentum (and ``write_buffer``: a move along the
    measured line without a backup leaves it); nothing where ``ok`` is False."""
    table.launch(
        _update_kernel,
        b,
        src,
        b.exp_avg,
        b.exp_avg if coef is None else coef,
        b.exp_avg if ok is None else ok.to(torch.int32),
        split(count),
        split(momentum),
        split(scale),
        writes=True,
        HAS_COEF=coef is not None,
        HAS_OK=ok is not None,
        WRITE_BUF=write_buffer and momentum != 0,
        **_flags(count, momentum),
    )


def point(
    b, src: torch.Tensor, *, count: int, momentum: float, scale: float, save_backup: bool, write_buffer: bool
) -> None:
    """``p = backup - scale * D`` (``save_backup``: ``backup = p`` first, in the same pass)."""
    table.launch(
        _point_kernel,
        b,
        b.ensure_backup(),
        src,
        b.exp_avg,
        split(count),
        split(momentum),
        split(scale),
        writes=True,
        SAVE=save_backup,
        WRITE_BUF=write_buffer and momentum != 0,
        **_flags(count, momentum),
    )
