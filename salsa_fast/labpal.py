"""LABPAL: the large-batch parabolic approximation line search, on SaLSA's buffers.

LABPAL (Mutschler & Zell, arXiv 2108.13880) rarely measures the loss along one line with a
large batch (N inference batches), fits a parabola to three points on it, and reuses the step
it derives for many (default 1000) plain normalised-SGD or SGD updates. This implementation
follows the authors' reference implementation, with its defects fixed (see :class:`LABPAL`).
``salsa_fast/labpal_reference.py`` is the readable per-parameter twin the tests hold this class
to.

Closure contract: SaLSA's. One ``step(closure)`` call per inference batch; the closure takes
``backwards`` and returns that batch's loss. The optimizer calls it with ``backwards=True``
(training, and the first ``k`` calls of a measurement) or ``False`` (the rest of a
measurement), and calls the stored closures of a measurement again at two other points on the
line (two more for each try farther out, see :class:`LABPAL`), each under the seed of its own
step, so dropout masks repeat.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from ._flat_optimizer import FlatOptimizer
from .checks import check, is_int, is_real, positive
from .closure import draw_seed
from .distributed import agree_on_loss, agree_on_sums, resolve_group
from .flat import FlatBucket
from .labpal_scalars import Scalars
from .labpal_line import LineMeasurement
from .parabola import H, parabola_step

__all__ = ["LABPAL", "parabola_step"]

TRUSTED_NORM = (1e-3, 100.0)  # directions with a norm outside are not measured (hard-coded there)


class LABPAL(LineMeasurement, FlatOptimizer):
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
        measure_batches: inference batches per measurement per unit of ``k``
            (``amount_batches_for_full_batch_loss_approximation``, 10).
        batch_size_schedule: ``(call, multiplier)`` entries; each sets
            ``k = max(int(multiplier * noise_factor), 1)`` and forces a measurement.
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
            reference's uncapped updates, which diverge on small MLPs (see the README).
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
    (:func:`salsa_fast.parabola.fit_line`; ``stats["rescaled"]`` counts such measurements).
    Accepted fits and rejections that stand above the noise are the reference's. After 3
    measurements abandoned for their norm, or fits rejected, in a row, it warns once, naming the
    reason and the argument that changes it (``trusted_norm``, ``sample_step``, ``max_step_size``).

    The defects of the authors' implementation fixed here are listed, each with its test, in
    the README's LABPAL section.
    """

    name = "LABPAL"
    entry = "labpal"
    Scalars = Scalars
    global_keys = frozenset(
        "mode training_set_size batch_size update_step_adaptation reuse_steps measure_batches batch_size_schedule "
        "warmup_updates window sample_step max_step_size eps fit cap_sgd_updates backend keep_backup weight_decay "
        "process_group trusted_norm".split()
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
        mode = mode.lower() if isinstance(mode, str) else mode
        check(mode in ("nsgd", "sgd"), "mode", mode, "must be 'nsgd' or 'sgd'")
        check(is_int(training_set_size) and training_set_size > 0, "training_set_size", training_set_size, "must be an int > 0")
        check(is_int(batch_size) and batch_size > 0, "batch_size", batch_size, "must be an int > 0")
        check(positive(update_step_adaptation), "update_step_adaptation", update_step_adaptation, "must be > 0")
        check(is_real(momentum) and 0 <= momentum < 1, "momentum", momentum, "must be in [0, 1)")
        for name, value in (("reuse_steps", reuse_steps), ("measure_batches", measure_batches), ("window", window)):
            check(is_int(value) and value >= 1, name, value, "must be an int >= 1")
        check(is_int(warmup_updates) and warmup_updates >= 0, "warmup_updates", warmup_updates, "must be an int >= 0")
        check(positive(sample_step) and sample_step > H, "sample_step", sample_step, f"must be > {H}")
        check(positive(max_step_size), "max_step_size", max_step_size, "must be > 0")
        check(positive(eps), "eps", eps, "must be > 0")
        check(fit in ("reference", "exact"), "fit", fit, "must be 'reference' or 'exact'")
        check(isinstance(cap_sgd_updates, bool), "cap_sgd_updates", cap_sgd_updates, "must be a bool")
        check(isinstance(trusted_norm, (tuple, list)) and len(trusted_norm) == 2 and all(map(is_real, trusted_norm))
              and 0 <= trusted_norm[0] < trusted_norm[1], "trusted_norm", trusted_norm, "must be (low, high), 0 <= low < high")  # fmt: skip
        resolve_group(process_group)  # a group without torch.distributed is a ValueError
        try:
            schedule = sorted((int(t), float(m)) for t, m in batch_size_schedule)
        except (TypeError, ValueError):
            raise ValueError(f"invalid batch_size_schedule={batch_size_schedule!r}: (call, multiplier) pairs") from None
        check(all(t >= 0 and m > 0 for t, m in schedule), "batch_size_schedule", batch_size_schedule,
               "calls must be >= 0 and multipliers > 0")  # fmt: skip

        self.mode = mode
        self.noise_factor = (128 / batch_size) * (training_set_size / 40000)
        self.update_step_adaptation = float(update_step_adaptation)
        self.momentum = float(momentum)
        self.reuse_steps = reuse_steps
        self.measure_batches = measure_batches
        self.batch_size_schedule = schedule
        self.warmup_updates = warmup_updates
        self.window = window
        self.sample_step = float(sample_step)
        self.max_step_size = float(max_step_size)
        self.eps = float(eps)
        self.fit = fit
        self.cap_sgd_updates = cap_sgd_updates
        self.process_group = process_group
        self.trusted_norm = (float(trusted_norm[0]), float(trusted_norm[1]))
        self._scalars = Scalars()
        self._in_a_row = {"abandoned": 0, "rejected": 0}  # (for the warnings only: not saved)
        self._loss_eps = 0.0  # the resolution (relative) of the measurement's loss dtype
        self._next_momentum: float | None = None  # a group's new momentum, applied between measurements
        super().__init__(params, dict(lr=1.0, momentum=self.momentum), backend=backend, keep_backup=keep_backup)
        self._pack()

    def _transient(self) -> dict[str, Any]:
        return {
            **super()._transient(),
            "_measurement": [],  # (closure, seed, loss at theta0) of each call of the measurement
            "_device_skips": None,  # CUDA: updates skipped on the device, not yet read
            "_at_start": None,  # (scalars, measurement) as the step found them (see _on_undo)
            "_line_norm": None,  # ||D|| of the line being measured
            "_saved_buckets": 0,  # buckets whose backup holds theta0 (keep_backup)
            "_line_at": [],  # keep_backup=False: each bucket at theta0 - at * D
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
        return self._scalars.step

    @property
    def learning_rate(self) -> float | None:
        """The SGD learning rate in use: each accepted step length over the direction norm it
        was measured with, averaged like the step lengths; None until a measurement is accepted."""
        return self._scalars.lr

    @property
    def measuring(self) -> bool:
        return self._scalars.measuring

    def _fold_pending_skips(self) -> None:
        """Add the updates skipped on the device (CUDA) to the host count: one sync, so only
        when diagnostics or a checkpoint ask for it."""
        if self._device_skips is not None:
            self._scalars.skipped += int(self._device_skips)
            self._device_skips = None

    @property
    def stats(self) -> dict[str, float]:
        """Counters. On CUDA a non-finite direction is skipped on the device, so that update
        still counts in ``updates`` (and towards ``reuse_steps``); ``skipped_updates`` counts it
        too (reading it syncs once). On CPU a skipped update is not counted in ``updates``."""
        self._fold_pending_skips()
        s = self._scalars
        return {
            "step_size": s.step if s.step is not None else float("nan"),
            "learning_rate": s.lr if s.lr is not None else float("nan"),
            "measuring": float(s.measuring),
            "k": s.k,
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
        """One inference batch: a training call or a measurement call. Returns its loss."""
        if not self._begin_step(closure):
            return self._idle_step(closure)
        # what the schedule may change before the closure runs (the list is only ever replaced)
        self._at_start = replace(self._scalars), self._measurement
        s = self._scalars
        self._apply_schedule()
        if not s.measuring:
            warmup_over = not s.warmup_measured and s.updates == self.warmup_updates + 1
            if warmup_over or s.since_measurement >= self.reuse_steps:
                s.warmup_measured = s.warmup_measured or warmup_over
                self._start_measurement()
        if self._next_momentum is not None and not (s.measuring and self._measurement):
            self.momentum, self._next_momentum = self._next_momentum, None  # (not within a measurement)
        out = self._measure(closure) if s.measuring else self._train(closure)
        s.calls += 1
        for group in self.param_groups:
            group["step_size"], group["learning_rate"] = s.step, s.lr
        return out

    def _on_undo(self) -> None:
        self._scalars, self._measurement = self._at_start

    def _apply_schedule(self) -> None:
        """Fire every schedule entry whose call has come (``>=``: none is ever skipped)."""
        s = self._scalars
        schedule = self.batch_size_schedule
        while s.schedule_index < len(schedule) and schedule[s.schedule_index][0] <= s.calls:
            _, multiplier = schedule[s.schedule_index]
            s.k = max(int(multiplier * self.noise_factor), 1)
            s.schedule_index += 1
            self._start_measurement()

    def _start_measurement(self) -> None:
        s = self._scalars
        s.measuring = True
        s.accumulated = 0  # a partly accumulated training batch is dropped
        self._measurement = []
        self._loss_eps = 0.0

    def _gradient_call(self, closure) -> tuple[object, torch.Tensor, int]:
        seed = draw_seed()
        out, loss = self._first_call(closure, seed)  # (a None gradient counts as zero)
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
        Training with k = 1 reads the gradient buffer itself."""
        return self._scalars.k > 1 or self._scalars.measuring

    # -- training ----------------------------------------------------------------------------------
    def _train(self, closure):
        s = self._scalars
        out, _, _ = self._gradient_call(closure)
        s.accumulated += 1
        if s.accumulated < s.k:
            return out
        norm, _ = self._direction_sums(s.accumulated)
        ok = torch.isfinite(norm) & (norm > 0)
        if self._host_checks and not bool(ok):
            s.skipped += 1
        else:
            self._update(s.accumulated, norm, None if self._host_checks else ok)
            s.updates += 1  # on CUDA also when skipped on the device: see stats
            s.since_measurement += 1
            if not self._host_checks:
                skip = (~ok).to(torch.int64)
                self._device_skips = skip if self._device_skips is None else self._device_skips + skip
        s.accumulated = 0
        return out

    def _source(self, b: FlatBucket) -> torch.Tensor:
        """The gradient sum the direction is built from: ``acc``, or the gradient itself."""
        return self._acc(b) if self._accumulating() else b.grad

    def _direction_sums(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``||D||`` and ``<d, D>`` over all buckets and ranks (fp64 device tensors, no sync),
        where ``d`` is the mean gradient of ``count`` batches and ``D = d + momentum * buf``."""
        dev = self._buckets[0].device
        sums = {False: torch.zeros(2, dtype=torch.float64, device=dev)}  # by whether the bucket holds shards
        sums[True] = sums[False].clone()
        for b in self._buckets:
            sums[b.sharded] += torch.stack(self._backend.labpal_sums(b, self._source(b), count=count, momentum=self.momentum)).to(dev)
        sq, dot = agree_on_sums(resolve_group(self.process_group), sums[False], sums[True])
        return sq.sqrt(), dot

    def _agreed(self, loss) -> float:
        """A closure's loss averaged over the ranks (each computes its share of the batch)."""
        group = resolve_group(self.process_group)
        if group is None:
            return float(loss)
        return float(agree_on_loss(group, torch.as_tensor(loss).to(self._buckets[0].device, torch.float64).clone()))

    @torch.no_grad()
    def _update(self, count: int, norm: torch.Tensor, ok: torch.Tensor | None) -> None:
        """A training update: NSGD ``p -= lr_g * step * D / ||D||``; SGD ``p -= lr_g * lr * D``
        (the rate capped at ``step / ||D||`` with ``cap_sgd_updates``); the rate is computed on
        the device (no sync). The momentum buffer becomes ``D``. Where ``ok`` is False (CUDA: a
        non-finite direction) nothing changes."""
        s = self._scalars
        rate = None  # a device scalar that multiplies lr_g, or None for a host rate
        if self.mode == "nsgd" or self.cap_sgd_updates:
            rate = s.step / norm.clamp_min(torch.finfo(norm.dtype).tiny)
            if self.mode == "sgd":
                rate = rate.clamp(max=s.lr)
        for b in self._buckets:
            lr = float(self.param_groups[b.group_index]["lr"])
            self._backend.labpal_update(
                b, self._source(b), count=count, momentum=self.momentum,
                scale=lr if rate is not None else lr * s.lr, coef=None if rate is None else rate.to(b.device),
                ok=None if ok is None else ok.to(b.device),
            )  # fmt: skip

    # -- measuring ---------------------------------------------------------------------------------
    def _measure(self, closure):
        s = self._scalars
        n_total = self.measure_batches * s.k
        i = len(self._measurement)
        if i < s.k:
            out, loss, seed = self._gradient_call(closure)
        else:
            seed = draw_seed()
            out, loss = self._first_call(closure, seed, backwards=False)
            s.forwards += 1
        self._measurement.append((closure, seed, self._agreed(loss)))
        self._loss_eps = max(self._loss_eps, torch.finfo(loss.dtype).eps if loss.is_floating_point() else 0.0)
        if i + 1 == s.k:
            norm, dot = self._direction_sums(s.k)
            norm_v, dot_v = torch.stack([norm, dot]).tolist()  # the search's one sync
            slope = -dot_v / norm_v if norm_v > 0 else float("nan")
            low, high = self.trusted_norm
            trusted = low <= norm_v <= high or s.step is None  # (with no step in use there is none to keep)
            if not (math.isfinite(norm_v) and trusted and slope < 0):
                s.abandoned += 1
                if math.isfinite(norm_v) and not trusted:
                    self._count_in_a_row("abandoned", f"the direction norm {norm_v:.4g} is outside trusted_norm="
                                         f"{self.trusted_norm}: pass a range that holds your loss's norms")  # fmt: skip
                self._abandon()
                return out
            self._in_a_row["abandoned"] = 0
            self._line_norm, self._line_slope = norm_v, slope
        if i + 1 == n_total:
            self._finish_measurement()
        return out

    def _abandon(self) -> None:
        """Weights unchanged; train on with the step in use for another ``reuse_steps`` updates,
        or measure again if there is none yet (the reference crashed there; only a direction
        that does not descend, or is not finite, is abandoned then)."""
        s = self._scalars
        self._start_measurement()
        s.measuring = s.step is None
        s.since_measurement = 0

    # -- state_dict (saved and loaded by the shell, as a "labpal" entry beside torch's layout) ----
    def _saved_scalars(self, state_dict: dict[str, Any]) -> Any:
        """Checkpoints from before ``rescaled`` was counted: none was."""
        saved = super()._saved_scalars(state_dict)
        return {"rescaled": 0, **saved} if isinstance(saved, dict) else saved

    def _on_load(self) -> None:
        """A checkpoint taken in the middle of a measurement restarts that measurement (its
        closures cannot be saved; the parameters are still at its starting point)."""
        self._device_skips = None
        if self._scalars.measuring:
            self._start_measurement()
