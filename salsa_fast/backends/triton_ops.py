"""The Triton backend: each of SaLSA's passes is one kernel launch per flat buffer.

Same functions, same semantics as :mod:`salsa_fast.backends.torch_ops` (results agree to float
rounding); the kernels and their byte counts are in :mod:`salsa_fast.kernels`. Imported only
when the backend is chosen, so that ``TRITON_INTERPRET`` is read when the kernels are defined.
"""

from __future__ import annotations

import torch

from ..flat import FlatBucket
from ..kernels import adam_step, labpal, lean_search, probe as probe_kernel, search
from ..kernels.reduce import finish
from . import Hyper

name = "triton"

plain_step = adam_step.plain_step


def probe(b: FlatBucket, h: Hyper, loss: torch.Tensor | None = None) -> None:
    """Raise ``h.state.flag`` if a gradient of the bucket (or ``loss``) is not finite: one pass
    over the gradient buffer, no sync."""
    probe_kernel.probe(b.grad, h.state.flag, loss)


def search_begin(b: FlatBucket, *, lr_step: float, decay: float, h: Hyper) -> torch.Tensor:
    b.ensure_backup()
    partials = search.first_pass(b, lr_step=lr_step, decay=decay, h=h)
    # Only now is there a backup to go back to: a launch that raised wrote nothing, and marking
    # the search active before it would make the abort copy an unwritten backup over p.
    b.backup_written()
    return finish(partials)


def search_trial(b: FlatBucket, *, lr_step: float, decay: float, h: Hyper) -> None:
    search.trial(b, lr_step=lr_step, decay=decay, h=h)


def search_momentum_point(b: FlatBucket, *, lr_step: float, decay: float, h: Hyper) -> None:
    search.momentum_point(b, lr_step=lr_step, decay=decay, h=h)


def search_commit(b: FlatBucket, *, h: Hyper) -> None:
    search.commit(b, h=h)
    b.end_search()


# the search without a backup (salsa_fast.salsa_line.MovingLine decides the moves)
lean_norm = lean_search.norm


lean_move = lean_search.move


# LABPAL's passes (see salsa_fast.backends.torch_ops for their contracts)
labpal_sums = labpal.sums
labpal_update = labpal.update
labpal_point = labpal.point
