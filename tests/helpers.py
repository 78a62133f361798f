"""Small real models on scikit-learn's digits, and a training loop that records decisions."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import torch
from sklearn.datasets import load_digits
from torch import nn

from salsa_fast import testing

_DIGITS = None


def digits(dtype=torch.float32):
    """(images scaled to [0, 1] as N x 64, labels)."""
    global _DIGITS
    if _DIGITS is None:
        x, y = load_digits(return_X_y=True)
        _DIGITS = torch.tensor(x / 16.0), torch.tensor(y)
    x, y = _DIGITS
    return x.to(dtype), y


def mlp(dtype=torch.float32, seed=0, hidden=33):
    """Digits MLP with an odd hidden size."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dtype)


def chaotic_mlp(dtype=torch.float32, seed=0):
    """A deeper, narrow tanh MLP on which SaLSA with use_mv=True is chaotic: last-bit differences
    grow to ~1e-6 within 150 float64 steps, between *any* two implementations (the published
    package against a plain restatement included)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 10)).to(dtype)


class ConvNet(nn.Module):
    """A small conv net on the 8x8 digit images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.head = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def convnet(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ConvNet().to(dtype)


class PixelLM(nn.Module):
    """A tiny transformer with dropout: next-pixel prediction over digit images read as tokens.

    Each image is a sequence of its 64 pixel intensities (17 levels); the model predicts the next
    intensity from the previous ones (causal mask).
    """

    vocab = 17

    def __init__(self, width=16, heads=2, layers=1, dropout=0.1, seq=16):
        super().__init__()
        self.seq = seq
        self.embed = nn.Embedding(self.vocab, width)
        self.pos = nn.Parameter(torch.randn(seq, width) * 0.1)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width + 1, dropout=dropout, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, self.vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        n = tokens.shape[1]
        return self.head(self.body(h, mask=self.mask[:n, :n].to(h.dtype), is_causal=True))


def pixel_lm(dtype=torch.float32, seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return PixelLM(dropout=dropout).to(dtype)


def pixel_tokens():
    x, _ = digits(torch.float64)
    return (x * 16).round().long()


@dataclass
class Run:
    model: nn.Module
    opt: torch.optim.Optimizer
    calls: list[int] = field(default_factory=list)  # cumulative closure calls after each step
    losses: list[float] = field(default_factory=list)


def batches(n_items, steps, batch=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n_items, (batch,), generator=g) for _ in range(steps)]


def make_closure(model, kind, idx, dtype, counter, device="cpu"):
    """The closure of one batch (rows ``idx``), its data on ``device``; counts its calls."""
    loss_fn = nn.CrossEntropyLoss()
    if kind == "lm":
        tokens = pixel_tokens()[idx]
        seq = model.seq
        inputs, targets = tokens[:, :seq], tokens[:, 1 : seq + 1]

        def closure(backwards=False):
            counter[0] += 1
            logits = model(inputs)
            loss = loss_fn(logits.reshape(-1, PixelLM.vocab).float(), targets.reshape(-1))
            if backwards:
                loss.backward()
            return loss

        return closure
    x, y = digits(dtype)
    xb, yb = x[idx].to(device), y[idx].to(device)

    def closure(backwards=False):
        counter[0] += 1
        loss = loss_fn(model(xb).float(), yb)
        if backwards:
            loss.backward()
        return loss

    return closure


def step_with(opt, closure) -> None:
    """One step of a closure optimizer (SaLSA, LABPAL), or of a torch optimizer after one
    gradient pass, the way each is meant to be driven."""
    opt.zero_grad()
    if isinstance(opt, torch.optim.Optimizer) and opt.__class__.__module__.startswith("torch."):
        closure(backwards=True)
        opt.step()
    else:
        opt.step(closure)


def train(model, opt, steps, kind="digits", dtype=torch.float32, seed=1, start=0, batch=64, zero_grad=None, rng_seed=0):
    """Train ``steps`` steps (from batch number ``start``) and record closure calls per step.

    ``rng_seed`` reseeds torch's global generator first (so two runs see the same dropout
    masks); pass None to continue from the current state (e.g. after restoring it).
    """
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    n = pixel_tokens().shape[0] if kind == "lm" else digits()[0].shape[0]
    run = Run(model, opt)
    counter = [0]
    plan = batches(n, start + steps, batch, seed)[start:]
    with contextlib.redirect_stdout(io.StringIO()):  # the published package prints
        for idx in plan:
            closure = make_closure(model, kind, idx, dtype, counter)
            (zero_grad or opt.zero_grad)()
            loss = opt.step(closure)
            run.calls.append(counter[0])
            run.losses.append(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))
    return run


