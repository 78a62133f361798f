"""SaLSAMixin with lightning.Trainer on CPU: it trains, counts steps, logs the step size."""

import csv
import math

import pytest
import torch
from helpers import digits
from torch import nn

L = pytest.importorskip("lightning")
from salsa_fast import SaLSA  # noqa: E402
from salsa_fast.integrations.lightning import SaLSAMixin  # noqa: E402


class DigitsModel(SaLSAMixin, L.LightningModule):
    def __init__(self, batchnorm=False):
        super().__init__()
        torch.manual_seed(0)
        norm = [nn.BatchNorm1d(64)] if batchnorm else []
        self.net = nn.Sequential(nn.Linear(64, 64), *norm, nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def salsa_loss(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def _loader():
    x, y = digits()
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


def _full_loss(model):
    x, y = digits()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), y).item()
    model.train(was_training)
    return loss


def _fit(model, tmp_path, steps=80, **kwargs):
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path), name="run")
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=10,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip
    trainer.fit(model, _loader())
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return trainer, rows


def test_trains_counts_steps_and_logs_the_step_size(tmp_path):
    model = DigitsModel()
    initial = _full_loss(model)
    trainer, rows = _fit(model, tmp_path)
    assert trainer.global_step == 80
    assert isinstance(trainer.optimizers[0], SaLSA)
    assert trainer.optimizers[0].stats["steps"] == 80
    logged = [r for r in rows if r.get("step_size")]
    assert len(logged) >= 7
    assert all(float(r["step_size"]) > 0 for r in logged)
    assert {"search_interval", "searched_fraction", "forwards_per_step", "train_loss"} <= set(rows[0])
    assert _full_loss(model) < initial / 2


def test_batchnorm_statistics_are_updated_once_per_step(tmp_path):
    model = DigitsModel(batchnorm=True)
    trainer, _ = _fit(model, tmp_path, steps=30)
    bn = model.net[1]
    assert int(bn.num_batches_tracked) == 30  # trials did not touch them
    assert trainer.optimizers[0].stats["forwards"] > 30


class ScheduledModel(DigitsModel):
    def configure_optimizers(self):
        optimizer = SaLSA(self.parameters())
        warmup, total = 10, 60

        def factor(step):
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, factor)]


def test_warmup_cosine_schedule_scales_the_step_size_multiplier(tmp_path):
    model = ScheduledModel()
    trainer, _ = _fit(model, tmp_path, steps=60)
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] < 0.01  # cosine ran down to ~0 over the 60 steps
    assert trainer.optimizers[0].step_size > 0


def test_bf16_mixed_precision(tmp_path):
    model = DigitsModel()
    initial = _full_loss(model)
    trainer, _ = _fit(model, tmp_path, steps=60, precision="bf16-mixed")
    assert trainer.global_step == 60
    assert _full_loss(model) < initial / 2
