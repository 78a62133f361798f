"""Whole training steps: SaLSA's overhead over torch's Adam on real workloads.

For each workload of :mod:`workloads` (a digits MLP, a digits conv net, a character-level GPT
on Python's documentation; larger on a GPU) and each optimizer, train the same model from the
same weights on the same batches and report ms per step, the ratio to Adam(fused) and to
Adam(foreach) measured in the same run, forward passes per step, the fraction of steps that
searched, and memory (peak allocated on CUDA; optimizer-held state everywhere).

Optimizers: ``adam_forloop``, ``adam_foreach``, ``adam_fused``, ``published_salsa`` (the
``salsa-optimizer`` package, when installed), ``salsa_fast_torch`` and, on CUDA,
``salsa_fast_triton``.

    python benchmarks/overhead.py --device cpu --quick --json out.json
    python benchmarks/overhead.py --device cuda --steps 300

On CUDA (``--warm-kernels``, the default there) each SaLSA optimizer first trains a throwaway copy
of each workload until it has made a search step and a non-search step, so that Triton compiles
every kernel variant before anything is timed: the untimed first steps all search, and would
leave the non-search step's kernels to compile inside the timed window. ``--json`` and
``--markdown`` are rewritten after each workload, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import workloads  # noqa: E402
from common import environment, sync, write_json  # noqa: E402

from salsa_fast import (
    SaLSA,  # noqa: E402
    testing,
)

try:
    from salsa.SaLSA import SaLSA as PublishedSaLSA
except ImportError:
    PublishedSaLSA = None

WARMUP = 2  # steps trained but not timed (kernel compilation, allocator warm-up)


def optimizers(device: torch.device) -> dict:
    table = {
        "adam_forloop": lambda ps: torch.optim.Adam(ps, foreach=False),
        "adam_foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
        "adam_fused": lambda ps: torch.optim.Adam(ps, fused=True),
    }
    if PublishedSaLSA is not None:
        table["published_salsa"] = lambda ps: PublishedSaLSA(ps)
    table["salsa_fast_torch"] = lambda ps: SaLSA(ps, backend="torch")
    if device.type == "cuda":
        table["salsa_fast_triton"] = lambda ps: SaLSA(ps, backend="triton")
    return table


def state_bytes(opt) -> int:
    """Bytes of tensors the optimizer holds beyond the parameters and their gradients."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    if isinstance(opt, SaLSA):
        for b in testing.buckets(opt):
            for t in (b.exp_avg, b.exp_avg_sq, b.backup, *b.workspace.values()):
                add(t)
        return total
    for st in getattr(opt, "state", {}).values():
        values = st.values() if isinstance(st, dict) else st if isinstance(st, list) else [st]
        for v in values:
            for t in v if isinstance(v, list) else [v]:
                add(t)
    return total


def warm_kernels(build, make_opt, device: torch.device, max_steps: int = 300) -> int:
    """Train a throwaway copy of the workload until a SaLSA optimizer has made both a search step
    and a non-search step (every kernel it launches is then compiled); returns the steps taken."""
    workload = build()
    opt = make_opt(list(workload.model.parameters()))
    if not isinstance(opt, SaLSA):
        return 0  # torch's and the published optimizers compile nothing; WARMUP covers them
    kinds = set()
    step = 0
    while len(kinds) < 2 and step < max_steps:
        workload.step(opt, *workload.batches[step % len(workload.batches)])
        kinds.add(opt.last_step.searched)
        step += 1
    sync(device)
    return step