def param_values(bucket) -> torch.Tensor:
    """A bucket's parameters gathered into its flat index space (padding zero), for comparisons."""
    return bucket.copy_params_to(torch.zeros(bucket.numel, dtype=bucket.dtype, device=bucket.device))


def fill_regions(bucket, buf: torch.Tensor, values: torch.Tensor) -> None:
    """Copy ``values`` (flat, bucket-sized) into ``buf``'s parameter regions; the padding between
    them is zero, as the optimizer keeps it."""
    buf.zero_()
    torch._foreach_copy_(bucket.views_of(buf), bucket.views_of(values.to(buf.dtype)))


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    """The largest difference between two models' parameters.

    How far two runs of one algorithm that round differently may drift apart (the flat
    optimizer and its reference twin, ``keep_backup`` True and False, the published package):
    each step they differ by a few roundings per element and by sums over the parameters taken
    in other orders. While the training is not chaotic, the drift stays near that level: on
    these models about 1e-15 in float64 and 1e-7 in float32, more where exhausted searches left
    large parameters or where an element's gradient is itself at rounding level (Adam's
    normalised step turns that into a difference of a whole step: once 6e-12 instead of 7e-15
    with other kernels). Where the training is chaotic (use_mv on the digits MLP from about step
    80, on the pixel transformer from step 50; ``c=0.1`` with ``init_step_size=0.1`` in float32
    from the start) differences grow ~10x every 10-20 steps from whatever rounding seeded them,
    at a rate that depends on the trajectory, which every CPU's matmul kernels round their own
    way: the use_mv comparisons with torch's AVX-512, AVX2 and scalar kernels
    (``ATEN_CPU_CAPABILITY``) and MKL's AVX-512, AVX2 and SSE4.2 paths
    (``MKL_ENABLE_INSTRUCTIONS``) were within 3x of each other at step 80, and 4e-10 against
    5e-7 at step 150. How much a training amplifies a rounding is its trajectory's property,
    not something the arithmetic bounds, so these tolerances are not derived: the comparisons
    stop before the growth, and their tolerances stand well above the drift there under all
    three kernel sets (65x at the least: float32 after 40 steps, 1.5e-6 against 1e-4; float64
    150x to 1e8x). Decisions (the closure calls) could flip only at a criterion tied to within
    that drift."""
    return max((p.double() - q.double()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def next_step_searches(opt) -> bool:
    """Whether SaLSA's next step will run a line search (mirrors its interval rule)."""
    s = testing.scalars(opt)
    return s.steps + 1 < 10 or s.since_search + 1 >= opt.search_interval


def poisoned(model, closure, what: str = "grad"):
    """``closure`` with a NaN written into the first gradient after backward (``"grad"``), or
    a NaN gradient-pass loss (``"loss"``)."""

    def closure_with_nan(backwards=False):
        loss = closure(backwards)
        if backwards and what == "grad":
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        if backwards and what == "loss":
            return loss * float("nan")
        return loss

    return closure_with_nan


def advance_until(opt, closure_at, searches: bool, min_steps: int = 12) -> int:
    """Step ``opt`` with ``closure_at(0)``, ``closure_at(1)``, ... until it has taken
    ``min_steps`` steps and its next step will (``searches``) or will not run a search;
    returns the index of that next step's closure."""
    step = 0
    while testing.scalars(opt).steps < min_steps or next_step_searches(opt) != searches:
        opt.zero_grad()
        opt.step(closure_at(step))
        step += 1
    return step


def snapshot(model, opt):
    """The parameters, the optimizer state and its scalars, copied."""
    params = [p.detach().clone() for p in model.parameters()]
    sd = opt.state_dict()
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in sd["state"].items()}
    return params, state, dict(sd["param_groups"][0]["salsa"])


def assert_unchanged(model, opt, snap, ignore=("forwards", "backwards", "skipped")) -> None:
    """Parameters and state equal to ``snap``, bit for bit; scalars too, but for ``ignore``."""
    params, state, scalars = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    sd = opt.state_dict()
    for i, s in state.items():
        for k, v in s.items():
            assert torch.equal(sd["state"][i][k], v), (i, k)
    now = {k: v for k, v in sd["param_groups"][0]["salsa"].items() if k not in ignore}
    assert now == {k: v for k, v in scalars.items() if k not in ignore}


def with_scalars(sd: dict, entry: str, **changes) -> dict:
    """``sd`` (not changed) with ``changes`` made to the run's scalars, which every group holds
    under ``entry`` ("salsa", "labpal")."""
    groups = [{**g, entry: {**g[entry], **changes}} for g in sd["param_groups"]]
    return {**sd, "param_groups": groups}


def without_scalars(sd: dict, entry: str) -> dict:
    """``sd`` with the run's scalars dropped from every group."""
    return {**sd, "param_groups": [{k: v for k, v in g.items() if k != entry} for g in sd["param_groups"]]}


def as_previous_release(sd: dict, entry: str) -> dict:
    """``sd`` as the previous release wrote it: the run's scalars a top-level entry (lists as
    lists), not in the groups; the state's DTensors (FSDP2) as their plain local shards."""
    scalars = {
        k: [float(x) for x in v.split(",") if x] if isinstance(v, str) else v
        for k, v in sd["param_groups"][0][entry].items()
    }
    groups = [{k: v for k, v in g.items() if k != entry} for g in sd["param_groups"]]
    state = {i: {k: getattr(v, "_local_tensor", v) for k, v in e.items()} for i, e in sd["state"].items()}
    return {**sd, "state": state, "param_groups": groups, entry: scalars}


# -- two backends' passes over a bucket, equal to rounding (tolerances derived from the arithmetic) ----


def close_buckets(a, b, dtype):
    """Equal to rounding: TOL's few ulps relative, and, for an element whose operations cancel
    to near zero, absolute ulps of its operands (:func:`cancellation_atol`)."""
    from conftest import TOL  # (not at the top: worker processes import helpers)

    values = param_values(a)
    operands = [values] + ([a.backup] if a.backup is not None else [])
    tol = TOL[dtype]
    atol = cancellation_atol(a.state_dtype, tol, operands)  # (the math's dtype: bf16/fp16 round once at the end)
    torch.testing.assert_close(values, param_values(b), rtol=tol["rtol"], atol=atol)
    close_state(a, b, dtype, ("exp_avg", "exp_avg_sq"))


def close_state(a, b, dtype, names) -> None:
    """The buckets' state buffers ``names`` equal to rounding, as :func:`close_buckets`' values."""
    from conftest import STATE_TOL, STATE_TOL_32

    state_tol = STATE_TOL.get(dtype, STATE_TOL_32)
    for name in names:
        if getattr(a, name) is not None:
            atol = cancellation_atol(a.state_dtype, state_tol, [getattr(a, name), a.grad])
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=state_tol["rtol"], atol=atol)


