"""What a LABPAL run carries from call to call and saves in its checkpoints: the schedule's
counters, the step in use and its history. Each field carries the check a checkpoint's value
must pass (:mod:`salsa_fast.checks`)."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import count, flag, optional_positive, positives


@dataclass
class Scalars:
    """The schedule's counters, the step in use and its history (each field with the check a
    checkpoint's value must pass)."""

    calls: int = count()  # step() calls (the schedule's clock)
    updates: int = count()  # parameter updates (training ones and the one ending a measurement)
    since_measurement: int = count()  # updates since the last finished measurement
    k: int = count(1, low=1)  # training batch size, in inference batches
    schedule_index: int = count()  # next batch-size schedule entry
    measuring: bool = flag(True)  # the first call measures
    warmup_measured: bool = flag(False)
    accumulated: int = count()  # calls in the current training batch
    step: float | None = optional_positive()  # the step length in use (NSGD updates; every measurement's update)
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
