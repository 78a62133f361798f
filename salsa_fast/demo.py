"""The main job: train an MLP on scikit-learn's digits with SaLSA and with Adam, side by side.

    python -m salsa_fast.demo            # or: salsa-fast-demo
    python -m salsa_fast.demo --quick    # a few epochs

Both optimizers start from the same weights and see the same mini-batches. SaLSA gets no
learning rate; Adam runs at torch's default (1e-3). Prints final loss and accuracy, the step
sizes SaLSA found, wall time per training step of both, and writes a PNG with the loss curves
and SaLSA's step size. Uses CUDA when present.

Needs the ``bench`` extra (scikit-learn, matplotlib, tqdm).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import SaLSA


@dataclass
class History:
    name: str
    losses: list[float] = field(default_factory=list)  # mini-batch loss per step
    step_sizes: list[float] = field(default_factory=list)  # SaLSA only
    searched: list[bool] = field(default_factory=list)  # SaLSA only
    seconds: float = 0.0  # wall time of all training steps
    steps: int = 0
    forwards: int = 0
    train_loss: float = float("nan")
    test_accuracy: float = float("nan")

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / max(1, self.steps)


def load_data(device: torch.device, seed: int):
    """Digits as (train x, train y, test x, test y): 80/20 split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return [t.to(device) for t in (x[train], y[train], x[test], y[test])]


def make_model(hidden: int, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    ).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(opt, model, loss_fn, xb, yb, hist: History) -> torch.Tensor:
    """One training step, as each optimizer is driven: SaLSA with its closure (recording its
    step size and whether it searched), Adam after one backward."""
    if not isinstance(opt, SaLSA):
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        return loss

    def closure(backwards=False):
        loss = loss_fn(model(xb), yb)
        if backwards:
            loss.backward()
        return loss

    opt.zero_grad()
    loss = opt.step(closure)
    hist.step_sizes.append(opt.step_size)
    hist.searched.append(opt.last_step.searched)
    return loss


def train(name, model, data, epochs, batch_size, seed, device, progress) -> History:
    x, y, x_test, y_test = data
    loss_fn = nn.CrossEntropyLoss()
    salsa = name == "SaLSA"
    opt = SaLSA(model.parameters()) if salsa else torch.optim.Adam(model.parameters())
    hist = History(name)
    order_gen = torch.Generator().manual_seed(seed + 1)
    n = len(x)
    bar = progress(total=epochs * -(-n // batch_size), desc=f"{name:>5}", unit="step", leave=True)
    for _ in range(epochs):
        order = torch.randperm(n, generator=order_gen).to(device)
        _sync(device)
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            loss = _step(opt, model, loss_fn, x[idx], y[idx], hist)
            hist.losses.append(loss.detach())
            hist.steps += 1
            bar.update()
        _sync(device)
        hist.seconds += time.perf_counter() - start
        bar.set_postfix(loss=f"{float(hist.losses[-1]):.4f}")
    bar.close()
    hist.losses = [float(v) for v in hist.losses]  # one transfer at the end, not one per step
    hist.forwards = opt.stats["forwards"] if salsa else hist.steps
    with torch.no_grad():
        hist.train_loss = float(loss_fn(model(x), y))
        hist.test_accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return hist


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Debiased exponential moving average (as for Adam's moments)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def plot(salsa: History, adam: History, path: str, device: torch.device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eta) = plt.subplots(1, 2, figsize=(11, 4))
    for h, color in ((salsa, "tab:red"), (adam, "tab:blue")):
        ax_loss.plot(h.losses, color=color, alpha=0.2, lw=0.8)
        label = f"{h.name} (test acc {h.test_accuracy:.1%})" + ("" if h is salsa else ", lr=1e-3")
        ax_loss.plot(smooth(h.losses), color=color, lw=1.8, label=label)
    ax_loss.set(yscale="log", xlabel="step", ylabel="mini-batch loss", title="Training loss on digits")
    ax_loss.legend()
    ax_eta.plot(salsa.step_sizes, color="tab:red", lw=1.5, label="step size")
    searches = [i for i, s in enumerate(salsa.searched) if s]
    ax_eta.scatter(
        searches,
        [salsa.step_sizes[i] for i in searches],
        s=6,
        color="black",
        zorder=3,
        label=f"line search ({len(searches)} of {salsa.steps} steps)",
    )
    ax_eta.set(yscale="log", xlabel="step", ylabel="step size", title="SaLSA's step size (no tuning)")
    ax_eta.legend()
    fig.suptitle(f"salsa_fast demo on {device.type}: SaLSA vs Adam, same init and batches")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(salsa: History, adam: History, device: torch.device) -> str:
    sizes = salsa.step_sizes
    lines = [
        f"device: {device}  ({torch.__version__})",
        "",
        f"{'':>6} {'train loss':>11} {'test acc':>9} {'ms/step':>9} {'forwards/step':>14}",
    ]
    for h in (salsa, adam):
        lines.append(
            f"{h.name:>6} {h.train_loss:>11.4f} {h.test_accuracy:>9.1%} {h.ms_per_step:>9.3f} "
            f"{h.forwards / h.steps:>14.2f}"
        )
    lines += [
        "",
        f"SaLSA / Adam wall time per step: {salsa.ms_per_step / adam.ms_per_step:.2f}x "
        f"({sum(salsa.searched)} of {salsa.steps} steps searched)",
        f"SaLSA step sizes: first {sizes[0]:.3g}, median {statistics.median(sizes):.3g}, "
        f"min {min(sizes):.3g}, max {max(sizes):.3g}, final {sizes[-1]:.3g}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="salsa-fast-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="salsa_demo.png", help="where to write the plot (PNG)")
    parser.add_argument("--quick", action="store_true", help="3 epochs, for a smoke test")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    epochs = 3 if args.quick else args.epochs
    if args.no_progress:
        progress = _NoBar
    else:
        from tqdm.auto import tqdm as progress

    data = load_data(device, args.seed)
    runs = {}
    for name in ("SaLSA", "Adam"):
        model = make_model(args.hidden, args.seed, device)
        runs[name] = train(name, model, data, epochs, args.batch_size, args.seed, device, progress)
    text = report(runs["SaLSA"], runs["Adam"], device)
    print(text)
    plot(runs["SaLSA"], runs["Adam"], args.out, device)
    print(f"\nplot written to {args.out}")
    return {"runs": runs, "report": text, "plot": args.out}


class _NoBar:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


if __name__ == "__main__":
    main()