def cancellation_atol(dtype, tol, operands) -> float:
    """The absolute part of the tolerance, for math in ``dtype``: each backend rounds an
    element at most 8 times (the direction's five operations, the point's two, a widening or
    narrowing), so the two differ by at most 16 roundings of its largest operand. The values
    after the pass and the backup (the values before, where the pass keeps one) bound the
    operands (``|lr * d| <= |p_new| + |p_old|``; a moment's: the moment and the gradient):
    16 ulps of twice the largest of them, or the conftest's atol if that is larger."""
    largest = max(float(t.abs().max()) for t in operands if t.numel())
    return max(tol["atol"], 16 * torch.finfo(dtype).eps * 2 * largest)


def assert_sums_close(sum_a, sum_b, terms: torch.Tensor, dtype: torch.dtype) -> None:
    """Two backends' sums of the same ``n`` products (``terms``, as one backend computed them,
    math in ``dtype``): each adds them in its own order, so each is within ``gamma_n * sum(|terms|)``
    of the exact sum (Higham's bound for a dot product in any order, ``gamma_n ~ n * eps / 2``),
    and their products differ by a few roundings each (at most 16, as in
    :func:`cancellation_atol`): the two are within ``(n + 16) * eps * sum(|terms|)``."""
    bound = (terms.numel() + 16) * torch.finfo(dtype).eps * float(terms.double().abs().sum())
    assert abs(float(sum_a) - float(sum_b)) <= bound
