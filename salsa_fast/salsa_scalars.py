"""What a SaLSA run carries from step to step and saves in its checkpoints (each field with the
check a checkpoint's value must pass, :mod:`salsa_fast.checks`), what one step reports, the
records the phases of one step hand each other, and the checks of SaLSA's arguments."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .checks import check, count, finite, is_int, is_real

# Keys that are properties of the whole search and cannot differ between param groups.
SEARCH_KEYS = ("init_step_size", "c", "momentum", "speed_up", "use_mv", "direction", "growth", "decrease", "eps")
SETUP_KEYS = ("max_backtracks", "max_interval", "backend", "process_group", "grad_scaler", "keep_backup")
GLOBAL_KEYS = frozenset(SEARCH_KEYS + SETUP_KEYS)


def checked_betas(momentum) -> tuple[float, float, float]:
    """``momentum`` as ``(beta1, beta2, beta3)``, each in [0, 1), or a ``ValueError`` naming it."""
    try:
        betas = tuple(float(b) for b in momentum)
    except (TypeError, ValueError):
        betas = ()
    check(len(betas) == 3, "momentum", momentum, "must be three floats (beta1, beta2, beta3)")
    for i, beta in enumerate(betas, 1):
        check(0.0 <= beta < 1.0, f"momentum (beta{i})", momentum, f"beta{i} must be in [0, 1)")
    return betas


def check_arguments(init_step_size, c, weight_decay, direction, growth, decrease, eps, max_backtracks, max_interval):
    """A ``ValueError`` naming the first of SaLSA's search arguments out of its range."""
    check(is_real(init_step_size) and init_step_size > 0, "init_step_size", init_step_size, "must be > 0")
    check(is_real(c) and c > 0, "c", c, "must be > 0")
    check(is_real(eps) and eps > 0, "eps", eps, "must be > 0")
    check(is_real(weight_decay) and weight_decay >= 0, "weight_decay", weight_decay, "must be >= 0")
    check(is_real(growth) and growth > 1 and math.isfinite(growth), "growth", growth, "must be > 1")
    check(is_real(decrease) and 0 < decrease < 1, "decrease", decrease, "must be in (0, 1)")
    check(is_int(max_backtracks) and max_backtracks >= 1, "max_backtracks", max_backtracks, "must be an int >= 1")
    check(is_real(max_interval) and max_interval > 0, "max_interval", max_interval, "must be > 0")
    check(direction in ("adam", "sgd"), "direction", direction, "must be 'adam' or 'sgd'")


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
    """What the last ``step()`` did (``SaLSA.last_step``).

    Attributes:
        searched: it ran a line search.
        trials: closure calls without backward in this step.
        accepted: a trial met the criterion (False on non-search steps).
        skipped: the loss or a gradient was not finite: nothing was changed.
        step_size: the step size after this step.
        lr_scale: the largest group ``lr`` this step; its updates were ``lr_scale * step_size`` long.
    """

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
