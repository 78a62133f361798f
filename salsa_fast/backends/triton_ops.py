"""The Triton backend: each of SaLSA's passes is one kernel launch per flat buffer.

Same functions, same semantics as :mod:`salsa_fast.backends.torch_ops` (results agree to float
rounding); the kernels and their byte counts are in :mod:`salsa_fast.kernels`. Imported only
when the backend is chosen, so that ``TRITON_INTERPRET`` is read when the kernels are defined.
"""

from __future__ import annotations

import torch

from ..flat import FlatBucket
from ..kernels import adam_step, labpal, lean_search, reduce, search
from ..kernels._common import grid
from . import lean
from .torch_ops import Hyper

name = "triton"


def plain_step(b: FlatBucket, *, lr_step: float, decay: float, h: Hyper, found_inf: torch.Tensor | None) -> None:
    adam_step.plain_step(b, lr_step=lr_step, decay=decay, h=h, found_inf=found_inf)


def grad_probe(b: FlatBucket) -> torch.Tensor:
    """The gradient buffer's sum (fp32 partials): finite iff every gradient is."""
    partials = reduce.partials_buffer(b.work, grid(b.numel)[0], b.state_dtype, b.device)
    return reduce.buffer_sum(b.grad, partials)


def search_begin(b: FlatBucket, *, lr_step: float, decay: float, h: Hyper) -> torch.Tensor:
    b.ensure_backup()
    b.search_active = True
    return search.first_pass(b, lr_step=lr_step, decay=decay, h=h)


def search_trial(b: FlatBucket, *, lr_step: float, decay: float, h: Hyper) -> None:
    search.trial(b, lr_step=lr_step, decay=decay, h=h)


def search_momentum_point(b: FlatBucket, *, lr_step: float, decay: float, h: Hyper) -> None:
    search.momentum_point(b, lr_step=lr_step, decay=decay, h=h)


def search_commit(b: FlatBucket, *, h: Hyper) -> None:
    search.commit(b, h=h)
    b.end_search()


def search_abort(b: FlatBucket) -> None:
    if b.search_active:
        b.copy_params_from(b.backup)
    b.end_search()


# the search without a backup (see salsa_fast.backends.lean)
lean_norm = lean_search.norm


lean_trial, lean_momentum_point, lean_restore = lean.passes(lean_search.move)


# LABPAL's passes (see salsa_fast.backends.torch_ops for their contracts)
labpal_sums = labpal.sums
labpal_update = labpal.update
labpal_point = labpal.point
