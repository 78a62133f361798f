"""Backends: who runs SaLSA's per-element passes over the flat buffers.

A backend is a module with the functions of :mod:`salsa_fast.backends.torch_ops`
(``probe``, ``plain_step``, ``search_begin``, ``search_trial``, ``search_momentum_point``,
``search_commit``, ``search_abort``, ``lean_norm``, ``lean_trial``, ``lean_momentum_point``,
``lean_restore`` for SaLSA, each taking the step's :class:`Hyper` with its device numbers;
``labpal_sums``, ``labpal_update``, ``labpal_point`` for LABPAL). The choice never changes results
beyond float rounding.

* ``"torch"``: whole-buffer torch ops; runs everywhere.
* ``"triton"``: :mod:`salsa_fast.kernels`, on CUDA tensors (or CPU tensors under
  ``TRITON_INTERPRET=1``, for testing); a ``RuntimeError`` says why when it cannot run.
* ``"auto"``: Triton when every parameter is on CUDA and Triton imports, torch otherwise.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from types import ModuleType

import torch

from . import torch_ops
from .torch_ops import Hyper

__all__ = ["NAMES", "Hyper", "resolve", "triton_unavailable_reason"]

NAMES = ("auto", "triton", "torch")


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


def resolve(name: str, devices: Iterable[torch.device]) -> ModuleType:
    """The backend module for ``name`` (one of :data:`NAMES`) on the parameters' devices."""
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
