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
line, each under the seed of its own step, so dropout masks repeat.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from . import backends
from .closure import call_closure, check_closure, draw_seed
from .flat import FlatBucket
from .optimizer import SaLSAWarning

__all__ = ["LABPAL", "parabola_step"]

_requires_grad = operator.attrgetter("requires_grad")
H = 1.77e-4  # the reference's first sample position on the line (hard-coded there)
NORM_RANGE = (1e-3, 100.0)  # directions with a norm outside are not measured (hard-coded there)


def parabola_step(losses: tuple[float, float, float], h: float, mu: float, fit: str) -> tuple[float, float, float]:
    """``(a, b, s)`` from losses at positions ``0, h, mu`` on the line: curvature/2, slope at 0 and
    the step to the minimum ``-b / (2a)``.

    ``fit="reference"`` reproduces the reference: ``numpy.gradient`` applied twice (first-order
    at the edge, second-order inside), which for an exact parabola ``c + beta x + alpha x^2``
    gives ``b = beta + alpha h``, ``a = alpha / 2`` and so ``s = -beta/alpha - h``, about twice
    the true minimum (the default ``update_step_adaptation=1.8`` was tuned with it).
    ``fit="exact"`` interpolates the three points: ``s`` is the parabola's minimum.
    """
    f0, f1, f2 = losses
    if fit == "exact":
        alpha = ((f2 - f0) / mu - (f1 - f0) / h) / (mu - h)
        beta = (f1 - f0) / h - alpha * h
        a, b = alpha, beta
    else:
        d1, d2 = h, mu - h  # numpy.gradient's interior weights for uneven spacing
        g0 = (f1 - f0) / d1
        g1 = -d2 / (d1 * (d1 + d2)) * f0 + (d2 - d1) / (d1 * d2) * f1 + d1 / (d2 * (d1 + d2)) * f2
        a, b = (g1 - g0) / d1 / 2, g0
    s = -b / (2 * a) if a != 0 else float("nan")
    return a, b, s


@dataclass
class _Scalars:
    calls: int = 0  # step() calls (the schedule's clock)
    updates: int = 0  # parameter updates (training ones and the one ending a measurement)
    since_measurement: int = 0  # updates since the last finished measurement
    k: int = 1  # training batch size, in inference batches
    schedule_index: int = 0  # next batch-size schedule entry
    measuring: bool = True  # the first call measures
    warmup_measured: bool = False
    accumulated: int = 0  # calls in the current training batch
    step: float | None = None  # the step length in use (NSGD updates; every measurement's update)
    lr: float | None = None  # the SGD learning rate in use
    history: list[float] = field(default_factory=list)  # accepted step lengths after warm-up
    lr_history: list[float] = field(default_factory=list)  # the matching learning rates
    measurements: int = 0  # finished measurements (accepted or not)
    abandoned: int = 0  # measurements given up at the direction check
    rejected: int = 0  # parabolas that were not convex with a descending slope
    forwards: int = 0
    backwards: int = 0
    skipped: int = 0  # training updates skipped for a non-finite direction