def run(workload: workloads.Workload, name: str, make_opt, device: torch.device) -> dict:
    opt = make_opt(list(workload.model.parameters()))
    calls = searched = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_steps = len(workload.batches) - WARMUP
    start = None
    with contextlib.redirect_stdout(io.StringIO()):  # the published package prints
        for i, (xb, yb) in enumerate(workload.batches):
            if i == WARMUP:
                sync(device)
                start = time.perf_counter()
            forwards = workload.step(opt, xb, yb)
            calls += forwards
            searched += forwards > 1
    sync(device)
    seconds = time.perf_counter() - start
    steps = len(workload.batches)
    return {
        "ms_per_step": 1e3 * seconds / timed_steps,
        "forwards_per_step": calls / steps,
        "searched_fraction": searched / steps,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "state_mb": state_bytes(opt) / 2**20,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small models, 60 steps: under a minute on CPU")
    parser.add_argument("--steps", type=int, help="steps per run (default 60 quick, 300 otherwise)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot", help="bar chart of the ratios to Adam (PNG)")
    parser.add_argument(
        "--warm-kernels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile every SaLSA kernel variant before timing (default: on CUDA)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    warm = device.type == "cuda" if args.warm_kernels is None else args.warm_kernels
    steps = args.steps or (60 if args.quick else 300)
    if args.device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2 if args.quick else torch.get_num_threads()))
    from tqdm.auto import tqdm

    env = environment(device)
    table = optimizers(device)
    builders = workloads.standard(device, steps + WARMUP, args.quick)
    records = []
    with tqdm(total=len(builders) * len(table), desc="overhead", unit="run") as bar:
        for build in builders:
            results = {}
            for name, make_opt in table.items():
                if warm:
                    warm_kernels(build, make_opt, device)
                workload = build()  # same seed: same weights and batches for every optimizer
                results[name] = run(workload, name, make_opt, device)
                bar.set_postfix(workload=workload.name, optimizer=name)
                bar.update()
                del workload
            for name, r in results.items():
                records.append(
                    {
                        "benchmark": "overhead",
                        "workload": build().name,
                        "optimizer": name,
                        "n_params": build().n_params,
                        "dtype": "float32",
                        "steps": steps,
                        **r,
                        "ratio_vs_adam": r["ms_per_step"] / results["adam_fused"]["ms_per_step"],
                        "ratio_vs_adam_foreach": r["ms_per_step"] / results["adam_foreach"]["ms_per_step"],
                        "warm_kernels": warm,
                        **env,
                    }
                )
            write_results(records, args)  # after each workload: an interrupted run keeps these
    print(format_table(records))
    write_results(records, args)
    if args.plot:
        plot(records, args.plot)
    return records


def write_results(records: list[dict], args) -> None:
    write_json(args.json, records)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_table(records) + "\n")


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["workload"] for r in records))
    opts = list(dict.fromkeys(r["optimizer"] for r in records))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(opts)
    for j, opt in enumerate(opts):
        ratios = [
            next(r["ratio_vs_adam"] for r in records if r["workload"] == w and r["optimizer"] == opt) for w in names
        ]
        bars = ax.bar([i + j * width for i in range(len(names))], ratios, width, label=opt)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.axhline(1.0, color="gray", lw=1, ls=":")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set(
        ylabel="time per training step / Adam(fused)",
        title=(
            f"Whole training steps, {records[0]['steps']} per run: "
            f"{records[0]['device_name']}, torch {records[0]['torch']}"
        ),
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(records: list[dict]) -> str:
    env = records[0]
    lines = [
        f"# Whole training steps on {env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"{env['threads']} threads, {env['date']}",
        "",
        f"{records[0]['steps']} steps per run ({WARMUP} more untimed first), the same weights and batches for all"
        + ("; SaLSA's kernels compiled beforehand on a throwaway copy." if records[0].get("warm_kernels") else "."),
        "",
        "| workload | params | optimizer | ms/step | vs Adam(fused) | vs Adam(foreach) | forwards/step | searched | "
        "state MB | peak MB |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        peak = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(
            f"| {r['workload']} | {r['n_params'] / 1e6:.2f}M | {r['optimizer']} | {r['ms_per_step']:.2f} | "
            f"{r['ratio_vs_adam']:.2f}x | {r['ratio_vs_adam_foreach']:.2f}x | {r['forwards_per_step']:.2f} | "
            f"{r['searched_fraction']:.0%} | {r['state_mb']:.1f} | {peak} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
