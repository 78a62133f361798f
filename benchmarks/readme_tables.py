"""The documentation's measured numbers and plots, rendered from the committed results in ``benchmarks/results/``.

    python benchmarks/readme_tables.py            # rewrite the result blocks and redraw the plots
    python benchmarks/readme_tables.py --check    # exit 1, printing a diff, where a page differs

Every number README.md or a page of ``docs/`` quotes from a benchmark run sits in a block
between two markers,

    <!-- results:NAME: rendered from benchmarks/results/FILE.json by benchmarks/readme_tables.py -->
    ...
    <!-- /results:NAME -->

and this script writes what lies between them from FILE.json (the marker's indentation is the
block's, so a block can sit inside a list item). ``BLOCKS`` below says, for each NAME, which
results file it reads, which benchmark script writes that file, and how the block is rendered.
A block that ``BLOCKS`` does not know, a marker naming another file than ``BLOCKS`` does, a
results file that does not exist, or a ``BLOCKS`` entry with no block, or with a block on two
pages, is an error. Where the prose around a number states something that only holds for some
results ("invisible", "drifts by as much"), the renderer checks it and refuses to render a new
run that contradicts it: rewrite that prose then. The plots the pages show (``PLOTS``, drawn
into ``docs/img/``) are redrawn from the same results by the benchmark scripts' own ``plot``
functions. ``tests/test_readme_tables.py`` checks the pages against the committed results.

After a new run of a benchmark whose committed JSON feeds the documentation, save its JSON over
the one in ``benchmarks/results/`` and run this script. The kernel byte table (between
``<!-- byte-table`` markers, in ``docs/how-it-is-fast.md``) is not a benchmark result and is left
alone: ``tests/test_compile.py`` checks it against the compiled kernels.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import statistics
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMAGES = Path("docs") / "img"  # (relative to the repository root)
WIDTH = 96  # the pages' prose is wrapped at about this many characters
OPEN = re.compile(
    r"^(?P<indent>[ \t]*)<!-- results:(?P<name>[\w-]+): rendered from (?P<source>\S+) "
    r"by benchmarks/readme_tables\.py -->[ \t]*$"
)
CLOSE = "<!-- /results:{name} -->"
WORDS = dict(enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]))


class ProseMismatch(ValueError):
    """A new result contradicts what the prose around it says: rewrite the prose."""


def _premise(ok: bool, what: str) -> None:
    if not ok:
        raise ProseMismatch(f"the results no longer show that {what}; rewrite that prose in README.md and here")


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=width, break_long_words=False, break_on_hyphens=False)


def _prose(*paragraphs: str) -> Callable[[int], list[str]]:
    """Paragraphs to wrap at the pages' width less the block's indentation (known only later)."""

    def lines(width: int) -> list[str]:
        out: list[str] = []
        for p in paragraphs:
            if out:
                out.append("")
            out += p if isinstance(p, list) else _wrap(p, width)
        return out

    return lines


def up(x: float, digits: int = 2) -> str:
    """``x`` rounded up to ``digits`` significant digits, as the pages write it (``1.1e-13``)."""
    d = Decimal(repr(x))
    exponent = d.adjusted() - digits + 1
    d = d.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_CEILING)
    return _sci(float(d), digits)


def near(x: float, digits: int = 2) -> str:
    return _sci(x, digits)


def _sci(x: float, digits: int) -> str:
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def sig(x: float, digits: int = 2) -> str:
    """``digits`` significant digits, plainly written: 0.013, 0.33, 2.3, 214."""
    if abs(x) >= 10**digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _times(x: float) -> str:
    """A whole ratio as ``6x``; the check that it is whole is the caller's premise."""
    return f"{round(x)}x"


def _count(n: int, total: int) -> str:
    return f"all {total}" if n == total else "none" if n == 0 else f"{n} of {total}"


