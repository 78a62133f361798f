"""The paper's comparison in miniature: six optimizers on real data, tables and plots.

The SaLSA paper (Tables I and II) claims that SaLSA, untuned, beats Adam and SGD with tuned
learning rates and the older SLS line search: higher peak accuracy and a lower final training
loss, for a few percent more compute. This script tests the claim on data that ships with
packages:

* ``digits_mlp``: an MLP on scikit-learn's 8x8 digits (80/20 split);
* ``digits_convnet``: a small conv net on the same images;
* ``char_transformer``: a GPT-style character model on Python's documentation (90/10 split;
  accuracy = next-character accuracy on held-out windows).

Candidates: ``adam`` (torch's default learning rate), ``adam_tuned`` and ``sgd`` (momentum 0.9;
both tuned by a learning-rate grid, the best final training loss per task wins), ``adam_sls``
and ``sgd_sls`` (plain Armijo, beta3 = 0, a search every step), ``adam_salsa`` and
``sgd_salsa`` (defaults), and ``published_salsa`` (the ``salsa-optimizer`` package) when
installed. The line searches get no tuning.

Records per (task, optimizer, seed): ``final_loss`` (training loss averaged over the last 10%
of steps), ``peak_accuracy`` (held out, evaluated through training), ``wall_s``, ``forwards``,
``backwards``. Output: Markdown tables (mean +- standard error, best in bold), loss and
step-size curves with standard-error bands, and each line search's compute over its base.

    python benchmarks/convergence.py --quick --json out.json          # about a minute on CPU
    python benchmarks/convergence.py --seeds 3 --markdown out.md --plot out.png
    python benchmarks/convergence.py --device cuda --seeds 5          # larger models
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import workloads  # noqa: E402
from common import environment, write_json  # noqa: E402

from salsa_fast import SLS, SaLSA  # noqa: E402

try:
    from salsa.SaLSA import SaLSA as PublishedSaLSA
except ImportError:
    PublishedSaLSA = None

ADAM_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
SGD_GRID = [0.01, 0.03, 0.1, 0.3]


# -- tasks ------------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    make_model: Callable[[], nn.Module]
    batches: Callable[[int], list]  # seed -> the training batches, in order
    loss_fn: Callable
    accuracy: Callable[[nn.Module], float]  # held out


def _digits_split(device):
    x, y = workloads.digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def _epochs(n: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Shuffled epochs cut into batches, for ``steps`` steps."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=g)
        out += [order[i : i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def _classification_accuracy(model, x, y) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was)
    return acc


def digits_task(name: str, make: Callable[[], nn.Module], device, steps: int, batch: int = 64) -> Task:
    xtr, ytr, xte, yte = _digits_split(device)

    def batches(seed):
        return [(xtr[i], ytr[i]) for i in _epochs(len(xtr), steps, batch, seed)]

    return Task(name, make, batches, nn.functional.cross_entropy, lambda m: _classification_accuracy(m, xte, yte))


def char_task(device, steps: int, batch: int, seq: int, width: int, layers: int, heads: int) -> Task:
    ids, vocab = workloads.char_corpus()
    cut = int(0.9 * len(ids))
    train_ids, test_ids = ids[:cut], ids[cut:]
    offsets = torch.arange(seq + 1)
    g = torch.Generator().manual_seed(123)
    test_starts = torch.randint(0, len(test_ids) - seq - 1, (256,), generator=g)
    test = test_ids[test_starts[:, None] + offsets].to(device)

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(steps):
            window = train_ids[torch.randint(0, len(train_ids) - seq - 1, (batch,), generator=g)[:, None] + offsets]
            out.append((window[:, :-1].to(device), window[:, 1:].to(device)))
        return out

    def make():
        return workloads.CharGPT(vocab, width, layers, heads, seq).to(device)

    def accuracy(model):
        was = model.training
        model.eval()
        with torch.no_grad():
            acc = (model(test[:, :-1]).argmax(-1) == test[:, 1:]).float().mean().item()
        model.train(was)
        return acc

    return Task(f"char_transformer_{width}x{layers}", make, batches, workloads._lm_loss, accuracy)


def tasks(device: torch.device, quick: bool) -> list[Task]:
    if device.type == "cuda":
        steps, width, conv, lm = 3000, 1024, 64, dict(batch=64, seq=128, width=256, layers=4, heads=4)
    elif quick:
        steps, width, conv, lm = 120, 128, 8, dict(batch=16, seq=32, width=64, layers=1, heads=2)
    else:
        steps, width, conv, lm = 700, 256, 16, dict(batch=32, seq=64, width=96, layers=2, heads=4)

    def mlp():
        return nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        ).to(device)

    return [
        digits_task("digits_mlp", mlp, device, steps),
        digits_task("digits_convnet", lambda: workloads.DigitsConvNet(conv).to(device), device, steps),
        char_task(device, steps // 2 if quick else steps, **lm),
    ]


# -- optimizers -------------------------------------------------------------------------------------


def candidates(adam_grid, sgd_grid) -> dict[str, tuple[Callable, list]]:
    """name -> (make(params, lr), learning rates to try; [None] = no tuning)."""
    table = {
        "adam": (lambda ps, lr: torch.optim.Adam(ps), [None]),
        "adam_tuned": (lambda ps, lr: torch.optim.Adam(ps, lr=lr), adam_grid),
        "sgd": (lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9), sgd_grid),
        "adam_sls": (lambda ps, lr: SLS(ps), [None]),
        "sgd_sls": (lambda ps, lr: SLS(ps, direction="sgd"), [None]),
        "adam_salsa": (lambda ps, lr: SaLSA(ps), [None]),
        "sgd_salsa": (lambda ps, lr: SaLSA(ps, direction="sgd"), [None]),
    }
    if PublishedSaLSA is not None:
        table["published_salsa"] = (lambda ps, lr: PublishedSaLSA(ps), [None])
    return table


BASE = {"adam_sls": "adam", "adam_salsa": "adam", "sgd_sls": "sgd", "sgd_salsa": "sgd", "published_salsa": "adam"}


def train(task: Task, make_opt, lr, seed: int, eval_every: int) -> dict:
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_opt(list(model.parameters()), lr)
    closure_based = not isinstance(opt, (torch.optim.Adam, torch.optim.SGD))
    losses, step_sizes = [], []
    forwards = backwards_done = 0
    peak = 0.0
    batches = task.batches(seed)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the published package prints
        for i, (xb, yb) in enumerate(batches):
            if closure_based:

                def closure(backwards=False, xb=xb, yb=yb):
                    nonlocal forwards, backwards_done
                    forwards += 1
                    loss = task.loss_fn(model(xb), yb)
                    if backwards:
                        backwards_done += 1
                        loss.backward()
                    return loss

                opt.zero_grad()
                loss = opt.step(closure)
                size = opt.step_size  # SaLSA's property; the published package's attribute
            else:
                opt.zero_grad()
                loss = task.loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                forwards += 1
                backwards_done += 1
                size = opt.param_groups[0]["lr"]
            losses.append(loss.detach())
            step_sizes.append(float(size))
            if (i + 1) % eval_every == 0 or i + 1 == len(batches):
                peak = max(peak, task.accuracy(model))
    wall = time.perf_counter() - start
    losses = [float(v) for v in losses]
    tail = max(10, len(losses) // 10)
    final = statistics.fmean(losses[-tail:])
    if not math.isfinite(final):
        final = float("inf")
    return {
        "final_loss": final,
        "peak_accuracy": peak,
        "wall_s": wall,
        "forwards": forwards,
        "backwards": backwards_done,
        "losses": losses,
        "step_sizes": step_sizes,
    }


# -- reporting --------------------------------------------------------------------------------------


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return m, se


def summary(records: list[dict]) -> dict:
    """(task, optimizer) -> mean and standard error of each metric."""
    out: dict = {}
    for r in records:
        out.setdefault((r["task"], r["optimizer"]), []).append(r)
    return {
        key: {
            m: mean_se([r[m] for r in rs]) for m in ("final_loss", "peak_accuracy", "wall_s", "forwards", "backwards")
        }
        for key, rs in out.items()
    }


def tables(records: list[dict], env: dict, chosen_lrs: dict) -> str:
    s = summary(records)
    task_names = list(dict.fromkeys(r["task"] for r in records))
    opt_names = list(dict.fromkeys(r["optimizer"] for r in records))
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"# Convergence on {env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}",
        "",
        f"{len(seeds)} seed(s); mean +- standard error; best per task in bold. Tuned learning rates "
        f"(best final training loss): " + "; ".join(f"{t}: {o} {lr:g}" for (t, o), lr in chosen_lrs.items()) + ".",
    ]
    for metric, title, better in (
        ("final_loss", "Final training loss (lower is better; mean over the last 10% of steps)", min),
        ("peak_accuracy", "Peak held-out accuracy (higher is better)", max),
    ):
        lines += [
            "",
            f"## {title}",
            "",
            "| optimizer | " + " | ".join(task_names) + " |",
            "| --- |" + " ---: |" * len(task_names),
        ]
        best = {t: better(s[(t, o)][metric][0] for o in opt_names if (t, o) in s) for t in task_names}
        for o in opt_names:
            cells = []
            for t in task_names:
                m, se = s[(t, o)][metric]
                fmt = f"{m:.4f} +- {se:.4f}" if metric == "final_loss" else f"{100 * m:.2f} +- {100 * se:.2f}%"
                cells.append(f"**{fmt}**" if m == best[t] else fmt)
            lines.append(f"| {o} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Compute of each line search over its base optimizer",
        "",
        "| optimizer | task | forwards/step | wall time vs base |",
        "| --- | --- | ---: | ---: |",
    ]
    steps = {t: next(r["steps"] for r in records if r["task"] == t) for t in task_names}
    for o in opt_names:
        if o not in BASE:
            continue
        for t in task_names:
            base = s.get((t, BASE[o]))
            if base is None or (t, o) not in s:
                continue
            lines.append(
                f"| {o} | {t} | {s[(t, o)]['forwards'][0] / steps[t]:.2f} | "
                f"{s[(t, o)]['wall_s'][0] / base['wall_s'][0]:.2f}x |"
            )
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in records))
    opt_names = list(dict.fromkeys(r["optimizer"] for r in records))
    fig, axes = plt.subplots(2, len(task_names), figsize=(5 * len(task_names), 8), squeeze=False)
    colors = {o: plt.cm.tab10(i % 10) for i, o in enumerate(opt_names)}
    for j, t in enumerate(task_names):
        for o in opt_names:
            runs = [r for r in records if r["task"] == t and r["optimizer"] == o]
            if not runs:
                continue
            for row, key in ((0, "losses"), (1, "step_sizes")):
                if row == 1 and o not in BASE:  # step sizes of the line searches only
                    continue
                curves = torch.tensor([_smooth(r[key]) if row == 0 else r[key] for r in runs], dtype=torch.float64)
                mean = curves.mean(0)
                se = curves.std(0) / math.sqrt(len(runs)) if len(runs) > 1 else torch.zeros_like(mean)
                x = range(len(mean))
                axes[row][j].plot(x, mean, color=colors[o], lw=1.3, label=o)
                axes[row][j].fill_between(x, (mean - se).clamp_min(1e-12), mean + se, color=colors[o], alpha=0.2)
        axes[0][j].set(yscale="log", title=t, xlabel="step", ylabel="training loss (smoothed)")
        axes[1][j].set(yscale="log", xlabel="step", ylabel="step size")
        axes[0][j].legend(fontsize=7)
        axes[1][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_plot(records: list[dict], path: str) -> None:
    """Final training loss per task and optimizer (mean over seeds, standard-error bars), from the
    saved records alone (they hold no curves): the picture README.md shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in records))
    opt_names = [o for o in dict.fromkeys(r["optimizer"] for r in records) if o != "published_salsa"]
    fig, axes = plt.subplots(1, len(task_names), figsize=(4.2 * len(task_names), 3.6), squeeze=False)
    for ax, t in zip(axes[0], task_names):
        stats = [
            mean_se([r["final_loss"] for r in records if r["task"] == t and r["optimizer"] == o]) for o in opt_names
        ]
        colors = [plt.cm.tab10(i % 10) for i in range(len(opt_names))]
        ax.bar(range(len(opt_names)), [m for m, _ in stats], yerr=[se for _, se in stats], color=colors)
        ax.set_xticks(range(len(opt_names)), opt_names, rotation=45, ha="right", fontsize=8)
        ax.set(yscale="log", title=t, ylabel="final training loss" if t == task_names[0] else None)
        ax.grid(axis="y", alpha=0.3)
    env = records[0]
    fig.suptitle(
        f"Final training loss after {env['steps']} steps, lower is better ({env['device_name']}, torch {env['torch']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list[float], beta: float = 0.95) -> list[float]:
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * (v if math.isfinite(v) else avg / (1 - beta ** max(i, 1)))
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small tasks, one seed, short grids")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per candidate (default 1 quick, 3 otherwise)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    adam_grid = [3e-4, 1e-3, 3e-3] if args.quick else ADAM_GRID
    sgd_grid = [0.03, 0.1, 0.3] if args.quick else SGD_GRID
    table = candidates(adam_grid, sgd_grid)
    task_list = tasks(device, args.quick)
    env = environment(device)
    from tqdm.auto import tqdm

    total = len(task_list) * len(seeds) * sum(len(lrs) for _, lrs in table.values())
    records, chosen = [], {}
    with tqdm(total=total, desc="convergence", unit="run") as bar:
        for task in task_list:
            eval_every = max(1, len(task.batches(0)) // 20)
            for name, (make, lrs) in table.items():
                by_lr = {}
                for lr in lrs:
                    by_lr[lr] = [train(task, make, lr, seed, eval_every) for seed in seeds]
                    bar.set_postfix(task=task.name, optimizer=name)
                    bar.update(len(seeds))
                lr = min(by_lr, key=lambda v: statistics.fmean(r["final_loss"] for r in by_lr[v]))
                if lr is not None:
                    chosen[(task.name, name)] = lr
                for seed, r in zip(seeds, by_lr[lr]):
                    records.append(
                        {
                            "task": task.name,
                            "optimizer": name,
                            "seed": seed,
                            "lr": lr,
                            "steps": len(r["losses"]),
                            **r,
                            **env,
                        }
                    )
    text = tables(records, env, chosen)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(records, args.plot)
    slim = [{k: v for k, v in r.items() if k not in ("losses", "step_sizes")} for r in records]
    write_json(args.json, slim)
    return records


if __name__ == "__main__":
    main()