class LABPAL(Optimizer):
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
            (``parabolic_approximation_sample_step_size``, 0.01).
        max_step_size: cap on the measured step before adaptation (1.0).
        eps: floor of the step (``epsilon``, 1e-6).
        fit: ``"reference"`` (the reference's effective step) or ``"exact"``.
        backend: ``"auto"`` (Triton kernels on CUDA, torch ops elsewhere), ``"triton"`` or
            ``"torch"``, as for SaLSA.
        keep_backup: ``True`` keeps a copy of the parameters while measuring and writes each
            point on the line from it. ``False`` keeps none: the parameters move from point to
            point along ``D`` and back, one rounding per element per move (as SaLSA's).
        cap_sgd_updates: ``mode="sgd"`` only: no update is longer than the step in use, i.e.
            the rate applied is ``min(learning_rate, step_size / ||D||)``. The reference has no
            cap (``False`` gives its updates): its learning rate is a step measured at one
            gradient norm, and once gradients grow past that norm (the first measurement is at
            initialisation, where they are smallest) its steps become many times longer than
            any measured one, and it diverges on small MLPs with the default 1.8 adaptation.

    Fixed reference defects: moves follow the stored direction (never ``.grad``, which
    ``zero_grad()`` may have set to None); clipping does not mutate the cap; a first
    measurement abandoned at the direction check measures again instead of crashing; schedule
    entries fire when the call counter reaches them (never missed with ``k > 1``); randomness is
    SaLSA's (no numpy reseeding, works without CUDA); :meth:`preserve_buffers` keeps BatchNorm
    statistics out of the extra forward passes; parameters without gradients count as zero;
    ``step`` returns the loss, the step in use is ``step_size`` / ``group["step_size"]``, and
    ``state_dict`` resumes exactly (a checkpoint taken mid-measurement restarts it).
    """

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
    ):
        mode = mode.lower()
        _check(mode in ("nsgd", "sgd"), "mode", mode, "must be 'nsgd' or 'sgd'")
        _check(_is_int(training_set_size) and training_set_size > 0, "training_set_size", training_set_size, "must be an int > 0")
        _check(_is_int(batch_size) and batch_size > 0, "batch_size", batch_size, "must be an int > 0")
        _check(_positive(update_step_adaptation), "update_step_adaptation", update_step_adaptation, "must be > 0")
        _check(_real(momentum) and 0 <= momentum < 1, "momentum", momentum, "must be in [0, 1)")
        for name, value in (("reuse_steps", reuse_steps), ("measure_batches", measure_batches), ("window", window)):
            _check(_is_int(value) and value >= 1, name, value, "must be an int >= 1")
        _check(_is_int(warmup_updates) and warmup_updates >= 0, "warmup_updates", warmup_updates, "must be an int >= 0")
        _check(_positive(sample_step) and sample_step > H, "sample_step", sample_step, f"must be > {H}")
        _check(_positive(max_step_size), "max_step_size", max_step_size, "must be > 0")
        _check(_positive(eps), "eps", eps, "must be > 0")
        _check(fit in ("reference", "exact"), "fit", fit, "must be 'reference' or 'exact'")
        _check(isinstance(cap_sgd_updates, bool), "cap_sgd_updates", cap_sgd_updates, "must be a bool")
        _check(backend in backends.NAMES, "backend", backend, f"must be one of {backends.NAMES}")
        _check(isinstance(keep_backup, bool), "keep_backup", keep_backup, "must be a bool")
        try:
            schedule = sorted((int(t), float(m)) for t, m in batch_size_schedule)
        except (TypeError, ValueError):
            raise ValueError(f"invalid batch_size_schedule={batch_size_schedule!r}: (call, multiplier) pairs") from None
        _check(all(t >= 0 and m > 0 for t, m in schedule), "batch_size_schedule", batch_size_schedule,
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
        self.backend_name = backend
        self.keep_backup = keep_backup
        self._ready = False
        super().__init__(params, dict(lr=1.0))
        self._scalars = _Scalars()
        self._preserved: list[nn.Module] = []
        self._measurement: list[tuple[Any, int, float]] = []  # (closure, seed, loss at theta0)
        self._in_measurement_eval = False
        self._device_skips: torch.Tensor | None = None  # CUDA: updates skipped on the device
        self._repack()
        self._ready = True

    # -- buffers ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "weight_decay" in param_group:
            raise ValueError("LABPAL has no weight decay; only 'lr' (a multiplier on the step) may be set per group")
        super().add_param_group(param_group)
        value = self.param_groups[-1]["lr"]
        _check(_real(value) and value >= 0, "param group 'lr'", value, "must be >= 0")
        self.param_groups[-1]["step_size"] = self.param_groups[-1]["learning_rate"] = None
        if self._ready:
            self._repack()

    def _repack(self) -> None:
        # views made at the last repack, in the layout the parameters had then (see SaLSA._repack)
        old = {p: (e["momentum_buffer"], e["accumulated_grad"]) for p, e in self.state.items()}
        buckets = []
        for gi, group in enumerate(self.param_groups):
            by_key: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.requires_grad:
                    by_key.setdefault((p.device, p.dtype), []).append(p)
            buckets += [FlatBucket(ps, gi, keep_second_moment=False, lean=not self.keep_backup) for ps in by_key.values()]
        if not buckets:
            raise ValueError("LABPAL got no parameters that require grad")
        self.state.clear()
        with torch.no_grad():
            for b in buckets:
                for p, m, a in zip(b.params, b.views_of(b.exp_avg), b.views_of(self._acc(b))):
                    if p in old:
                        m.copy_(old[p][0])
                        a.copy_(old[p][1])
                    self.state[p] = {"momentum_buffer": m, "accumulated_grad": a}
        self._buckets = buckets
        self._all_params = [p for g in self.param_groups for p in g["params"]]
        self._requires_grad = list(map(_requires_grad, self._all_params))
        self._cuda_devices = sorted({b.device.index or 0 for b in buckets if b.device.type == "cuda"})
        self._host_checks = all(b.device.type == "cpu" for b in buckets)
        self._backend = backends.resolve(self.backend_name, {b.device for b in buckets})
        if any(b.dtype in (torch.bfloat16, torch.float16) for b in buckets):
            warnings.warn(
                "LABPAL with bf16/fp16 parameters: its line measurement's first sample moves the "
                f"parameters by {H} in all, below those dtypes' resolution, so the fitted parabolas "
                "are noise and most measurements are rejected. Keep the parameters in fp32 (autocast "
                "the forward pass instead).",
                SaLSAWarning,
                stacklevel=3,
            )

    @staticmethod
    def _acc(b: FlatBucket) -> torch.Tensor:
        """The bucket's running sum of the gradients of the current (training or measuring) batch."""
        acc = b.workspace.get("acc")
        if acc is None:
            acc = b.workspace["acc"] = torch.zeros(b.numel, dtype=b.state_dtype, device=b.device)
        return acc

    def _check_layout(self) -> None:
        if list(map(_requires_grad, self._all_params)) != self._requires_grad:
            self._repack()
            return
        for b in self._buckets:
            if b.moved():
                if b.relaid():
                    self._repack()
                    return
                b.rebind()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """One memset per flat buffer (``set_to_none`` is ignored, as in SaLSA); a no-op while a
        measurement re-evaluates its stored closures."""
        if self._in_measurement_eval:
            return
        self._check_layout()  # (as in SaLSA.zero_grad)
        for b in self._buckets:
            b.zero_grad()

    def preserve_buffers(self, *modules: nn.Module) -> None:
        """Keep these modules' buffers (BatchNorm statistics) out of the measurement's extra
        forward passes: snapshotted before them, restored after each."""
        for module in modules:
            if not isinstance(module, nn.Module):
                raise TypeError(f"preserve_buffers takes nn.Modules, got {type(module).__name__}")
            if module not in self._preserved:
                self._preserved.append(module)

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

    def _fold_device_skips(self) -> None:
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
        self._fold_device_skips()
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
            "forwards": s.forwards,
            "backwards": s.backwards,
            "skipped_updates": s.skipped,
        }

    # -- the step --------------------------------------------------------------------------------
    def step(self, closure=None):  # type: ignore[override]
        """One inference batch: a training call or a measurement call. Returns its loss."""
        check_closure(closure)
        if self._in_measurement_eval:
            raise RuntimeError("LABPAL.step() was called from inside its own closure")
        self._check_layout()
        s = self._scalars
        self._apply_schedule()
        if not s.measuring:
            warmup_over = not s.warmup_measured and s.updates == self.warmup_updates + 1
            if warmup_over or s.since_measurement >= self.reuse_steps:
                s.warmup_measured = s.warmup_measured or warmup_over
                self._start_measurement()
        out = self._measure(closure) if s.measuring else self._train(closure)
        s.calls += 1
        for group in self.param_groups:
            group["step_size"], group["learning_rate"] = s.step, s.lr
        return out

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
        for b in self._buckets:
            self._acc(b).zero_()

    def _gradient_call(self, closure) -> tuple[object, torch.Tensor, int]:
        seed = draw_seed()
        out, loss = call_closure(closure, seed, self._cuda_devices, backwards=True)
        self._scalars.forwards += 1
        self._scalars.backwards += 1
        for b in self._buckets:
            if not b.grads_intact():
                b.adopt_grads()  # None (unused, or zero_grad(set_to_none)) counts as zero
            if self._accumulating():
                self._acc(b).add_(b.grad)
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
        if self._accumulating():
            for b in self._buckets:
                self._acc(b).zero_()
        return out

    def _source(self, b: FlatBucket) -> torch.Tensor:
        """The gradient sum the direction is built from: ``acc``, or the gradient itself."""
        return self._acc(b) if self._accumulating() else b.grad

    def _direction_sums(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``||D||`` and ``<d, D>`` over all buckets (fp64 device tensors, no sync), where ``d``
        is the mean gradient of ``count`` batches and ``D = d + momentum * buf``."""
        sq, dot = [], []
        for b in self._buckets:
            sq_b, dot_b = self._backend.labpal_sums(b, self._source(b), count=count, momentum=self.momentum)
            sq.append(sq_b)
            dot.append(dot_b)
        dev = self._buckets[0].device
        return torch.stack([t.to(dev) for t in sq]).sum().sqrt(), torch.stack([t.to(dev) for t in dot]).sum()

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
            out, loss = call_closure(closure, seed, self._cuda_devices, backwards=False)
            s.forwards += 1
        self._measurement.append((closure, seed, float(loss)))
        if i + 1 == s.k:
            norm, dot = self._direction_sums(s.k)
            norm_v, dot_v = torch.stack([norm, dot]).tolist()  # the search's one sync
            slope = -dot_v / norm_v if norm_v > 0 else float("nan")
            low, high = NORM_RANGE
            if not (math.isfinite(norm_v) and low <= norm_v <= high and slope < 0):
                s.abandoned += 1
                self._abandon()
                return out
            self._line_norm = norm_v
        if i + 1 == n_total:
            self._finish_measurement()
        return out

    def _abandon(self) -> None:
        """Weights unchanged; train on with the step in use for another ``reuse_steps`` updates,
        or measure again if there is none yet (the reference crashed there)."""
        s = self._scalars
        self._start_measurement()
        s.measuring = s.step is None
        s.since_measurement = 0

    @torch.no_grad()
    def _finish_measurement(self) -> None:
        s = self._scalars
        norm = self._line_norm
        l0 = _nanmean([loss for _, _, loss in self._measurement])
        self._saved_buckets = 0  # buckets whose backup holds theta0 (the first point saves it)
        self._line_at = [0.0] * len(self._buckets)  # keep_backup=False: each bucket at theta0 - at * D
        try:
            l1 = self._losses_at(H, norm, first=True)
            l2 = self._losses_at(self.sample_step, norm)
        except BaseException:  # a closure (or a pass) raised: back to theta0, measure again next call
            self._back_to_theta0()
            self._start_measurement()
            raise
        a, b_slope, step = parabola_step((l0, l1, l2), H, self.sample_step, self.fit)
        s.measurements += 1
        if a > 0 and b_slope < 0:
            step = max(min(step, self.max_step_size) * self.update_step_adaptation, self.eps)
            lr = max(step / max(norm, self.eps), self.eps)
            if math.isfinite(step):
                if s.updates < self.warmup_updates:
                    s.step, s.lr = step, lr
                else:
                    s.history = (s.history + [step])[-self.window :]
                    s.lr_history = (s.lr_history + [lr])[-self.window :]
                    s.step, s.lr = _nanmean(s.history), _nanmean(s.lr_history)
        else:
            s.rejected += 1
        if s.step is None:  # nothing accepted yet: back to theta0, measure again
            self._back_to_theta0()
            self._start_measurement()
            return
        # the measurement ends with a step of the averaged length from theta0 along the unit
        # direction, written in one pass (the momentum buffer becomes the direction)
        for i, b in enumerate(self._buckets):
            lr = float(self.param_groups[b.group_index]["lr"])
            if self.keep_backup:
                self._backend.labpal_point(b, self._source(b), count=s.k, momentum=self.momentum,
                                           scale=s.step / norm * lr, save_backup=False, write_buffer=True)  # fmt: skip
            else:
                self._move_on_line(i, s.step / norm * lr, write_buffer=True)
        s.updates += 1
        s.since_measurement = 0
        s.measuring = False
        self._measurement = []
        for b in self._buckets:
            self._acc(b).zero_()

    def _move_on_line(self, i: int, scale: float, write_buffer: bool = False) -> None:
        """keep_backup=False: bucket ``i`` to ``theta0 - scale * D`` from where it is on the line,
        one rounding per element (``write_buffer``: the momentum buffer becomes ``D``)."""
        b, s = self._buckets[i], self._scalars
        self._backend.labpal_update(b, self._source(b), count=s.k, momentum=self.momentum,
                                    scale=scale - self._line_at[i], coef=None, ok=None, write_buffer=write_buffer)  # fmt: skip
        self._line_at[i] = scale

    def _back_to_theta0(self) -> None:
        """The parameters back where the measurement started (without a backup: to a rounding
        per element per move)."""
        if self.keep_backup:
            for b in self._buckets[: self._saved_buckets]:
                b.copy_params_from(b.backup)
            return
        for i, at in enumerate(self._line_at):
            if at:
                self._move_on_line(i, 0.0)

    def _losses_at(self, x: float, norm: float, first: bool = False) -> float:
        """Mean loss of the stored closures at ``theta0 - x * D / ||D||`` (NaNs skipped). The
        line is the unscaled direction: group ``lr`` multipliers scale updates, not measurements.
        ``first``: the parameters are still at ``theta0``; save them as the backup on the way."""
        s = self._scalars
        for i, b in enumerate(self._buckets):
            if not self.keep_backup:
                self._move_on_line(i, x / norm)
                continue
            self._backend.labpal_point(b, self._source(b), count=s.k, momentum=self.momentum,
                                       scale=x / norm, save_backup=first, write_buffer=False)  # fmt: skip
            self._saved_buckets += first
        buffers = [t for m in self._preserved for t in m.buffers()]
        saved = [t.clone() for t in buffers]
        losses = []
        self._in_measurement_eval = True
        try:
            for closure, seed, _ in self._measurement:
                _, loss = call_closure(closure, seed, self._cuda_devices, backwards=False)
                s.forwards += 1
                losses.append(float(loss))
                for t, v in zip(buffers, saved):
                    t.copy_(v)
        finally:
            self._in_measurement_eval = False
        return _nanmean(losses)

    # -- state_dict --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Torch's layout (per-index ``momentum_buffer`` and ``accumulated_grad``) plus a
        ``"labpal"`` entry with the counters, the step in use and its history."""
        self._fold_device_skips()
        sd = super().state_dict()
        sd["labpal"] = asdict(self._scalars)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume. A checkpoint taken in the middle of a measurement restarts that measurement
        (its closures cannot be saved; the parameters are still at its starting point)."""
        if "labpal" not in state_dict:
            raise ValueError("not a LABPAL state_dict: it has no 'labpal' entry")
        scalars = dict(state_dict["labpal"])
        names = {f.name for f in fields(_Scalars)}
        if not names.issubset(scalars):
            raise ValueError(f"the state_dict's 'labpal' entry misses {sorted(names - set(scalars))}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(g["params"]) != len(sg["params"]) for g, sg in zip(self.param_groups, saved_groups)
        ):
            raise ValueError("the state_dict's parameter groups do not match this optimizer's")
        index_of = {p: i for g, sg in zip(self.param_groups, saved_groups) for p, i in zip(g["params"], sg["params"])}
        copies = []
        for p, entry in self.state.items():
            saved = state_dict["state"].get(index_of[p])
            for key, target in entry.items():
                value = None if saved is None else saved.get(key)
                if value is not None and (not isinstance(value, torch.Tensor) or value.shape != target.shape):
                    raise ValueError(f"state {key!r} of parameter {index_of[p]} does not match its shape")
                copies.append((target, value))
        with torch.no_grad():
            for target, value in copies:
                target.zero_() if value is None else target.copy_(value)
        for g, sg in zip(self.param_groups, saved_groups):
            g.update({k: v for k, v in sg.items() if k not in ("params", "param_names")})
        self._scalars = _Scalars(**{n: scalars[n] for n in names})
        self._device_skips = None
        self._scalars.history = list(self._scalars.history)
        self._scalars.lr_history = list(self._scalars.lr_history)
        if self._scalars.measuring:
            self._start_measurement()


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _check(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: {what}")


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _positive(x) -> bool:
    return _real(x) and x > 0 and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
