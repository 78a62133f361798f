"""Backends: who runs the per-element passes over the flat buffers.

A backend is a module that implements :class:`Backend`: SaLSA's passes, each taking the step's
:class:`Hyper` with its device numbers, and LABPAL's. The choice never changes results beyond
float rounding.

* ``"torch"`` (:mod:`~salsa_fast.backends.torch_ops`): whole-buffer torch ops; runs everywhere.
* ``"triton"`` (:mod:`~salsa_fast.backends.triton_ops`): :mod:`salsa_fast.kernels`, on CUDA
  tensors (or CPU tensors under ``TRITON_INTERPRET=1``, for testing); a ``RuntimeError`` says
  why when it cannot run.
* ``"auto"``: Triton when every parameter is on CUDA and Triton imports, torch otherwise.

The search bookkeeping both share (the backup, whether a search is active, its scratch) lives
on :class:`~salsa_fast.flat.FlatBucket`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

if TYPE_CHECKING:
    from ..flat import FlatBucket
    from ..step_state import StepState

__all__ = ["NAMES", "Backend", "Hyper", "resolve", "triton_unavailable_reason"]


class Hyper(NamedTuple):
    """Per-step constants shared by every bucket of one device: host floats, and the step's
    device-resident numbers (bias corrections, non-finite flag; see :mod:`salsa_fast.step_state`)."""

    beta1: float
    beta2: float
    eps: float
    direction: str  # "adam" | "sgd"
    use_mv: bool
    state: StepState  # on the buckets' device


class Backend(Protocol):
    """What a backend module provides. Each pass handles one bucket; none syncs with the host.

    ``lr_step`` is the group's ``lr`` times the step size; ``decay`` the weight-decay factor
    (``p0 * (1 - decay)``); a *point* is ``p = p0 * (1 - decay) - lr_step * d``, with ``p0`` the
    parameters at the step's start and ``d`` the search direction (or the momentum direction).
    """

    name: str

    # -- SaLSA, every step
    def probe(self, b: FlatBucket, hyper: Hyper, loss: torch.Tensor | None = None) -> None:
        """Raise ``hyper.state.flag`` if a gradient of ``b`` (or ``loss``) is not finite."""

    def plain_step(
        self, b: FlatBucket, *, lr_step: float, decay: float, hyper: Hyper, count_skip: bool = False
    ) -> None:
        """An Adam (or SGD) step with the moments updated; nothing where ``hyper.state.flag`` is
        set (``count_skip``: then count the skip in ``hyper.state``, once per device and step)."""

    # -- SaLSA's search with a backup (keep_backup=True; see salsa_fast.salsa_line.BackupLine)
    def backup_begin(self, b: FlatBucket, *, lr_step: float, decay: float, hyper: Hyper) -> torch.Tensor:
        """Back up ``p``, build the search direction from the would-be moments, write the first
        point; returns ``sum(g * d)`` (0-dim). The moments are not written."""

    def backup_trial(self, b: FlatBucket, *, lr_step: float, decay: float, hyper: Hyper) -> None:
        """Write another point from the backup."""

    def backup_momentum_point(self, b: FlatBucket, *, lr_step: float, decay: float, hyper: Hyper) -> None:
        """Write the point along the momentum direction (the search's fallback)."""

    # -- SaLSA's search without a backup (keep_backup=False; see salsa_fast.salsa_line.MovingLine)
    def moving_begin(self, b: FlatBucket, *, hyper: Hyper) -> torch.Tensor:
        """``sum(g * d)`` (0-dim); the parameters are not touched."""

    def moving_move(self, b: FlatBucket, *, mode: int, momentum: bool, s: float, decay: float, hyper: Hyper) -> None:
        """One move of ``p`` along the search (``momentum``: the momentum) direction, ``mode``
        ``FIRST`` (from ``p0``), ``MOVE`` (along the line) or ``RESTORE`` (back to ``p0``)."""

    # -- the end of either search
    def search_commit(self, b: FlatBucket, *, hyper: Hyper) -> None:
        """The search is decided: write the moments, end the search (``p`` stays)."""

    # -- LABPAL (``D = src / count + momentum * exp_avg``, rebuilt by every pass)
    def labpal_sums(
        self, b: FlatBucket, src: torch.Tensor, *, count: int, momentum: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||D||^2, <d, D>)`` as 0-dim fp64 tensors."""

    def labpal_update(
        self,
        b: FlatBucket,
        src: torch.Tensor,
        *,
        count: int,
        momentum: float,
        scale: float,
        coef: torch.Tensor | None,
        ok: torch.Tensor | None,
        write_buffer: bool = True,
    ) -> None:
        """``p -= scale * coef * D``; the momentum buffer becomes ``D``; nothing where ``ok`` is False."""

    def labpal_point(
        self,
        b: FlatBucket,
        src: torch.Tensor,
        *,
        count: int,
        momentum: float,
        scale: float,
        save_backup: bool,
        write_buffer: bool,
    ) -> None:
        """``p = backup - scale * D`` (``save_backup``: first ``backup = p``)."""


NAMES = ("auto", "triton", "torch")
FIRST, MOVE, RESTORE = 0, 1, 2  # moving_move's modes: p = p*(1-decay) - s*d;  p -= s*d;  p = (p + s*d) / (1-decay)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(devices: Iterable[torch.device]) -> str | None:
    """Why the Triton backend cannot run on these devices, or None if it can."""
    for device in devices:
        if device.type == "cuda":
            continue
        if device.type == "cpu" and _interpreting():
            continue
        return (
            f"its kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
            f"and some parameters are on {device}"
        )
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"Triton does not import ({e}); pip install triton"
    return None


def resolve(name: str, devices: Iterable[torch.device]) -> Backend:
    """The backend module for ``name`` (one of :data:`NAMES`) on the parameters' devices."""
    from . import torch_ops

    devices = list(devices)
    if name == "torch":
        return torch_ops
    if name == "auto" and not all(d.type == "cuda" for d in devices):
        return torch_ops
    reason = triton_unavailable_reason(devices)
    if reason is not None:
        if name == "auto":
            return torch_ops
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    from . import triton_ops

    return triton_ops
