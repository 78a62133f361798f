"""Distributed training on CPU with gloo, two processes: every rank takes the same decisions.

Each rank trains on its half of every batch. With SaLSA's all-reduces, the ranks hold identical
parameters after identical closure calls, and equal one process training on the whole batches.
"""

import os

import dist_workers
import pytest
import torch
import torch.distributed as dist
from dist_workers import ONE_PROCESS_ATOL, assert_ranks_agree, max_diff
from helpers import mlp, train
from multiprocess import spawn, torchrun

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD = 2


def _launch(fn, tmp_path, *args):
    spawn(fn, WORLD, tmp_path, str(tmp_path), *args)
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _single_process(name="SaLSA", backend="auto"):
    """One process, the whole batches: what the ranks together must reproduce."""
    model = mlp()
    opt = dist_workers.OPTIMIZERS[name](model.parameters(), backend=backend)
    return model, train(model, opt, dist_workers.STEPS, batch=dist_workers.BATCH)


def _assert_equals_one_process(result, name="SaLSA", backend="auto"):
    model, run = _single_process(name, backend)
    assert result["calls"] == run.calls
    assert max_diff(result["params"], model) <= ONE_PROCESS_ATOL
    decisions = result["stats"]["searches"] if name == "SaLSA" else result["stats"]["measurements"]
    assert decisions >= 4  # the decisions were really exercised


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ddp_ranks_take_identical_decisions_equal_to_one_process(tmp_path, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    results = _launch(dist_workers.train, tmp_path, "ddp", "SaLSA", backend)
    assert_ranks_agree(results)
    _assert_equals_one_process(results[0], backend=backend)


def test_without_the_all_reduce_ranks_disagree(tmp_path):
    """The same run with the collectives replaced by local numbers: the ranks, seeing different
    data, decide differently, which is what the test above would catch."""
    results = _launch(dist_workers.train, tmp_path, "ddp", "SaLSA", "auto", False)
    differs = results[0]["calls"] != results[1]["calls"] or not all(
        torch.equal(p, q) for p, q in zip(results[0]["params"], results[1]["params"])
    )
    assert differs


def test_ddp_gradient_as_bucket_view(tmp_path):
    """DDP's gradients as views of its buckets: SaLSA copies them into its own buffer each step
    (warned about once, on each rank) and takes exactly the decisions of the default setting."""
    viewed = _launch(dist_workers.train, tmp_path, "ddp", "SaLSA", "auto", True, True)
    assert_ranks_agree(viewed)
    default = _launch(dist_workers.train, tmp_path, "ddp")
    assert viewed[0]["calls"] == default[0]["calls"] and viewed[0]["stats"] == default[0]["stats"]
    assert all(torch.equal(p, q) for p, q in zip(viewed[0]["params"], default[0]["params"]))
    for r in viewed:
        assert [w for w in r["warnings"] if "copies it back into its flat gradient buffer" in w] != []
        assert len(r["warnings"]) == 1
    assert all(r["warnings"] == [] for r in default)


def test_labpal_ddp_ranks_take_identical_decisions_equal_to_one_process(tmp_path):
    results = _launch(dist_workers.train, tmp_path, "ddp", "LABPAL")
    assert_ranks_agree(results)
    _assert_equals_one_process(results[0], "LABPAL")


def test_ddp_checkpoint_rank0_saves_all_load(tmp_path):
    resumed = _launch(dist_workers.checkpoint_rank0_saves, tmp_path)
    assert_ranks_agree(resumed)
    uninterrupted = _launch(dist_workers.train, tmp_path, "ddp")
    assert resumed[0]["calls"] == uninterrupted[0]["calls"]
    assert all(torch.equal(p, q) for p, q in zip(resumed[0]["params"], uninterrupted[0]["params"]))


@pytest.mark.parametrize("name", ["SaLSA", "LABPAL"])
def test_fsdp2_sharded_parameters(tmp_path, name):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 is not available")
    results = _launch(dist_workers.train, tmp_path, "fsdp", name)
    assert all(results[0]["sharded"])
    assert_ranks_agree(results)
    _assert_equals_one_process(results[0], name)


def test_torchrun_example(tmp_path):
    """examples/ddp_digits.py, launched as the README says (torchrun, two CPU processes)."""
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "ddp_digits.py")
    done = torchrun(example, "--steps", "30", cwd=tmp_path)
    assert "ranks hold identical parameters: True" in done.stdout
    assert (tmp_path / "salsa_ddp_checkpoint.pt").exists()


def test_fsdp2_dcp_example_resumes_exactly(tmp_path):
    """examples/fsdp2_dcp.py on two CPU ranks: resumed from its step-10 checkpoint, it ends with
    the parameters (checksum) and closure calls of the run that never stopped."""
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 is not available")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "fsdp2_dcp.py")
    straight = torchrun(example, "--steps", "20", "--save-every", "10", "--checkpoint-dir", "straight", cwd=tmp_path)
    assert (tmp_path / "straight" / "step-10").is_dir() and (tmp_path / "straight" / "step-20").is_dir()
    resumed = torchrun(example, "--steps", "20", "--resume", str(tmp_path / "straight" / "step-10"),
                       "--checkpoint-dir", "resumed", cwd=tmp_path)  # fmt: skip
    assert "resumed from" in resumed.stdout
    last = [line for line in straight.stdout.splitlines() if line.startswith("parameter checksum")]
    assert len(last) == 1 and last == [line for line in resumed.stdout.splitlines() if line.startswith("parameter checksum")]
