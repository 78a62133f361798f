"""One search step and one non-search step of SaLSA, profiled: kernels, launches, host and device time.

Trains the character-level GPT of :mod:`workloads` (the size ``profile_training.py`` uses; smaller
with ``--quick``) until SaLSA has made both kinds of step, so that every kernel is compiled; times
further steps of each kind without the profiler; then records steps one at a time with
``torch.profiler`` until it holds one of each kind, and tabulates for each:

* the whole step (``zero_grad`` and ``step``, the closure's forward and backward passes included):
  CUDA kernels run, kernel launches and host syncs seen on the host, host time, and device time
  (the kernels' durations summed);
* SaLSA's own part: what runs inside its ``salsa.plain_step`` / ``salsa.search`` ranges, less the
  trials' forward passes (``salsa.trial``): its kernels by name, their device time, the host time.

    python benchmarks/profile_steps.py --device cuda --markdown profile.md --json profile.json
    python benchmarks/profile_steps.py --device cpu --quick        # host times only, a few seconds

(For a whole trace and the top operators, see ``profile_training.py``.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter

import torch
from torch.autograd import DeviceType

sys.path.insert(0, os.path.dirname(__file__))
import workloads  # noqa: E402
from common import environment, sync, write_json  # noqa: E402

from salsa_fast import (
    SaLSA,  # noqa: E402
    testing,
)

KINDS = {True: "search", False: "non-search"}
STEP_RANGE = "profile_steps.step"
OWN_RANGES = ("salsa.plain_step", "salsa.search")
TRIAL_RANGE = "salsa.trial"


def build(device: torch.device, quick: bool, steps: int) -> workloads.Workload:
    if device.type == "cuda":  # as profile_training.py
        return workloads.char_transformer(device, steps, batch=32, seq=256, width=512, layers=8, heads=8)
    if quick:
        return workloads.char_transformer(device, steps, batch=8, seq=32, width=64, layers=2, heads=2)
    return workloads.char_transformer(device, steps, batch=16, seq=64, width=128, layers=2, heads=4)


class Trainer:
    """Steps through the workload's batches (cycling), remembering what each step did."""

    def __init__(self, work: workloads.Workload, opt: SaLSA, device: torch.device):
        self.work, self.opt, self.device, self.done = work, opt, device, 0

    def step(self) -> tuple[bool, float, float]:
        """One training step from an idle device: (searched, host ms until step() returned, wall ms)."""
        xb, yb = self.work.batches[self.done % len(self.work.batches)]
        self.done += 1
        sync(self.device)
        start = time.perf_counter()
        with torch.profiler.record_function(STEP_RANGE):
            self.work.step(self.opt, xb, yb)
        host = time.perf_counter() - start
        sync(self.device)
        return self.opt.last_step.searched, 1e3 * host, 1e3 * (time.perf_counter() - start)


def warm_up(trainer: Trainer, max_steps: int) -> set[bool]:
    """Train until both kinds of step were seen (every kernel compiled), or ``max_steps``."""
    kinds = set()
    while len(kinds) < 2 and trainer.done < max_steps:
        kinds.add(trainer.step()[0])
    return kinds


def time_steps(trainer: Trainer, steps: int) -> dict:
    """Mean host and wall time of each kind of step over ``steps`` unprofiled steps."""
    seen: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(steps):
        searched, host, wall = trainer.step()
        seen[searched].append((host, wall))
    return {
        KINDS[k]: {
            "steps": len(seen[k]),
            "host_ms": statistics.mean(h for h, _ in seen[k]) if seen[k] else None,
            "wall_ms": statistics.mean(w for _, w in seen[k]) if seen[k] else None,
        }
        for k in (False, True)
    }


def _ms(e) -> float:
    return (e.time_range.end - e.time_range.start) / 1e3


def _inside(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in windows)


def _device_class(e) -> str:
    if e.name.startswith("Memcpy"):
        return "memcpy"
    if e.name.startswith("Memset"):
        return "memset"
    if getattr(e, "is_user_annotation", False) or e.name.startswith(("salsa.", "profile_steps.", "Optimizer.")):
        return "annotation"  # a record_function range drawn on the GPU timeline
    return "kernel"


def summarize(events, host_ms: float) -> dict:
    """Counts and times of one profiled step (``prof.events()``), the whole step and SaLSA's own part.

    Launches and syncs are host API calls inside the step's range. A kernel is SaLSA's own when
    the call that launched it (the same correlation id) was made inside SaLSA's ranges and outside
    a trial's forward pass; a kernel whose launch the trace lacks (a driver API call the profiler
    did not record) is placed by the op it is linked to instead, or counted as unattributed.
    """
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    device = [e for e in events if e.device_type != DeviceType.CPU]

    def windows(*names):
        return [(e.time_range.start, e.time_range.end) for e in cpu if e.name in names]

    step = windows(STEP_RANGE)
    own, trials = windows(*OWN_RANGES), windows(TRIAL_RANGE)
    in_step = [e for e in cpu if _inside(e.time_range.start, step)]
    launches = [e for e in in_step if e.name.startswith(("cudaLaunch", "cuLaunch")) or "LaunchKernel" in e.name]
    syncs = [e for e in in_step if "Synchronize" in e.name]
    kernels = [e for e in device if _device_class(e) == "kernel"]
    copies = [e for e in device if _device_class(e) in ("memcpy", "memset")]

    launched = {e.id: e.time_range.start for e in launches}  # CUPTI correlation ids
    ops = {e.id: e.time_range.start for e in cpu if getattr(e, "linked_correlation_id", 0) == 0}

    def launch_time(k):
        if k.id in launched:
            return launched[k.id]
        return ops.get(getattr(k, "linked_correlation_id", 0))

    times = [launch_time(k) for k in kernels]
    own_kernels = [k for k, t in zip(kernels, times) if t is not None and _inside(t, own) and not _inside(t, trials)]
    own_host = sum(b - a for a, b in own) - sum(b - a for a, b in trials)
    return {
        "kernels": len(kernels),
        "launches": len(launches),
        "syncs": len(syncs),
        "copies": len(copies),
        "host_ms": host_ms,
        "device_ms": sum(_ms(k) for k in kernels),
        "own_kernels": len(own_kernels),
        "own_host_ms": own_host / 1e3,
        "own_device_ms": sum(_ms(k) for k in own_kernels),
        "own_kernel_names": dict(Counter(k.name for k in own_kernels)),
        "unattributed_kernels": sum(t is None for t in times),
    }