def _env(r: dict) -> str:
    return f"{r['device_name']} {r['device'].upper()}, {r['threads']} threads, torch {r['torch']}, {r['date']}"


# ---------------------------------------------------------------- cpu_training_step_mlp4m.json


def _cpu_step(records: list[dict]) -> tuple[dict, dict, dict]:
    by = {r["optimizer"]: r for r in records}
    return by["adam_foreach"], by["salsa_fast"], by["published_salsa"]


def _agreement(fast: dict) -> str:
    agree, steps, rounds = fast["steps_with_published_decisions"], fast["steps"], fast["rounds"]
    if all(a == steps for a in agree):
        return f"on all {steps * rounds} steps"
    first = ", ".join(f"step {a + 1}" for a in agree if a < steps)
    return (
        f"on every step of {_count(sum(a == steps for a in agree), rounds)} rounds of {steps} steps; "
        f"in the others the first different decision came at {first}"
    )


def headline(records: list[dict]) -> Callable[[int], list[str]]:
    adam, fast, pub = _cpu_step(records)
    _premise(adam["device"] == "cpu", "the headline's measurement is on a CPU")
    return _prose(
        f"**Measured so far on a CPU only** ({fast['threads']} threads, a "
        f"{fast['n_params'] / 1e6:.2f}M-parameter MLP on digits, [details](docs/how-it-is-fast.md)): over the first "
        f"{fast['steps']} steps of training, where SaLSA searches on most steps ({fast['closure_calls_per_step']:.2f} "
        f"closure calls per step), a whole training "
        f"step takes {fast['ratio_vs_adam']:.2f}x as long as with `torch.optim.Adam(foreach=True)`, and the "
        f"published package takes {pub['ms_per_step'] / fast['ms_per_step']:.2f}x as long as `salsa_fast` "
        f"({pub['optimizer_ms_per_step'] / fast['optimizer_ms_per_step']:.1f}x for the optimizer's own work, "
        f"outside the closure), with the same decisions {_agreement(fast)}. No GPU has run this code yet: its "
        f"speed on a GPU, where the Triton kernels run, is not measured."
    )


def cpu_training_step(records: list[dict]) -> Callable[[int], list[str]]:
    adam, fast, pub = _cpu_step(records)
    names = {
        "adam_foreach": "`torch.optim.Adam(foreach=True)`",
        "salsa_fast": "`salsa_fast.SaLSA`",
        "published_salsa": "published `salsa.SaLSA`",
    }
    rows = [
        [
            names[r["optimizer"]],
            f"{r['ms_per_step']:.1f}",
            f"{r['ratio_vs_adam']:.2f}x",
            "" if r["optimizer_ms_per_step"] is None else f"{r['optimizer_ms_per_step']:.1f}",
            f"{r['closure_calls_per_step']:.2f}",
        ]
        for r in records
    ]
    table = markdown_table(
        ["optimizer", "ms/step", "vs Adam(foreach)", "optimizer-side ms/step", "closure calls/step"], rows, "lrrrr"
    )
    return _prose(
        f"Measured on the CPU of the development machine ({_env(fast)}; "
        f"`benchmarks/cpu_training_step.py`, results in `benchmarks/results/cpu_training_step_mlp4m.md`), "
        f"whole training steps of a {fast['n_params'] / 1e6:.2f}M-parameter MLP on digits, batch {fast['batch']}, "
        f"{fast['steps']} steps, medians of {fast['rounds']} rounds (optimizer-side: the step's time outside "
        f"the closure):",
        table,
        f"Both SaLSA implementations made the same closure calls (same decisions) {_agreement(fast)}. (In "
        f"float32 their last-bit differences grow through training, since they compute in different orders, "
        f"so a near-tie decision can go the other way late in a run.) Over Adam, SaLSA makes "
        f"{fast['closure_calls_per_step'] - adam['closure_calls_per_step']:.2f} extra closure calls per step "
        f"here (trial forward passes, most of them early in training, when the search runs every step); its "
        f"optimizer-side time is {fast['optimizer_ms_per_step']:.1f} ms per step, "
        f"{pub['optimizer_ms_per_step'] / fast['optimizer_ms_per_step']:.1f}x less than the published "
        f"package's {pub['optimizer_ms_per_step']:.1f} ms (whole steps: "
        f"{pub['ms_per_step'] / fast['ms_per_step']:.2f}x less).",
    )


