"""SaLSATrainer under DDP: the script ``tests/test_integration_transformers.py`` runs with torchrun.

    torchrun --standalone --nproc_per_node 2 trainer_ddp_worker.py OUT [--resume CHECKPOINT]

Trains the tests' tiny GPT-2 on 2 CPU processes (gloo), a checkpoint every ``SAVE_STEPS`` steps
in ``OUT/run``, and writes what the tests compare to ``OUT/rank{r}.pt``: the parameters, SaLSA's
stats after every optimizer step with the number of ``compute_loss`` calls so far, the input
ids of every micro-batch this rank trained on, the process group's timeout and which
``salsa_fast`` it imported.
"""

from __future__ import annotations

import argparse
import gc
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers
from tiny_gpt2 import CharDataset, tiny_gpt2

import salsa_fast
from salsa_fast import SaLSAWarning
from salsa_fast.integrations.transformers import SaLSATrainer

STEPS = 16
SAVE_STEPS = 8
BATCH = 4  # per rank and micro-batch
ACCUMULATION = 2
SAMPLES = 96  # 12 micro-batches per rank: 6 steps an epoch, so the run (and a resume from step 8) crosses epochs
DROPOUT = 0.1  # on: the resumed run must restore the RNG streams exactly, not only the data order
TIMEOUT_S = 120  # of every collective: a lost peer fails the run in 2 minutes instead of hanging it (default 30)


class RecordingTrainer(SaLSATrainer):
    """Keeps the micro-batches this rank trained on and, after every optimizer step, SaLSA's
    stats with the number of loss evaluations so far (a closure call makes one per micro-batch)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_calls = 0
        self.batches: list[torch.Tensor] = []
        self.trace: list[dict] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.loss_calls += 1
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append(inputs["input_ids"].clone())
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the window's last micro-batch: SaLSA stepped
            self.trace.append({"step": self.state.global_step + 1, "loss_calls": self.loss_calls, **self.salsa.stats})
        return loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", default=None)
    cli = parser.parse_args()
    warnings.simplefilter("error", SaLSAWarning)  # as in the pytest config
    # transformers 5.24 hands ddp_timeout to the process group only off CPU (use_cpu=True drops it):
    # the group is made here, with that timeout, and accelerate takes it as it finds it.
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))

    data = CharDataset(SAMPLES)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(cli.out, "run"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=SAVE_STEPS,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        ddp_backend="gloo",
        ddp_timeout=TIMEOUT_S,
    )
    trainer = RecordingTrainer(model=tiny_gpt2(data.vocab, DROPOUT), args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=cli.resume)

    rank = dist.get_rank()
    assert dist.get_world_size() == 2 and isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    # (private API: the only way to read the timeout the group was created with)
    timeout = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
    result = {
        "params": params,
        "trace": trainer.trace,
        "batches": trainer.batches,
        "timeout": timeout.total_seconds(),
        "package": salsa_fast.__file__,
    }
    torch.save(result, os.path.join(cli.out, f"rank{rank}.pt"))
    # DDP's reducer holds the group too. Were its reference the last (after destroy_process_group), freeing
    # the trainer would destroy the group with the GIL held, and ~ProcessGroupGloo then waits for a gloo
    # thread that may need the GIL: rank 0 hung so, once in about ten runs. Freed first, the group goes
    # from Python, which releases the GIL.
    del trainer
    gc.collect()
    assert not any(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    dist.barrier()  # tear down only once every rank is done (see tests/multiprocess.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
