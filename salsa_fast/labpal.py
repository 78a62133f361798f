"""LABPAL: the large-batch parabolic approximation line search, on SaLSA's buffers.

LABPAL (Mutschler & Zell, arXiv 2108.13880) rarely measures the loss along one line with a
large batch (N inference batches), fits a parabola to three points on it, and reuses the step
it derives for many (default 1000) plain normalised-SGD or SGD updates. This implementation
follows the authors' reference implementation, with its defects fixed (see :class:`LABPAL`).
``salsa_fast/labpal_reference.py`` is the readable per-parameter twin the tests hold this class
to.

Closure contract: SaLSA's. One ``step(closure)`` call per inference batch; the closure takes
``backwards`` and returns that batch's loss. The optimizer calls it with ``backwards=True``
(training, and the first ``accumulation`` calls of a measurement) or ``False`` (the rest of a
measurement), and calls the stored closures of a measurement again at two other points on the
line (two more for each try farther out, see :class:`LABPAL`), each under the seed of its own
step, so dropout masks repeat.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ._flat_optimizer import FlatOptimizer
from .checks import check, is_real
from .closure import draw_seed
from .distributed import agree_on_loss, agree_on_sums, resolve_group
from .flat import FlatBucket
from .labpal_line import BackupLine, MovingLine
from .labpal_measurement import Measuring
from .labpal_parabola import H, parabola_step
from .labpal_scalars import TRUSTED_NORM, Scalars, settings
from .step_state import SkipLedger

__all__ = ["LABPAL", "parabola_step"]


class LABPAL(Measuring, FlatOptimizer):
    r"""Large-batch parabolic approximation line search.

    Args (reference name in parentheses):
        params: parameters or param-group dicts; a group's ``lr`` (default 1.0) multiplies the
            step in that group's updates (LR schedulers compose with it).
        mode: ``"nsgd"`` (normalised SGD: steps of length ``step_size`` along the unit
            direction) or ``"sgd"`` (steps ``learning_rate * direction``).
        training_set_size, batch_size: set the noise factor
            ``(128 / batch_size) * (training_set_size / 40000)``.
        update_step_adaptation: multiplies the measured step (1.8).
        momentum: heavy-ball momentum without dampening, shared by updates and measurements.
            Also a param-group entry, alike in every group, that schedulers with
            ``cycle_momentum`` move; a new value takes effect outside measurements.
        reuse_steps: updates between measurements (``amount_steps_to_reuse_lr``, 1000).
        measure_batches: inference batches per measurement per unit of ``accumulation``
            (``amount_batches_for_full_batch_loss_approximation``, 10).
        batch_size_schedule: ``(call, multiplier)`` entries; each sets
            ``accumulation = max(int(multiplier * noise_factor), 1)`` (the calls whose gradients
            are averaged into one update: the training batch, in inference batches) and forces a
            measurement.
        warmup_updates: updates that use each measured step directly
            (``amount_untrustworthy_initial_steps``, 400); after them a measurement is forced
            once, and steps are averaged over ``window`` measurements
            (``amount_of_former_lr_values_to_consider``, 25).
        sample_step: the second sample position on the line
            (``parabolic_approximation_sample_step_size``, 0.01); the first is ``H = 1.77e-4``.
        max_step_size: cap on the measured step before adaptation (1.0), and on how far out a
            measurement's samples may go (below).
        eps: floor of the step (``epsilon``, 1e-6).
        fit: ``"reference"`` (the reference's effective step) or ``"exact"``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, as for SaLSA.
        keep_backup: ``True`` keeps a copy of the parameters while measuring and writes each
            point on the line from it. ``False`` keeps none: the parameters move from point to
            point along ``D`` and back, one rounding per element per move (as SaLSA's).
        cap_sgd_updates: ``mode="sgd"`` only: no update is longer than the step in use, i.e.
            the rate applied is ``min(learning_rate, step_size / ||D||)``. ``False`` gives the
            reference's uncapped updates, which diverge on small MLPs (see docs/labpal.md).
        process_group: the ranks that must take the same decisions (default: the world, when
            torch.distributed is initialised): the line's losses are averaged over them and the
            direction's norm and slope summed over FSDP2 shards, as SaLSA's.
        trusted_norm: ``(low, high)``: a measurement whose direction norm ``||D||`` lies outside
            is abandoned while a step is in use, as the reference's are outside its hard-coded
            ``(1e-3, 100.0)``, the default; with none in use yet it is measured all the same
            (the reference crashed there). A loss summed rather than averaged has larger norms.

    Measuring farther out: a fit the reference rejects (``a <= 0`` or ``b >= 0``) while rounding,
    not the loss, could have decided it is fitted again on the same batches with both sample
    steps 10x longer (``2N`` more forwards), then 100x, the second never beyond ``max_step_size``
    (:func:`salsa_fast.labpal_parabola.fit_line`; ``stats["rescaled"]`` counts such measurements).
    Accepted fits and rejections that stand above the noise are the reference's. After 3
    measurements abandoned for their norm, or fits rejected, in a row, it warns once, naming the
    reason and the argument that changes it (``trusted_norm``, ``sample_step``, ``max_step_size``).

    The defects of the authors' implementation fixed here are listed, each with its test, in
    docs/labpal.md.
    """

    name = "LABPAL"
    entry = "labpal"
    Scalars = Scalars
    renamed_scalars = {"step": "step_size", "k": "accumulation"}  # (checkpoints of the previous release)
    global_keys = frozenset(
        [
            "mode",
            "training_set_size",
            "batch_size",
            "update_step_adaptation",
            "reuse_steps",
            "measure_batches",
            "batch_size_schedule",
            "warmup_updates",
            "window",
            "sample_step",
            "max_step_size",
            "eps",
            "fit",
            "cap_sgd_updates",
            "backend",
            "keep_backup",
            "weight_decay",
            "process_group",
            "trusted_norm",
        ]
    )
    per_group_hint = (
        "LABPAL measures one step for all groups (and has no weight decay), so only 'lr' (a multiplier "
        "on the step) may differ per group ('momentum' may be set, alike in every group, for schedulers)"
    )
    shared_across_groups = ("momentum",)
    shards = True

    def __init__(
        self,
        params,
        mode: str = "nsgd",
        training_set_size: int = 40000,
        batch_size: int = 128,
        update_step_adaptation: float = 1.8,
        momentum: float = 0.0,
        reuse_steps: int = 1000,
        measure_batches: int = 10,
        batch_size_schedule=((0, 1), (75000, 2), (112500, 4)),
        warmup_updates: int = 400,
        window: int = 25,
        sample_step: float = 0.01,
        max_step_size: float = 1.0,
        eps: float = 1e-6,
        *,
        fit: str = "reference",
        cap_sgd_updates: bool = True,
        backend: str = "auto",
        keep_backup: bool = True,
        process_group=None,
        trusted_norm=TRUSTED_NORM,
    ):
        self.__dict__.update(settings(locals()))  # mode, noise_factor, momentum, ...: see settings()
        self._scalars = Scalars()
        self._in_a_row = {"abandoned": 0, "rejected": 0}  # (for the warnings only: not saved)
        self._next_momentum: float | None = None  # a group's new momentum, applied between measurements
        super().__init__(params, dict(lr=1.0, momentum=self.momentum), backend=backend, keep_backup=keep_backup)
        self._pack()

    def _transient(self) -> dict[str, Any]:
        return {
            **super()._transient(),
            "_measurement": [],  # (closure, seed, loss at theta0) of each call of the measurement
            "_loss_eps": 0.0,  # the resolution (relative) of the measurement's loss dtype
            "_line_norm": None,  # ||D|| of the line being measured
            "_line_slope": None,  # its slope at theta0, -<d, D> / ||D||
            "_line": None,  # where the measurement puts the parameters (salsa_fast.labpal_line)
            "_ledger": None,  # the updates the device skipped, not yet read (made by the first that may be)
            "_unread_skips": False,  # a training update ran on the device path since the host last read the ledger
            "_at_start": None,  # (scalars, measurement) as the step found them (see _on_undo)
        }

    def _on_copy(self) -> None:
        """A copy restarts a measurement in progress, as a resumed run does (see _on_load)."""
        self._on_load()

    # -- buffers (the shell is salsa_fast._flat_optimizer) -----------------------------------------
    def _check_group_values(self, group: dict[str, Any], where: str) -> None:
        super()._check_group_values(group, where)
        if "momentum" in group:
            value = group["momentum"]
            check(is_real(value) and 0 <= value < 1, f"{where} 'momentum'", value, "must be in [0, 1)")

    def _init_group(self, group: dict[str, Any]) -> None:
        group["step_size"] = group["learning_rate"] = None

    def _on_shared(self, key: str, momentum: float) -> None:
        """The momentum follows the groups' (moved by schedulers that cycle momentum); a new
        value waits for the next update or measurement, so a measurement keeps its line."""
        self._next_momentum = float(momentum)

    def _state_buffers(self, b: FlatBucket) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": b.exp_avg, "accumulated_grad": self._acc(b)}

    def _on_repack(self) -> None:
        """The line the measurements move on (which keeps a backup or moves the parameters,
        chosen here once); the ledger of device-side skips is made anew where it is needed (the
        shell counted the old one's first); the warning for bf16/fp16 parameters."""
        line = BackupLine if self.keep_backup else MovingLine
        self._line = line(self._backend, self._buckets)
        self._ledger = None
        if any(b.dtype in (torch.bfloat16, torch.float16) for b in self._buckets):
            self._warn_once(
                "low-precision",
                "LABPAL with bf16/fp16 parameters: the reference's first sample on the line moves the "
                f"parameters by {H} in all, below those dtypes' resolution, so measurements are fitted "
                "farther out (2N more forward passes each, stats['rescaled']), and steps and updates round "
                "to the parameters' precision. fp32 parameters (autocast the forward pass) measure as "
                "the reference does.",
            )

    @staticmethod
    def _acc(b: FlatBucket) -> torch.Tensor:
        """The bucket's running sum of the gradients of the current (training or measuring) batch."""
        acc = b.workspace.get("acc")
        if acc is None:
            acc = b.workspace["acc"] = torch.zeros(b.numel, dtype=b.state_dtype, device=b.device)
        return acc

    # -- diagnostics -----------------------------------------------------------------------------
    @property
    def step_size(self) -> float | None:
        """The step length in use along the unit direction (NSGD updates, and the update ending
        each measurement); None until a measurement is accepted."""
        return self._scalars.step_size

    @property
    def learning_rate(self) -> float | None:
        """The SGD learning rate in use: each accepted step length over the direction norm it
        was measured with, averaged like the step lengths; None until a measurement is accepted."""
        return self._scalars.lr

    @property
    def measuring(self) -> bool:
        """Whether a measurement is under way (the next calls re-evaluate its line)."""
        return self._scalars.measuring

    def _fold_pending_skips(self) -> None:
        """Count the updates the device skipped since the host last read them (one sync, only if
        a training update ran on the device path since then): for ``state_dict()`` and copies."""
        if self._unread_skips:
            self._count_device_skips(int(self._ledger.read_skipped().item()))

    def _count_device_skips(self, n: int) -> None:
        """The device skipped ``n`` training updates the host has not counted: count them (they
        stay counted in ``updates``, as the host took them)."""
        self._unread_skips = False
        if n:
            self._scalars.skipped += n
            self._ledger.counted()

    @property
    def stats(self) -> dict[str, float]:
        """Counters; reading them never syncs. On CUDA a non-finite direction is skipped on the
        device, so that update still counts in ``updates`` (and towards ``reuse_steps``), and
        ``skipped_updates`` counts it as of the host's last read: the next measurement's
        direction check or ``state_dict()``. On CPU a skipped update is counted at once, and not
        in ``updates``."""
        s = self._scalars
        return {
            "step_size": s.step_size if s.step_size is not None else float("nan"),
            "learning_rate": s.lr if s.lr is not None else float("nan"),
            "measuring": float(s.measuring),
            "accumulation": s.accumulation,
            "calls": s.calls,
            "updates": s.updates,
            "measurements": s.measurements,
            "abandoned": s.abandoned,
            "rejected": s.rejected,
            "rescaled": s.rescaled,
            "forwards": s.forwards,
            "backwards": s.backwards,
            "skipped_updates": s.skipped,
        }

    # -- the step --------------------------------------------------------------------------------
    @torch._disable_dynamo  # (under torch.compile: one graph break, as SaLSA's step)
    def step(self, closure=None):  # type: ignore[override]
        """One inference batch: a training call or a measurement call.

        Args:
            closure: called as ``closure(backwards=True)`` or ``closure(backwards=False)``, as for
                SaLSA; it must hold on to its own batch (a measurement calls it again later).

        Returns:
            What the closure returned.

        Raises:
            TypeError: no closure, or one that cannot be called with ``backwards``.
            ValueError: the closure's loss is not a scalar.
        """
        if not self._begin_step(closure):
            return self._idle_step(closure)
        # what the schedule may change before the closure runs (the list is only ever replaced)
        self._at_start = replace(self._scalars), self._measurement
        self._apply_schedule()
        self._measure_when_due()
        self._follow_momentum()
        out = self._measure(closure) if self._scalars.measuring else self._train(closure)
        self._end_call()
        return out

    def _on_undo(self) -> None:
        """The step's closure raised before anything moved: back to the scalars and the
        measurement the step found."""
        self._scalars, self._measurement = self._at_start

    def _apply_schedule(self) -> None:
        """Fire every schedule entry whose call has come (``>=``: none is ever skipped): each
        sets the accumulation and starts a measurement."""
        s = self._scalars
        schedule = self.batch_size_schedule
        while s.schedule_index < len(schedule) and schedule[s.schedule_index][0] <= s.calls:
            _, multiplier = schedule[s.schedule_index]
            s.accumulation = max(int(multiplier * self.noise_factor), 1)
            s.schedule_index += 1
            self._start_measurement()

    def _measure_when_due(self) -> None:
        """Start a measurement once after the warm-up's updates, and after every ``reuse_steps``
        updates since the last one."""
        s = self._scalars
        if s.measuring:
            return
        warmup_over = not s.warmup_measured and s.updates == self.warmup_updates + 1
        if warmup_over or s.since_measurement >= self.reuse_steps:
            s.warmup_measured = s.warmup_measured or warmup_over
            self._start_measurement()

    def _follow_momentum(self) -> None:
        """A new momentum from the groups takes effect now, unless a measurement is under way
        (its points must lie on one line)."""
        if self._next_momentum is not None and not (self._scalars.measuring and self._measurement):
            self.momentum, self._next_momentum = self._next_momentum, None

    def _end_call(self) -> None:
        """Count the call; every group shows the step and the learning rate in use (for loggers)."""
        s = self._scalars
        s.calls += 1
        for group in self.param_groups:
            group["step_size"], group["learning_rate"] = s.step_size, s.lr

    def _gradient_call(self, closure) -> tuple[object, torch.Tensor, int]:
        """The closure with backward (a None gradient counts as zero); its gradient added to the
        batch's sum where one is kept. Returns its output, its loss and its seed."""
        seed = draw_seed()
        out, loss = self._first_call(closure, seed)
        s = self._scalars
        s.forwards += 1
        s.backwards += 1
        if self._accumulating():  # (the batch's first gradient is copied: no zeroing between sums)
            first = (len(self._measurement) if s.measuring else s.accumulated) == 0
            for b in self._buckets:
                self._acc(b).copy_(b.grad) if first else self._acc(b).add_(b.grad)
        return out, loss, seed

    def _accumulating(self) -> bool:
        """Whether the batch's gradient is summed in the ``acc`` buffer: for several inference
        batches, and during a measurement (its direction must outlive the next zero_grad()).
        Training with an accumulation of 1 reads the gradient buffer itself."""
        return self._scalars.accumulation > 1 or self._scalars.measuring

    def _source(self, b: FlatBucket) -> torch.Tensor:
        """The gradient sum the direction is built from: ``acc``, or the gradient itself."""
        return self._acc(b) if self._accumulating() else b.grad

    def _direction_sums(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``||D||`` and ``<d, D>`` over all buckets and ranks (fp64 tensors on the first
        bucket's device, no sync), where ``d`` is the mean gradient of ``count`` batches and
        ``D = d + momentum * buf``."""
        dev = self._buckets[0].device
        sums = {False: torch.zeros(2, dtype=torch.float64, device=dev)}  # by whether the bucket holds shards
        sums[True] = sums[False].clone()
        for b in self._buckets:
            bucket_sums = self._backend.labpal_sums(b, self._source(b), count=count, momentum=self.momentum)
            sums[b.sharded] += torch.stack(bucket_sums).to(dev)
        sq, dot = agree_on_sums(resolve_group(self.process_group), sums[False], sums[True])
        return sq.sqrt(), dot

    def _agreed(self, loss) -> float:
        """A closure's loss averaged over the ranks (each computes its share of the batch)."""
        group = resolve_group(self.process_group)
        if group is None:
            return float(loss)
        return float(agree_on_loss(group, torch.as_tensor(loss).to(self._buckets[0].device, torch.float64).clone()))

    # -- training ----------------------------------------------------------------------------------
    def _train(self, closure):
        """One training call: its gradient joins the batch's; the batch's last call updates."""
        s = self._scalars
        out, _, _ = self._gradient_call(closure)
        s.accumulated += 1
        if s.accumulated >= s.accumulation:
            self._train_update()
            s.accumulated = 0
        return out

    def _train_update(self) -> None:
        """The training batch's update, unless its direction is not finite (or zero). On CPU the
        host reads that at once and skips the update; on the device path (CUDA) the device skips
        it without a sync and notes it in the ledger, and the host counts the update as taken."""
        s = self._scalars
        norm, _ = self._direction_sums(s.accumulated)
        ok = torch.isfinite(norm) & (norm > 0)
        if self._host_checks and not bool(ok):
            s.skipped += 1
            return
        self._update(s.accumulated, norm, None if self._host_checks else ok)
        s.updates += 1  # on CUDA also when skipped on the device: see stats
        s.since_measurement += 1
        if not self._host_checks:
            self._skip_ledger().record(~ok)
            self._unread_skips = True

    def _skip_ledger(self) -> SkipLedger:
        """The count of updates the device skipped and the host has not read, on the first
        bucket's device: 8 bytes, made by the first update the device may skip (on the host
        path, CPU, there is none)."""
        if self._ledger is None:
            self._ledger = SkipLedger(self._buckets[0].device)
        return self._ledger

    @torch.no_grad()
    def _update(self, count: int, norm: torch.Tensor, ok: torch.Tensor | None) -> None:
        """A training update: NSGD ``p -= lr_g * step * D / ||D||``; SGD ``p -= lr_g * lr * D``
        (the rate capped at ``step / ||D||`` with ``cap_sgd_updates``); the rate is computed on
        the device (no sync). The momentum buffer becomes ``D``. Where ``ok`` is False (CUDA: a
        non-finite direction) nothing changes."""
        s = self._scalars
        rate = None  # a device scalar that multiplies lr_g, or None for a host rate
        if self.mode == "nsgd" or self.cap_sgd_updates:
            rate = s.step_size / norm.clamp_min(torch.finfo(norm.dtype).tiny)
            if self.mode == "sgd":
                rate = rate.clamp(max=s.lr)
        for b in self._buckets:
            lr = float(self.param_groups[b.group_index]["lr"])
            scale = lr if rate is not None else lr * s.lr
            coef = None if rate is None else rate.to(b.device)
            b_ok = None if ok is None else ok.to(b.device)
            self._backend.labpal_update(
                b, self._source(b), count=count, momentum=self.momentum, scale=scale, coef=coef, ok=b_ok
            )

    # -- state_dict (saved and loaded by the shell, as a "labpal" entry beside torch's layout) ----
    def _saved_scalars(self, state_dict: dict[str, Any]) -> Any:
        """Checkpoints from before ``rescaled`` was counted: none was. (Those from before
        ``step_size`` and ``accumulation`` were so named hold ``step`` and ``k``:
        :attr:`renamed_scalars`.)"""
        saved = super()._saved_scalars(state_dict)
        return {"rescaled": 0, **saved} if isinstance(saved, dict) else saved

    def _on_load(self) -> None:
        """The loaded run's counts replace ours, the device's unread skips included; a
        checkpoint taken in the middle of a measurement restarts that measurement (its closures
        cannot be saved; the parameters are still at its starting point)."""
        if self._unread_skips:
            self._ledger.counted()
            self._unread_skips = False
        if self._scalars.measuring:
            self._start_measurement()
