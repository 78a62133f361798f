"""LABPAL, restated plainly: per-parameter tensors, one formula per line, the reference's own
parabola fit (``numpy.gradient`` twice, restated as :func:`gradient`). The ground truth :class:`salsa_fast.LABPAL` is tested
against; same arguments, closure contract, seeding and fixes, none of its flat buffers.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from .closure import call_closure, check_closure, draw_seed

H = 1.77e-4


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
    :func:`salsa_fast.parabola.nanmean`: the twin shares no code with what it checks.)"""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


class LABPALReference(Optimizer):
    def __init__(self, params, mode="nsgd", training_set_size=40000, batch_size=128, update_step_adaptation=1.8,
                 momentum=0.0, reuse_steps=1000, measure_batches=10,
                 batch_size_schedule=((0, 1), (75000, 2), (112500, 4)), warmup_updates=400, window=25,
                 sample_step=0.01, max_step_size=1.0, eps=1e-6, *, fit="reference", cap_sgd_updates=True):  # fmt: skip
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

        self.calls = 0
        self.updates = 0
        self.since_measurement = 0
        self.k = 1
        self.next_entry = 0
        self.measuring = True
        self.warmup_measured = False
        self.step_value = None  # the step length in use
        self.lr = None  # the SGD learning rate in use
        self.history = []
        self.lr_history = []
        self.forwards = 0
        self.grad_sum = None  # per parameter: the summed gradients of the current batch
        self.count = 0  # calls in the current training batch
        self.stored = []  # the measurement's (closure, seed, loss at theta0)

    def _params(self):
        return [(p, g["lr"]) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _reset_batch(self):
        self.grad_sum = [torch.zeros_like(p, dtype=torch.float32 if p.dtype != torch.float64 else p.dtype)
                         for p, _ in self._params()]  # fmt: skip
        self.count = 0

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
        """Mean gradient, direction (with momentum), ||direction|| and <mean gradient, direction>."""
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

    def _fit(self, l0, l1, l2):
        x = [0.0, H, self.mu]
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
        return a, b, -b / (2 * a)

    def step(self, closure=None):
        check_closure(closure)
        if self.grad_sum is None:
            self._reset_batch()
        while self.next_entry < len(self.schedule) and self.schedule[self.next_entry][0] <= self.calls:
            self.k = max(int(self.schedule[self.next_entry][1] * self.noise_factor), 1)
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
        self.count += 1
        if self.count == self.k:
            dirs, norm, _ = self._direction(self.count)
            if math.isfinite(norm) and norm > 0:
                origins = [p.detach().clone() for p, _ in self._params()]
                if self.mode == "nsgd":
                    scale = self.step_value / norm
                elif self.cap:
                    scale = min(self.lr, self.step_value / norm)
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
        if i < self.k:
            out, loss, seed = self._gradient_pass(closure)
        else:
            seed = draw_seed()
            out, loss = call_closure(closure, seed, [], backwards=False)
            self.forwards += 1
        self.stored.append((closure, seed, float(loss)))
        if i + 1 == self.k:
            self.dirs, self.norm, dot = self._direction(self.k)
            slope = -dot / self.norm if self.norm > 0 else float("nan")
            if not (math.isfinite(self.norm) and 1e-3 <= self.norm <= 100 and slope < 0):
                self._start_measurement()
                self.measuring = self.step_value is None
                self.since_measurement = 0
                return out
        if i + 1 == self.measure_batches * self.k:
            self._finish()
        return out

    def _losses_at(self, theta0, x):
        self._move(theta0, self.dirs, x / self.norm, use_group_lr=False)
        losses = []
        for closure, seed, _ in self.stored:
            losses.append(float(call_closure(closure, seed, [], backwards=False)[1]))
            self.forwards += 1
        return nanmean(losses)

    @torch.no_grad()
    def _finish(self):
        theta0 = [p.detach().clone() for p, _ in self._params()]
        l0 = nanmean([loss for _, _, loss in self.stored])
        l1 = self._losses_at(theta0, H)
        l2 = self._losses_at(theta0, self.mu)
        a, b, s = self._fit(l0, l1, l2)
        if a > 0 and b < 0:
            s = max(min(s, self.max_step_size) * self.adaptation, self.eps)
            lr = max(s / max(self.norm, self.eps), self.eps)
            if math.isfinite(s):
                if self.updates < self.warmup_updates:
                    self.step_value, self.lr = s, lr
                else:
                    self.history = (self.history + [s])[-self.window :]
                    self.lr_history = (self.lr_history + [lr])[-self.window :]
                    self.step_value = sum(self.history) / len(self.history)
                    self.lr = sum(self.lr_history) / len(self.lr_history)
        self._move(theta0, self.dirs, 0.0)  # back to theta0
        if self.step_value is None:
            self._start_measurement()
            return
        self._move(theta0, self.dirs, self.step_value / self.norm)  # a step of the averaged length
        for (p, _), D in zip(self._params(), self.dirs):
            if self.momentum:
                self.state[p]["momentum_buffer"] = D.clone()
        self.updates += 1
        self.since_measurement = 0
        self.measuring = False
        self.stored = []
        self._reset_batch()
