"""The transformer question, measured: SaLSA against AdamW on a byte-level language model.

A small decoder-only transformer (GPT-style, pre-norm, causal ``scaled_dot_product_attention``)
is trained from scratch on bytes of Python's standard library: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (test suites and site-packages left out, files over 200 kB
left out), listed sorted by path, taken in the order of a hash of their relative path until the
caps, and split by file into training and validation (a file whose path hashes to 0 mod 10 is
validation). Every machine with CPython has this corpus; its size and hash are recorded, since
it differs between Python versions.

Candidates, each for the same number of steps, on the same batches and from the same
initialisation per seed:

* ``adamw_tuned``: ``AdamW(lr, weight_decay=0.1)`` with linear warm-up (5% of the steps) and
  cosine decay to 10%, the learning rate chosen from a grid by mean final validation loss (the
  whole grid is reported);
* ``adamw_default``: ``AdamW()`` at torch's defaults (lr 1e-3, weight decay 0.01), constant;
* ``salsa``: ``SaLSA()`` at its defaults;
* ``salsa_schedule``: ``SaLSA()`` under the same warm-up and cosine as a ``LambdaLR`` (the
  group's ``lr`` scales the step size the search finds);
* ``salsa_lean``: ``SaLSA(keep_backup=False)``.

The runs of one seed are interleaved (all candidates of seed 0, then of seed 1, the order
rotated per seed), so that load from other processes on the machine falls on every candidate
alike; wall time is reported relative to ``adamw_default`` of the same seed. Wall time counts
the training steps only, not the evaluations.

Records per (candidate, seed): validation loss (nats per byte, and bits per byte) at regular
intervals and at the end, the training loss of every step, wall time, forward and backward
passes (closure calls, from SaLSA's ``stats``), SaLSA's step sizes. Output: a Markdown table
(mean +- standard error over seeds, best in bold), a plot (validation loss against step and
against wall time), JSON with the environment.

    python benchmarks/transformer_lm.py --quick                       # seconds: a tiny model
    python benchmarks/transformer_lm.py --steps 200 --seeds 2 --json benchmarks/results/transformer_lm_cpu.json \\
        --markdown benchmarks/results/transformer_lm_cpu.md --plot benchmarks/results/transformer_lm_cpu.png
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write_json  # noqa: E402

import salsa_fast  # noqa: E402
from salsa_fast import SaLSA  # noqa: E402

ADAMW_GRID = [3e-4, 1e-3, 3e-3]
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
LN2 = math.log(2)


@dataclass
class Config:
    width: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128
    batch: int = 8
    steps: int = 200
    evals: int = 10  # validation points after step 0
    val_windows: int = 64
    train_cap: int = 4_000_000  # bytes
    val_cap: int = 500_000
    max_file: int = 200_000
    warmup: float = 0.05
    final_lr_fraction: float = 0.1


QUICK = Config(width=32, layers=1, heads=2, context=32, batch=8, steps=20, evals=4, val_windows=16)
QUICK.train_cap, QUICK.val_cap = 200_000, 40_000


# -- data -------------------------------------------------------------------------------------------


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def stdlib_files(root: str, max_file: int) -> list[str]:
    """Relative paths of the standard library's ``.py`` files, sorted, tests and big files left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and os.path.getsize(path) <= max_file:
                out.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(out)


