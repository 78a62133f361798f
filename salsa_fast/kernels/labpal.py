"""LABPAL's passes: the direction's sums, the update, a point on the measured line.

The direction ``D = src / count + momentum * buf`` is rebuilt in registers by every pass and never
stored (``src``: the gradient buffer, or the sum of ``count`` batches' gradients; ``buf``: the
momentum buffer, read only with momentum).

bytes per fp32 parameter (no momentum; momentum adds 4 to each pass that reads ``buf`` and 4 to
each that writes it):
sums     reads src; one partial of sum(D*D) (and of sum(d*D)) per program       4 B
update   reads p, src; writes p (and buf)                                        12 B
point    reads backup (or p, then writes backup), src; writes p                 12 B (16 B)
The torch backend's update builds ``D``, and for bf16/fp16 parameters an fp32 copy of them, in
temporaries first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, NUM_WARPS, div, grid, offsets, rounded, scalar, split
from .reduce import finish, partials_buffer


@triton.jit
def _direction(src_ptr, buf_ptr, offs, mask, count_hi, count_lo, mom_hi, mom_lo,
               ST: tl.constexpr, AVERAGE: tl.constexpr, MOMENTUM: tl.constexpr):  # fmt: skip
    """(d, D) for these offsets, in the math dtype ``ST``."""
    d = tl.load(src_ptr + offs, mask=mask, other=0).to(ST)
    if AVERAGE:
        d = div(d, scalar(count_hi, count_lo, ST), ST)
    if MOMENTUM:
        D = d + scalar(mom_hi, mom_lo, ST) * tl.load(buf_ptr + offs, mask=mask, other=0)
    else:
        D = d
    return d, D


@triton.jit
def _sums_kernel(
    src_ptr, buf_ptr, sq_ptr, dot_ptr, n, count_hi, count_lo, mom_hi, mom_lo,
    AVERAGE: tl.constexpr, MOMENTUM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    ST: tl.constexpr = buf_ptr.dtype.element_ty
    pid, offs, mask = offsets(n, BLOCK)
    d, D = _direction(src_ptr, buf_ptr, offs, mask, count_hi, count_lo, mom_hi, mom_lo, ST, AVERAGE, MOMENTUM)
    tl.store(sq_ptr + pid, tl.sum(D * D, axis=0))
    if MOMENTUM:
        tl.store(dot_ptr + pid, tl.sum(d * D, axis=0))


@triton.jit
def _update_kernel(
    p_ptr, src_ptr, buf_ptr, coef_ptr, ok_ptr, n, count_hi, count_lo, mom_hi, mom_lo, s_hi, s_lo,
    AVERAGE: tl.constexpr, MOMENTUM: tl.constexpr, HAS_COEF: tl.constexpr, HAS_OK: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    ST: tl.constexpr = buf_ptr.dtype.element_ty
    pid, offs, mask = offsets(n, BLOCK)
    if HAS_OK:  # (broadcast through a zeros block: the interpreter cannot AND a 0-dim bool)
        mask = mask & (tl.zeros([BLOCK], tl.int32) + tl.load(ok_ptr) != 0)
    _, D = _direction(src_ptr, buf_ptr, offs, mask, count_hi, count_lo, mom_hi, mom_lo, ST, AVERAGE, MOMENTUM)
    c = scalar(s_hi, s_lo, ST)
    if HAS_COEF:
        c = tl.load(coef_ptr).to(ST) * c
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(ST) - c * D
    tl.store(p_ptr + offs, rounded(p, p_ptr.dtype.element_ty), mask=mask)
    if MOMENTUM:
        tl.store(buf_ptr + offs, D, mask=mask)


@triton.jit
def _point_kernel(
    p_ptr, backup_ptr, src_ptr, buf_ptr, n, count_hi, count_lo, mom_hi, mom_lo, s_hi, s_lo,
    SAVE: tl.constexpr, WRITE_BUF: tl.constexpr, AVERAGE: tl.constexpr, MOMENTUM: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    ST: tl.constexpr = buf_ptr.dtype.element_ty
    pid, offs, mask = offsets(n, BLOCK)
    if SAVE:
        raw = tl.load(p_ptr + offs, mask=mask, other=0)
        tl.store(backup_ptr + offs, raw, mask=mask)
    else:
        raw = tl.load(backup_ptr + offs, mask=mask, other=0)
    _, D = _direction(src_ptr, buf_ptr, offs, mask, count_hi, count_lo, mom_hi, mom_lo, ST, AVERAGE, MOMENTUM)
    p = raw.to(ST) - scalar(s_hi, s_lo, ST) * D
    tl.store(p_ptr + offs, rounded(p, p_ptr.dtype.element_ty), mask=mask)
    if WRITE_BUF:
        tl.store(buf_ptr + offs, D, mask=mask)


def _shape(count: int, momentum: float) -> dict:
    return dict(AVERAGE=count != 1, MOMENTUM=momentum != 0, BLOCK=BLOCK, num_warps=NUM_WARPS)


def sums(b, src: torch.Tensor, *, count: int, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||D||^2, <d, D>)`` over the bucket, 0-dim fp64 device tensors."""
    n = b.numel
    sq_partials = partials_buffer(b.workspace, n, b.state_dtype, b.device, "labpal_sq")
    # without momentum <d, D> is ||D||^2: no second buffer (the kernel gets a pointer it never uses)
    dot_partials = partials_buffer(b.workspace, n, b.state_dtype, b.device, "labpal_dot") if momentum else sq_partials
    if n:
        _sums_kernel[grid(n)](
            src, b.exp_avg, sq_partials, dot_partials, n, *split(count), *split(momentum), **_shape(count, momentum)
        )
    sq = finish(sq_partials)
    return sq, (finish(dot_partials) if momentum else sq)


def update(b, src: torch.Tensor, *, count: int, momentum: float, scale: float,
           coef: torch.Tensor | None, ok: torch.Tensor | None) -> None:  # fmt: skip
    """``p -= scale * coef * D``; buf = D with momentum; nothing where ``ok`` is False."""
    n = b.numel
    if n == 0:
        return
    _update_kernel[grid(n)](
        b.param, src, b.exp_avg, b.exp_avg if coef is None else coef, b.exp_avg if ok is None else ok.to(torch.int32),
        n, *split(count), *split(momentum), *split(scale),
        HAS_COEF=coef is not None, HAS_OK=ok is not None, **_shape(count, momentum),
    )  # fmt: skip


def point(b, src: torch.Tensor, *, count: int, momentum: float, scale: float, save_backup: bool,
          write_buffer: bool) -> None:  # fmt: skip
    """``p = backup - scale * D`` (``save_backup``: ``backup = p`` first, in the same pass)."""
    n = b.numel
    backup = b.ensure_backup()
    if n == 0:
        return
    _point_kernel[grid(n)](
        b.param, backup, src, b.exp_avg, n, *split(count), *split(momentum), *split(scale),
        SAVE=save_backup, WRITE_BUF=write_buffer and momentum != 0, **_shape(count, momentum),
    )  # fmt: skip
