"""Hugging Face ``transformers``: a ``Trainer`` that trains with SaLSA.

    from salsa_fast.integrations.transformers import SaLSATrainer

    trainer = SaLSATrainer(model=model, args=TrainingArguments(...), train_dataset=dataset)
    trainer.train()          # no learning rate to set; step_size is logged next to the loss

What it changes in ``Trainer``:

* the optimizer is SaLSA (``salsa_kwargs`` are passed to it; ``args.weight_decay`` applies to
  the parameters the Trainer would decay), with the model's buffers preserved across trials;
* each optimizer step is one ``SaLSA.step(closure)`` run on the last micro-batch of the
  gradient-accumulation window: the closure computes the Trainer's own loss
  (``compute_loss``) over *all* micro-batches of the step, with the Trainer's normalisation,
  and backpropagates each of them (gradient sync only on the last one), so every line-search
  trial measures the same loss the gradient is of;
* ``args.max_grad_norm`` clipping, if set, happens inside the closure, before SaLSA uses the
  gradient;
* the learning-rate schedule acts on SaLSA's per-group ``lr`` multiplier: constant 1.0 by
  default (the search sets the step size), the Trainer's ``lr_scheduler_type`` and warm-up
  with ``schedule_multiplier=True``;
* ``step_size``, ``search_interval``, ``searched_fraction``, ``forwards_per_step`` and
  ``skipped_steps`` join every training log (``log_history``, TensorBoard, W&B, ...).

Under ``torchrun`` (DDP, set up by the Trainer through accelerate) nothing changes: each rank's
closure computes the loss of its own share of the batch, DDP averages the gradient on the
window's last backward, and SaLSA all-reduces the numbers it decides on over the default process
group (:mod:`salsa_fast.distributed`), so every rank takes the same steps and keeps the same
parameters. ``train(resume_from_checkpoint=...)`` continues as the run would have: SaLSA's state
is in the checkpoint's ``optimizer.pt``, and the Trainer restores the data order and each rank's
random streams, from which the closure's dropout seed is drawn (tested bit for bit on 2 CPU
processes). FSDP and DeepSpeed are untested.

fp32 and bf16 (``bf16=True``) are supported. fp16 (``fp16=True``) is not: accelerate's
GradScaler would drive the optimizer itself; train fp16 with ``SaLSA(grad_scaler=...)`` in a
loop of your own instead.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import Trainer

from .. import SaLSA
from . import log_values


class _TrainerSaLSA(SaLSA):
    """SaLSA whose closure-less ``step()`` is the Trainer's own call after ``training_step``
    already stepped: nothing to do."""

    def step(self, closure=None):
        if closure is None:
            return None
        return super().step(closure)


class SaLSATrainer(Trainer):
    """A ``transformers.Trainer`` that trains with SaLSA (what it changes: the module docstring).

    Args:
        *args: the ``Trainer``'s positional arguments.
        salsa_kwargs: passed to :class:`~salsa_fast.SaLSA` (default: its defaults).
        schedule_multiplier: apply the Trainer's ``lr_scheduler_type`` and warm-up to SaLSA's
            per-group ``lr`` multiplier (default ``False``: a constant 1.0, the search alone sets
            the step size).
        **kwargs: the ``Trainer``'s keyword arguments (``model``, ``args``, ``train_dataset``, ...).

    Raises:
        ValueError: ``args.fp16`` is set (accelerate's GradScaler cannot drive a closure
            optimizer; use ``bf16=True``, or ``SaLSA(grad_scaler=...)`` in a loop of your own).
    """

    def __init__(self, *args, salsa_kwargs: dict[str, Any] | None = None, schedule_multiplier: bool = False, **kwargs):
        self.salsa_kwargs = dict(salsa_kwargs or {})
        self.schedule_multiplier = schedule_multiplier
        self._window: list[tuple[Any, Any]] = []
        self._closure_grad_norm = None
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ValueError(
                "SaLSATrainer supports fp32 and bf16 training, not fp16 (accelerate's GradScaler "
                "cannot drive a closure optimizer); use bf16=True, or SaLSA(grad_scaler=...) in your own loop"
            )

    @property
    def salsa(self) -> SaLSA:
        """The SaLSA optimizer (``self.optimizer`` may be accelerate's wrapper around it)."""
        opt = self.optimizer
        return getattr(opt, "optimizer", opt)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model if model is not None else self.model
            decay_names = set(self.get_decay_parameter_names(model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay_names], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            self.optimizer = _TrainerSaLSA(groups, **self.salsa_kwargs)
            self.optimizer.preserve_buffers(model)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and not self.schedule_multiplier:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, lambda _: 1.0)
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """The Trainer's rule: did ``compute_loss`` already normalise for accumulation?"""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return (accepts and num_items_in_batch is not None) or getattr(self, "compute_loss_func", None) is not None

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:  # not the last micro-batch of this optimizer step
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        model.train()
        micro = [(self._prepare_inputs(x), n) for x, n in window]
        salsa = self.salsa

        def closure(backwards=False):
            total = torch.zeros((), device=self.args.device)
            for i, (x, n) in enumerate(micro):
                last = i == len(micro) - 1
                no_sync = self.accelerator.no_sync(model) if backwards and not last else contextlib.nullcontext()
                with no_sync:
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, x, num_items_in_batch=n)
                    if self.args.n_gpu > 1:
                        loss = loss.mean()
                    if not self._loss_is_scaled_for_ga(n):
                        loss = loss / len(micro)
                    if backwards:
                        self.accelerator.backward(loss)
                total = total + loss.detach()
            if backwards and self.args.max_grad_norm:
                self._closure_grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
            return total

        salsa.zero_grad()
        loss = salsa.step(closure)
        return loss.detach()

    def _clip_grad_norm(self, model):
        """Clipping happened in the closure, before SaLSA used the gradient."""
        return self._closure_grad_norm

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.optimizer is not None:
            logs = {**logs, **log_values(self.salsa)}
        super().log(logs, *args, **kwargs)
