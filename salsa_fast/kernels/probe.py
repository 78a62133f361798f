"""The non-finite probe of a non-search step: is the loss or any gradient NaN or infinite?

One pass over the flat gradient buffer, reading it once (4 B per fp32 parameter, 2 for bf16 and
fp16: the price of a skip that is exact without a host sync). A program that finds a NaN or an
infinity stores 1 into the step's flag (``StepState.flag``): every writer writes the same value,
so the racing stores need no atomics and the result does not depend on their order. The loss is
checked by the first program of the launch that is handed it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import BLOCK, NUM_WARPS, flat_block, grid, load, on_device, run_chunk


@triton.jit
def _chunk_probe(mask, x_ptrs):
    """1 if the chunk holds a NaN or an infinity, else 0."""
    x = load(x_ptrs, mask).to(tl.float32)
    return tl.max((x - x != 0).to(tl.int32), axis=0)  # x - x is NaN for NaN and for +-inf


@triton.jit(do_not_specialize=["n"])  # (see _common.flat_block)
def _probe_kernel(x_ptr, n, flag_ptr, loss_ptr, HAS_LOSS: tl.constexpr, BLOCK: tl.constexpr):
    pid, offs, left = flat_block(n, BLOCK)
    bad = run_chunk(_chunk_probe, left, BLOCK, (x_ptr + offs,))
    if HAS_LOSS and pid == 0:
        loss = tl.load(loss_ptr)
        bad = tl.maximum(bad, (loss - loss != 0).to(tl.int32))
    if bad != 0:
        tl.store(flag_ptr, 1.0)


def probe(x, flag, loss=None) -> None:
    """Set ``flag`` (0-dim fp32, on ``x``'s device) to 1 if ``x`` or ``loss`` (a 0-dim tensor on
    the same device, or None) holds a NaN or an infinity; otherwise leave it as it is."""
    n = x.numel()
    if n == 0 and loss is None:
        return
    with on_device(x):
        _probe_kernel[grid(max(n, 1))](
            x, n, flag, loss if loss is not None else flag, HAS_LOSS=loss is not None, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
