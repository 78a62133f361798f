"""What a SaLSA run carries from step to step and saves in its checkpoints (each field with the
check a checkpoint's value must pass, :mod:`salsa_fast.checks`), what one step reports, and the
records the phases of one step hand each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .checks import count, finite


@dataclass
class Scalars:
    """Every global scalar of the algorithm and the run's counters (all host numbers)."""

    step_size: float = finite(1.0, 0.0, strict=True)  # eta: the step size the last search accepted
    steps: int = count()  # k: steps taken (skipped steps excluded)
    decrease_avg: float = finite(0.0)  # h: smoothed loss decrease
    norm_avg: float = finite(0.0, 0.0)  # s: smoothed preconditioned gradient norm
    step_size_slow: float = finite(1e-8, 0.0, strict=True)
    step_size_fast: float = finite(1e-8, 0.0, strict=True)
    since_search: int = count(100)
    forwards: int = count()  # closure calls
    backwards: int = count()  # closure calls with backwards=True
    searches: int = count()
    trials: int = count()
    skipped: int = count()  # non-finite steps skipped


@dataclass(frozen=True)
class StepInfo:
    """What the last ``step()`` did (``SaLSA.last_step``)."""

    searched: bool = False  # it ran a line search
    trials: int = 0  # closure calls without backward in this step
    accepted: bool = False  # a trial met the criterion (False on non-search steps)
    skipped: bool = False  # non-finite loss/gradient: nothing was changed
    step_size: float = float("nan")  # the step size after this step
    lr_scale: float = 1.0  # the largest group lr this step (its updates were lr_scale * step_size long)


class Writes(NamedTuple):
    """Per bucket (in bucket order): the multiplier of the step size in its writes, and its
    weight-decay factor (``p0 * (1 - decay)``)."""

    lrs: list[float]
    decays: list[float]


class Step(NamedTuple):
    """One step's inputs, as the phases of :meth:`salsa_fast.SaLSA.step` share them."""

    out: Any  # what the closure returned
    loss: torch.Tensor  # its loss (0-dim, detached)
    seed: int  # every closure call of the step runs under it
    number: int  # the step's number k (skips the device made that the host has not read included)
    update: Writes  # with each group's lr: the parameters' update
    search: Writes  # with each group's lr relative to the largest: trials and the criterion's norm
    lr_scale: float  # the largest lr (update = lr_scale * relative * step size)
    grads_bad: torch.Tensor | None  # a GradScaler's overflow verdict


class Found(NamedTuple):
    """What a search decided."""

    eta: float  # the new step size
    accepted: bool
    trials: int
    forwards: int  # closure calls of the step (the gradient pass included)
    norm_avg: float
    decrease_avg: float
