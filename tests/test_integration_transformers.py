"""SaLSATrainer: a tiny GPT-2 built from a config (no downloads), on Python's documentation."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from salsa_fast import SaLSA  # noqa: E402
from salsa_fast.integrations.transformers import SaLSATrainer  # noqa: E402

SEQ = 32


class CharDataset(torch.utils.data.Dataset):
    def __init__(self, n=512):
        import pydoc_data.topics

        text = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[: n * SEQ + 1]
        vocab = sorted(set(text))
        self.vocab = len(vocab)
        index = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([index[c] for c in text])
        self.items = [ids[i * SEQ : (i + 1) * SEQ] for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def _gpt2(vocab, dropout=0.1):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _trainer(tmp_path, data, batch, accumulation, steps, dropout=0.1, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, logging_steps=10, report_to=[], save_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return SaLSATrainer(model=_gpt2(data.vocab, dropout), args=args, train_dataset=data, **kwargs)


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
    assert {"search_interval", "searched_fraction", "forwards_per_step"} <= set(logs[0])
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
    lrs = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert lrs[0] <= 1.0 and lrs[-1] < lrs[0]  # cosine decay of the multiplier on the step size


def test_fp16_is_refused_with_a_way_out(tmp_path, data):
    with pytest.raises((ValueError, RuntimeError), match="fp16|bf16|GPU|gpu"):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), fp16=True, report_to=[], use_cpu=True)
        SaLSATrainer(model=_gpt2(data.vocab), args=args, train_dataset=data)
