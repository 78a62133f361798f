"""Lightning: train a ``LightningModule`` with SaLSA, the smallest correct way.

    from salsa_fast.integrations.lightning import SaLSAMixin

    class Model(SaLSAMixin, lightning.LightningModule):
        def salsa_loss(self, batch, batch_idx):      # the loss of one batch, nothing else
            x, y = batch
            return F.cross_entropy(self(x), y)

    lightning.Trainer(max_steps=1000).fit(Model(), loader)

SaLSA needs to evaluate the loss at trial points, which Lightning's automatic optimization
(a closure without arguments, run once) cannot express, so the mixin switches the module to
manual optimization and writes ``training_step`` for you: it builds the closure from
``salsa_loss`` (backward through ``manual_backward``, so Lightning's precision plugins
apply), steps SaLSA, counts the step for Lightning (``global_step``, ``max_steps``), steps
any LR schedulers you return (they scale SaLSA's per-group ``lr`` multiplier), and logs
``train_loss``, ``step_size`` and the search statistics to the Trainer's loggers.

``configure_optimizers`` defaults to ``SaLSA(self.parameters(), **self.salsa_kwargs)`` with
the module's buffers preserved across trials (BatchNorm statistics are updated once per
step) and, under ``precision="16-mixed"``, Lightning's GradScaler handed to SaLSA. Override it
to return your own SaLSA (and schedulers) instead.

Several processes (``strategy="ddp"``; tested with two CPU processes): ``training_step`` runs
inside DDP's forward and the closure's backward is ``manual_backward``, which readies DDP's
reducer, so the gradient is all-reduced once per step; the search's trial forwards run in the
same ``training_step`` under ``no_grad``, past the DDP wrapper, and its reducer never sees them
(they need no ``find_unused_parameters``). SaLSA averages the losses it decides on over the
ranks, so every rank takes the same decisions and keeps identical parameters. Keep DDP's default
``gradient_as_bucket_view=False`` (see docs/integrations.md). ``train_loss`` is each rank's own loss
(rank 0's reaches the loggers), as Lightning logs without ``sync_dist``.

Resuming (``fit(..., ckpt_path=...)``) restores SaLSA's state with Lightning's loop position
and schedulers; the run continues bit for bit as the uninterrupted one if (1) the checkpoint
ends an epoch or the train loader is resumable (``state_dict``/``load_state_dict``, e.g.
torchdata's ``StatefulDataLoader``; a plain DataLoader restarts the epoch at its first batch,
and Lightning warns), and (2) training draws no random numbers: Lightning does not checkpoint
random generators, and SaLSA seeds each step's closure calls (dropout) with a draw from torch's.
Under manual optimization ``ModelCheckpoint(every_n_train_steps=...)`` warns that it saves the
state after the step: that is the state to resume from.
"""

from __future__ import annotations

from typing import Any

from .. import SaLSA
from . import log_values


class SaLSAMixin:
    """Mix into a ``LightningModule`` (before it in the bases); implement ``salsa_loss``."""

    automatic_optimization = False
    salsa_kwargs: dict[str, Any] = {}

    def salsa_loss(self, batch, batch_idx):
        """The scalar loss of ``batch``: forward pass and loss function, no backward."""
        raise NotImplementedError("SaLSAMixin needs salsa_loss(batch, batch_idx) -> loss")

    def configure_optimizers(self):
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        optimizer = SaLSA(self.parameters(), grad_scaler=scaler, **self.salsa_kwargs)
        optimizer.preserve_buffers(self)
        return optimizer

    def training_step(self, batch, batch_idx):
        lightning_optimizer = self.optimizers()
        salsa = getattr(lightning_optimizer, "optimizer", lightning_optimizer)
        if not isinstance(salsa, SaLSA):
            raise TypeError(f"SaLSAMixin trains with SaLSA, but configure_optimizers returned {type(salsa).__name__}")

        def closure(backwards=False):
            loss = self.salsa_loss(batch, batch_idx)
            if backwards:
                self.manual_backward(loss)
            return loss

        # What LightningOptimizer.step does around the step, minus its own closure wrapping
        # (which calls the closure without arguments): count the step for the loop.
        lightning_optimizer._on_before_step()
        salsa.zero_grad()
        loss = salsa.step(closure)
        lightning_optimizer._on_after_step()

        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()
        self.log("train_loss", loss.detach(), prog_bar=True)
        self.log_dict(log_values(salsa))
        return loss.detach()
