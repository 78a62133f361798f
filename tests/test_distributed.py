"""Distributed training on CPU with gloo, two processes: every rank takes the same decisions.

Each rank trains on its half of every batch. With SaLSA's all-reduces, the ranks hold identical
parameters after identical closure calls, and equal, bit for bit, one process that trains on the
whole batches computing them as the ranks do (``dist_workers.OneProcess``).
"""

import os

import dist_workers
import multiprocess
import pytest
import torch
import torch.distributed as dist
from dist_workers import (
    OneProcess,
    assert_equals_one_process,
    assert_ranks_agree,
    ddp_mean,
    fsdp_mean,
    probe_gradients,
)
from multiprocess import spawn, torchrun

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD = 2


def _launch(fn, tmp_path, *args):
    spawn(fn, WORLD, tmp_path, str(tmp_path), *args)
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _assert_equals_one_process(result, kind, name="SaLSA", backend="auto"):
    """``result`` (rank 0's) equals one process's run on the whole batches, bit for bit; and the
    gradients DDP or FSDP2 reduced on the ranks are the twin's reduction of them, bit for bit."""
    reduce = {"ddp": ddp_mean, "fsdp": fsdp_mean}[kind]
    other = {"ddp": fsdp_mean, "fsdp": ddp_mean}[kind]
    grads = [probe_gradients(r) for r in range(WORLD)]
    assert torch.equal(result["probe"], reduce(grads, WORLD))
    assert not torch.equal(reduce(grads, WORLD), other(grads, WORLD))  # (the probe tells the two apart)
    assert_equals_one_process(result, OneProcess(kind, name, WORLD, backend).run())
    decisions = result["stats"]["searches"] if name == "SaLSA" else result["stats"]["measurements"]
    assert decisions >= 4  # the decisions were really exercised


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ddp_ranks_take_identical_decisions_equal_to_one_process(tmp_path, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    results = _launch(dist_workers.train, tmp_path, "ddp", "SaLSA", backend)
    assert_ranks_agree(results)
    _assert_equals_one_process(results[0], "ddp", backend=backend)


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
    _assert_equals_one_process(results[0], "ddp", "LABPAL")


def test_ddp_checkpoint_rank0_saves_all_load(tmp_path):
    resumed = _launch(dist_workers.checkpoint_rank0_saves, tmp_path)
    assert_ranks_agree(resumed)
    uninterrupted = _launch(dist_workers.train, tmp_path, "ddp")
    assert resumed[0]["calls"] == uninterrupted[0]["calls"]
    assert all(torch.equal(p, q) for p, q in zip(resumed[0]["params"], uninterrupted[0]["params"]))


def test_a_rank_aborted_while_tearing_down_runs_again(tmp_path):
    """gloo, rarely and under load, aborts a rank that is tearing down (SIGABRT; seen in
    ``test_ddp_checkpoint_rank0_saves_all_load``): ``spawn`` warns with what the rank said and
    runs the whole thing once more."""
    with pytest.warns(UserWarning, match=r"(?s)rank 1 was killed by SIGABRT while tearing down.*gloo::IoException"):
        results = _launch(multiprocess.abort_at_teardown, tmp_path)
    assert [r["first"] for r in results] == [False, False]  # (the second run's)


@pytest.mark.parametrize("name", ["SaLSA", "LABPAL"])
def test_fsdp2_sharded_parameters(tmp_path, name):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 is not available")
    results = _launch(dist_workers.train, tmp_path, "fsdp", name)
    assert all(results[0]["sharded"])
    assert_ranks_agree(results)
    _assert_equals_one_process(results[0], "fsdp", name)


def test_torchrun_example(tmp_path):
    """examples/ddp_digits.py, launched as docs/distributed.md says (torchrun, two CPU processes)."""
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
    resumed = torchrun(
        example,
        "--steps",
        "20",
        "--resume",
        str(tmp_path / "straight" / "step-10"),
        "--checkpoint-dir",
        "resumed",
        cwd=tmp_path,
    )
    assert "resumed from" in resumed.stdout
    last = [line for line in straight.stdout.splitlines() if line.startswith("parameter checksum")]
    assert len(last) == 1 and last == [
        line for line in resumed.stdout.splitlines() if line.startswith("parameter checksum")
    ]