# ------------------------------------------------------------------------------ memory_cpu.json


def _mlp_width(params: int) -> int:
    """The hidden width w of memory.py's 64-w-w-10 MLP: w*w + 76*w + 10 parameters."""
    w = round((-76 + math.sqrt(76 * 76 - 4 * (10 - params))) / 2)
    _premise(w * w + 76 * w + 10 == params, "the memory run is memory.py's 64-w-w-10 MLP")
    return w


def memory(result: dict) -> Callable[[int], list[str]]:
    env, by = result["environment"], {r["optimizer"]: r for r in result["memory"]}
    adam, fused, fast, lean = by["adam_foreach"], by["adam_fused"], by["salsa_fast"], by["salsa_fast_lean"]
    mib = lambda r: f"{r['live_bytes'] / 2**20:.2f}"  # noqa: E731
    over = lambda r: r["live_bytes"] - adam["live_bytes"]  # noqa: E731

    def row(name, r):
        return [name, mib(r), f"{r['live_bytes'] / adam['live_bytes']:.3f}x", f"{over(r):+,d}" if over(r) else "0"]

    rows = (
        [row("`torch.optim.Adam` (foreach or fused)", adam)]
        if fused["live_bytes"] == adam["live_bytes"]
        else [row("`torch.optim.Adam(foreach=True)`", adam), row("`torch.optim.Adam(fused=True)`", fused)]
    )
    rows += [row("`SaLSA()`", fast), row("`SaLSA(keep_backup=False)`", lean)]
    width, param_bytes = _mlp_width(adam["params"]), adam["param_bytes"]
    copies = over(fast) / param_bytes
    _premise(round(copies) == 2 and abs(copies - 2) < 0.01, "the default's excess is two parameter-sized buffers")
    # Adam: a 4-byte 0-dim step tensor per parameter (6 of them); SaLSA: one 8-byte count per device
    _premise(over(lean) == 8 - 6 * 4, "keep_backup=False holds 16 bytes less than Adam")
    peak = (
        "CUDA peak bytes (`torch.cuda.max_memory_allocated`) are in the script's output on a GPU; none "
        "has been measured yet."
        if env["device"] == "cpu"
        else ""
    )
    return _prose(
        f"Measured between steps (`benchmarks/memory.py`, a census of live tensor storages; "
        f"`benchmarks/results/memory_cpu.*`, {env['device_name']} {env['device'].upper()}, torch {env['torch']}, "
        f"{env['date']}), a 64-{width}-{width}-10 digits MLP, {adam['params'] / 1e6:.2f}M parameters:",
        markdown_table(["optimizer", "live MiB", "vs Adam(foreach)", "over Adam, bytes"], rows, "lrrr"),
        f"(The default's excess is the backup and the CPU work buffer, 2 x {param_bytes / 2**20:.1f} MiB; "
        f"{over(lean):+d} bytes: Adam keeps a 0-dim step tensor for each of the six parameters, 24 bytes, where "
        f"SaLSA keeps one 8-byte count per device, of the steps the device skipped that the host has not read "
        f"yet.) {peak}".rstrip(),
    )


