"""LABPAL's CUDA-path bookkeeping, checked on the CPU: a training update whose direction is not
finite is skipped on the device without a sync, noted in its ``SkipLedger``
(``salsa_fast.step_state``), and the host reads that count only together with a number it must
read anyway: the next measurement's direction check, or ``state_dict()``. ``stats`` never
syncs. ``testing.defer_host_reads(opt)`` makes the CPU wait as CUDA must (on CPU the host
otherwise reads the verdict at once, and the update is not counted in ``updates``)."""

import contextlib
import copy

import pytest
import torch
from helpers import digits, mlp, train
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from salsa_fast import LABPAL, testing

DIGITS = dict(training_set_size=1797, batch_size=64, momentum=0.5, reuse_steps=5)


@contextlib.contextmanager
def tensor_ops(monkeypatch):
    """Within the block, every tensor operation (a read of a device number, ``.item()``,
    ``bool()``, ``int()``, ``float()``, is the op ``_local_scalar_dense``) and every ``tolist()``
    (which on CPU tensors reads their memory directly) appends its name to the list yielded."""
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", lambda t: ops.append("tolist") or tolist(t))
        with Ops():
            yield ops


def test_tensor_ops_sees_every_read_of_a_device_number(monkeypatch):
    t = torch.tensor([1.0, 2.0])
    for read in (lambda: t[0].item(), lambda: bool(t[0]), lambda: int(t[0]), lambda: float(t[0]), lambda: t.tolist()):
        with tensor_ops(monkeypatch) as ops:
            read()
        assert ops, read
    with tensor_ops(monkeypatch) as ops:
        pass
    assert ops == []


def poisoned(model, x, y):
    """A closure whose gradient is not finite."""

    def closure(backwards=False):
        loss = nn.functional.cross_entropy(model(x[:64]), y[:64])
        if backwards:
            loss.backward()
            next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    return closure


@pytest.mark.parametrize("keep_backup", [True, False])
def test_device_skips_are_read_with_the_next_measurement_or_state_dict_and_stats_never_syncs(monkeypatch, keep_backup):
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **DIGITS, keep_backup=keep_backup)
    testing.defer_host_reads(opt)  # the CUDA path
    x, y = digits(torch.float64)

    def stats():
        with tensor_ops(monkeypatch) as ops:
            numbers = opt.stats
        assert ops == []  # not a tensor touched: no sync
        return numbers

    train(model, opt, 12, dtype=torch.float64)  # measured (10 calls), then two updates
    updates = stats()["updates"]
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    opt.step(poisoned(model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # skipped on the device
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum))
    assert stats()["updates"] == updates + 1  # counted as taken, as on CUDA
    assert stats()["skipped_updates"] == 0  # as of the last read
    assert opt.state_dict()["param_groups"][0]["labpal"]["skipped"] == 1  # state_dict() reads it
    assert stats()["skipped_updates"] == 1

    opt.zero_grad()
    opt.step(poisoned(model, x, y))  # a second one: 4 updates since the measurement
    train(model, opt, 1, dtype=torch.float64, start=14, rng_seed=None)  # the 5th (reuse_steps)
    assert not opt.measuring and stats()["skipped_updates"] == 1
    train(model, opt, 1, dtype=torch.float64, start=15, rng_seed=None)  # a measurement's first call
    assert opt.measuring and stats()["skipped_updates"] == 2  # read with its direction check
    assert copy.deepcopy(opt).stats == stats()


def test_the_host_path_counts_a_skip_at_once_and_not_as_an_update(monkeypatch):
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **DIGITS)
    x, y = digits(torch.float64)
    train(model, opt, 12, dtype=torch.float64)
    updates = opt.stats["updates"]
    opt.zero_grad()
    opt.step(poisoned(model, x, y))
    with tensor_ops(monkeypatch) as ops:
        numbers = opt.stats
    assert ops == [] and numbers["skipped_updates"] == 1 and numbers["updates"] == updates


def test_a_loaded_checkpoint_replaces_the_skips_not_yet_read():
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **DIGITS)
    sd = copy.deepcopy(opt.state_dict())  # nothing skipped
    testing.defer_host_reads(opt)
    x, y = digits(torch.float64)
    train(model, opt, 12, dtype=torch.float64)
    opt.zero_grad()
    opt.step(poisoned(model, x, y))
    opt.load_state_dict(sd)
    assert opt.state_dict()["param_groups"][0]["labpal"]["skipped"] == 0
