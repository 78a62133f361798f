"""The kernels compile for a GPU and get the memory accesses they were designed for, checked
without one: tests/compile_kernels.py compiles the launches the launchers really make for sm_90
with Triton's bundled ptxas, and counts the global memory instructions in the PTX."""

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(__file__)


def _compile(scenario: str, arch: int = 90) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # (Triton 3.9 warns when it is unset)
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_kernels.py"), "--arch", str(arch), "--scenario", scenario],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_table_kernels_use_128_bit_accesses_on_aligned_parameters():
    """Every pass that writes parameters through the table stores them 128 bits at a time when
    every parameter is 16-byte aligned, and falls back to narrower stores (still compiling) when
    one is not; the flat buffers' accesses are 128-bit in both."""
    records = _compile("table")
    kernels = {"_plain_step_kernel", "_search_point_kernel", "_update_kernel", "_point_kernel"}
    assert {r["kernel"] for r in records} == kernels
    by_variant = defaultdict(dict)
    for r in records:
        assert r["constexprs"]["F_ALIGN"] == 16
        constexprs = {k: v for k, v in r["constexprs"].items() if k != "P_ALIGN"}
        key = (r["kernel"], r["pointers"]["p_base"], json.dumps(constexprs, sort_keys=True))
        by_variant[key][r["constexprs"]["P_ALIGN"]] = r["global"]
    assert len(by_variant) == len(records) // 2  # every variant compiled aligned and not
    for (kernel, p_type, _), counts in by_variant.items():
        aligned = counts[max(counts)]
        unaligned = counts[1]
        assert max(counts) == {"*fp32": 4, "*bf16": 8}[p_type]  # 16 bytes of elements
        assert aligned.get("st.v4.32", 0) > unaligned.get("st.v4.32", 0), (kernel, p_type, counts)
        assert unaligned.get("ld.v4.32", 0) > 0, (kernel, p_type)  # the flat buffers still are


def test_lean_kernels_compile_with_and_without_flat_alignment():
    """keep_backup=False packs the flat buffers without padding: where the flat offsets happen to
    be 16-element aligned the moves store parameters 128 bits at a time as the other passes do;
    where they are not (a 17-element bias), every kernel still compiles, with narrower accesses."""
    records = _compile("lean")
    assert {r["kernel"] for r in records} == {"_plain_step_kernel", "_norm_kernel", "_move_kernel"}
    moves = defaultdict(dict)
    for r in records:
        if r["kernel"] == "_move_kernel":
            moves[(r["pointers"]["p_base"], r["constexprs"]["MODE"])][r["constexprs"]["F_ALIGN"]] = r["global"]
    for (p_type, mode), counts in moves.items():
        assert set(counts) == {16, 1}, (p_type, mode, set(counts))
        assert counts[16].get("ld.v4.32", 0) > counts[1].get("ld.v4.32", 0), (p_type, mode, counts)