def memory_rounding(result: dict) -> Callable[[int], list[str]]:
    drift = result["drift"]
    f64 = [d for d in drift if d["dtype"] == "float64"]
    f32 = [d for d in drift if d["dtype"] == "float32"]
    steps = {d["steps"] for d in drift}
    _premise(len(steps) == 1 and len(f64) == len(f32) > 0, "every drift run has the same steps and both dtypes")
    (steps,) = steps
    _premise(all(d["same_decisions_steps"] == steps for d in drift), "keep_backup=False made the default's calls")
    f64_max = max(d["max_abs_param_diff"] for d in f64)
    _premise(f64_max < 1e-10, "float64 parameters stay equal to rounding (invisible)")
    lean = [d["max_abs_param_diff"] for d in f32]
    nudged = [d["nudged_max_abs_param_diff"] for d in f32]
    _premise(max(nudged) >= max(lean) / 2, "the nudged control drifts by as much as keep_backup=False")
    loss_gap = max(abs(d["loss_default"] - d["loss_lean"]) for d in f32)
    seeds = WORDS.get(len(f64), str(len(f64)))
    return _prose(
        f"In float64 that is invisible: on digits MLPs over {steps} steps, {seeds} seeds, "
        f"`keep_backup=False` made the same closure calls as the default at every step, parameters within "
        f"{up(f64_max)}. In float32 it made the same calls at all {steps} steps too, but the parameters drifted "
        f"apart by {near(min(lean))} to {near(max(lean))} (max absolute difference) with full-data losses within "
        f"{up(loss_gap, 1)} of each other; a control run, the default mode nudged by 1e-7 once, drifts by as much "
        f"({near(min(nudged))} to {near(max(nudged))}), so that is float32 training amplifying any last-bit "
        f"difference, not the lean mode going astray (`benchmarks/results/memory_cpu.md`)."
    )


def memory_labpal(result: dict) -> Callable[[int], list[str]]:
    by = {r["optimizer"]: r for r in result["memory"]}
    sgd, labpal, lean = by["sgd_momentum"], by["labpal"], by["labpal_lean"]
    x = {n: r["live_bytes"] / r["param_bytes"] for n, r in (("sgd", sgd), ("labpal", labpal), ("lean", lean))}
    _premise(all(abs(v - round(v)) < 0.01 for v in x.values()), "each holds whole parameter-sized buffers")
    _premise((round(x["sgd"]), round(x["labpal"]), round(x["lean"])) == (3, 6, 4), "the buffers listed are those held")
    mib = lambda r: f"{r['live_bytes'] / 2**20:.2f} MiB"  # noqa: E731
    return _prose(
        f"Measured (same MLP, momentum 0.9): SGD with momentum {mib(sgd)} ({_times(x['sgd'])} the parameters), "
        f"LABPAL {mib(labpal)} ({_times(x['labpal'])}: its gradient sum over the measurement's batches, the "
        f"backup, and on CPU a work buffer), `keep_backup=False` {mib(lean)} ({_times(x['lean'])}: parameters, "
        f"gradients, momentum buffer, gradient sum)."
    )


# ------------------------------------------------------------------------ labpal_digits_cpu.json


