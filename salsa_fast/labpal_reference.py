"""LABPAL, restated plainly: per-parameter tensors, one formula per line, the reference's own
parabola fit (``numpy.gradient`` twice, restated as :func:`gradient`). The ground truth
:class:`salsa_fast.LABPAL` is tested against; same arguments, closure contract, seeding and
fixes (measuring farther out where rounding decides the reference's fit included), none of its
flat buffers.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from .closure import call_closure, check_closure, draw_seed

H = 1.77e-4
RESOLUTION = 4.0  # slope and curvature must stand this many times what rounding could move them by
GROWTH = 10.0  # sample steps this much longer at each try farther out


def gradient(f: list[float], x: list[float]) -> list[float]:
    """``numpy.gradient(f, x)`` (``edge_order=1``) in plain Python: one-sided first differences
    at the two ends, the second-order central difference for uneven spacing inside."""
    n = len(f)
    out = [(f[1] - f[0]) / (x[1] - x[0])]
    for i in range(1, n - 1):
        d1, d2 = x[i] - x[i - 1], x[i + 1] - x[i]
        out.append(-d2 / (d1 * (d1 + d2)) * f[i - 1] + (d2 - d1) / (d1 * d2) * f[i] + d1 / (d2 * (d1 + d2)) * f[i + 1])
    out.append((f[-1] - f[-2]) / (x[-1] - x[-2]))
    return out


def nanmean(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN if all are), as ``numpy.nanmean``. (Not
    :func:`salsa_fast.labpal_parabola.nanmean`: the twin shares no code with what it checks.)"""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


