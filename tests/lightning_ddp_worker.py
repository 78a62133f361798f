"""A 2-process Lightning DDP run of ``SaLSAMixin``, for tests/test_integration_lightning.py.

    python tests/lightning_ddp_worker.py OUT_DIR [--steps N] [--checkpoint-every K] [--resume CKPT]

``strategy="ddp"`` starts rank 1 by running this script again (LOCAL_RANK=1), so it cannot run
inside pytest. Each rank writes ``OUT_DIR/rank{r}.pt``: its parameters, SaLSA's stats and state,
and per step the closure calls and the dataset rows it trained on. ``--checkpoint-every K``
saves ``OUT_DIR/step=K.ckpt`` (and every K steps after) with ``ModelCheckpoint``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from datetime import timedelta

import lightning as L
import torch
from helpers import digits, mlp
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from salsa_fast import SaLSAWarning
from salsa_fast.integrations.lightning import SaLSAMixin

ROWS = 1024  # 512 rows per rank, 8 batches of 64 an epoch: 16 steps cross an epoch boundary
BATCH = 64


class RecordingModel(SaLSAMixin, L.LightningModule):
    """The digits MLP; records each step's closure calls and dataset rows."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.calls: list[int] = []
        self.rows: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.calls.append(0)
        self.rows.append(batch[2].tolist())
        return super().training_step(batch, batch_idx)

    def salsa_loss(self, batch, batch_idx):
        x, y, _ = batch
        self.calls[-1] += 1
        return nn.functional.cross_entropy(self.net(x), y)


class ResumableLoader(torch.utils.data.DataLoader):
    """On resume Lightning restarts a plain DataLoader at the beginning of the epoch; a loader
    with ``state_dict``/``load_state_dict`` (like torchdata's StatefulDataLoader) is asked where
    it was. This one skips the batches of the epoch that the checkpointed run had trained on
    (the sampler's order is the same: DistributedSampler shuffles with seed + epoch). Handed out
    means trained on: Lightning prefetches nothing from a loader that has a length."""

    _yielded = 0  # batches of the current epoch handed out
    _skip = 0  # to skip at the start of the next epoch's iteration (set by load_state_dict)

    def __iter__(self):
        skip, self._skip, self._yielded = self._skip, 0, 0
        for i, batch in enumerate(super().__iter__()):
            self._yielded = i + 1
            if i >= skip:
                yield batch

    def state_dict(self):
        return {"yielded": self._yielded}

    def load_state_dict(self, state):
        self._skip = state["yielded"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    warnings.simplefilter("error", SaLSAWarning)  # as pytest's configuration does

    x, y = digits()
    data = torch.utils.data.TensorDataset(x[:ROWS], y[:ROWS], torch.arange(ROWS))
    loader = ResumableLoader(data, batch_size=BATCH, shuffle=True)  # Lightning swaps in a DistributedSampler
    every = args.checkpoint_every
    checkpoint = ModelCheckpoint(dirpath=args.out, filename="{step}", every_n_train_steps=every, save_top_k=-1)
    trainer = L.Trainer(
        strategy=DDPStrategy(timeout=timedelta(seconds=120)),
        accelerator="cpu",
        devices=2,
        max_steps=args.steps,
        default_root_dir=args.out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[checkpoint] if every else [],
        enable_checkpointing=bool(every),
    )
    model = RecordingModel()
    trainer.fit(model, loader, ckpt_path=args.resume)

    salsa = trainer.optimizers[0]
    result = dict(
        params=[p.detach().clone() for p in model.parameters()],
        stats=salsa.stats,
        state=salsa.state_dict(),
        calls=model.calls,
        rows=model.rows,
        global_step=trainer.global_step,
    )
    torch.save(result, f"{args.out}/rank{trainer.global_rank}.pt")
    # Rank 0 started rank 1: wait for it, and fail if it failed.
    for child in getattr(trainer.strategy.launcher, "procs", []):
        if child.wait(timeout=120) != 0:
            sys.exit(f"rank 1 exited with {child.returncode}")


if __name__ == "__main__":
    main()