def load_corpus(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Training and validation bytes (uint8 tensors) and a description of the selection."""
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root, cfg.max_file)
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    caps = {"train": cfg.train_cap, "val": cfg.val_cap}
    sizes = {"train": 0, "val": 0}
    for rel in sorted(files, key=lambda r: _digest("order:" + r)):
        split = "val" if _digest("split:" + rel) % 10 == 0 else "train"
        if sizes[split] >= caps[split]:
            if all(sizes[s] >= caps[s] for s in caps):
                break
            continue
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read() + b"\n"
        parts[split].append(data)
        sizes[split] += len(data)
    blobs = {s: b"".join(p) for s, p in parts.items()}
    info = {
        "stdlib": root,
        "candidate_files": len(files),
        "train_files": len(parts["train"]),
        "val_files": len(parts["val"]),
        "train_bytes": len(blobs["train"]),
        "val_bytes": len(blobs["val"]),
        "sha256": hashlib.sha256(blobs["train"] + blobs["val"]).hexdigest()[:16],
    }
    tensors = [torch.frombuffer(bytearray(blobs[s]), dtype=torch.uint8) for s in ("train", "val")]
    return tensors[0], tensors[1], info


def train_batches(train: torch.Tensor, cfg: Config, seed: int) -> list[torch.Tensor]:
    """The seed's batches, in order: random windows of ``context + 1`` bytes."""
    g = torch.Generator().manual_seed(1000 + seed)
    offsets = torch.arange(cfg.context + 1)
    starts = torch.randint(0, len(train) - cfg.context - 1, (cfg.steps, cfg.batch), generator=g)
    return [train[s[:, None] + offsets].long() for s in starts]


def val_windows(val: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Evenly spaced validation windows, the same for every run."""
    starts = torch.linspace(0, len(val) - cfg.context - 2, cfg.val_windows).long()
    return val[starts[:, None] + torch.arange(cfg.context + 1)].long()


# -- model ------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        for out in (self.proj, self.mlp[2]):  # GPT-2's scaled init of the residual projections
            nn.init.normal_(out.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class ByteGPT(nn.Module):
    """A decoder-only transformer over bytes: embeddings, pre-norm blocks, an untied head."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(256, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.layers) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 256, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m not in self._residual_projections():
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)

    def _residual_projections(self) -> list[nn.Module]:
        return [m for b in self.blocks for m in (b.proj, b.mlp[2])]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def lm_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    logits = model(window[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, chunk: int = 32) -> float:
    total = sum(
        lm_loss(model, windows[i : i + chunk]).item() * len(windows[i : i + chunk])
        for i in range(0, len(windows), chunk)
    )
    return total / len(windows)


# -- candidates -------------------------------------------------------------------------------------


def warmup_cosine(cfg: Config) -> Callable[[int], float]:
    warm = max(1, round(cfg.warmup * cfg.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
        return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def candidates(cfg: Config, grid: list[float]) -> list[tuple[str, float | None, Callable]]:
    """(name, learning rate or None, make(params) -> (optimizer, scheduler or None))."""

    def scheduled(opt):
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg))

    out = [
        ("adamw_tuned", lr, lambda ps, lr=lr: scheduled(torch.optim.AdamW(ps, lr=lr, weight_decay=0.1))) for lr in grid
    ]
    return out + [
        ("adamw_default", None, lambda ps: (torch.optim.AdamW(ps), None)),
        ("salsa", None, lambda ps: (SaLSA(ps), None)),
        ("salsa_schedule", None, lambda ps: scheduled(SaLSA(ps))),
        ("salsa_lean", None, lambda ps: (SaLSA(ps, keep_backup=False), None)),
    ]


# -- one run ----------------------------------------------------------------------------------------


def _step(model, opt, window) -> float:
    if isinstance(opt, SaLSA):

        def closure(backwards=False, window=window):
            loss = lm_loss(model, window)
            if backwards:
                loss.backward()
            return loss

        opt.zero_grad()
        return float(opt.step(closure).detach())
    opt.zero_grad()
    loss = lm_loss(model, window)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train(cfg: Config, make, seed: int, batches, windows, bar=None) -> dict:
    torch.manual_seed(seed)
    model = ByteGPT(cfg)
    opt, sched = make(list(model.parameters()))
    eval_at = {round(cfg.steps * (i + 1) / cfg.evals) for i in range(cfg.evals)}
    curve = {"step": [0], "time_s": [0.0], "val_loss": [evaluate(model, windows)]}
    losses, sizes, effective = [], [], []
    wall = 0.0
    for i, window in enumerate(batches):
        start = time.perf_counter()
        losses.append(_step(model, opt, window))
        if sched is not None:
            sched.step()
        wall += time.perf_counter() - start
        if isinstance(opt, SaLSA):
            sizes.append(opt.step_size)
            effective.append(opt.stats["effective_step_size"])
        if i + 1 in eval_at:
            curve["step"].append(i + 1)
            curve["time_s"].append(wall)
            curve["val_loss"].append(evaluate(model, windows))
        if bar is not None:
            bar.update(1)
    stats = opt.stats if isinstance(opt, SaLSA) else {"forwards": cfg.steps, "backwards": cfg.steps}
    tail = max(1, len(losses) // 10)
    return {
        "final_val_loss": curve["val_loss"][-1],
        "final_val_bpb": curve["val_loss"][-1] / LN2,
        "final_train_loss": statistics.fmean(losses[-tail:]),
        "wall_s": wall,
        "forwards": int(stats["forwards"]),
        "backwards": int(stats["backwards"]),
        "searches": int(stats.get("searches", 0)),
        "total_trials": int(stats.get("total_trials", 0)),
        "curve": curve,
        "train_losses": losses,
        "step_sizes": sizes,
        "effective_step_sizes": effective,
        "n_params": sum(p.numel() for p in model.parameters()),
    }


# -- the study --------------------------------------------------------------------------------------


def run_study(cfg: Config, seeds: list[int], grid: list[float], progress: bool = True) -> tuple[list[dict], dict]:
    """Every candidate for every seed, interleaved per seed; returns the records and the corpus."""
    from tqdm.auto import tqdm

    train_bytes, val_bytes, corpus = load_corpus(cfg)
    windows = val_windows(val_bytes, cfg)
    table = candidates(cfg, grid)
    records = []
    with tqdm(
        total=len(seeds) * len(table) * cfg.steps, desc="transformer_lm", unit="step", disable=not progress
    ) as bar:
        for seed in seeds:
            batches = train_batches(train_bytes, cfg, seed)
            shift = seed % len(table)
            for name, lr, make in table[shift:] + table[:shift]:
                bar.set_postfix(seed=seed, candidate=name if lr is None else f"{name} {lr:g}")
                record = train(cfg, make, seed, batches, windows, bar)
                records.append({"candidate": name, "lr": lr, "seed": seed, "steps": cfg.steps, **record})
    return records, corpus


def choose_lr(records: list[dict]) -> float:
    grid = {r["lr"] for r in records if r["candidate"] == "adamw_tuned"}
    return min(grid, key=lambda lr: _mean([r for r in records if r["lr"] == lr], "final_val_loss"))


def _mean(runs: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def loss_at_time(curve: dict, t: float) -> float:
    """Validation loss at ``t`` seconds of training, interpolated between evaluations; the
    final loss when the run was shorter."""
    times, losses = curve["time_s"], curve["val_loss"]
    for i in range(1, len(times)):
        if times[i] >= t:
            frac = (t - times[i - 1]) / max(times[i] - times[i - 1], 1e-12)
            return losses[i - 1] + frac * (losses[i] - losses[i - 1])
    return losses[-1]


def derived(records: list[dict]) -> None:
    """Adds, per run, wall time and the validation loss at equal wall time, both against
    ``adamw_default`` of the same seed."""
    base = {r["seed"]: r for r in records if r["candidate"] == "adamw_default"}
    for r in records:
        b = base[r["seed"]]
        r["wall_vs_adamw_default"] = r["wall_s"] / b["wall_s"]
        r["val_loss_at_adamw_default_time"] = loss_at_time(r["curve"], b["wall_s"])


NAMES = ["adamw_tuned", "adamw_default", "salsa", "salsa_schedule", "salsa_lean"]
COLUMNS = [  # key, header, lower is better (None: no bold), format
    ("final_val_loss", "val loss (nats/byte)", True, "{:.4f}"),
    ("final_val_bpb", "val bits/byte", True, "{:.4f}"),
    ("val_loss_at_adamw_default_time", "val loss at AdamW-default's wall time", True, "{:.4f}"),
    ("final_train_loss", "train loss (last 10%)", True, "{:.4f}"),
    ("forwards_per_step", "forwards/step", None, "{:.2f}"),
    ("backwards_per_step", "backwards/step", None, "{:.2f}"),
    ("wall_vs_adamw_default", "wall time vs AdamW default", None, "{:.2f}x"),
    ("wall_s", "wall s", None, "{:.1f}"),
]


def chosen_runs(records: list[dict], lr: float) -> dict[str, list[dict]]:
    runs = {n: [r for r in records if r["candidate"] == n and (n != "adamw_tuned" or r["lr"] == lr)] for n in NAMES}
    for rs in runs.values():
        for r in rs:
            r["forwards_per_step"] = r["forwards"] / r["steps"]
            r["backwards_per_step"] = r["backwards"] / r["steps"]
    return runs


def _cell(values: list[float], fmt: str, bold: bool) -> str:
    m, se = mean_se(values)
    text = fmt.format(m) + (f" +- {fmt.format(se)}" if len(values) > 1 else "")
    return f"**{text}**" if bold else text


def main_table(runs: dict[str, list[dict]], lr: float) -> list[str]:
    lines = ["| candidate | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    best = {k: min(_mean(rs, k) for rs in runs.values()) for k, _, lower, _ in COLUMNS if lower}
    for name, rs in runs.items():
        label = f"{name} (lr {lr:g})" if name == "adamw_tuned" else name
        cells = [
            _cell([r[k] for r in rs], fmt, lower is not None and _mean(rs, k) == best[k])
            for k, _, lower, fmt in COLUMNS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def grid_table(records: list[dict], lr: float) -> list[str]:
    lines = ["| AdamW lr (warm-up + cosine, wd 0.1) | val loss (nats/byte) | val bits/byte |", "| --- | ---: | ---: |"]
    for g in sorted({r["lr"] for r in records if r["candidate"] == "adamw_tuned"}):
        rs = [r for r in records if r["candidate"] == "adamw_tuned" and r["lr"] == g]
        mark = " (chosen)" if g == lr else ""
        lines.append(
            f"| {g:g}{mark} | {_cell([r['final_val_loss'] for r in rs], '{:.4f}', False)} | "
            f"{_cell([r['final_val_bpb'] for r in rs], '{:.4f}', False)} |"
        )
    return lines


def salsa_table(runs: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| candidate | searches | trials/search | step size, first 10% (median) | last 10% (median) "
        "| effective, last 10% |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("salsa", "salsa_schedule", "salsa_lean"):
        rs = runs[name]
        tail = max(1, rs[0]["steps"] // 10)
        cells = [
            _cell([r["searches"] for r in rs], "{:.0f}", False),
            _cell([r["total_trials"] / max(1, r["searches"]) for r in rs], "{:.2f}", False),
            _cell([statistics.median(r["step_sizes"][:tail]) for r in rs], "{:.2e}", False),
            _cell([statistics.median(r["step_sizes"][-tail:]) for r in rs], "{:.2e}", False),
            _cell([statistics.median(r["effective_step_sizes"][-tail:]) for r in rs], "{:.2e}", False),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report(records: list[dict], env: dict, cfg: Config, corpus: dict) -> str:
    lr = choose_lr(records)
    runs = chosen_runs(records, lr)
    seeds = sorted({r["seed"] for r in records})
    n_params = records[0]["n_params"]
    return "\n".join(
        [
            f"# A byte-level transformer LM: SaLSA vs AdamW, {env['device_name']} ({env['device']}), "
            f"torch {env['torch']}, {env['threads']} threads, {env['date']}",
            "",
            f"Model: {n_params / 1e6:.2f}M parameters (width {cfg.width}, {cfg.layers} layers, {cfg.heads} heads, "
            f"context {cfg.context}), batch {cfg.batch}, {cfg.steps} steps. Corpus: Python {env['python']}'s standard "
            f"library, {corpus['train_files']} files ({corpus['train_bytes'] / 1e6:.2f} MB) for training, "
            f"{corpus['val_files']} other files ({corpus['val_bytes'] / 1e6:.2f} MB) for validation; validation "
            f"loss on {cfg.val_windows} fixed windows of {cfg.context} bytes.",
            "",
            f"{len(seeds)} seed(s), mean +- standard error over seeds; best loss in bold. Every candidate runs "
            "the same batches from the same initialisation per seed. The runs were interleaved per seed (all "
            "candidates of one seed, then the next seed, the order rotated per seed) on a machine shared with "
            "other jobs: wall times are noisy, and are compared with `adamw_default` of the same seed. Wall time "
            "counts training steps only. 'At AdamW-default's wall time': the validation loss each run had "
            "reached after as many seconds of training as `adamw_default` needed for all its steps "
            "(interpolated between evaluations; a scheduled run cut there has not finished its decay).",
            "",
            *main_table(runs, lr),
            "",
            "## AdamW's learning-rate grid (chosen by mean final validation loss)",
            "",
            *grid_table(records, lr),
            "",
            "## SaLSA's searches and step sizes",
            "",
            *salsa_table(runs),
        ]
    )


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = chosen_runs(records, choose_lr(records))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, rs) in enumerate(runs.items()):
        color = plt.cm.tab10(i)
        label = f"{name} (lr {rs[0]['lr']:g})" if name == "adamw_tuned" else name
        losses = torch.tensor([r["curve"]["val_loss"] for r in rs], dtype=torch.float64)
        steps = rs[0]["curve"]["step"]
        axes[0].plot(steps, losses.mean(0), color=color, lw=1.4, label=label, marker=".")
        for r in rs:
            first = r is rs[0]
            axes[1].plot(
                r["curve"]["time_s"], r["curve"]["val_loss"], color=color, lw=1.0, label=label if first else None
            )
    axes[0].set(xlabel="step", ylabel="validation loss (nats/byte)", title="at equal steps (mean over seeds)")
    axes[1].set(
        xlabel="training wall time (s)", ylabel="validation loss (nats/byte)", title="at equal wall time (each seed)"
    )
    for ax in axes:
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rounded(value, digits: int = 6):
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    return value


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model for 20 steps, one seed (seconds)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 200; quick 20)")
    parser.add_argument("--seeds", type=int, help="seeds (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--grid", type=float, nargs="+", default=ADAMW_GRID, help="AdamW learning rates to tune over")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(**asdict(QUICK)) if args.quick else Config()
    if args.steps:
        cfg.steps = args.steps
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    env = environment(torch.device("cpu"))
    env["salsa_fast"] = os.path.dirname(salsa_fast.__file__)
    records, corpus = run_study(cfg, seeds, args.grid, progress=not args.no_progress)
    derived(records)
    text = report(records, env, cfg, corpus)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(records, args.plot)
    result = {"environment": env, "config": asdict(cfg), "corpus": corpus, "chosen_lr": choose_lr(records)}
    result["records"] = _rounded(records)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