class LABPALReference(Optimizer):
    def __init__(
        self,
        params,
        mode="nsgd",
        training_set_size=40000,
        batch_size=128,
        update_step_adaptation=1.8,
        momentum=0.0,
        reuse_steps=1000,
        measure_batches=10,
        batch_size_schedule=((0, 1), (75000, 2), (112500, 4)),
        warmup_updates=400,
        window=25,
        sample_step=0.01,
        max_step_size=1.0,
        eps=1e-6,
        *,
        fit="reference",
        cap_sgd_updates=True,
        trusted_norm=(1e-3, 100.0),
    ):
        super().__init__(params, dict(lr=1.0))
        self.mode = mode.lower()
        self.noise_factor = (128 / batch_size) * (training_set_size / 40000)
        self.adaptation = update_step_adaptation
        self.momentum = momentum
        self.reuse_steps = reuse_steps
        self.measure_batches = measure_batches
        self.schedule = sorted(batch_size_schedule)
        self.warmup_updates = warmup_updates
        self.window = window
        self.mu = sample_step
        self.max_step_size = max_step_size
        self.eps = eps
        self.fit = fit
        self.cap = cap_sgd_updates  # SGD updates no longer than the step in use
        self.trusted_norm = trusted_norm  # directions with a norm outside are not measured

        self.calls = 0
        self.updates = 0
        self.since_measurement = 0
        self.accumulation = 1  # calls whose gradients are averaged into one update
        self.next_entry = 0
        self.measuring = True
        self.warmup_measured = False
        self.step_size = None  # the step length in use
        self.lr = None  # the SGD learning rate in use
        self.history = []
        self.lr_history = []
        self.forwards = 0
        self.rescaled = 0  # measurements fitted farther out than the reference's samples
        self.grad_sum = None  # per parameter: the summed gradients of the current batch
        self.accumulated = 0  # calls in the current training batch
        self.stored = []  # the measurement's (closure, seed, loss at theta0, its dtype's eps)

    def _params(self):
        return [(p, g["lr"]) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _reset_batch(self):
        self.grad_sum = [
            torch.zeros_like(p, dtype=torch.float32 if p.dtype != torch.float64 else p.dtype) for p, _ in self._params()
        ]
        self.accumulated = 0

    def _start_measurement(self):
        self.measuring = True
        self.stored = []
        self._reset_batch()

    def _gradient_pass(self, closure):
        seed = draw_seed()
        out, loss = call_closure(closure, seed, [], backwards=True)
        self.forwards += 1
        for acc, (p, _) in zip(self.grad_sum, self._params()):
            if p.grad is not None:
                acc += p.grad.to(acc.dtype)
        return out, loss, seed

    def _direction(self, count):
        """Direction (with momentum), ||direction|| and <mean gradient, direction>."""
        means, dirs = [], []
        for acc, (p, _) in zip(self.grad_sum, self._params()):
            d = acc / count
            buf = self.state[p].get("momentum_buffer")
            D = d + self.momentum * buf if (self.momentum and buf is not None) else d
            means.append(d)
            dirs.append(D)
        norm = math.sqrt(sum(float((D.double() * D.double()).sum()) for D in dirs))
        dot = sum(float((d.double() * D.double()).sum()) for d, D in zip(means, dirs))
        return dirs, norm, dot

    @torch.no_grad()
    def _move(self, origins, dirs, scale, use_group_lr=True):
        """p = origin - scale * lr_group * D (NSGD callers pass step/||D||). Points measured on
        the line leave the group multiplier out: it scales updates, not measurements."""
        for (p, lr), origin, D in zip(self._params(), origins, dirs):
            p.copy_((origin.to(D.dtype) - scale * (lr if use_group_lr else 1.0) * D).to(p.dtype))

    def _fit(self, l0, l1, l2, h, mu):
        """(a, b, step) of the losses at 0, h, mu."""
        x = [0.0, h, mu]
        f = [l0, l1, l2]
        if self.fit == "exact":  # the interpolating parabola alpha x^2 + beta x + c, Lagrange form
            alpha = beta = 0.0
            for i in range(3):
                others = [x[j] for j in range(3) if j != i]
                denominator = (x[i] - others[0]) * (x[i] - others[1])
                alpha += f[i] / denominator
                beta -= f[i] * (others[0] + others[1]) / denominator
            a, b = alpha, beta
        else:
            slopes = gradient(f, x)
            curvatures = gradient(slopes, x)
            a, b = curvatures[0] / 2, slopes[0]
        return a, b, -b / (2 * a) if a != 0 else float("nan")

    def _verdict(self, l0, l1, l2, h, mu, noise):
        """True/False: accepted/rejected however the losses err by up to ``noise`` each (times
        RESOLUTION); None where such errors could flip it, or where the fit of the losses and
        that of their differences to l0 (free of the float64 rounding a large loss brings into
        the formula) disagree. A non-finite fit is rejected."""
        a, b, _ = self._fit(0.0, l1 - l0, l2 - l0, h, mu)
        raw_a, raw_b, _ = self._fit(l0, l1, l2, h, mu)
        if not (math.isfinite(a) and math.isfinite(b)):
            return False
        if (a > 0 and b < 0) != (raw_a > 0 and raw_b < 0):
            return None
        unit = [self._fit(*e, h, mu) for e in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))]
        reach_a = RESOLUTION * noise * sum(abs(u[0]) for u in unit)  # a and b are linear in the losses
        reach_b = RESOLUTION * noise * sum(abs(u[1]) for u in unit)
        if a <= -reach_a or b >= reach_b:
            return False
        if a >= reach_a and b <= -reach_b:
            return True
        return None

    def _noise(self, at0, at_h, at_mu, h, mu):
        """How far rounding may move a loss: the loss dtype's resolution at the largest mean loss,
        or the gradient batches' misfit at h to the parabola through their loss at 0 with their
        exact slope there and their loss at mu, if larger."""
        k = self.accumulation  # the gradient batches
        l0k, l1k, l2k = nanmean(at0[:k]), nanmean(at_h[:k]), nanmean(at_mu[:k])
        curvature = (l2k - l0k - mu * self.slope) / mu**2
        misfit = abs(l1k - l0k - h * self.slope - curvature * h**2)
        eps = max(e for _, _, _, e in self.stored)
        floor = eps * max(abs(nanmean(at0)), abs(nanmean(at_h)), abs(nanmean(at_mu)))
        return max(floor, misfit) if math.isfinite(misfit) else floor

    def step(self, closure=None):
        check_closure(closure)
        if self.grad_sum is None:
            self._reset_batch()
        while self.next_entry < len(self.schedule) and self.schedule[self.next_entry][0] <= self.calls:
            self.accumulation = max(int(self.schedule[self.next_entry][1] * self.noise_factor), 1)
            self.next_entry += 1
            self._start_measurement()
        if not self.measuring:
            warmup_over = not self.warmup_measured and self.updates == self.warmup_updates + 1
            if warmup_over or self.since_measurement >= self.reuse_steps:
                self.warmup_measured = self.warmup_measured or warmup_over
                self._start_measurement()
        out = self._measure(closure) if self.measuring else self._train(closure)
        self.calls += 1
        return out

    def _train(self, closure):
        out, _, _ = self._gradient_pass(closure)
        self.accumulated += 1
        if self.accumulated == self.accumulation:
            dirs, norm, _ = self._direction(self.accumulated)
            if math.isfinite(norm) and norm > 0:
                origins = [p.detach().clone() for p, _ in self._params()]
                if self.mode == "nsgd":
                    scale = self.step_size / norm
                elif self.cap:
                    scale = min(self.lr, self.step_size / norm)
                else:
                    scale = self.lr
                self._move(origins, dirs, scale)
                for (p, _), D in zip(self._params(), dirs):
                    if self.momentum:
                        self.state[p]["momentum_buffer"] = D.clone()
                self.updates += 1
                self.since_measurement += 1
            self._reset_batch()
        return out

    def _measure(self, closure):
        i = len(self.stored)
        if i < self.accumulation:
            out, loss, seed = self._gradient_pass(closure)
        else:
            seed = draw_seed()
            out, loss = call_closure(closure, seed, [], backwards=False)
            self.forwards += 1
        eps = torch.finfo(loss.dtype).eps if loss.is_floating_point() else 0.0
        self.stored.append((closure, seed, float(loss), eps))
        if i + 1 == self.accumulation:
            self.dirs, self.norm, dot = self._direction(self.accumulation)
            slope = -dot / self.norm if self.norm > 0 else float("nan")
            self.slope = slope
            low, high = self.trusted_norm  # (with no step yet, any norm: there is none to keep)
            trusted = low <= self.norm <= high or self.step_size is None
            if not (math.isfinite(self.norm) and trusted and slope < 0):
                self._start_measurement()
                self.measuring = self.step_size is None
                self.since_measurement = 0
                return out
        if i + 1 == self.measure_batches * self.accumulation:
            self._finish()
        return out

    def _losses_at(self, theta0, x):
        self._move(theta0, self.dirs, x / self.norm, use_group_lr=False)
        losses = []
        for closure, seed, _, _ in self.stored:
            losses.append(float(call_closure(closure, seed, [], backwards=False)[1]))
            self.forwards += 1
        return losses

    @torch.no_grad()
    def _finish(self):
        theta0 = [p.detach().clone() for p, _ in self._params()]
        at0 = [loss for _, _, loss, _ in self.stored]
        l0 = nanmean(at0)
        at_h, at_mu = self._losses_at(theta0, H), self._losses_at(theta0, self.mu)
        a, b, s = self._fit(l0, nanmean(at_h), nanmean(at_mu), H, self.mu)
        if not (a > 0 and b < 0):  # rejected: farther out, while rounding could have decided it
            scale, noise = 1.0, 0.0
            while True:
                noise = max(noise, self._noise(at0, at_h, at_mu, H * scale, self.mu * scale))
                bigger = min(scale * GROWTH, self.max_step_size / self.mu)
                verdict = self._verdict(l0, nanmean(at_h), nanmean(at_mu), H * scale, self.mu * scale, noise)
                if verdict is not None or bigger <= scale:
                    break
                scale = bigger
                at_h = self._losses_at(theta0, H * scale)
                at_mu = self._losses_at(theta0, self.mu * scale)
                a, b, s = self._fit(l0, nanmean(at_h), nanmean(at_mu), H * scale, self.mu * scale)
            self.rescaled += scale > 1
        if a > 0 and b < 0:
            s = max(min(s, self.max_step_size) * self.adaptation, self.eps)
            lr = max(s / max(self.norm, self.eps), self.eps)
            if math.isfinite(s):
                if self.updates < self.warmup_updates:
                    self.step_size, self.lr = s, lr
                else:
                    self.history = (self.history + [s])[-self.window :]
                    self.lr_history = (self.lr_history + [lr])[-self.window :]
                    self.step_size = sum(self.history) / len(self.history)
                    self.lr = sum(self.lr_history) / len(self.lr_history)
        self._move(theta0, self.dirs, 0.0)  # back to theta0
        if self.step_size is None:
            self._start_measurement()
            return
        self._move(theta0, self.dirs, self.step_size / self.norm)  # a step of the averaged length
        for (p, _), D in zip(self._params(), self.dirs):
            if self.momentum:
                self.state[p]["momentum_buffer"] = D.clone()
        self.updates += 1
        self.since_measurement = 0
        self.measuring = False
        self.stored = []
        self._reset_batch()
