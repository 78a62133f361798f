"""SaLSA's search with a backup (``salsa_line.BackupLine``): the first pass, each further trial,
the fallback point, the commit (which the search without a backup ends with too).

Moments are not written until the search is over (the commit), so a failed search is undone by
copying the backup back: nothing else changed. Every point is recomputed from the backup and
the (old) moments and gradient, so a trial reads backup, g, v (and m with ``use_mv``) and
writes p: 16 (20) bytes per fp32 parameter; SGD trials 12.

bytes per fp32 parameter (Adam; with use_mv add 4 for m; SGD drops v's 4):
first pass  reads p, g, v (m); writes backup, the first trial's p, one partial of
            sum(g * direction) per chunk                         20 (24) B
trial       reads backup, g, v (m); writes p                      16 (20) B
commit      reads g, m, v; writes m, v                            20 B
Against a single 32 B first pass that also writes the moments, a search moves 8 B/param
more in all (20 + 20 vs 32): the price of a search that can be undone exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import table
from ._common import (
    BLOCK,
    NUM_WARPS,
    adam_constants,
    direction,
    first_moment,
    flat_block,
    grid,
    load,
    moment_constants,
    on_device,
    rounded,
    run_chunk,
    scalar,
    second_moment,
    split,
    store,
)
from .reduce import partials_buffer

FIRST, TRIAL, MOMENTUM = 0, 1, 2  # the point kinds of _search_point_kernel


@triton.jit
def _chunk_point(
    mask,
    p_ptrs,
    g_ptrs,
    m_ptrs,
    v_ptrs,
    backup_ptrs,
    lr,
    keep,
    mc,
    ST: tl.constexpr,
    KIND: tl.constexpr,
    ADAM: tl.constexpr,
    USE_MV: tl.constexpr,
):
    """One chunk of a point; returns its partial of sum(g * direction) (FIRST) or 0."""
    if KIND == 0:
        p_raw = load(p_ptrs, mask)
        store(backup_ptrs, p_raw, mask)
    else:
        p_raw = load(backup_ptrs, mask)
    p0 = p_raw.to(ST)
    p0 = p0 * keep  # (keep = 1 - decay: times 1 is exact)
    g = load(g_ptrs, mask).to(ST)
    d, _, _ = direction(g, m_ptrs, v_ptrs, mask, mc, ST, USE_MV or KIND == 2, ADAM)
    store(p_ptrs, rounded(p0 - lr * d, p_ptrs.dtype.element_ty), mask)
    if KIND == 0:
        return tl.sum(g * d, axis=0)
    else:
        return 0.0


@triton.jit
def _search_point_kernel(
    p_base,
    rows_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    backup_ptr,
    partial_ptr,
    pow1_ptr,
    pow2_ptr,
    lr,
    keep,
    adam,
    KIND: tl.constexpr,
    ADAM: tl.constexpr,
    USE_MV: tl.constexpr,
    P_ALIGN: tl.constexpr,
    F_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write ``p = backup*(1-decay) - lr * direction`` (KIND=FIRST also writes the backup from
    p and one partial of sum(g * direction) per chunk). The direction is built from the step's
    would-be moments: ``g * precond`` for a trial, ``mhat * precond`` with USE_MV or for the
    MOMENTUM point; precond is 1 for SGD. ``lr``, ``keep`` (1 - decay): (high, low) pairs;
    ``adam``: :func:`._common.adam_constants`."""
    ST: tl.constexpr = m_ptr.dtype.element_ty
    pid, p_offs, f_offs, n = table.chunk(rows_ptr, P_ALIGN, F_ALIGN, BLOCK)
    mc = moment_constants(adam, pow1_ptr, pow2_ptr, ST)
    p, g, m, v, bk = p_base + p_offs, g_ptr + f_offs, m_ptr + f_offs, v_ptr + f_offs, backup_ptr + f_offs
    lr, keep = scalar(lr, ST), scalar(keep, ST)
    part = run_chunk(_chunk_point, n, BLOCK, (p, g, m, v, bk, lr, keep, mc, ST, KIND, ADAM, USE_MV))
    if KIND == 0:
        tl.store(partial_ptr + pid, part)


@triton.jit
def _chunk_commit(mask, g_ptrs, m_ptrs, v_ptrs, b1, omb1, b2, omb2, ST: tl.constexpr, ADAM: tl.constexpr):
    g = load(g_ptrs, mask).to(ST)
    store(m_ptrs, first_moment(load(m_ptrs, mask), g, b1, omb1), mask)
    if ADAM:
        store(v_ptrs, second_moment(load(v_ptrs, mask), g, b2, omb2), mask)


@triton.jit(do_not_specialize=["n"])  # (see _common.flat_block)
def _commit_kernel(g_ptr, m_ptr, v_ptr, n, adam, ADAM: tl.constexpr, BLOCK: tl.constexpr):
    """The moments of the step, in place (the arithmetic the search points used; ``adam``:
    :func:`._common.adam_constants`, of which eps is not used)."""
    ST: tl.constexpr = m_ptr.dtype.element_ty
    pid, offs, left = flat_block(n, BLOCK)
    b1, omb1, b2, omb2 = scalar(adam[0], ST), scalar(adam[1], ST), scalar(adam[2], ST), scalar(adam[3], ST)
    g, m, v = g_ptr + offs, m_ptr + offs, v_ptr + offs
    run_chunk(_chunk_commit, left, BLOCK, (g, m, v, b1, omb1, b2, omb2, ST, ADAM))


def _launch_point(b, kind: int, lr_step: float, decay: float, hyper, partials) -> None:
    adam = hyper.direction == "adam"
    table.launch(
        _search_point_kernel,
        b,
        b.grad,
        b.exp_avg,
        b.exp_avg_sq if adam else b.exp_avg,
        b.backup,
        partials if partials is not None else b.exp_avg,
        hyper.state.pow1,
        hyper.state.pow2,
        split(lr_step),
        split(1 - decay),
        adam_constants(hyper),
        writes=True,
        KIND=kind,
        ADAM=adam,
        USE_MV=hyper.use_mv and kind != MOMENTUM,
        num_warps=NUM_WARPS,
    )


def first_pass(b, *, lr_step: float, decay: float, hyper):
    """Back up p and write the first trial; returns the partials of sum(g * direction) (see
    :func:`salsa_fast.kernels.reduce.finish`)."""
    partials = partials_buffer(b.work, table.param_table(b).programs, b.state_dtype, b.device, "chunk_partials")
    _launch_point(b, FIRST, lr_step, decay, hyper, partials)
    return partials


def trial(b, *, lr_step: float, decay: float, hyper) -> None:
    _launch_point(b, TRIAL, lr_step, decay, hyper, None)


def momentum_point(b, *, lr_step: float, decay: float, hyper) -> None:
    _launch_point(b, MOMENTUM, lr_step, decay, hyper, None)


def commit(b, *, hyper) -> None:
    n = b.numel
    if n == 0:
        return
    adam = hyper.direction == "adam"
    with on_device(b.grad):
        _commit_kernel[grid(n)](
            b.grad,
            b.exp_avg,
            b.exp_avg_sq if adam else b.exp_avg,
            n,
            adam_constants(hyper),
            ADAM=adam,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
