"""Optimizer-only microbenchmark: each pass over one flat buffer, timed, as GB/s and vs Adam.

For every size and dtype, one parameter of ``n`` elements with a gradient, and:

* ``adam_fused`` / ``adam_foreach``: ``torch.optim.Adam(...).step()``;
* ``salsa_fast_torch`` / ``salsa_fast_triton`` (CUDA only): SaLSA's passes called through its
  backend, without a closure: ``step`` (a non-search step as the optimizer runs it: the
  non-finite check plus the update), ``step_kernel`` (the update alone), ``first_pass`` (a
  search's first pass), ``trial`` (each further trial) and ``commit`` (the moments at the end of
  a search).

Bandwidth is the pass's byte floor (every buffer it must read or write, once) over its time,
next to the device's measured copy bandwidth and its datasheet peak, so an A40 user can read off
what to expect. ``ratio_vs_adam`` divides by ``adam_fused``'s step at the same size and dtype.

    python benchmarks/optimizer_step.py --device cpu --quick --json out.json --plot out.png
    python benchmarks/optimizer_step.py --device cuda            # 1e5 .. 1e9 parameters

Every pass is called three times before it is timed (``common.time_ms``), so Triton's compilation
stays out of the timed window. ``--json`` is rewritten after each size.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import copy_bandwidth_gb_s, datasheet_peak, environment, time_ms, write_json  # noqa: E402

from salsa_fast import (
    SaLSA,  # noqa: E402
    testing,
)
from salsa_fast.backends import Hyper  # noqa: E402
from salsa_fast.step_state import StepState  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def byte_floor(pass_name: str, optimizer: str, dtype: torch.dtype) -> int:
    """Bytes per parameter a pass must move: each buffer read or written once."""
    p = torch.finfo(dtype).bits // 8
    s = 8 if dtype == torch.float64 else 4  # SaLSA's state dtype
    if optimizer.startswith("adam"):
        return 3 * p + 4 * p  # torch's Adam keeps its moments in the parameter dtype
    return {
        "step": 4 * p + 4 * s,  # check reads g; update reads p, g, m, v, writes p, m, v
        "step_kernel": 3 * p + 4 * s,
        "first_pass": 4 * p + s,  # reads p, g, v; writes backup, p (use_mv: + m)
        "trial": 3 * p + s,  # reads backup, g, v; writes p
        "commit": p + 4 * s,  # reads g, m, v; writes m, v
    }[pass_name]


def _param(n: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.randn(n, device=device).to(dtype))
    p.grad = (torch.randn(n, device=device) * 1e-3).to(dtype)
    return p


def adam_passes(kind: str, n: int, dtype, device):
    p = _param(n, dtype, device)
    opt = torch.optim.Adam([p], fused=kind == "fused", foreach=kind == "foreach")
    return {"step": opt.step}


def salsa_passes(backend: str, n: int, dtype, device):
    p = _param(n, dtype, device)
    grad = p.grad
    opt = SaLSA([p], backend=backend)
    p.grad = grad
    testing.attach_grads(opt)  # attach the flat gradient view (the first step would do it)
    (b,) = testing.buckets(opt)
    be = testing.backend(opt)
    h = Hyper(0.9, 0.999, 1e-8, "adam", False, StepState.at(device, 0.9, 0.999, bias_step=11.0))
    kw = dict(lr_step=1e-4, decay=0.0)

    def step():  # as the optimizer does it: the probe raises the device's flag, the update reads it
        h.state.begin(11.0)
        be.probe(b, h)
        be.plain_step(b, hyper=h, count_skip=True, **kw)

    def trial():
        if not b.search_active:  # a trial rewrites from the backup its search's first pass wrote
            be.backup_begin(b, hyper=h, **kw)
        be.backup_trial(b, hyper=h, **kw)

    return {
        "step": step,
        "step_kernel": lambda: be.plain_step(b, hyper=h, **kw),
        "first_pass": lambda: be.backup_begin(b, hyper=h, **kw),
        "trial": trial,
        "commit": lambda: be.search_commit(b, hyper=h),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU: up to 1e7; GPU: up to 1e8")
    parser.add_argument("--sizes", type=float, nargs="*")
    parser.add_argument("--dtypes", nargs="*", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.sizes:
        sizes = [int(s) for s in args.sizes]
    elif device.type == "cuda":
        sizes = [10**k for k in range(5, 9 if args.quick else 10)]
    else:
        sizes = [10**k for k in range(5, 8 if args.quick else 9)]
    optimizers = ["adam_fused", "adam_foreach", "salsa_fast_torch"]
    if device.type == "cuda":
        optimizers.append("salsa_fast_triton")
    from tqdm.auto import tqdm

    env = environment(device)
    copy_gb_s = copy_bandwidth_gb_s(device)
    peak = datasheet_peak(env["device_name"])
    records = []
    with tqdm(total=len(sizes) * len(args.dtypes) * len(optimizers), desc="optimizer_step", unit="case") as bar:
        for n in sizes:
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                adam_ms = None
                for name in optimizers:
                    if name.startswith("adam"):
                        passes = adam_passes(name.split("_")[1], n, dtype, device)
                    else:
                        passes = salsa_passes(name.rsplit("_", 1)[1], n, dtype, device)
                    for pass_name, fn in passes.items():
                        ms = time_ms(fn, device, repeats=args.repeats)
                        if name == "adam_fused":
                            adam_ms = ms
                        gb_s = byte_floor(pass_name, name, dtype) * n / (ms * 1e-3) / 1e9
                        records.append(
                            {
                                "benchmark": "optimizer_step",
                                "optimizer": name,
                                "pass": pass_name,
                                "n_params": n,
                                "dtype": dtype_name,
                                "ms_per_step": ms,
                                "ratio_vs_adam": ms / adam_ms,
                                "bytes_per_param": byte_floor(pass_name, name, dtype),
                                "gb_per_s": gb_s,
                                "copy_gb_per_s": copy_gb_s,
                                "pct_of_copy": 100 * gb_s / copy_gb_s,
                                "datasheet_gb_per_s": peak,
                                "pct_of_datasheet": None if peak is None else 100 * gb_s / peak,
                                **env,
                            }
                        )
                    del passes
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    bar.update()
            write_json(args.json, records)  # after each size: an interrupted run keeps these
    print(format_table(records, copy_gb_s, peak))
    write_json(args.json, records)
    if args.plot:
        plot(records, args.plot)
    return records


def format_table(records: list[dict], copy_gb_s: float, peak: float | None) -> str:
    env = records[0]
    head = (
        f"# Optimizer passes on {env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"triton {env['triton']}, {env['date']}\n\nmeasured copy bandwidth {copy_gb_s:.0f} GB/s"
        + (f", datasheet {peak:.0f} GB/s" if peak else "")
        + "\n\n| n | dtype | optimizer | pass | ms | vs Adam(fused) step | B/param | GB/s | % of copy |\n"
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
    )
    rows = [
        f"| {r['n_params']:.0e} | {r['dtype']} | {r['optimizer']} | {r['pass']} | {r['ms_per_step']:.3f} | "
        f"{r['ratio_vs_adam']:.2f}x | {r['bytes_per_param']} | {r['gb_per_s']:.1f} | {r['pct_of_copy']:.0f}% |"
        for r in records
    ]
    return "\n".join([head, *rows])


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bw, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.5))
    dtype = records[0]["dtype"]
    series = {}
    for r in records:
        if r["dtype"] == dtype:
            series.setdefault((r["optimizer"], r["pass"]), []).append(r)
    for (opt, pass_name), rs in series.items():
        style = "-" if opt.startswith("salsa") else "--"
        ax_bw.plot(
            [r["n_params"] for r in rs],
            [r["gb_per_s"] for r in rs],
            style,
            marker="o",
            ms=3,
            label=f"{opt} {pass_name}",
        )
        if pass_name in ("step", "step_kernel"):
            ax_ratio.plot(
                [r["n_params"] for r in rs],
                [r["ratio_vs_adam"] for r in rs],
                style,
                marker="o",
                ms=3,
                label=f"{opt} {pass_name}",
            )
    copy = records[0]["copy_gb_per_s"]
    ax_bw.axhline(copy, color="gray", lw=1, ls=":", label=f"measured copy {copy:.0f} GB/s")
    ax_bw.set(xscale="log", xlabel="parameters", ylabel="GB/s (byte floor / time)", title=f"Bandwidth ({dtype})")
    ax_ratio.axhline(1.0, color="gray", lw=1, ls=":")
    ax_ratio.set(
        xscale="log", xlabel="parameters", ylabel="time / Adam(fused) step", title="Non-search step vs Adam(fused)"
    )
    for ax in (ax_bw, ax_ratio):
        ax.legend(fontsize=7)
    fig.suptitle(f"{records[0]['device_name']}: torch {records[0]['torch']}, triton {records[0]['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
