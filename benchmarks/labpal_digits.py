"""LABPAL's modes on digits MLPs: does each train with the default hyperparameters?
The documentation's numbers come from the committed run, benchmarks/results/labpal_digits_cpu.json: after saving a new
run's --json there, `python benchmarks/readme_tables.py` refreshes the documentation.

The issue's bar: batch 64, 1000 step calls, under half the initial full-batch loss, at most 1.3
closure calls per step. Every (mode, model, seed) runs with the defaults; ``sgd_uncapped`` is
``mode="sgd", cap_sgd_updates=False``, the reference's SGD updates.

Models: ``tanh``, one hidden tanh layer (as in the tests), and ``relu``, two hidden ReLU layers,
each at three widths. Records: ``mode``, ``model``, ``width``, ``seed``, ``initial_loss`` and
``final_loss`` (full batch), ``calls_per_step``, ``measurements``, ``rejected``, ``rescaled``
(measurements fitted farther out on the line than the reference's samples), ``step_size``,
``learning_rate``.

The float32 results depend on the number of threads (the order of the sums in each matrix
product): the script uses two, as the committed run did.

    python benchmarks/labpal_digits.py --markdown out.md --json out.json --plot out.png
    python benchmarks/labpal_digits.py --quick                        # one seed, one width
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write_json
from workloads import digits, sample

from salsa_fast import LABPAL

MODES = {
    "nsgd": {"mode": "nsgd"},
    "sgd": {"mode": "sgd"},
    "sgd_uncapped": {"mode": "sgd", "cap_sgd_updates": False},
}


def model(kind: str, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "tanh":
        return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def run(mode: str, kind: str, width: int, seed: int, calls: int, x, y) -> dict:
    net = model(kind, width, seed)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        initial = loss_fn(net(x), y).item()
    opt = LABPAL(net.parameters(), training_set_size=len(x), batch_size=64, **MODES[mode])
    torch.manual_seed(0)
    closure_calls = 0
    for idx in sample(len(x), calls, 64, seed=1):

        def closure(backwards=False, xb=x[idx], yb=y[idx]):  # binds this batch: LABPAL re-evaluates it
            nonlocal closure_calls
            closure_calls += 1
            loss = loss_fn(net(xb), yb)
            if backwards:
                loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
    with torch.no_grad():
        final = loss_fn(net(x), y).item()
    stats = opt.stats
    return {
        "benchmark": "labpal_digits",
        "optimizer": f"labpal_{mode}",
        "mode": mode,
        "model": kind,
        "width": width,
        "seed": seed,
        "initial_loss": initial,
        "final_loss": final if math.isfinite(final) else float("inf"),
        "calls_per_step": closure_calls / calls,
        "measurements": stats["measurements"],
        "rejected": stats["rejected"],
        "rescaled": stats["rescaled"],
        "step_size": stats["step_size"],
        "learning_rate": stats["learning_rate"],
    }


def markdown(records: list[dict], env: dict) -> str:
    lines = [
        f"# LABPAL on digits MLPs, default hyperparameters ({env['device_name']}, torch {env['torch']}, {env['date']})",
        "",
        "Batch 64, 1000 step calls; full-batch cross-entropy before and after. Passes: under half the "
        "initial loss at <= 1.3 closure calls per step.",
        "",
        "| mode | models passing | median final loss | worst final loss | calls/step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        rs = [r for r in records if r["mode"] == mode]
        if not rs:
            continue
        ok = sum(r["final_loss"] < r["initial_loss"] / 2 and r["calls_per_step"] <= 1.3 for r in rs)
        finals = [r["final_loss"] for r in rs]
        lines.append(
            f"| {mode} | {ok}/{len(rs)} | {statistics.median(finals):.4g} | {max(finals):.4g} | "
            f"{max(r['calls_per_step'] for r in rs):.3f} |"
        )
    lines += [
        "",
        "| mode | model | width | seed | initial | final | measurements (rejected, rescaled) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        lines.append(
            f"| {r['mode']} | {r['model']} | {r['width']} | {r['seed']} | {r['initial_loss']:.3f} | "
            f"{r['final_loss']:.4g} | {r['measurements']} ({r['rejected']}, {r.get('rescaled', 0)}) |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, mode in enumerate(MODES):
        finals = [r["final_loss"] for r in records if r["mode"] == mode]
        finals = [min(f, 1e3) for f in finals]
        ax.scatter([i] * len(finals), finals, alpha=0.6)
    ax.axhline(records[0]["initial_loss"] / 2, color="gray", linestyle="--", label="half the initial loss")
    ax.set_xticks(range(len(MODES)), list(MODES))
    ax.set_yscale("log")
    ax.set_ylabel("final full-batch loss (1000 calls)")
    ax.set_title("LABPAL on digits MLPs, default hyperparameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, one width")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, y = digits()
    widths, seeds = ([64], [0]) if args.quick else ([33, 64, 128], [0, 1, 2])
    grid = [(m, k, w, s) for m in MODES for k in ("tanh", "relu") for w in widths for s in seeds]
    records = [run(*cfg, args.calls, x, y) for cfg in tqdm(grid, desc="labpal", unit="run")]
    env = environment(torch.device("cpu"))
    for r in records:
        r.update(env)
    text = markdown(records, env)
    print(text)
    write_json(args.json, records)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.plot:
        plot(records, args.plot)
    return records


if __name__ == "__main__":
    main()
