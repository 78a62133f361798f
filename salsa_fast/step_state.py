"""The numbers of a step that live on the device: the step count, Adam's bias corrections, the
non-finite flag, and the count of steps the device skipped (:class:`SkipLedger`, which LABPAL
keeps for its updates too).

On CUDA a non-search step must not sync, so the host cannot know whether the device skipped it
(a non-finite loss or gradient). What that decision changes is therefore kept on the device,
the way torch's ``capturable`` Adam keeps its ``step``: the kernels read the bias corrections
from here, and a skipped step counts itself here, so the next steps correct with the true step
count without the host knowing. The host keeps its own counters (``step``, ``since_search``)
one ahead per unread skip and subtracts them when it reads the count: at the next search's one
sync, in ``state_dict()``, or after every step on CPU, where reading is free. Until then
``last_step.skipped`` says False and no warning has been issued.

One :class:`StepState` per device; every bucket on the device reads it (``Hyper.state``).
"""

from __future__ import annotations

import math

import torch


class SkipLedger:
    """The steps (SaLSA) or updates (LABPAL) a device skipped that the host has not counted yet:
    the device records them without a sync, the host reads the count along with a number it
    must read anyway (a search's or a measurement's one sync, or ``state_dict()``), so reading
    ``stats`` never syncs.

    Kept between steps (8 bytes):
        minus_skipped: fp64 0-dim, minus the uncounted skips (negative, so that SaLSA's step
            count is one ``add``; SaLSA's Triton update decrements it itself).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.minus_skipped = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def record(self, skipped: torch.Tensor) -> None:
        """One more skip where ``skipped`` (a 0-dim device tensor: 0 or 1, or a bool) is set."""
        self.minus_skipped.sub_(skipped.to(self.minus_skipped.dtype) if skipped.dtype == torch.bool else skipped)

    def read_skipped(self) -> torch.Tensor:
        """The uncounted skips as a 0-dim fp64 tensor (to be read with some other number)."""
        return self.minus_skipped.neg()

    def counted(self) -> None:
        """The host has counted the skips it read."""
        self.minus_skipped.zero_()


class StepState(SkipLedger):
    """The device-resident per-step numbers of one device: the ledger of skipped steps, and
    what a step's kernels read.

    Kept between steps (8 bytes: ``keep_backup=False`` stays at Adam's memory):
        minus_skipped: fp64 0-dim, minus the number of steps the device skipped and the host
            has not counted yet (negative so that one ``add`` gives the step count).
    Made by :meth:`begin` for one step and dropped by :meth:`end`:
        flag: fp32 0-dim, 1 when this step's loss or a gradient is not finite (the probes set it).
        bias_step: fp64 0-dim, the step count the bias corrections use this step.
        pow1, pow2: fp64 0-dim, ``beta1 ** bias_step`` and ``beta2 ** bias_step``; the bias
            corrections are ``1 - pow`` (``corr1``, ``corr2``; the kernels compute them in fp64).
    """

    def __init__(self, device: torch.device, beta1: float, beta2: float) -> None:
        super().__init__(device)
        self.beta1, self.beta2 = beta1, beta2
        self.end()

    @torch.no_grad()
    def begin(self, bias_step: float) -> None:
        """A new step whose host-side count is ``bias_step``: a clear flag, and the powers for
        the device's count (the host's minus the skips it has not counted). Four small ops, no
        sync; with no skip pending they equal the host's ``beta ** bias_step`` bit for bit."""
        self.flag = torch.zeros((), dtype=torch.float32, device=self.device)
        self.bias_step = torch.add(self.minus_skipped, bias_step)
        self.pow1 = torch.pow(self.beta1, self.bias_step)
        self.pow2 = torch.pow(self.beta2, self.bias_step)
        self._corr = None

    def end(self) -> None:
        """The step is over: drop its numbers (nothing but the count is kept between steps)."""
        self.flag = self.bias_step = self.pow1 = self.pow2 = self._corr = None

    @property
    def corr1(self) -> torch.Tensor:
        return self._corrections()[0]

    @property
    def corr2(self) -> torch.Tensor:
        return self._corrections()[1]

    def _corrections(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._corr is None:
            self._corr = (torch.rsub(self.pow1, 1), torch.rsub(self.pow2, 1))
        return self._corr

    def count_skip(self) -> None:
        """Count this step as skipped if its flag is set (the Triton kernels do it themselves)."""
        self.record(self.flag)

    @classmethod
    def at(cls, device, beta1: float, beta2: float, bias_step: float) -> StepState:
        """A state for passes called on their own (tests, benchmarks): ``bias_step`` set."""
        state = cls(torch.device(device), beta1, beta2)
        state.begin(bias_step)
        return state


class DeviceSteps:
    """The :class:`StepState` of every device the buckets live on, used together.

    The first device's state holds the count of skips (the first bucket on each device counts a
    skip in its own device's state, and every device sees the same flag, so all counts agree)."""

    def __init__(self, devices, beta1: float, beta2: float, old: DeviceSteps | None = None) -> None:
        kept = old.states if old is not None else {}
        self.states = {d: kept.get(d) or StepState(d, beta1, beta2) for d in devices}
        self.first = next(iter(self.states.values()), None)  # (None: no parameter trains for now)
        self.set_betas(beta1, beta2)

    def set_betas(self, beta1: float, beta2: float) -> None:
        for state in self.states.values():
            state.beta1, state.beta2 = beta1, beta2

    def begin(self, bias_step: float) -> None:
        for state in self.states.values():
            state.begin(bias_step)

    def end(self) -> None:
        for state in self.states.values():
            state.end()

    @torch.no_grad()
    def raise_flag(self, loss: torch.Tensor, grads_bad: torch.Tensor | None, probe, agree) -> None:
        """Set every device's flag when the loss or a gradient is not finite on any device or
        rank, without a sync. ``grads_bad`` is a GradScaler's finding (it checked every
        gradient); without one, ``probe(loss)`` probes every bucket's gradients (and the loss it
        is given, on the first device). ``agree(flag)`` takes the verdict of every rank."""
        first = self.first
        if loss.device.type == "cpu" and first.device.type != "cpu":  # a CPU loss: read for free
            if not math.isfinite(loss):
                first.flag.fill_(1.0)
            loss = None  # (the flag still goes through the agreement)
        elif loss.device != first.device:
            loss = loss.to(first.device, non_blocking=True)
        if grads_bad is None:
            probe(loss)
        else:
            torch.maximum(first.flag, grads_bad.to(first.flag.dtype), out=first.flag)
            if loss is not None:
                torch.maximum(first.flag, (~torch.isfinite(loss)).to(first.flag.dtype), out=first.flag)
        # one verdict for all devices (gathered on the first, sent back) and all ranks
        if len(self.states) > 1:
            torch.amax(torch.stack([st.flag.to(first.device) for st in self.states.values()]), out=first.flag)
        agree(first.flag)
        for state in self.states.values():
            if state is not first:
                state.flag.copy_(first.flag, non_blocking=True)

    def read_skipped(self) -> torch.Tensor:
        return self.first.read_skipped()

    def counted(self) -> None:
        for state in self.states.values():
            state.counted()
