"""Named ranges around SaLSA's phases, for profilers.

Each range shows in ``torch.profiler`` traces (Chrome/Perfetto) and, on CUDA, as an NVTX range
in Nsight Systems timelines: ``salsa.gradient_pass``, ``salsa.plain_step``, ``salsa.search``
(first pass to commit) and ``salsa.trial`` (one trial's forward pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_NVTX = torch.cuda.is_available()


@contextlib.contextmanager
def annotate(name: str) -> Iterator[None]:
    with torch.profiler.record_function(name):
        if _NVTX:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if _NVTX:
                torch.cuda.nvtx.range_pop()
