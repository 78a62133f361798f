"""Named ranges around SaLSA's phases, for profilers; a census of live tensor memory.

Each range shows in ``torch.profiler`` traces (Chrome/Perfetto) and, on CUDA, as an NVTX range
in Nsight Systems timelines: ``salsa.gradient_pass``, ``salsa.plain_step``, ``salsa.search``
(first pass to commit) and ``salsa.trial`` (one trial's forward pass).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch

_NVTX = torch.cuda.is_available()


@contextlib.contextmanager
def annotate(name: str) -> Iterator[None]:
    # (a record_function is two dispatcher calls per range: made only while torch.profiler runs)
    recording = torch.autograd.profiler._is_profiler_enabled
    with torch.profiler.record_function(name) if recording else contextlib.nullcontext():
        if _NVTX:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if _NVTX:
                torch.cuda.nvtx.range_pop()


def live_storages(device_type: str = "cpu") -> dict[int, int]:
    """Every tensor storage on ``device_type`` that Python objects hold right now, by address,
    with its size in bytes (views count once). Take it before and after to see what a model
    and its optimizer keep alive: ``sum(n for a, n in after.items() if a not in before)``."""
    gc.collect()
    found = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == device_type:
            try:
                storage = obj.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # no memory of its own: a FakeTensor torch.compile keeps, a wrapper subclass
                continue
    return found
