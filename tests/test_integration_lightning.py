"""SaLSAMixin with lightning.Trainer on CPU: it trains, counts steps, logs the step size; on two
processes (DDP) the ranks take identical decisions, and a run resumed mid-epoch continues exactly."""

import contextlib
import csv
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from helpers import digits
from multiprocess import diagnosis
from torch import nn

L = pytest.importorskip("lightning")
import lightning_ddp_worker as worker  # noqa: E402

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
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
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
    assert {"effective_step_size", "search_interval", "searched_fraction", "forwards_per_step", "train_loss"} <= set(
        rows[0]
    )
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
    salsa = trainer.optimizers[0]
    assert salsa.step_size > 0
    # the last step's updates were its lr times the step size found (which the schedule leaves)
    assert salsa.stats["effective_step_size"] == salsa.last_step.lr_scale * salsa.step_size < 0.01 * salsa.step_size


def test_bf16_mixed_precision(tmp_path):
    model = DigitsModel()
    initial = _full_loss(model)
    trainer, _ = _fit(model, tmp_path, steps=60, precision="bf16-mixed")
    assert trainer.global_step == 60
    assert _full_loss(model) < initial / 2


# -- two processes: strategy="ddp" starts rank 1 by running the script again, so the runs happen in
# tests/lightning_ddp_worker.py, a subprocess with a deadline (and the ranks' collectives time out).

DDP_DEADLINE_S = 300
DDP_STEPS = 16
CHECKPOINT_STEP = 5  # mid-epoch: an epoch is ROWS / (2 * BATCH) = 8 steps
BATCHES_PER_EPOCH = worker.ROWS // (2 * worker.BATCH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_fit(out, *args: str) -> list[dict]:
    """Run the worker on two processes; each rank's results. The port is picked just before the
    launch; if another process took it meanwhile, the run is tried once more on a new one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for attempt in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }  # this checkout's
        log = os.path.join(out, f"ranks-{attempt}.log")
        # Output to a file, not a pipe, and the worker in its own session: rank 0 returns (it waits for
        # rank 1 when it succeeds), and whatever is left of the session is killed, rank 1 included
        # (Lightning does not stop it when rank 0 fails, e.g. on a taken port: it would wait out its timeout).
        with open(log, "w") as sink:
            run = subprocess.Popen(
                [sys.executable, worker.__file__, str(out), *args],
                cwd=out,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                run.wait(timeout=DDP_DEADLINE_S)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        with open(log) as f:
            output = f.read()
        if timed_out:
            raise AssertionError(f"the DDP run did not finish in {DDP_DEADLINE_S} s:\n{diagnosis(output)}")
        if run.returncode == 0 or attempt or "address already in use" not in output.lower():
            break
    assert run.returncode == 0, diagnosis(output)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def _identical(a, b) -> bool:
    """Equal, tensors bit for bit, through dicts and lists."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_identical, a, b))
    return a == b


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process run of DDP_STEPS steps that checkpoints every CHECKPOINT_STEP steps."""
    out = tmp_path_factory.mktemp("ddp")
    return out, _ddp_fit(out, "--steps", str(DDP_STEPS), "--checkpoint-every", str(CHECKPOINT_STEP))


def test_ddp_ranks_take_identical_decisions_on_their_own_shares(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert rank0["global_step"] == rank0["stats"]["steps"] == DDP_STEPS
    # searches (and trials) ran: on each rank's own loss they would differ (calls, parameters)
    assert rank0["stats"]["searches"] >= 10 and rank0["stats"]["total_trials"] > 0
    assert rank0["calls"] == rank1["calls"]
    assert rank0["stats"] == rank1["stats"]
    assert _identical(rank0["params"], rank1["params"])
    assert _identical(rank0["state"], rank1["state"])
    # Lightning's DistributedSampler: each epoch, the ranks train on disjoint halves of the rows
    for epoch in range(DDP_STEPS // BATCHES_PER_EPOCH):
        steps = slice(epoch * BATCHES_PER_EPOCH, (epoch + 1) * BATCHES_PER_EPOCH)
        rows0, rows1 = ({i for batch in r["rows"][steps] for i in batch} for r in (rank0, rank1))
        assert not rows0 & rows1 and len(rows0 | rows1) == worker.ROWS


def test_ddp_resumed_mid_epoch_continues_as_the_uninterrupted_run(ddp_run, tmp_path):
    out, uninterrupted = ddp_run
    checkpoint = out / f"step={CHECKPOINT_STEP}.ckpt"
    resumed = _ddp_fit(
        tmp_path, "--steps", str(DDP_STEPS), "--checkpoint-every", str(CHECKPOINT_STEP), "--resume", str(checkpoint)
    )
    for full, rest in zip(uninterrupted, resumed):
        assert rest["global_step"] == DDP_STEPS
        assert rest["rows"] == full["rows"][CHECKPOINT_STEP:]  # the same batches, in the same order
        assert rest["calls"] == full["calls"][CHECKPOINT_STEP:]
        assert rest["stats"] == full["stats"]
        assert _identical(rest["params"], full["params"])
        assert _identical(rest["state"], full["state"])
