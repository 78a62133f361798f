"""``torch.distributed.checkpoint`` (DCP) and its state-dict helpers, as FSDP2, torchtitan and
accelerate save optimizers: a run resumed from such a checkpoint continues exactly as the
uninterrupted one (same closure calls, equal parameters and stats), for SaLSA and LABPAL, in one
process, under DDP and under FSDP2 (two gloo ranks); and a checkpoint FSDP2 wrote on two ranks
loads into one process and continues with the same decisions.

torch keeps only ``state`` and ``param_groups`` of an optimizer's state_dict (and, flattened,
only what each parameter's group holds): the run's scalars live in every group for that reason.
"""

import os

import dcp_workers
import dist_workers
import pytest
import torch
import torch.distributed as dist
from dist_workers import OneProcess, assert_equals_one_process, assert_ranks_agree
from helpers import mlp
from multiprocess import spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD = 2
NAMES = tuple(dist_workers.OPTIMIZERS)
ONE_PROCESS_SAVES = ("dcp", "dcp-flat", "per-rank", "per-rank-previous")  # (no rank 0 to gather to)


def _assert_resumed_exactly(results, name, how):
    straight, resumed = results[name, "uninterrupted"], results[name, how]
    assert not resumed["measuring_at_save"]  # (a checkpoint inside a LABPAL measurement restarts it)
    assert resumed["calls"] == straight["calls"]
    assert all(torch.equal(p, q) for p, q in zip(resumed["params"], straight["params"]))
    assert resumed["stats"] == straight["stats"]
    decisions = straight["stats"]["searches" if name == "SaLSA" else "measurements"]
    assert decisions >= 4 and straight["calls"][dcp_workers.HALF] > straight["calls"][dcp_workers.HALF - 1] > 0


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return dcp_workers.resume_all("plain", 0, 1, str(tmp_path_factory.mktemp("dcp")), saves=ONE_PROCESS_SAVES)


@pytest.mark.parametrize("how", ONE_PROCESS_SAVES)
@pytest.mark.parametrize("name", NAMES)
def test_one_process(one_process, name, how):
    _assert_resumed_exactly(one_process, name, how)


def _spawned(tmp_path_factory, kind):
    out = tmp_path_factory.mktemp(kind)
    spawn(dcp_workers.resume, WORLD, out, str(out), kind)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _spawned(tmp_path_factory, "ddp")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 is not available")
    return _spawned(tmp_path_factory, "fsdp")


@pytest.mark.parametrize("how", dcp_workers.SAVES)
@pytest.mark.parametrize("name", NAMES)
def test_ddp(ddp, name, how):
    assert_ranks_agree([r[name, how] for r in ddp])
    _assert_resumed_exactly(ddp[0], name, how)


@pytest.mark.parametrize("how", dcp_workers.SAVES)
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2(fsdp, name, how):
    assert_ranks_agree([r[name, how] for r in fsdp])
    _assert_resumed_exactly(fsdp[0], name, how)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_checkpoint_of_two_ranks_resumes_in_one_process(fsdp, name):
    """DCP reshards: the state FSDP2 saved as two ranks' shards loads into one unsharded model;
    trained on from there in one process on the whole batches (each rank's share computed as the
    ranks compute it: ``dist_workers.OneProcess``), it ends as the two ranks' run, bit for bit."""
    straight = fsdp[0][name, "uninterrupted"]
    path = fsdp[0][name, "dcp"]["path"]
    model = mlp(seed=123)
    opt = dist_workers.OPTIMIZERS[name](model.parameters())
    dcp_workers.load("dcp", model, opt, path)
    one = OneProcess("fsdp", name, WORLD)
    one.load_whole(model, opt)  # (the twin holds the parameters and state as the ranks' shards)
    half = dcp_workers.HALF
    run = one.run(half, dist_workers.STEPS - half, calls=straight["calls"][:half])  # (calls counted on from there)
    assert_equals_one_process(straight, run)
