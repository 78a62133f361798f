"""Memory between steps: Adam, SaLSA and SaLSA(keep_backup=False) (and SGD with momentum, LABPAL
and LABPAL(keep_backup=False)); and what the lean mode costs in rounding.
The documentation's numbers come from the committed run, benchmarks/results/memory_cpu.json: after saving a new
run's --json there, `python benchmarks/readme_tables.py` refreshes the documentation.

Memory: each optimizer trains a digits MLP (default 64-1024-1024-10, 1.13M parameters) from the
same weights on the same batches; after the last step the script counts the bytes of every
tensor alive that was not alive before the model was built (parameters, gradients, everything
the optimizer keeps): on CPU by a census of the storages Python objects hold
(``salsa_fast.profiling.live_storages``), on CUDA with ``torch.cuda.memory_allocated``, plus the
peak during training (``max_memory_allocated``).

Rounding: ``keep_backup=False`` reaches each trial point from the previous one (one rounding
per element per move) instead of from a saved copy. On digits MLPs over ``--drift-steps``
steps it is run beside the default in float64 and float32: the steps after which both made the
same closure calls, and how far apart the parameters are at the end.

    python benchmarks/memory.py
    python benchmarks/memory.py --device cuda --json out.json --markdown out.md --plot out.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import workloads  # noqa: E402

from salsa_fast import LABPAL, SaLSA  # noqa: E402
from salsa_fast.profiling import live_storages  # noqa: E402

OPTIMIZERS = {
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "salsa_fast": lambda ps: SaLSA(ps),
    "salsa_fast_lean": lambda ps: SaLSA(ps, keep_backup=False),
    # LABPAL's neighbour is SGD with momentum; it also keeps a gradient sum over its batches
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
    "labpal": lambda ps: LABPAL(ps, momentum=0.9, training_set_size=1797, batch_size=128),
    "labpal_lean": lambda ps: LABPAL(ps, momentum=0.9, training_set_size=1797, batch_size=128, keep_backup=False),
}


# what each row is compared with: Adam for SaLSA, SGD with momentum for LABPAL
BASELINE = {name: "sgd_momentum" if name.startswith(("sgd", "labpal")) else "adam_foreach" for name in OPTIMIZERS}


def measure(name: str, device: torch.device, width: int, steps: int) -> dict:
    """Live tensor bytes after ``steps`` training steps (and the CUDA peak during them)."""
    work = workloads.digits_mlp(device, steps, width=width)
    params = [p for p in work.model.parameters()]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    if device.type == "cuda":
        common.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) - param_bytes  # the model exists already
    else:
        model_storages = {p.untyped_storage().data_ptr() for p in params}
        before = {a: n for a, n in live_storages().items() if a not in model_storages}
    opt = OPTIMIZERS[name](params)
    for xb, yb in work.batches:
        work.step(opt, xb, yb)
    record = {"optimizer": name, "params": sum(p.numel() for p in params), "param_bytes": param_bytes}
    if device.type == "cuda":
        common.sync(device)
        record["live_bytes"] = torch.cuda.memory_allocated(device) - base
        record["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        after = live_storages()
        record["live_bytes"] = sum(n for a, n in after.items() if a not in before)
    del opt, work
    return record


def drift(dtype: torch.dtype, seed: int, steps: int, device: torch.device) -> dict:
    """Default vs keep_backup=False on a digits MLP: the steps with the same closure calls, the
    final parameter distance and full-data losses; and, for scale, how far a default run drifts
    when its parameters are nudged by 1e-7 (Gaussian, once, after the first step)."""
    x, y = (t.to(device) for t in workloads.digits())
    runs = {}
    for name in ("default", "lean", "nudged"):
        work = workloads.digits_mlp(device, steps, width=256, seed=seed)
        work.model.to(dtype)
        opt = SaLSA(work.model.parameters(), keep_backup=name != "lean")
        calls, total = [], 0
        for i, (xb, yb) in enumerate(work.batches):
            total += work.step(opt, xb.to(dtype), yb)
            calls.append(total)
            if name == "nudged" and i == 0:
                g = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    for p in work.model.parameters():
                        p.add_((torch.randn(p.shape, generator=g) * 1e-7).to(device, dtype))
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(work.model(x.to(dtype)), y).item()
        runs[name] = (work.model, calls, loss)

    def distance(a, b):
        pairs = zip(runs[a][0].parameters(), runs[b][0].parameters())
        return max((p.double() - q.double()).abs().max().item() for p, q in pairs)

    ca, cb = runs["default"][1], runs["lean"][1]
    same = next((i for i, (u, v) in enumerate(zip(ca, cb)) if u != v), len(ca))
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "seed": seed,
        "steps": steps,
        "same_decisions_steps": same,
        "max_abs_param_diff": distance("default", "lean"),
        "loss_default": runs["default"][2],
        "loss_lean": runs["lean"][2],
        "nudged_max_abs_param_diff": distance("default", "nudged"),
    }


def markdown(env: dict, memory: list[dict], drifts: list[dict], width: int, steps: int) -> str:
    adam = next(r for r in memory if r["optimizer"] == "adam_foreach")
    params = adam["params"]
    lines = [
        "# Memory between steps, and the rounding of keep_backup=False",
        "",
        f"digits MLP 64-{width}-{width}-10 ({params / 1e6:.2f}M parameters, {adam['param_bytes'] / 2**20:.2f} MiB), "
        f"{steps} steps; {env['device_name']}, torch {env['torch']}, {env['date']}",
        "",
        "| optimizer | live MiB | baseline | vs baseline | over baseline, bytes | x parameter bytes |"
        + (" peak MiB |" if "peak_bytes" in adam else ""),
        "| --- | ---: | --- | ---: | ---: | ---: |" + (" ---: |" if "peak_bytes" in adam else ""),
    ]
    by_name = {r["optimizer"]: r for r in memory}
    for r in memory:
        base = by_name[BASELINE[r["optimizer"]]]
        row = (
            f"| {r['optimizer']} | {r['live_bytes'] / 2**20:.2f} | {base['optimizer']} | "
            f"{r['live_bytes'] / base['live_bytes']:.3f}x | {r['live_bytes'] - base['live_bytes']:+,d} | "
            f"{r['live_bytes'] / r['param_bytes']:.3f} |"
        )
        if "peak_bytes" in r:
            row += f" {r['peak_bytes'] / 2**20:.2f} |"
        lines.append(row)
    lines += [
        "",
        "keep_backup=False beside the default (digits MLP 64-256-256-10, batch 128):",
        "",
        "| dtype | seed | steps with the same closure calls | max abs parameter difference | "
        "full-data loss, default / lean | control: default nudged by 1e-7 once, max abs difference |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d in drifts:
        lines.append(
            f"| {d['dtype']} | {d['seed']} | {d['same_decisions_steps']} / {d['steps']} "
            f"| {d['max_abs_param_diff']:.2e} | "
            f"{d['loss_default']:.6f} / {d['loss_lean']:.6f} | {d['nudged_max_abs_param_diff']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def plot(memory: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    names = [r["optimizer"] for r in memory]
    colors = [
        "#4a4" if n.endswith("_lean") else "#888" if BASELINE[n] == n or n == "adam_fused" else "#c44" for n in names
    ]
    ax.barh(names, [r["live_bytes"] / 2**20 for r in memory], color=colors)
    for k, ls in ((4, ":"), (3, "--")):
        ax.axvline(memory[0]["param_bytes"] * k / 2**20, color="k", lw=0.8, ls=ls, label=f"{k} x parameters")
    ax.set_xlabel("live tensor MiB between steps")
    ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--drift-steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args()
    device = torch.device(args.device)
    workloads.digits()  # (the data set, loaded once: not part of any measurement)
    memory = [measure(name, device, args.width, args.steps) for name in tqdm(OPTIMIZERS, desc="memory")]
    cases = [(dtype, seed) for dtype in (torch.float64, torch.float32) for seed in range(args.seeds)]
    drifts = [drift(dtype, seed, args.drift_steps, device) for dtype, seed in tqdm(cases, desc="drift")]
    env = common.environment(device)
    text = markdown(env, memory, drifts, args.width, args.steps)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "memory": memory, "drift": drifts}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        plot(memory, args.plot)


if __name__ == "__main__":
    main()
