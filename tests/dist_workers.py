"""Worker processes for the distributed tests (gloo on CPU): importable, so spawn can find them.

Each worker is ``fn(rank, world, store, out_dir, ...)`` (see ``multiprocess.spawn``). It trains
the digits MLP of ``helpers`` on its rank's share of every batch and saves what the test
compares (parameters, closure calls after every step, stats) to ``out_dir``.

:class:`OneProcess` is what the ranks together must equal, bit for bit: one process that does
their arithmetic (see there).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.distributed as dist
from helpers import batches, digits, make_closure, mlp
from multiprocess import finish, init
from torch import nn

from salsa_fast import LABPAL, SaLSA, testing

STEPS = 40
BATCH = 64
# LABPAL measuring often (3 batches per measurement, every 8 updates once warmed up), so that
# 40 calls hold several measurements and the checkpoint at call 20 falls between two of them.
LABPAL_OPTIONS = dict(
    training_set_size=1797, batch_size=BATCH, reuse_steps=8, warmup_updates=6, measure_batches=3, max_step_size=0.2
)
OPTIMIZERS = {
    "SaLSA": lambda params, **kw: SaLSA(params, **kw),
    "LABPAL": lambda params, **kw: LABPAL(params, **LABPAL_OPTIONS, **kw),
}


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


class _Probe(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))

    def forward(self, c):
        return (self.w * c).sum()  # its gradient is c


def probe_gradients(rank: int) -> torch.Tensor:
    """Rank ``rank``'s gradient in :func:`reduction_probe`: values on which the possible orders
    of DDP's and FSDP2's reductions round apart. Subnormals (multiples of ``2**-149``) lose a
    bit when halved: 3 * 2**-149 halved is 2 * 2**-149 (the tie goes to even), so halving before
    the sum and after it give 4 and 3 * 2**-149."""
    u = 2.0**-149
    return torch.tensor([3 * u, 5 * u, 3 * u * (rank + 1), -7 * u, 1.0 + rank * 2**-23, 0.1 * (rank + 1)])


def reduction_probe(kind: str, rank: int) -> torch.Tensor:
    """The whole gradient DDP (``kind="ddp"``) or FSDP2 (``"fsdp"``) leaves on this rank when
    the ranks' gradients are :func:`probe_gradients`: what :func:`ddp_mean` and
    :func:`fsdp_mean` must reproduce, bit for bit."""
    module = _Probe(len(probe_gradients(rank)))
    model = module
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(module)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(module)
    model(probe_gradients(rank)).backward()
    grad = module.w.grad
    return (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()


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
    return result(
        module,
        opt,
        calls,
        sharded=[b.sharded for b in testing.buckets(opt)],
        warnings=[str(w.message) for w in caught],
        probe=reduction_probe(kind, rank),
    )


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


# -- one process, as the ranks compute --------------------------------------------------------
# The one-process run that the ranks must equal does their arithmetic operation for operation,
# so the two are compared bit for bit, on any CPU, whichever SIMD kernels it runs:
#
# * every rank's share of the batch is computed on its own: the same shapes, so the same matmul
#   and reduction kernels as on that rank (the whole batch at once would sum in another order,
#   and how far apart that lands depends on the CPU's kernels and grows over the steps);
# * the losses are combined as salsa_fast.distributed combines them (mean_loss), the gradients
#   as DDP (ddp_mean) or FSDP2 (fsdp_mean) reduces them;
# * for FSDP2, the twin's parameters are the ranks' shards, one param group per rank, so each
#   flat bucket is laid out exactly like that rank's. Every elementwise kernel then sees the
#   same tensors (which matters: torch's fused AdamW rounds its vectorised body and its scalar
#   tail differently on AVX2 and AVX-512 CPUs, so an element's result depends on its position in
#   the tensor), and the preconditioned norm is summed per shard, then over the shards, as the
#   ranks' all-reduce sums it (one sum over the whole parameter would round otherwise, and a
#   last-bit difference there could tip a near-tie decision);
# * on one thread, as every rank runs (multiprocess.init).
# With two ranks each sum over the ranks is one addition, which is commutative, so the order in
# which gloo adds does not matter; with more ranks it would, and the twin would have to follow it.
# (Where the ranks halve an fp64 number and add the halves back, x / 2 + x / 2 == x holds exactly
# outside fp64's subnormal range, below 2**-1021.)


def ddp_mean(grads: list[torch.Tensor], world: int) -> torch.Tensor:
    """DDP's reduction with its default communication (no comm hook registered): each rank's
    gradient is multiplied by ``1 / world`` as it is copied into DDP's bucket (an fp32 multiply
    by the float nearest ``1 / world``), then the buckets are SUM all-reduced."""
    return functools.reduce(torch.add, [g * (1 / world) for g in grads])


def fsdp_mean(grads: list[torch.Tensor], world: int) -> torch.Tensor:
    """FSDP2's reduction of fp32 gradients: a reduce-scatter with ``ReduceOp.AVG`` and no pre- or
    post-division (torch's ``_get_gradient_divide_factors`` for fp32 and bf16), which gloo runs
    as a sum followed by a division by the world size."""
    return functools.reduce(torch.add, grads) / world


def mean_loss(losses: list[torch.Tensor], world: int) -> torch.Tensor:
    """The ranks' agreed loss (``salsa_fast.distributed``): each rank's loss in fp64 divided by
    the world size, then SUM all-reduced."""
    return functools.reduce(torch.add, [loss.double() / world for loss in losses])


@contextlib.contextmanager
def one_thread():
    """torch on one thread meanwhile, as on every rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class OneProcess:
    """One process that trains as ``world`` ranks of ``kind`` ("ddp" or "fsdp") train together
    (see the notes above): ``run`` returns what :func:`result` returns on a rank."""

    def __init__(self, kind: str, name: str, world: int, backend: str = "auto"):
        self.kind, self.world = kind, world
        self.model = mlp()
        whole = list(self.model.parameters())
        if kind == "fsdp":
            # rank r's shard of every parameter (FSDP2's Shard(0) is torch.chunk along dim 0)
            self.shards = [[nn.Parameter(p.detach()[_chunk(p, world, r)].clone()) for p in whole] for r in range(world)]
            self.params = [p for shard in self.shards for p in shard]
            groups = [{"params": shard} for shard in self.shards]
        else:
            self.params = whole
            groups = [{"params": whole}]
        self.reduce = fsdp_mean if kind == "fsdp" else ddp_mean
        self.opt = OPTIMIZERS[name](groups, backend=backend)

    def whole(self) -> list[torch.Tensor]:
        """The model's parameters (FSDP2: the ranks' shards concatenated, as all-gathered)."""
        if self.kind != "fsdp":
            return list(self.model.parameters())
        return [torch.cat(parts) for parts in zip(*self.shards)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "fsdp":
            return self.model(x)
        names = [n for n, _ in self.model.named_parameters()]
        return torch.func.functional_call(self.model, dict(zip(names, self.whole())), (x,))

    def closure(self, idx: torch.Tensor, count: list[int]):
        """The closure of batch ``idx``: each rank's share (``train_shards``'s split) computed on
        its own, the losses and gradients combined as the ranks' collectives combine them."""
        x, y = digits(torch.float32)
        share = len(idx) // self.world
        parts = [idx[r * share : (r + 1) * share] for r in range(self.world)]
        batches_ = [(x[i], y[i]) for i in parts]
        loss_fn = nn.CrossEntropyLoss()

        def closure(backwards=False):
            count[0] += 1
            losses, grads = [], []
            for xb, yb in batches_:
                loss = loss_fn(self.forward(xb).float(), yb)
                losses.append(loss)
                if backwards:
                    grads.append(torch.autograd.grad(loss, self.params))
            if backwards:
                with torch.no_grad():
                    for p, per_rank in zip(self.params, zip(*grads)):
                        g = self.reduce(list(per_rank), self.world)
                        if p.grad is None:
                            p.grad = g
                        else:
                            p.grad.copy_(g)
            return mean_loss(losses, self.world)

        return closure

    def run(self, start: int = 0, steps: int = STEPS, calls: list[int] | None = None) -> dict:
        """Train on batches ``start .. start + steps`` of ``train_shards``'s plan."""
        calls = [] if calls is None else calls
        plan = batches(len(digits()[0]), STEPS, BATCH, seed=1)[start : start + steps]
        count = [calls[-1] if calls else 0]
        with one_thread():
            for idx in plan:
                self.opt.zero_grad()
                self.opt.step(self.closure(idx, count))
                calls.append(count[0])
        return {"params": [p.detach().clone() for p in self.whole()], "calls": list(calls), "stats": self.opt.stats}

    @torch.no_grad()
    def load_whole(self, model: nn.Module, opt) -> None:
        """Start from a one-process (unsharded) ``model`` and its optimizer: parameters, state and
        scalars, split into the ranks' shards (FSDP2 only)."""
        n = len(self.shards[0])
        for j, p in enumerate(model.parameters()):
            for r in range(self.world):
                self.shards[r][j].copy_(p[_chunk(p, self.world, r)])
        sd = opt.state_dict()
        state = {
            r * n + j: {key: v[_chunk(v, self.world, r)].clone() for key, v in entry.items()}
            for j, entry in sd["state"].items()
            for r in range(self.world)
        }
        groups = [{**sd["param_groups"][0], "params": list(range(r * n, (r + 1) * n))} for r in range(self.world)]
        self.opt.load_state_dict({"state": state, "param_groups": groups})


def _chunk(t: torch.Tensor, world: int, rank: int) -> slice:
    """Rank ``rank``'s rows of ``t`` under FSDP2's ``Shard(0)`` (``torch.chunk``'s split)."""
    size = -(-t.shape[0] // world)
    return slice(rank * size, min((rank + 1) * size, t.shape[0]))


def assert_equals_one_process(result: dict, one: dict) -> None:
    """A rank's :func:`result` equals the one-process run ``one``, bit for bit."""
    assert result["calls"] == one["calls"]
    assert all(torch.equal(p, q) for p, q in zip(result["params"], one["params"], strict=True))
    assert result["stats"] == one["stats"]
