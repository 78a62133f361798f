"""The non-search step in one pass: weight decay, moments, bias correction, preconditioning.

Reads p, g, m, v and writes p, m, v: 28 bytes per fp32 parameter, the same as
``torch.optim.Adam(fused=True)``. A device flag skips the whole update without a host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import BLOCK, NUM_WARPS, div, grid, offsets, rounded, scalar, split, sqrt


@triton.jit
def _plain_step_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, skip_ptr, n,
    lr_hi, lr_lo, keep_hi, keep_lo, b1_hi, b1_lo, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo,
    c1_hi, c1_lo, c2_hi, c2_lo, eps_hi, eps_lo,
    ADAM: tl.constexpr, DECAY: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    ST: tl.constexpr = m_ptr.dtype.element_ty
    pid, offs, mask = offsets(n, BLOCK)
    if HAS_SKIP:  # (broadcast through a zeros block: the interpreter cannot AND a 0-dim bool)
        mask = mask & (tl.zeros([BLOCK], tl.float32) + tl.load(skip_ptr) == 0)
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(ST)
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(ST)
    m = tl.load(m_ptr + offs, mask=mask, other=0)
    if DECAY:
        p = p * scalar(keep_hi, keep_lo, ST)
    m = m * scalar(b1_hi, b1_lo, ST) + scalar(omb1_hi, omb1_lo, ST) * g
    d = div(m, scalar(c1_hi, c1_lo, ST), ST)
    if ADAM:
        v = tl.load(v_ptr + offs, mask=mask, other=0)
        v = v * scalar(b2_hi, b2_lo, ST) + scalar(omb2_hi, omb2_lo, ST) * g * g
        denom = sqrt(div(v, scalar(c2_hi, c2_lo, ST), ST), ST) + scalar(eps_hi, eps_lo, ST)
        d = div(d, denom, ST)
        tl.store(v_ptr + offs, v, mask=mask)
    p = p - scalar(lr_hi, lr_lo, ST) * d
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(p_ptr + offs, rounded(p, p_ptr.dtype.element_ty), mask=mask)


def plain_step(b, *, lr_step: float, decay: float, h, found_inf=None) -> None:
    """``p = p*(1-decay) - lr_step * momentum_direction``, moments updated, for one bucket."""
    n = b.numel
    if n == 0:
        return
    adam = h.direction == "adam"
    v = b.exp_avg_sq if adam else b.exp_avg
    skip = found_inf if found_inf is not None else b.exp_avg  # unused without HAS_SKIP
    _plain_step_kernel[grid(n)](
        b.param, b.grad, b.exp_avg, v, skip, n,
        *split(lr_step), *split(1 - decay), *split(h.beta1), *split(1 - h.beta1),
        *split(h.beta2), *split(1 - h.beta2), *split(h.corr1), *split(h.corr2), *split(h.eps),
        ADAM=adam, DECAY=decay != 0, HAS_SKIP=found_inf is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
