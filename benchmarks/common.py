"""What the benchmark scripts share: timing, the environment record, bandwidth references."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

# Datasheet memory bandwidth (GB/s), so results transfer to the GPUs users have (docs/benchmarks.md).
DATASHEET_GB_S = {
    "A40": 696,
    "A100-SXM4-80GB": 2039,
    "A100 80GB": 2039,
    "H100 80GB HBM3": 3350,  # H100 SXM
    "H100 SXM": 3350,
    "H200": 4800,
}


def datasheet_peak(device_name: str) -> float | None:
    for key, value in DATASHEET_GB_S.items():
        if key in device_name:
            return float(value)
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def copy_bandwidth_gb_s(device: torch.device, n_bytes: int = 1 << 28) -> float:
    """Measured device copy bandwidth, counting bytes read and written (the roofline here)."""
    n = n_bytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def write_json(path: str | None, records: list[dict] | dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(records, f, indent=2)


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """A Markdown table as lines. ``align`` has a letter per column: ``r`` right (``---:``),
    anything else left (``---``); by default every column is left-aligned."""
    align = align or "l" * len(header)
    if len(align) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError("every row, and align, needs one entry per column of the header")
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]
