"""The one surface this project's tests and benchmarks use to look inside an optimizer, and to
drive on a CPU the bookkeeping a GPU runs. Not the training API: what it shows follows the
internals, and changes with them.

    from salsa_fast import testing

    testing.buckets(opt)           # the flat buckets (salsa_fast.flat.FlatBucket): params, grad, exp_avg, ...
    testing.backend(opt)           # the backend module that runs the passes
    testing.scalars(opt)           # the run's scalars, live (what state_dict() saves in its entry)
    testing.line(opt)              # where searches (SaLSA) or measurements (LABPAL) put the parameters
    testing.measurement(opt)       # LABPAL: (closure, seed, loss) of each call of the measurement so far
    with testing.line_points(opt) as points:  # LABPAL: the points its measurements put the parameters at
        ...                                    # (x of each, theta0 - x * D / ||D||, in order)
    testing.attach_grads(opt)      # the flat gradient views attached, as the first step attaches them
    testing.defer_host_reads(opt)  # CPU: read the device's count of skipped steps (updates) only when CUDA would
    with testing.undone_searches(opt) as undone:  # SaLSA: searches taken back before they moved
        ...                                        # (len(undone) of them, so far)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch.optim import Optimizer

__all__ = [
    "buckets",
    "backend",
    "scalars",
    "line",
    "measurement",
    "line_points",
    "attach_grads",
    "defer_host_reads",
    "undone_searches",
]


def buckets(opt: Optimizer) -> list:
    """The optimizer's flat buckets, one per (param group, device, dtype) with a trainable parameter."""
    return list(opt._buckets)


def backend(opt: Optimizer):
    """The backend module (``salsa_fast.backends.torch_ops`` or ``triton_ops``) running the passes."""
    return opt._backend


def scalars(opt: Optimizer) -> Any:
    """The run's scalars: the live dataclass (``salsa_fast.salsa_scalars.Scalars`` or LABPAL's)."""
    return opt._scalars


def line(opt: Optimizer):
    """The line the optimizer moves the parameters on: SaLSA's searches (``salsa_fast.salsa_line``)
    or LABPAL's measurements (``salsa_fast.labpal_line``); a ``BackupLine`` or, with
    ``keep_backup=False``, a ``MovingLine``."""
    return opt._line


def measurement(opt: Optimizer) -> list:
    """LABPAL: ``(closure, seed, loss)`` of each call of the measurement in progress (empty
    between measurements)."""
    return list(opt._measurement)


@contextlib.contextmanager
def line_points(opt: Optimizer) -> Iterator[list[float]]:
    """LABPAL: within the block, each point on the measured line that ``opt`` puts the
    parameters at (``theta0 - x * D / ||D||``, before evaluating the measurement's closures
    there) appends its ``x`` to the list yielded; the closing update is no such point."""
    points: list[float] = []
    line = type(opt._line)
    to = line.to

    def counted(self, x):
        if self is opt._line:
            points.append(x)
        return to(self, x)

    line.to = counted
    try:
        yield points
    finally:
        line.to = to


def attach_grads(opt: Optimizer) -> None:
    """Bring the parameters' gradients into the flat buffers and attach the views, as the first
    step after packing does (e.g. to time a pass without a step before it)."""
    opt._adopt_grads()


def defer_host_reads(opt: Optimizer, defer: bool = True) -> None:
    """On CPU tensors reading a device number is free, so the optimizer reads the count of
    steps (SaLSA) or updates (LABPAL) the device skipped after every step. ``defer=True`` makes
    it wait as it must on CUDA (until the next search's or measurement's sync, or
    ``state_dict()``): the CUDA path's bookkeeping, on a CPU."""
    opt._host_checks = not defer


@contextlib.contextmanager
def undone_searches(opt: Optimizer) -> Iterator[list]:
    """Within the block, each search of ``opt`` that goes back to the step's start before the
    step ends (a non-finite loss or gradient, a search no longer due, a closure that raises)
    appends to the list yielded."""
    undone: list = []
    line = type(opt._line)
    back = line.back

    def counted(self):
        if self is opt._line:
            undone.append(True)
        return back(self)

    line.back = counted
    try:
        yield undone
    finally:
        line.back = back
