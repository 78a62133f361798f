"""The Triton backend: each of SaLSA's passes is one kernel launch per flat buffer.

Same functions, same semantics as :mod:`salsa_fast.backends.torch_ops` (results agree to float
rounding); the kernels and their byte counts are in :mod:`salsa_fast.kernels`. Imported only
when the backend is chosen, so that ``TRITON_INTERPRET`` is read when the kernels are defined.
"""

from __future__ import annotations

import torch

from ..flat import FlatBucket
from ..kernels import labpal_passes, salsa_moving_search, salsa_plain_step, salsa_search
from ..kernels import probe as probe_kernel
from ..kernels.reduce import finish
from . import Hyper

name = "triton"

plain_step = salsa_plain_step.plain_step


def probe(b: FlatBucket, hyper: Hyper, loss: torch.Tensor | None = None) -> None:
    """Raise ``hyper.state.flag`` if a gradient of the bucket (or ``loss``) is not finite: one
    pass over the gradient buffer, no sync."""
    probe_kernel.probe(b.grad, hyper.state.flag, loss)


# the search with a backup (salsa_fast.salsa_line.BackupLine)
def backup_begin(b: FlatBucket, *, lr_step: float, decay: float, hyper: Hyper) -> torch.Tensor:
    b.ensure_backup()
    partials = salsa_search.first_pass(b, lr_step=lr_step, decay=decay, hyper=hyper)
    # Only now is there a backup to go back to: a launch that raised wrote nothing, and marking
    # the search active before it would make the abort copy an unwritten backup over p.
    b.backup_written()
    return finish(partials)


backup_trial = salsa_search.trial
backup_momentum_point = salsa_search.momentum_point

# the search without a backup (salsa_fast.salsa_line.MovingLine decides the moves)
moving_begin = salsa_moving_search.norm
moving_move = salsa_moving_search.move


def search_commit(b: FlatBucket, *, hyper: Hyper) -> None:
    salsa_search.commit(b, hyper=hyper)
    b.end_search()


# LABPAL's passes (see salsa_fast.backends.torch_ops for their contracts)
labpal_sums = labpal_passes.sums
labpal_update = labpal_passes.update
labpal_point = labpal_passes.point