def labpal_digits(records: list[dict]) -> Callable[[int], list[str]]:
    def mode(name):
        rs = [r for r in records if r["mode"] == name]
        passing = sum(r["final_loss"] < r["initial_loss"] / 2 and r["calls_per_step"] <= 1.3 for r in rs)
        finals = [r["final_loss"] for r in rs]
        return rs, passing, finals

    nsgd, nsgd_ok, nsgd_final = mode("nsgd")
    sgd, sgd_ok, sgd_final = mode("sgd")
    raw, raw_ok, raw_final = mode("sgd_uncapped")
    n = len(sgd)
    _premise(len(nsgd) == len(raw) == n > 0, "every mode ran on the same models")
    _premise(raw_ok < n / 2, "the reference's uncapped SGD updates fail where the cap trains")
    widths, seeds = {r["width"] for r in sgd}, {r["seed"] for r in sgd}
    kinds = " and ".join({"tanh": "tanh", "relu": "ReLU"}[k] for k in dict.fromkeys(r["model"] for r in sgd))
    initial = [r["initial_loss"] for r in raw]
    start = sig(min(initial)) if sig(min(initial)) == sig(max(initial)) else f"{sig(min(initial))}-{sig(max(initial))}"
    calls = max(r["calls_per_step"] for r in records)
    return _prose(
        f"Measured on {n} digits MLPs ({kinds}, {WORDS.get(len(widths), len(widths))} widths, "
        f"{WORDS.get(len(seeds), len(seeds))} seeds; batch 64, 1000 calls, default hyperparameters; "
        f"`benchmarks/labpal_digits.py`, results in `benchmarks/results/labpal_digits_cpu.md`): with the "
        f"reference's updates {_count(raw_ok, n)} trained, final losses {sig(min(raw_final))} to "
        f"{sig(max(raw_final))} from {start} (the reference twin, which restates those rules, diverges too in "
        f"the tests); with the cap {_count(sgd_ok, n)} train, to a median loss of "
        f"{sig(statistics.median(sgd_final))} (worst {sig(max(sgd_final))}; NSGD: {_count(nsgd_ok, n)}, median "
        f"{sig(statistics.median(nsgd_final))}, worst {sig(max(nsgd_final))}), at {calls:.2f} closure calls per "
        f"step."
    )


# ------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Block:
    source: str  # the results file, relative to the repository root
    script: str  # the benchmark that writes it (its docstring points here)
    render: Callable[[object], Callable[[int], list[str]]]


BLOCKS = {
    "headline": Block("benchmarks/results/cpu_training_step_mlp4m.json", "benchmarks/cpu_training_step.py", headline),
    "memory": Block("benchmarks/results/memory_cpu.json", "benchmarks/memory.py", memory),
    "memory_rounding": Block("benchmarks/results/memory_cpu.json", "benchmarks/memory.py", memory_rounding),
    "memory_labpal": Block("benchmarks/results/memory_cpu.json", "benchmarks/memory.py", memory_labpal),
    "labpal_digits": Block("benchmarks/results/labpal_digits_cpu.json", "benchmarks/labpal_digits.py", labpal_digits),
    "cpu_training_step": Block(
        "benchmarks/results/cpu_training_step_mlp4m.json", "benchmarks/cpu_training_step.py", cpu_training_step
    ),
}


@dataclass(frozen=True)
class Plot:
    source: str  # the results file, relative to the repository root
    script: str  # the benchmark that draws it, with ``function(records, path)``
    function: str = "plot"
    records: str | None = None  # the key of the records in the results file (None: it is the records)


PLOTS = {  # drawn into docs/img/, shown by README.md and the docs
    "convergence_cpu.png": Plot("benchmarks/results/convergence_cpu.json", "benchmarks/convergence.py", "summary_plot"),
    "overhead_cpu.png": Plot("benchmarks/results/overhead_cpu.json", "benchmarks/overhead.py"),
    "transformer_lm_cpu.png": Plot(
        "benchmarks/results/transformer_lm_cpu.json", "benchmarks/transformer_lm.py", records="records"
    ),
}