def profile_each_kind(trainer: Trainer, max_steps: int, trace: str | None) -> list[dict]:
    """Profile steps one at a time until one of each kind is held (or ``max_steps``)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities):  # the profiler's own first-use setup
        trainer.step()
    found = {}
    for _ in range(max_steps):
        with torch.profiler.profile(activities=activities) as prof:
            searched, host, _ = trainer.step()
        kind = KINDS[searched]
        if kind not in found:
            found[kind] = {"step": kind, "trials": trainer.opt.last_step.trials, **summarize(prof.events(), host)}
            if trace:
                prof.export_chrome_trace(f"{trace}.{kind}.json")
        if len(found) == 2:
            break
    return [found[k] for k in ("non-search", "search") if k in found]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--quick", action="store_true", help="CPU: a smaller model (a few seconds)")
    parser.add_argument("--warmup", type=int, default=400, help="at most this many steps to see both kinds")
    parser.add_argument("--timed", type=int, default=30, help="unprofiled steps timed after the warm-up")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--trace", help="also write each profiled step's trace to TRACE.<kind>.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))

    work = build(device, args.quick, steps=64)  # cycled through: the data matters little here
    opt = SaLSA(work.model.parameters(), backend=args.backend)
    trainer = Trainer(work, opt, device)
    kinds = warm_up(trainer, args.warmup)
    warmup_steps = trainer.done
    timed = time_steps(trainer, args.timed)
    profiled = profile_each_kind(trainer, max_steps=max(40, args.warmup // 4), trace=args.trace)
    result = {
        "benchmark": "profile_steps",
        "workload": work.name,
        "n_params": work.n_params,
        "backend": testing.backend(opt).name,
        "warmup_steps": warmup_steps,
        "both_kinds_in_warmup": len(kinds) == 2,
        "timed": timed,
        "profiled": profiled,
        **environment(device),
    }
    text = format_markdown(result)
    print(text)
    write_json(args.json, result)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return result


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def format_markdown(r: dict) -> str:
    lines = [
        f"# SaLSA's steps profiled: {r['workload']} ({r['n_params'] / 1e6:.2f}M parameters), backend {r['backend']}",
        "",
        f"{r['device_name']} ({r['device']}), torch {r['torch']}, triton {r['triton']}, {r['date']}; "
        f"{r['warmup_steps']} warm-up steps first"
        + ("" if r["both_kinds_in_warmup"] else " (without a non-search step among them: kernels may be compiling)")
        + ".",
        "",
        "Unprofiled (means over the steps of each kind): host ms until `step()` returned, "
        "wall ms until the device finished.",
        "",
        "| step | steps | host ms | wall ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind, t in r["timed"].items():
        lines.append(f"| {kind} | {t['steps']} | {_f(t['host_ms'])} | {_f(t['wall_ms'])} |")
    lines += [
        "",
        "One profiled step of each kind (profiler overhead in the host times). Whole step: kernels run on the "
        "device, launches and syncs called on the host, device ms = the kernels' durations summed. SaLSA's own: inside "
        "its `salsa.plain_step` / `salsa.search` ranges, less the trials' forward passes.",
        "",
    ]
    return "\n".join(lines + profiled_steps_table(r)) + "\n"


def profiled_steps_table(r: dict) -> list[str]:
    """The profiled steps as Markdown lines: the table, then (CUDA) each step's own kernels.
    (The GPU suite's summary shows the same.)"""
    cuda = r["device"] == "cuda"
    lines = [
        "| step | trials | kernels | launches | syncs | copies | host ms | device ms | own kernels | own host ms | "
        "own device ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in r["profiled"]:
        dev = (lambda key, fmt="d", p=p: format(p[key], fmt)) if cuda else (lambda key, fmt="d": "-")  # no CUDA events
        lines.append(
            f"| {p['step']} | {p['trials']} | {dev('kernels')} | {dev('launches')} | {dev('syncs')} "
            f"| {dev('copies')} | "
            f"{_f(p['host_ms'])} | {dev('device_ms', '.3f')} | {dev('own_kernels')} | {_f(p['own_host_ms'])} | "
            f"{dev('own_device_ms', '.3f')} |"
        )
    if cuda:
        lines.append("")
        for p in r["profiled"]:
            names = ", ".join(f"`{n}` x{c}" for n, c in sorted(p["own_kernel_names"].items())) or "none found"
            lost = f" ({p['unattributed_kernels']} kernels of the step not placed)" if p["unattributed_kernels"] else ""
            lines.append(f"- {p['step']} step, SaLSA's own kernels: {names}{lost}")
    return lines


if __name__ == "__main__":
    main()
