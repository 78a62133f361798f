"""Profile a few SaLSA training steps: a Chrome/Perfetto trace and the top operators.

Trains the character-level GPT of :mod:`workloads` (larger on a GPU) for a few warm-up steps,
then records ``--steps`` steps with ``torch.profiler``: the trace goes to ``--trace`` (open it
in https://ui.perfetto.dev or chrome://tracing), the table of the most expensive operators and
kernels is printed and written to ``--summary``. SaLSA's phases appear as named ranges
(``salsa.gradient_pass``, ``salsa.plain_step``, ``salsa.search``, ``salsa.trial``), which on
CUDA are also NVTX ranges, so Nsight Systems shows them on its timeline:

    python benchmarks/profile_training.py --device cuda --trace trace.json
    nsys profile -t cuda,nvtx -o salsa python benchmarks/profile_training.py --device cuda --no-torch-profiler
    ncu --nvtx --nvtx-include "salsa.plain_step/" --set full -o kernels \\
        python benchmarks/profile_training.py --device cuda --no-torch-profiler --steps 3

(Not ``profile.py``: a script directory is the first entry of ``sys.path``, and a module named
``profile`` there would shadow the standard library's, which ``cProfile`` imports, and torch
imports ``cProfile``.)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import workloads  # noqa: E402
from common import environment, sync  # noqa: E402

from salsa_fast import (
    SaLSA,  # noqa: E402
    testing,
)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--warmup", type=int, default=12, help="steps before recording (the first ones all search)")
    parser.add_argument("--steps", type=int, default=8, help="steps recorded")
    parser.add_argument("--trace", default="salsa_profile_trace.json")
    parser.add_argument("--summary", help="write the operator table here (Markdown)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--no-torch-profiler", action="store_true", help="just run (under nsys or ncu)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    if device.type == "cuda":
        work = workloads.char_transformer(
            device, args.warmup + args.steps, batch=32, seq=256, width=512, layers=8, heads=8
        )
    else:
        work = workloads.char_transformer(
            device, args.warmup + args.steps, batch=16, seq=64, width=128, layers=2, heads=4
        )
    opt = SaLSA(work.model.parameters(), backend=args.backend)

    def train_step(xb, yb):
        work.step(opt, xb, yb)

    for xb, yb in work.batches[: args.warmup]:
        train_step(xb, yb)
    sync(device)
    recorded = work.batches[args.warmup :]
    if args.no_torch_profiler:
        for xb, yb in recorded:
            train_step(xb, yb)
        sync(device)
        return ""

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    searched = 0
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for xb, yb in recorded:
            train_step(xb, yb)
            searched += opt.last_step.searched
        sync(device)
    prof.export_chrome_trace(args.trace)

    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=args.rows)
    env = environment(device)
    header = (
        f"# Profile of {len(recorded)} SaLSA steps ({searched} searched), {work.name} "
        f"({work.n_params / 1e6:.2f}M parameters), backend {testing.backend(opt).name}\n\n"
        f"{env['device_name']} ({env['device']}), torch {env['torch']}, triton {env['triton']}, {env['date']}\n"
        f"trace: {args.trace}\n\n"
    )
    text = header + "```\n" + table + "\n```\n"
    print(text)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