def documents(root: Path = ROOT) -> list[Path]:
    """The pages that may hold result blocks: README.md and every page of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def draw_plots(root: Path = ROOT) -> list[Path]:
    """Redraw every plot of ``PLOTS`` from its results file; the paths written."""
    import importlib

    written = []
    for name, spec in PLOTS.items():
        module = importlib.import_module(Path(spec.script).stem)  # (benchmarks/ is on sys.path)
        path = root / IMAGES / name
        path.parent.mkdir(parents=True, exist_ok=True)
        result = json.loads((root / spec.source).read_text())
        getattr(module, spec.function)(result[spec.records] if spec.records else result, str(path))
        written.append(path)
    return written


def blocks(text: str) -> list[dict]:
    """The result blocks in ``text``: name, source, indentation and line span of their contents."""
    lines = text.split("\n")
    found, i = [], 0
    while i < len(lines):
        m = OPEN.match(lines[i])
        if m is None:
            if "<!-- results:" in lines[i] or "<!-- /results:" in lines[i]:
                raise ValueError(f"line {i + 1}: a results marker not in the form {OPEN.pattern!r}")
            i += 1
            continue
        close = CLOSE.format(name=m["name"])
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == close), None)
        if end is None:
            raise ValueError(f"line {i + 1}: block {m['name']!r} has no {close}")
        found.append({"name": m["name"], "source": m["source"], "indent": m["indent"], "start": i + 1, "end": end})
        i = end + 1
    return found


def render(text: str, root: Path = ROOT) -> str:
    """``text`` (a page) with every result block rendered from its results file."""
    found = blocks(text)
    names = [b["name"] for b in found]
    for name in names:
        if name not in BLOCKS:
            raise ValueError(f"a page has a block {name!r} that benchmarks/readme_tables.py does not render")
        if names.count(name) > 1:
            raise ValueError(f"a page has block {name!r} twice")
    lines = text.split("\n")
    for b in reversed(found):  # from the end, so that the earlier spans stay valid
        spec = BLOCKS[b["name"]]
        if b["source"] != spec.source:
            raise ValueError(f"block {b['name']!r} names {b['source']}; it is rendered from {spec.source}")
        path = root / spec.source
        if not path.is_file():
            raise ValueError(f"block {b['name']!r}: {spec.source} does not exist")
        body = spec.render(json.loads(path.read_text()))(WIDTH - len(b["indent"]))
        lines[b["start"] : b["end"]] = [b["indent"] + line if line else "" for line in body]
    return "\n".join(lines)


def render_documents(texts: dict[str, str], root: Path = ROOT) -> dict[str, str]:
    """Every page rendered (``texts``: name -> text); each block of ``BLOCKS`` on exactly one page."""
    rendered, where = {}, {}
    for name, text in texts.items():
        try:
            rendered[name] = render(text, root)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        for b in blocks(text):
            where.setdefault(b["name"], []).append(name)
    missing = sorted(set(BLOCKS) - set(where))
    if missing:
        raise ValueError(f"no page has a block for {missing}: restore it, or drop it from BLOCKS")
    twice = {block: pages for block, pages in where.items() if len(pages) > 1}
    if twice:
        raise ValueError(f"blocks on more than one page: {twice}")
    return rendered


def _diff(old: str, new: str, name: str) -> str:
    lines = difflib.unified_diff(old.splitlines(True), new.splitlines(True), name, f"{name} (from results)")
    return "".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if a page is stale")
    parser.add_argument("--readme", type=Path, help="render this one page alone (and draw no plots)")
    args = parser.parse_args(argv)
    paths = [args.readme] if args.readme else documents()
    old = {str(p): p.read_text() for p in paths}
    try:
        new = {str(args.readme): render(old[str(args.readme)])} if args.readme else render_documents(old)
    except ValueError as e:
        print(f"readme_tables.py: {e}", file=sys.stderr)
        return 2
    stale = [name for name in old if new[name] != old[name]]
    if args.check:
        missing = [name for name in PLOTS if not (ROOT / IMAGES / name).is_file()]
        sys.stdout.writelines(_diff(old[name], new[name], name) for name in stale)
        for name in stale:
            print(f"{name} differs from benchmarks/results/: run python benchmarks/readme_tables.py", file=sys.stderr)
        for name in [] if args.readme else missing:
            print(f"docs/img/{name} is missing: run python benchmarks/readme_tables.py", file=sys.stderr)
        return 1 if stale or (missing and not args.readme) else 0
    for name in stale:
        Path(name).write_text(new[name])
        print(f"rewrote the result blocks of {name}")
    if not args.readme:
        for path in draw_plots():
            print(f"drew {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
