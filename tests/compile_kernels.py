"""Compile the kernels the launchers really launch, for CUDA targets, without a GPU.

Run as a script (in its own process: Triton's interpreter must be off, so the kernels are real
``JITFunction``s). It replaces ``JITFunction.run`` so that a launch records its kernel and
arguments instead of running, drives the Triton backend's launchers with CPU buckets
(``scenario`` below), rebuilds each launch's signature the way Triton specializes it (pointer
dtypes, 16-byte divisibility of aligned pointers, constexprs) and compiles it for each target
with Triton's bundled ptxas. It prints one JSON record per (launch, target): the kernel, its
constexprs, and counts of global memory instructions in the PTX (``v4``: 128-bit accesses).

    python tests/compile_kernels.py --arch 90 --scenario table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions (before triton is imported)

import torch  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_TYPES = {
    torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.int64: "i64", torch.int32: "i32",
}  # fmt: skip
_OPTIONS = ("num_warps", "num_stages", "num_ctas")
launches: list[tuple[JITFunction, dict]] = []


def _record(self, *args, grid, warmup, **kwargs):
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    launches.append((self, bound))


def _signature(kernel: JITFunction, bound: dict):
    sig, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = bound[name]
        if param.is_constexpr:
            sig[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32" if -(2**31) <= int(value) < 2**31 else "i64"
    options = {k: bound[k] for k in _OPTIONS if k in bound}
    return sig, constexprs, attrs, options


def _counts(ptx: str) -> dict:
    pattern = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9]+)*?(\.v[24])?\.(b|f|u|s)(\d+)")
    counts: dict[str, int] = {}
    for op, vec, _, bits in pattern.findall(ptx):
        key = f"{op}{vec or ''}.{bits}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def compile_all(archs: list[int]) -> list[dict]:
    records, seen = [], set()
    for kernel, bound in launches:
        sig, constexprs, attrs, options = _signature(kernel, bound)
        key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), tuple(attrs))
        if key in seen:
            continue
        seen.add(key)
        for arch in archs:
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            records.append({
                "kernel": kernel.fn.__name__, "arch": arch,
                "constexprs": {k: v for k, v in constexprs.items()},
                "pointers": {k: v for k, v in sig.items() if v.startswith("*")},
                "global": _counts(compiled.asm["ptx"]),
            })  # fmt: skip
    return records


# -- scenarios: which launches to make ---------------------------------------------------------


def _bucket(dtype: torch.dtype, misaligned: bool, direction: str = "adam", lean: bool = False,
            sizes: tuple = (3000, 17, 1024)):  # fmt: skip
    from salsa_fast.flat import FlatBucket

    tensors = [torch.zeros(n, dtype=dtype) for n in sizes]
    if misaligned:
        tensors[1] = torch.zeros(18, dtype=dtype)[1:]
    return FlatBucket([nn.Parameter(t) for t in tensors], 0, keep_second_moment=direction == "adam", lean=lean)


def scenario_table() -> None:
    """Every pass that reaches parameters through the table, fp32 and bf16, on buckets whose
    parameters are all 16-byte aligned and on one with a misaligned view."""
    from salsa_fast.backends import Hyper, triton_ops

    h = Hyper(0.9, 0.999, 1e-8, 0.5, 0.01, 7.0, "adam", False)
    for dtype in (torch.float32, torch.bfloat16):
        for misaligned in (False, True):
            b = _bucket(dtype, misaligned)
            triton_ops.plain_step(b, lr_step=0.1, decay=0.01, h=h, found_inf=None)
            triton_ops.search_begin(b, lr_step=0.1, decay=0.01, h=h)
            triton_ops.search_trial(b, lr_step=0.1, decay=0.01, h=h)
            triton_ops.labpal_update(b, b.grad, count=1, momentum=0.0, scale=0.1, coef=None, ok=None)
            triton_ops.labpal_point(b, b.grad, count=1, momentum=0.0, scale=0.1, save_backup=True, write_buffer=False)


def scenario_lean() -> None:
    """keep_backup=False: the norm pass and the moves, and the plain step, on lean buckets
    (packed without padding) whose flat offsets happen to be 16-element aligned and not."""
    from salsa_fast.backends import Hyper, triton_ops

    h = Hyper(0.9, 0.999, 1e-8, 0.5, 0.01, 7.0, "adam", False)
    for dtype in (torch.float32, torch.bfloat16):
        for sizes in ((3008, 1024, 16), (3000, 17, 1024)):
            b = _bucket(dtype, False, lean=True, sizes=sizes)
            triton_ops.plain_step(b, lr_step=0.1, decay=0.01, h=h, found_inf=None)
            triton_ops.lean_norm(b, h=h)
            triton_ops.lean_trial(b, lr_step=0.1, decay=0.01, h=h)
            triton_ops.lean_trial(b, lr_step=0.05, decay=0.01, h=h)
            triton_ops.lean_restore(b, h=h)


SCENARIOS = {"table": scenario_table, "lean": scenario_lean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 86 90")
    parser.add_argument("--scenario", choices=list(SCENARIOS), nargs="+", default=list(SCENARIOS))
    args = parser.parse_args()
    JITFunction.run = _record
    for name in args.scenario:
        SCENARIOS[name]()
    json.dump(compile_all(args.arch), sys.stdout)


if __name__ == "__main__":
    main()
