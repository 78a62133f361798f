"""Compile every kernel variant the backends launch, for CUDA targets, without a GPU.

Run as a script, in its own process (Triton's interpreter must be off, so that the kernels are
real ``JITFunction``s). It replaces ``JITFunction.run`` so that a launch records its kernel and
arguments instead of running, drives the Triton backend's launchers with CPU buckets over every
configuration the optimizers use (``record_launches``), specializes each launch the way the JIT
does (``native_specialize_impl``: 16-byte aligned pointers and element counts divisible by 16
get the divisibility hint, constexprs are baked in) and compiles each distinct variant for each
target with Triton's bundled ptxas. It prints one JSON record per (variant, target):

* ``kernel``, ``constexprs``, ``pointers`` (each pointer argument's type and whether it is
  16-byte aligned), ``counts`` (each element-count argument the kernel specialises on and
  whether it is divisible by 16; the whole-buffer kernels do not specialise on theirs),
* ``layouts``, ``lengths``: the bucket layouts whose launches made the variant, and the flat
  lengths ``n`` they passed (whole-buffer kernels),
* ``global``: counts of global memory instructions in the PTX (``ld.v4.32``: a 128-bit load),
* ``bytes_128``: bytes per element moved by 128-bit accesses (per thread, over the
  ``BLOCK / (32 * num_warps)`` elements each thread handles),
* ``spill_stores``, ``spill_loads``, ``stack_frame``: bytes, from ptxas's own report.

    python tests/compile_kernels.py --arch 80 86 90 --jobs 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions (before triton is imported)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # (Triton 3.9 warns when it is unset)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # (a cache hit would bring no ptxas report)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's salsa_fast

import torch  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_OPTIONS = ("num_warps", "num_stages", "num_ctas")
_launches: list[tuple[JITFunction, dict, str]] = []
_layout = ["?"]  # the layout whose launches are being recorded


def _record(self, *args, grid, warmup, **kwargs):
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    _launches.append((self, bound, _layout[0]))


# -- which launches: every configuration of the optimizers ------------------------------------


def _bucket(dtype, layout: str, direction: str):
    """A bucket of three parameters: ``aligned`` (padded regions, 16-byte aligned parameters),
    ``misaligned`` (a parameter that is a view at an odd offset), ``lean`` (packed without
    padding, keep_backup=False: flat offsets and the flat length not multiples of 16) or
    ``lean16`` (packed, sizes that keep them multiples of 16)."""
    from salsa_fast.flat import FlatBucket

    sizes = (3008, 1024, 16) if layout == "lean16" else (3000, 17, 1024)
    tensors = [torch.zeros(n, dtype=dtype) for n in sizes]
    if layout == "misaligned":
        tensors[1] = torch.zeros(18, dtype=dtype)[1:]
    adams_memory = layout.startswith("lean")
    return FlatBucket(
        [nn.Parameter(t) for t in tensors], 0, keep_second_moment=direction == "adam", adams_memory=adams_memory
    )


def _salsa_launches(dtype, layout: str, direction: str, use_mv: bool) -> None:
    from salsa_fast.backends import FIRST, MOVE, RESTORE, Hyper, triton_ops
    from salsa_fast.step_state import StepState

    b = _bucket(dtype, layout, direction)
    h = Hyper(0.9, 0.999, 1e-8, direction, use_mv, StepState.at("cpu", 0.9, 0.999, bias_step=7.0))
    loss = torch.zeros((), dtype=torch.float32)
    triton_ops.probe(b, h, loss)
    triton_ops.probe(b, h)
    triton_ops.plain_step(b, lr_step=0.1, decay=0.01, hyper=h, count_skip=True)
    if layout.startswith("lean"):  # keep_backup=False: the norm, then the moves a MovingLine makes
        triton_ops.moving_begin(b, hyper=h)
        for mode, momentum in ((FIRST, False), (MOVE, False), (RESTORE, False), (FIRST, True), (RESTORE, True)):
            triton_ops.moving_move(b, mode=mode, momentum=momentum, s=0.1, decay=0.01, hyper=h)
    else:
        triton_ops.backup_begin(b, lr_step=0.1, decay=0.01, hyper=h)
        triton_ops.backup_trial(b, lr_step=0.1, decay=0.01, hyper=h)
        triton_ops.backup_momentum_point(b, lr_step=0.1, decay=0.01, hyper=h)
    triton_ops.search_commit(b, hyper=h)


def _labpal_launches(dtype, layout: str) -> None:
    from salsa_fast.backends import triton_ops
    from salsa_fast.flat import state_dtype_for

    b = _bucket(dtype, layout, "sgd")
    accumulated = torch.zeros(b.numel, dtype=state_dtype_for(dtype))
    ok, coef = torch.ones((), dtype=torch.bool), torch.ones((), dtype=torch.float64)
    for src, count in ((b.grad, 1), (accumulated, 3)):
        for momentum in (0.0, 0.9):
            kw = dict(count=count, momentum=momentum)
            triton_ops.labpal_sums(b, src, **kw)
            # the training update (a rate and a finite-flag each on the device, or not), and the
            # move along the measured line (writing the momentum buffer or not)
            for c, o, write in (
                (None, None, True),
                (None, ok, True),
                (coef, None, True),
                (coef, ok, True),
                (None, None, False),
            ):
                triton_ops.labpal_update(b, src, scale=0.1, coef=c, ok=o, write_buffer=write, **kw)
            # the measurement's first point (saves the backup), its further points, the last one
            for save, write in ((True, False), (False, False), (False, True)):
                triton_ops.labpal_point(b, src, scale=0.1, save_backup=save, write_buffer=write, **kw)


def record_launches() -> list[tuple[JITFunction, dict, str]]:
    """Drive the launchers (kernels recorded, not run) over every dtype, layout and option:
    (kernel, bound arguments, layout) per launch."""
    for dtype in DTYPES:
        for layout in ("aligned", "misaligned", "lean", "lean16"):
            _layout[0] = layout
            for direction in ("adam", "sgd"):
                for use_mv in (False, True):
                    _salsa_launches(dtype, layout, direction, use_mv)
            _labpal_launches(dtype, layout)
    return _launches


# -- specializing and compiling ------------------------------------------------------------------


def specialize(kernel: JITFunction, bound: dict, backend) -> tuple:
    """(signature, constexprs, attrs, options) as ``JITFunction.run`` makes them."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(
            backend, value, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        signature[param.name] = kind
        if kind == "constexpr":  # (an int equal to 1)
            constexprs[(i,)] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = backend.parse_attr(spec)
    options = {k: bound[k] for k in _OPTIONS if k in bound}
    return signature, constexprs, attrs, options


