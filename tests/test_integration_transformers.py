"""SaLSATrainer: a tiny GPT-2 built from a config (no downloads), on Python's documentation; in
one process, and with DDP on 2 CPU processes (torchrun), a resumed checkpoint included."""

import os

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
import trainer_ddp_worker as worker  # noqa: E402
from multiprocess import torchrun  # noqa: E402
from tiny_gpt2 import CharDataset, tiny_gpt2  # noqa: E402

from salsa_fast import SaLSA  # noqa: E402
from salsa_fast.integrations.transformers import SaLSATrainer  # noqa: E402


def _trainer(tmp_path, data, batch, accumulation, steps, dropout=0.1, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return SaLSATrainer(model=tiny_gpt2(data.vocab, dropout), args=args, train_dataset=data, **kwargs)


@pytest.fixture(scope="module")
def data():
    return CharDataset()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trains_a_tiny_gpt2_and_logs_the_step_size(tmp_path, data, accumulation):
    trainer = _trainer(tmp_path, data, batch=16 // accumulation, accumulation=accumulation, steps=60)
    sample = torch.stack([data[i]["input_ids"] for i in range(64)])
    with torch.no_grad():
        initial = trainer.model(input_ids=sample, labels=sample).loss.item()  # ~ln(vocabulary)
    trainer.train()
    assert isinstance(trainer.salsa, SaLSA)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6
    assert all("step_size" in entry and entry["step_size"] > 0 for entry in logs)
    assert {"effective_step_size", "search_interval", "searched_fraction", "forwards_per_step"} <= set(logs[0])
    assert logs[-1]["loss"] < 0.7 * initial
    assert trainer.salsa.stats["steps"] == 60  # one SaLSA step per optimizer step
    assert trainer.state.global_step == 60


def test_gradient_accumulation_is_one_step_over_all_micro_batches(tmp_path, data):
    """Batch 8 in one piece, or as 2 micro-batches of 4: the same loss (normalised over the
    window's tokens), the same decisions, the same parameters to float rounding.

    (Rounding: after one step the two differ by 2e-7. Adam's normalised step moves an element
    by about the step size whatever the size of its gradient, so elements whose gradient is
    at rounding level can move differently; a few per thousand end up 1e-5 to 1e-3 apart.)"""
    whole = _trainer(tmp_path / "a", data, batch=8, accumulation=1, steps=25, dropout=0.0)
    split = _trainer(tmp_path / "b", data, batch=4, accumulation=2, steps=25, dropout=0.0)
    whole.train()
    split.train()
    assert whole.salsa.stats["forwards"] == split.salsa.stats["forwards"]
    assert whole.salsa.step_size == pytest.approx(split.salsa.step_size, rel=1e-6)
    diff = torch.cat([(p - q).abs().flatten() for p, q in zip(whole.model.parameters(), split.model.parameters())])
    assert diff.mean() < 1e-5 and diff.max() < 5e-3
    assert (diff > 1e-5).float().mean() < 0.02


def test_schedule_multiplier_follows_the_trainers_schedule(tmp_path, data):
    trainer = _trainer(tmp_path, data, batch=8, accumulation=1, steps=20, schedule_multiplier=True)
    trainer.args.lr_scheduler_type = "cosine"
    trainer.args.warmup_steps = 5
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    lrs = [entry["learning_rate"] for entry in logs]
    assert lrs[0] <= 1.0 and lrs[-1] < lrs[0]  # cosine decay of the multiplier on the step size
    # the updates shrink with it; the step size the search finds does not (it is not undone)
    assert logs[-1]["effective_step_size"] < logs[-1]["step_size"]


def test_fp16_is_refused_with_a_way_out(tmp_path, data):
    with pytest.raises((ValueError, RuntimeError), match="fp16|bf16|GPU|gpu"):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), fp16=True, report_to=[], use_cpu=True)
        SaLSATrainer(model=tiny_gpt2(data.vocab), args=args, train_dataset=data)


# -- DDP on 2 CPU processes: tests/trainer_ddp_worker.py under torchrun ---------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDP_DEADLINE_S = 300  # one run takes about 12 s on 2 idle cores
needs_distributed = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _torchrun_worker(out, *args):
    """The worker on 2 processes; each rank's results."""
    out.mkdir(exist_ok=True)
    # the ranks import this checkout's salsa_fast, as pytest does here, not whichever is installed
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    torchrun(worker.__file__, str(out), *args, nproc=2, cwd=out, timeout=DDP_DEADLINE_S, env=env)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def _identical(params, others):
    return params.keys() == others.keys() and all(torch.equal(params[k], others[k]) for k in params)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The uninterrupted run: its folder (checkpoints in run/) and each rank's results."""
    out = tmp_path_factory.mktemp("ddp")
    return out, _torchrun_worker(out)


@needs_distributed
def test_ddp_ranks_take_the_same_decisions_each_on_its_share(ddp_run):
    _, ranks = ddp_run
    first, second = ranks
    assert [rank["timeout"] for rank in ranks] == [worker.TIMEOUT_S] * 2  # the Trainer's collectives have it
    assert first["package"].startswith(ROOT)  # the code under test
    assert first["trace"] == second["trace"] and len(first["trace"]) == worker.STEPS
    last = first["trace"][-1]
    assert last["steps"] == worker.STEPS and last["searches"] > 0 and last["total_trials"] > 0  # decisions were made
    assert last["loss_calls"] == worker.ACCUMULATION * last["forwards"]  # every closure call: the whole window
    assert _identical(first["params"], second["params"])
    # Each rank trains on its own share: in every epoch, the two ranks together see each sample once.
    per_epoch = worker.SAMPLES // (2 * worker.BATCH)  # micro-batches per rank and epoch
    samples = sorted(x.tolist() for x in CharDataset(worker.SAMPLES).items)
    for epoch in range(worker.STEPS * worker.ACCUMULATION // per_epoch):
        seen = torch.cat([b for rank in ranks for b in rank["batches"][epoch * per_epoch : (epoch + 1) * per_epoch]])
        assert sorted(seen.tolist()) == samples


@needs_distributed
def test_ddp_resume_continues_exactly_as_the_uninterrupted_run(ddp_run):
    """From the mid-epoch checkpoint, dropout on: the same micro-batches, decisions and loss
    evaluations, and bit-identical parameters (the Trainer restores the data order and each
    rank's RNG states; SaLSA's state is in the checkpoint's optimizer.pt)."""
    out, uninterrupted = ddp_run
    resumed = _torchrun_worker(out / "resumed", "--resume", str(out / "run" / f"checkpoint-{worker.SAVE_STEPS}"))
    done = worker.SAVE_STEPS * worker.ACCUMULATION  # micro-batches before the checkpoint
    for whole, rest in zip(uninterrupted, resumed):
        before = whole["trace"][worker.SAVE_STEPS - 1]["loss_calls"]  # (counted by the first process only)
        after = whole["trace"][worker.SAVE_STEPS :]
        assert rest["trace"] == [{**t, "loss_calls": t["loss_calls"] - before} for t in after]
        assert len(rest["batches"]) == len(whole["batches"]) - done
        assert all(torch.equal(a, b) for a, b in zip(whole["batches"][done:], rest["batches"]))
        assert _identical(whole["params"], rest["params"])
