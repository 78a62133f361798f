"""pytest-benchmark suite over the same cases as the scripts (not part of the test run).

    pytest benchmarks/ --benchmark-only                       # CPU (and CUDA where present)
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group --benchmark-json=out.json

Each benchmark's group holds the things worth comparing: one optimizer pass at one size and
dtype for every implementation, or one workload's training step for every optimizer.
"""

from __future__ import annotations

import contextlib
import io
import itertools

import pytest
import torch
import workloads
from optimizer_step import adam_passes, salsa_passes
from overhead import optimizers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N = 10**7 if DEVICE.type == "cuda" else 10**6
IMPLEMENTATIONS = ["adam_fused", "adam_foreach", "salsa_fast_torch"] + (
    ["salsa_fast_triton"] if DEVICE.type == "cuda" else []
)


def _passes(name: str, dtype: torch.dtype) -> dict:
    if name.startswith("adam"):
        return adam_passes(name.split("_")[1], N, dtype, DEVICE)
    return salsa_passes(name.rsplit("_", 1)[1], N, dtype, DEVICE)


def _timed(fn):
    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_non_search_step(benchmark, name, dtype):
    benchmark.group = f"non-search step, n={N:.0e}, {dtype}"
    benchmark.extra_info.update(n_params=N, dtype=str(dtype), device=DEVICE.type)
    benchmark(_timed(_passes(name, dtype)["step"]))


@pytest.mark.parametrize("pass_name", ["first_pass", "trial", "commit"])
@pytest.mark.parametrize("name", [n for n in IMPLEMENTATIONS if n.startswith("salsa")])
def test_search_pass(benchmark, name, pass_name):
    benchmark.group = f"search {pass_name}, n={N:.0e}, fp32"
    benchmark.extra_info.update(n_params=N, device=DEVICE.type)
    benchmark(_timed(_passes(name, torch.float32)[pass_name]))


WORKLOADS = {build().name: build for build in workloads.standard(DEVICE, 64, quick=True)}


@pytest.mark.parametrize("optimizer", list(optimizers(DEVICE)))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_training_step(benchmark, workload, optimizer):
    """One training step per round, cycling through the workload's batches, so SaLSA's mix of
    search and non-search steps is in the average (the first rounds all search)."""
    work = WORKLOADS[workload]()
    opt = optimizers(DEVICE)[optimizer](list(work.model.parameters()))
    batches = itertools.cycle(work.batches)
    benchmark.group = f"training step: {workload}"

    def step():
        with contextlib.redirect_stdout(io.StringIO()):  # the published package prints
            work.step(opt, *next(batches))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=60, iterations=1, warmup_rounds=2)
