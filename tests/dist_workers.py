"""Worker processes for the distributed tests (gloo on CPU): importable, so spawn can find them.

Each worker is ``fn(rank, world, store, out_dir, ...)`` (see ``multiprocess.spawn``). It trains
the digits MLP of ``helpers`` on its rank's share of every batch and saves what the test
compares (parameters, closure calls after every step, stats) to ``out_dir``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from helpers import batches, digits, make_closure, mlp
from multiprocess import finish, init
from torch import nn

from salsa_fast import LABPAL, SaLSA

STEPS = 40
BATCH = 64
# LABPAL measuring often (3 batches per measurement, every 8 updates once warmed up), so that
# 40 calls hold several measurements and the checkpoint at call 20 falls between two of them.
LABPAL_OPTIONS = dict(training_set_size=1797, batch_size=BATCH, reuse_steps=8, warmup_updates=6, measure_batches=3,
                      max_step_size=0.2)  # fmt: skip
OPTIMIZERS = {
    "SaLSA": lambda params, **kw: SaLSA(params, **kw),
    "LABPAL": lambda params, **kw: LABPAL(params, **LABPAL_OPTIONS, **kw),
}


# How far the ranks' parameters may be from one process's: the README's "max |dp| 1.6e-7 after
# 40 steps" (float32; the same decisions, so only the gradients' summation order differs: the
# batch's loss averaged over two halves, then DDP's or FSDP's mean of the two gradients) is under
# 3 float32 ulps of the largest parameters (|p| < 0.63, ulp 6e-8); allow 4. (The Triton kernels
# round differently from torch's ops: they are compared with a one-process Triton run, 2.1e-7.)
ONE_PROCESS_ATOL = 4 * 2**-24


def max_diff(params, model) -> float:
    return max((p - q.detach()).abs().max().item() for p, q in zip(params, model.parameters()))


def assert_ranks_agree(results) -> None:
    """Every rank's result (see :func:`result`) took the first rank's decisions, bit for bit."""
    first = results[0]
    for other in results[1:]:
        assert other["calls"] == first["calls"]
        assert all(torch.equal(p, q) for p, q in zip(first["params"], other["params"]))
        assert other["stats"] == first["stats"]


def train_shards(model, opt, rank: int, world: int, start: int, steps: int, calls: list[int]) -> None:
    """Train on this rank's contiguous share of each full batch (equal shares)."""
    plan = batches(len(digits()[0]), STEPS, BATCH, seed=1)[start : start + steps]
    share = BATCH // world
    count = [calls[-1] if calls else 0]
    for idx in plan:
        opt.zero_grad()
        opt.step(make_closure(model, "digits", idx[rank * share : (rank + 1) * share], torch.float32, count))
        calls.append(count[0])


def wrapped(kind: str, seed: int = 0, **ddp_options):
    """``(the model to train, the module that holds the parameters)`` for ``kind``: "ddp",
    "fsdp" (FSDP2: every parameter a DTensor sharded over the ranks) or "plain"."""
    model = mlp(seed=seed)
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model, **ddp_options), model
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model, model


def result(module, opt, calls, **extra) -> dict:
    params = [p.detach().clone() for p in module.parameters()]
    if params and hasattr(params[0], "full_tensor"):
        params = [p.full_tensor() for p in params]  # DTensor shards gathered
    return {"params": params, "calls": list(calls), "stats": opt.stats, **extra}


def _save(out_dir, rank, results) -> None:
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _disable_agreement() -> None:
    """What the optimizer would do without its collectives: decide on local numbers."""
    import salsa_fast.salsa as o

    o.agree_on_search = lambda group, loss, pp_full, pp_sharded: torch.stack([loss, pp_full + pp_sharded])
    o.agree_on_loss = lambda group, loss: loss
    o.agree_on_flag = lambda group, flag: flag


def train(rank, world, store, out_dir, kind="ddp", name="SaLSA", backend="auto", agreement=True, bucket_view=False):
    """One run of ``STEPS`` steps; with ``bucket_view``, DDP's ``gradient_as_bucket_view=True``
    and the warnings the run raised."""
    init(rank, world, store)
    if not agreement:
        _disable_agreement()
    _save(out_dir, rank, _train(rank, world, kind, name, backend, bucket_view))
    finish()  # (the models are gone: see finish)


def _train(rank, world, kind, name, backend, bucket_view) -> dict:
    model, module = wrapped(kind, **({"gradient_as_bucket_view": True} if bucket_view else {}))
    calls: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = OPTIMIZERS[name](model.parameters(), backend=backend)
        train_shards(model, opt, rank, world, 0, STEPS, calls)
    return result(module, opt, calls, sharded=[b.sharded for b in opt._buckets], warnings=[str(w.message) for w in caught])


def checkpoint_rank0_saves(rank, world, store, out_dir):
    """DDP: train half, rank 0 saves ``state_dict()``s, every rank loads into fresh objects, train on."""
    init(rank, world, store)
    _save(out_dir, rank, _checkpoint_rank0_saves(rank, world, out_dir))
    finish()


def _checkpoint_rank0_saves(rank, world, out_dir) -> dict:
    model, module = wrapped("ddp")
    opt = SaLSA(model.parameters())
    calls: list[int] = []
    train_shards(model, opt, rank, world, 0, STEPS // 2, calls)
    path = os.path.join(out_dir, "checkpoint.pt")
    if rank == 0:
        torch.save({"model": module.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    checkpoint = torch.load(path, weights_only=True)
    module = mlp(seed=123)
    module.load_state_dict(checkpoint["model"])
    model = nn.parallel.DistributedDataParallel(module)
    opt = SaLSA(model.parameters())
    opt.load_state_dict(checkpoint["opt"])
    train_shards(model, opt, rank, world, STEPS // 2, STEPS - STEPS // 2, calls)
    return result(module, opt, calls)
