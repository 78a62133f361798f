"""Backends: who runs SaLSA's per-element passes over the flat buffers.

A backend is a module with the functions of :mod:`salsa_fast.backends.torch_ops`
(``plain_step``, ``grad_sum``, ``search_begin``, ``search_trial``, ``search_momentum_point``,
``search_commit``, ``search_abort``). The choice never changes results beyond float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import torch

from . import torch_ops
from .torch_ops import Hyper

__all__ = ["NAMES", "Hyper", "resolve", "triton_unavailable_reason"]

NAMES = ("auto", "triton", "torch")


def triton_unavailable_reason(devices: Iterable[torch.device]) -> str | None:
    """Why the Triton backend cannot run on these devices, or None if it can."""
    return "the Triton kernels are not part of this build of salsa_fast yet"


def resolve(name: str, devices: Iterable[torch.device]) -> ModuleType:
    """The backend module for ``name`` (one of :data:`NAMES`) on the parameters' devices."""
    devices = list(devices)
    if name == "torch":
        return torch_ops
    reason = triton_unavailable_reason(devices)
    if name == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}; use backend='torch' or 'auto'")
        raise AssertionError("unreachable until the Triton backend exists")
    return torch_ops  # "auto": Triton for CUDA tensors once it can run, the torch backend otherwise
