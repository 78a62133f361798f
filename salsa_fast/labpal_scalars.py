"""LABPAL's numbers, checked: its arguments (:func:`settings`), and what a run carries from call
to call and saves in its checkpoints (:class:`Scalars`: the schedule's counters, the step in
use and its history), each field with the check a checkpoint's value must pass
(:mod:`salsa_fast.checks`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .checks import check, count, flag, is_int, is_real, optional_positive, positive, positives
from .distributed import resolve_group
from .labpal_parabola import H

TRUSTED_NORM = (1e-3, 100.0)  # directions with a norm outside are not measured (hard-coded there)


def _int_from(low: int):
    return lambda x: is_int(x) and x >= low


# LABPAL's arguments, in the order they are checked: (the test, what a valid one is)
_RULES = {
    "mode": (lambda x: x in ("nsgd", "sgd"), "must be 'nsgd' or 'sgd'"),
    "training_set_size": (_int_from(1), "must be an int > 0"),
    "batch_size": (_int_from(1), "must be an int > 0"),
    "update_step_adaptation": (positive, "must be > 0"),
    "momentum": (lambda x: is_real(x) and 0 <= x < 1, "must be in [0, 1)"),
    "reuse_steps": (_int_from(1), "must be an int >= 1"),
    "measure_batches": (_int_from(1), "must be an int >= 1"),
    "window": (_int_from(1), "must be an int >= 1"),
    "warmup_updates": (_int_from(0), "must be an int >= 0"),
    "sample_step": (lambda x: positive(x) and x > H, f"must be > {H}"),
    "max_step_size": (positive, "must be > 0"),
    "eps": (positive, "must be > 0"),
    "fit": (lambda x: x in ("reference", "exact"), "must be 'reference' or 'exact'"),
    "cap_sgd_updates": (lambda x: isinstance(x, bool), "must be a bool"),
    "trusted_norm": (
        lambda x: isinstance(x, (tuple, list)) and len(x) == 2 and all(map(is_real, x)) and 0 <= x[0] < x[1],
        "must be (low, high), 0 <= low < high",
    ),
}


def settings(a: dict[str, Any]) -> dict[str, Any]:
    """LABPAL's attributes from its arguments ``a`` (its ``__init__``'s locals), each checked
    first: a ``ValueError`` names the first that is invalid."""
    a = {**a, "mode": a["mode"].lower() if isinstance(a["mode"], str) else a["mode"]}
    for name, (ok, what) in _RULES.items():
        check(ok(a[name]), name, a[name], what)
    resolve_group(a["process_group"])  # a group without torch.distributed is a ValueError
    floats = ["update_step_adaptation", "momentum", "sample_step", "max_step_size", "eps"]
    kept = [
        "mode",
        "reuse_steps",
        "measure_batches",
        "warmup_updates",
        "window",
        "fit",
        "cap_sgd_updates",
        "process_group",
    ]
    return {
        **{name: a[name] for name in kept},
        **{name: float(a[name]) for name in floats},
        "noise_factor": (128 / a["batch_size"]) * (a["training_set_size"] / 40000),
        "batch_size_schedule": _schedule(a["batch_size_schedule"]),
        "trusted_norm": (float(a["trusted_norm"][0]), float(a["trusted_norm"][1])),
    }


def _schedule(entries) -> list[tuple[int, float]]:
    """The batch-size schedule's ``(call, multiplier)`` entries, checked and sorted."""
    try:
        schedule = sorted((int(t), float(m)) for t, m in entries)
    except (TypeError, ValueError):
        raise ValueError(f"invalid batch_size_schedule={entries!r}: (call, multiplier) pairs") from None
    ok = all(t >= 0 and m > 0 for t, m in schedule)
    check(ok, "batch_size_schedule", entries, "calls must be >= 0 and multipliers > 0")
    return schedule


@dataclass
class Scalars:
    """The schedule's counters, the step in use and its history (each field with the check a
    checkpoint's value must pass)."""

    calls: int = count()  # step() calls (the schedule's clock)
    updates: int = count()  # parameter updates (training ones and the one ending a measurement)
    since_measurement: int = count()  # updates since the last finished measurement
    accumulation: int = count(1, low=1)  # calls averaged into one update (the training batch, in inference batches)
    schedule_index: int = count()  # next batch-size schedule entry
    measuring: bool = flag(True)  # the first call measures
    warmup_measured: bool = flag(False)
    accumulated: int = count()  # calls in the current training batch (up to accumulation)
    step_size: float | None = optional_positive()  # the step length in use (NSGD updates; every measurement's update)
    lr: float | None = optional_positive()  # the SGD learning rate in use
    history: list[float] = positives()  # accepted step lengths after warm-up
    lr_history: list[float] = positives()  # the matching learning rates
    measurements: int = count()  # finished measurements (accepted or not)
    abandoned: int = count()  # measurements given up at the direction check
    rejected: int = count()  # parabolas that were not convex with a descending slope
    rescaled: int = count()  # measurements whose fit was taken farther out on the line than the reference's
    forwards: int = count()
    backwards: int = count()
    skipped: int = count()  # training updates skipped for a non-finite direction
