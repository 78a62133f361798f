"""Every kernel variant the backends launch compiles for real GPUs and moves the bytes it was
designed for, checked without a GPU: ``tests/compile_kernels.py`` compiles each variant for
sm_80, sm_86 (A40) and sm_90 (H100) with Triton's bundled ptxas; the PTX and ptxas's report are
checked against the byte table of docs/how-it-is-fast.md."""

import json
import os
import re
import subprocess
import sys
from collections import defaultdict

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(__file__)
BYTE_TABLE = os.path.join(HERE, os.pardir, "docs", "how-it-is-fast.md")
ARCHS = (80, 86, 90)
ELEMENT_BYTES = {"*fp32": 4, "*fp64": 8, "*bf16": 2, "*fp16": 2}
# ptxas keeps a stack slot of a few bytes in a handful of variants (those with two code paths
# per program: the unmasked full chunk and the masked tail); more than this would be real spilling.
MAX_LOCAL_BYTES = 8


@pytest.fixture(scope="module")
def records() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_kernels.py"), "--arch", *map(str, ARCHS), "--jobs", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def _byte_table() -> list[dict]:
    """The byte table (docs/how-it-is-fast.md): kernel, constexpr filter, bytes for fp32 and bf16 parameters."""
    with open(BYTE_TABLE) as f:
        text = f.read()
    table = text[text.index("<!-- byte-table") : text.index("<!-- /byte-table -->")]
    rows = []
    for line in table.splitlines()[3:]:
        if not line.strip().startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        variant = dict(item.strip().split("=") for item in cells[2].split(",") if item.strip())
        rows.append(
            {
                "pass": cells[0],
                "kernel": cells[1].strip("`"),
                "variant": {k: int(v) for k, v in variant.items()},
                "fp32": int(cells[5]),
                "bf16": int(cells[6]),
            }
        )
    return rows


def _param_type(record) -> str:
    pointers = record["pointers"]
    for name in ("p_base", "g_ptr", "x_ptr", "src_ptr"):
        if name in pointers:
            return pointers[name][0]
    raise AssertionError(record)


def _fully_aligned(record) -> bool:
    """Every pointer 16-byte aligned, every element count a multiple of 16, and the table's
    offsets hinted as multiples of 16 bytes: the variant meant to run 128 bits at a time."""
    c = record["constexprs"]
    esize = ELEMENT_BYTES[record["pointers"]["p_base"][0]] if "p_base" in record["pointers"] else None
    return (
        all(aligned for _, aligned in record["pointers"].values())
        and all(record["counts"].values())
        and c.get("F_ALIGN", 16) == 16
        and (esize is None or c.get("P_ALIGN") == 16 // esize)
    )


def _matching(record, rows) -> list[dict]:
    """The byte-table rows whose kernel and constexprs the record has."""
    constexprs = record["constexprs"]
    return [
        r
        for r in rows
        if r["kernel"] == record["kernel"] and all(int(constexprs.get(k, -1)) == v for k, v in r["variant"].items())
    ]


def _expected(record, rows) -> set[float]:
    matching = _matching(record, rows)
    kind = _param_type(record)
    scale = {"*fp32": ("fp32", 1), "*fp64": ("fp32", 2), "*bf16": ("bf16", 1), "*fp16": ("bf16", 1)}[kind]
    return {r[scale[0]] * scale[1] for r in matching}


def test_every_variant_compiles_for_every_target(records):
    by_target = defaultdict(set)
    for r in records:
        by_target[r["arch"]].add(json.dumps([r["kernel"], r["constexprs"], r["pointers"]], sort_keys=True))
    assert set(by_target) == set(ARCHS)
    assert len({len(v) for v in by_target.values()}) == 1  # the same variants for each target
    kernels = {r["kernel"] for r in records}
    assert kernels == {
        "_probe_kernel",
        "_plain_step_kernel",
        "_search_point_kernel",
        "_commit_kernel",
        "_norm_kernel",
        "_move_kernel",
        "_sums_kernel",
        "_update_kernel",
        "_point_kernel",
    }
    dtypes = {_param_type(r) for r in records}
    assert dtypes == set(ELEMENT_BYTES)


def test_no_local_memory(records):
    """No variant spills registers to local memory beyond a stack slot (ptxas's own report)."""
    for r in records:
        assert r["stack_frame"] >= 0, r  # (ptxas reported)
    heavy = [r for r in records if max(r["stack_frame"], r["spill_stores"], r["spill_loads"]) > MAX_LOCAL_BYTES]
    assert not heavy, heavy[:3]


def test_bytes_per_element_match_the_byte_table(records):
    """In each fully aligned variant every stream is read and written 128 bits at a time, and
    the bytes per element those accesses move equal the byte table of docs/how-it-is-fast.md (which names every
    kernel, and whose every row is met by some variant)."""
    rows = _byte_table()
    assert {r["kernel"] for r in rows} == {r["kernel"] for r in records}
    used = set()
    checked = 0
    for r in records:
        if not _fully_aligned(r):
            continue
        expected = _expected(r, rows)
        assert len(expected) == 1, (r["kernel"], r["constexprs"], expected)
        assert r["bytes_128"] == expected.pop(), (r["kernel"], r["arch"], r["constexprs"], r["pointers"])
        used.update(row["pass"] for row in _matching(r, rows))
        checked += 1
    assert checked >= 100
    assert used == {row["pass"] for row in rows}


def test_misaligned_parameters_still_compile_narrower(records):
    """A bucket holding a parameter view at an odd address takes the unhinted variant: it
    compiles, and its parameter accesses are narrower than 128 bits (the flat buffers' are not)."""
    unhinted = [r for r in records if r["constexprs"].get("P_ALIGN") == 1]
    assert unhinted
    for r in unhinted:
        assert r["bytes_128"] > 0, (r["kernel"], r["constexprs"])
        narrow = sum(n for key, n in r["global"].items() if re.fullmatch(r"(ld|st)\.(8|16|32|64)", key))
        assert narrow > 0, (r["kernel"], r["constexprs"])


# the kernels that take a flat buffer's length ``n`` (one program per block of it)
WHOLE_BUFFER = {"_probe_kernel", "_commit_kernel", "_norm_kernel", "_sums_kernel"}


def test_whole_buffer_kernels_move_128_bits_at_any_length(records):
    """keep_backup=False packs the flat buffers without padding, so their length is rarely a
    multiple of 16 (the ``lean`` layout's is not). The kernels over a whole flat buffer still
    read and write it 128 bits at a time: every block but the last runs unmasked, whatever the
    length, and the bytes per element those accesses move equal the byte table of docs/how-it-is-fast.md."""
    rows = _byte_table()
    odd = [r for r in records if r["kernel"] in WHOLE_BUFFER and any(n % 16 for n in r["lengths"])]
    assert {r["kernel"] for r in odd} == WHOLE_BUFFER
    assert all("lean" in r["layouts"] for r in odd)
    for r in odd:
        assert all(aligned for _, aligned in r["pointers"].values()), r["pointers"]
        expected = _expected(r, rows)
        assert len(expected) == 1, (r["kernel"], r["constexprs"], expected)
        assert r["bytes_128"] == expected.pop() > 0, (r["kernel"], r["arch"], r["constexprs"], r["pointers"])
    assert len(odd) == sum(r["kernel"] in WHOLE_BUFFER for r in records)  # one variant serves every length