def _global_counts(ptx: str) -> dict[str, int]:
    pattern = re.compile(r"\b(ld|st)\.global(?:\.[A-Za-z0-9_:]+)*?(\.v[248])?\.(?:b|f|u|s)(\d+)\b")
    counts: dict[str, int] = {}
    for op, vec, bits in pattern.findall(ptx):
        key = f"{op}{vec or ''}.{bits}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _bytes_128(counts: dict[str, int], per_thread: int) -> float:
    """Bytes per element moved by 128-bit accesses (``v4`` of 32 bits, ``v2`` of 64)."""
    return 16 * sum(n for key, n in counts.items() if _width(key) == 128) / per_thread


def _width(key: str) -> int:
    """Bits one access of ``key`` (``ld.v4.32``, ``st.16``) moves."""
    parts = key.split(".")
    lanes = int(parts[1][1:]) if len(parts) == 3 else 1
    return lanes * int(parts[-1])


def _ptxas_report(log: str) -> dict[str, int]:
    numbers = {}
    for name, pattern in (
        ("stack_frame", r"(\d+) bytes stack frame"),
        ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"),
    ):
        found = [int(n) for n in re.findall(pattern, log)]
        numbers[name] = max(found) if found else -1  # -1: ptxas said nothing (a failed parse)
    return numbers


def compile_variant(job: tuple) -> list[dict]:
    """Compile one specialized variant for each target; its records."""
    kernel_name, signature, constexprs, attrs, options, archs, pointers, counts16, launched = job
    kernel = _KERNELS[kernel_name]
    knobs.nvidia.dump_ptxas_log = True
    records = []
    for arch in archs:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        counts = _global_counts(compiled.asm["ptx"])
        per_thread = constexprs[(kernel.arg_names.index("BLOCK"),)] // (32 * options.get("num_warps", 4))
        records.append(
            {
                "kernel": kernel_name,
                "arch": arch,
                "constexprs": {kernel.arg_names[k[0]]: v for k, v in constexprs.items()},
                "pointers": pointers,
                "counts": counts16,
                "layouts": sorted(launched["layouts"]),
                "lengths": sorted(launched["lengths"]),
                "global": counts,
                "bytes_128": _bytes_128(counts, per_thread),
                **_ptxas_report(log.getvalue()),
            }
        )
    return records


_KERNELS: dict[str, JITFunction] = {}


def jobs(archs: list[int]) -> list[tuple]:
    """One job per distinct variant (the same specialization launched twice compiles once, its
    launches' layouts and lengths gathered)."""
    backend = CUDABackend(GPUTarget("cuda", max(archs), 32))
    out, seen = [], {}
    for kernel, bound, layout in record_launches():
        signature, constexprs, attrs, options = specialize(kernel, bound, backend)
        name = kernel.fn.__name__
        _KERNELS[name] = kernel
        key = (name, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(sorted(attrs)))
        key += (tuple(options.items()),)
        if key not in seen:
            seen[key] = {"layouts": set(), "lengths": set()}
            out.append((name, signature, constexprs, attrs, options, archs, _pointers(signature, attrs)))
            out[-1] += (_counts(kernel, signature, attrs), seen[key])
        seen[key]["layouts"].add(layout)
        if "n" in bound:
            seen[key]["lengths"].add(bound["n"])
    return out


def _pointers(signature: dict, attrs: dict) -> dict:
    """Each pointer argument's type and whether it has the 16-byte alignment hint."""
    return {n: [t, (i,) in attrs] for i, (n, t) in enumerate(signature.items()) if str(t).startswith("*")}


def _counts(kernel: JITFunction, signature: dict, attrs: dict) -> dict:
    """Each element-count argument the kernel specialises on, and whether it has the hint."""
    return {n: (i,) in attrs for i, n in enumerate(signature) if n == "n" and not kernel.params[i].do_not_specialize}


def _init_worker() -> None:
    if not _KERNELS:  # (a forked worker has them already; a spawned one records them again)
        JITFunction.run = _record
        jobs([90])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 86 90")
    parser.add_argument("--jobs", type=int, default=1, help="compiling processes")
    parser.add_argument("--list", action="store_true", help="print the variants, compile nothing")
    args = parser.parse_args()
    JITFunction.run = _record
    work = jobs(args.arch)
    if args.list:
        for name, signature, constexprs, *_ in work:
            print(name, {k: v for k, v in signature.items() if str(v).startswith("*")}, constexprs)
        print(len(work), "variants", file=sys.stderr)
        return
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, initializer=_init_worker) as pool:
            records = [r for rs in pool.map(compile_variant, work, chunksize=4) for r in rs]
    else:
        records = [r for job in work for r in compile_variant(job)]
    json.dump(records, sys.stdout)


if __name__ == "__main__":
    main()
