"""One command for a GPU's first run: the CUDA and kernel tests, then every measurement, in one folder.

    python benchmarks/gpu_suite.py --out DIR                        # one GPU: about 8.5 minutes
    python benchmarks/gpu_suite.py --out DIR --device cpu --quick   # smoke check: tiny sizes, < 1 minute
    python benchmarks/gpu_suite.py --out DIR --only overhead        # run one stage again

Stages, each in its own subprocess with its own deadline, so that one that fails or hangs still
leaves the others their time (a stage's deadline is its share of ``--budget``; what a stage
leaves unused passes on to the next; a stage past its deadline gets Ctrl-C, then is killed):

1. ``tests``: pytest on the CUDA and kernel tests. On a machine with CUDA, ``tests/conftest.py``
   puts the kernel tests on CUDA (without one they run in Triton's interpreter on CPU tensors);
   on CPU a tiny subset runs instead. Counts come from a JUnit XML.
2. ``optimizer_step``: ``optimizer_step.py`` at 1e6..1e9 parameters, fp32 and bf16, each SaLSA
   pass against ``Adam(fused=True)``, as GB/s against the measured copy bandwidth.
3. ``profile``: ``profile_steps.py``: one search and one non-search step under torch.profiler
   (kernels, launches, host and device time).
4. ``overhead``: ``overhead.py``: whole training steps on three workloads, SaLSA's kernels
   compiled before the timed window (``--warm-kernels``).

DIR gets at most eight files (what a device run can bring back), named for the device (``--tag``,
by default from ``torch.cuda.get_device_name``: ``h200``), so they can go to ``results/`` as they are:

* ``summary_TAG.md``: the headline: device, versions, each stage's status and time, tests passed
  and failed, the non-search step over Adam(fused) from 1e7, GB/s against the copy bandwidth
  from 1e8, whole training steps, the profiled steps, and the output tail of a failed stage;
* ``suite_TAG.json``: the same as data, with every stage's command and output tail;
* ``tests_TAG.txt``: the counts, the failed tests and pytest's output;
* ``optimizer_step_TAG.json`` / ``.png``, ``profile_TAG.md``, ``overhead_TAG.json`` / ``.md``:
  what those scripts write.

The summary and the suite JSON are rewritten after each stage, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import environment  # noqa: E402

STAGES = ("tests", "optimizer_step", "profile", "overhead")
SHARES = {"tests": 0.4, "optimizer_step": 0.2, "profile": 0.1, "overhead": 0.3}  # of --budget
REQUIRES = {  # modules a stage needs beyond torch: a missing one is named rather than found in a traceback
    "tests": ["pytest"],
    "optimizer_step": ["tqdm", "matplotlib"],
    "profile": [],
    "overhead": ["tqdm", "sklearn"],
}

CUDA_TESTS = [
    "tests/test_cuda.py",
    "tests/test_kernels.py",
    "tests/test_labpal_kernels.py",
    "tests/test_rng.py::test_cuda_generator_is_forked_and_seeded",
]
# Without CUDA: test_cuda.py skips itself, and one quick kernel test runs in Triton's interpreter
# (chosen by keyword: a renamed test is deselected, not an error).
CPU_TESTS = ["tests/test_cuda.py", "tests/test_kernels.py", "-k", "test_cuda or empty_bucket"]
# the non-search step over Adam(fused): with the non-finite probe ("step") and without ("step_kernel")
TARGETS = {
    "ratio_from": 10**7,
    "ratio": {"step": 1.15, "step_kernel": 1.05},
    "bandwidth_from": 10**8,
    "step_pct": 85.0,
    "search_pct": 100 / 1.15,
}
TAIL_CHARS = 6000


# -- the plan -------------------------------------------------------------------------------------


def default_tag(device_type: str, device_name: str, quick: bool) -> str:
    """'h200' for 'NVIDIA H200', 'h100' for 'NVIDIA H100 80GB HBM3', 'cpu' on a CPU."""
    tag = "cpu"
    if device_type == "cuda":
        words = [w for w in re.split(r"[\s_-]+", device_name.lower()) if w and w not in ("nvidia", "tesla", "geforce")]
        tag = next((w for w in words if re.search(r"\d", w)), words[0] if words else "gpu")
        tag = re.sub(r"[^a-z0-9.]", "", tag) or "gpu"
    return tag + ("_quick" if quick else "")


def files(out: str, tag: str) -> dict[str, str]:
    names = {
        "summary": "summary_{}.md",
        "suite": "suite_{}.json",
        "tests": "tests_{}.txt",
        "optimizer_step_json": "optimizer_step_{}.json",
        "optimizer_step_png": "optimizer_step_{}.png",
        "profile_md": "profile_{}.md",
        "overhead_json": "overhead_{}.json",
        "overhead_md": "overhead_{}.md",
    }
    return {k: os.path.join(out, v.format(tag)) for k, v in names.items()}


def pytest_extras(cuda: bool, args) -> list[str]:
    """xdist workers and a per-test timeout where those plugins are installed (the GPU image has both)."""
    opts = []
    if cuda and args.test_workers > 0 and importlib.util.find_spec("xdist") is not None:
        opts += ["-n", str(args.test_workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:  # a test stuck in a CUDA call: its worker ends
        opts += [f"--timeout={args.test_timeout}", "--timeout-method=thread"]
    if args.maxfail > 0:
        opts += [f"--maxfail={args.maxfail}"]
    return opts


def commands(args, cuda: bool, f: dict[str, str], tmp: str) -> dict[str, list[str]]:
    py, bench = sys.executable, lambda name: os.path.join("benchmarks", name)
    dev = ["--device", "cuda" if cuda else "cpu"]
    if args.sizes:
        sizes = args.sizes
    elif cuda:
        sizes = ["1e6", "1e7", "1e8"] + ([] if args.quick else ["1e9"])
    else:
        sizes = ["1e4", "1e5"] if args.quick else ["1e6", "1e7"]
    tests = args.tests or (CUDA_TESTS if cuda else CPU_TESTS)
    present = [t for t in tests if not t.startswith("tests/") or os.path.exists(os.path.join(ROOT, t.split("::")[0]))]
    if any(t.startswith("tests/") for t in present):  # a file renamed since: run the others (else pytest says which)
        tests = present
    steps = args.overhead_steps or (6 if args.quick else 300)
    return {
        "tests": [
            py,
            "-m",
            "pytest",
            *tests,
            "-v",
            "-rfE",
            "--tb=short",
            "-p",
            "no:cacheprovider",
            f"--junitxml={os.path.join(tmp, 'junit.xml')}",
            *pytest_extras(cuda, args),
        ],
        "optimizer_step": [
            py,
            bench("optimizer_step.py"),
            *dev,
            "--sizes",
            *sizes,
            "--dtypes",
            "float32",
            "bfloat16",
            "--repeats",
            str(args.repeats),
            "--json",
            f["optimizer_step_json"],
            "--plot",
            f["optimizer_step_png"],
        ],
        "profile": [
            py,
            bench("profile_steps.py"),
            *dev,
            "--json",
            os.path.join(tmp, "profile.json"),
            "--markdown",
            f["profile_md"],
        ]
        + (["--quick", "--timed", "6"] if args.quick else []),
        "overhead": [
            py,
            bench("overhead.py"),
            *dev,
            "--steps",
            str(steps),
            "--warm-kernels",
            "--json",
            f["overhead_json"],
            "--markdown",
            f["overhead_md"],
        ]
        + (["--quick"] if args.quick and not cuda else []),
    }


# -- running a stage ------------------------------------------------------------------------------


def _pump(stream, log, echo: bool) -> None:
    """Copy the child's output to its log (and to our stdout), chunk by chunk: tqdm ends lines with \\r."""
    while chunk := os.read(stream.fileno(), 65536):
        log.write(chunk)
        log.flush()
        if echo:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()


def _stop(proc: subprocess.Popen) -> int:
    """Ctrl-C first (pytest then still writes its JUnit XML and summary), then harder."""
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)  # the whole group: pytest's and the compiler's children too
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def clean(text: str) -> str:
    """Output as a terminal would leave it: of each line, what follows its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def failure_line(output: str, rc: int) -> str:
    """The line that says what went wrong: the last error-looking line near the end, else the last."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines[-40:]):
        if re.search(r"Error|Exception|ERROR|FAILED|Killed|failed", line):
            return line
    return lines[-1] if lines else f"exit status {rc}"


def run_stage(name: str, cmd: list[str], timeout: float, log_path: str, env: dict, echo: bool) -> dict:
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, echo), daemon=True)
        pump.start()
        try:
            rc, timed_out = proc.wait(timeout=max(timeout, 1.0)), False
        except subprocess.TimeoutExpired:
            rc, timed_out = _stop(proc), True
        pump.join(timeout=10)
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        output = clean(fh.read())
    status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
    reason = f"past its {timeout:.0f} s deadline" if timed_out else "" if rc == 0 else failure_line(output, rc)
    if rc < 0 and not timed_out:  # killed from outside (out of memory?): say so first
        reason = f"killed by signal {-rc}; {reason}"
    return {
        "stage": name,
        "status": status,
        "seconds": round(time.monotonic() - start, 1),
        "limit_s": round(timeout),
        "returncode": rc,
        "reason": reason[:300],
        "command": shlex.join(cmd),
        "output": output,
    }


# -- reading what the stages wrote ----------------------------------------------------------------


def junit_counts(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for s in suites
        for case in s.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failed_tests": failed,
        "source": "junit",
    }


def output_counts(output: str) -> dict:
    """Counts from pytest -v's progress lines, for a run stopped before it wrote its XML."""
    progress = output.split("short test summary info")[0]
    seen = re.findall(r"(?:^|\s)(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?=\s|$)", progress, re.M)
    failed = re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)|(?:FAILED|ERROR) (\S+::\S+)", progress, re.M)
    return {
        "passed": seen.count("PASSED") + seen.count("XFAIL") + seen.count("XPASS"),
        "failed": seen.count("FAILED"),
        "errors": seen.count("ERROR"),
        "skipped": seen.count("SKIPPED"),
        "failed_tests": sorted({a or b for a, b in failed}),
        "source": "pytest output",
    }


def read_json(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def step_headline(records: list[dict]) -> dict:
    """The non-search step over Adam(fused) from 1e7, and GB/s against the copy from 1e8 (the
    project's performance targets); on a run of smaller sizes (CPU, --quick), every size."""
    salsa = "salsa_fast_triton" if any(r["optimizer"] == "salsa_fast_triton" for r in records) else "salsa_fast_torch"
    sizes = sorted({r["n_params"] for r in records})

    def at_least(n):
        return [s for s in sizes if s >= n] or sizes

    by_key = {(r["optimizer"], r["pass"], r["n_params"], r["dtype"]): r for r in records}

    def find(opt, pass_name, n, dtype):
        return by_key.get((opt, pass_name, n, dtype))

    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    ratios, bandwidth = [], []
    for n in at_least(TARGETS["ratio_from"]):
        for dtype in dtypes:
            for pass_name, target in TARGETS["ratio"].items():
                adam, step = find("adam_fused", "step", n, dtype), find(salsa, pass_name, n, dtype)
                if adam and step:
                    ratio = step["ms_per_step"] / adam["ms_per_step"]
                    ratios.append(
                        {
                            "n_params": n,
                            "dtype": dtype,
                            "pass": pass_name,
                            "adam_fused_ms": adam["ms_per_step"],
                            "salsa_step_ms": step["ms_per_step"],
                            "ratio": ratio,
                            "target": target,
                            "meets_target": ratio <= target,
                        }
                    )
    for n in at_least(TARGETS["bandwidth_from"]):
        for dtype in dtypes:
            passes = [("adam_fused", "step")] + [(salsa, p) for p in ("step", "first_pass", "trial", "commit")]
            for opt, pass_name in passes:
                r = find(opt, pass_name, n, dtype)
                if r is None:
                    continue
                target = None if opt == "adam_fused" else TARGETS["step_pct" if pass_name == "step" else "search_pct"]
                bandwidth.append(
                    {
                        "n_params": n,
                        "dtype": dtype,
                        "optimizer": opt,
                        "pass": pass_name,
                        "gb_per_s": r["gb_per_s"],
                        "pct_of_copy": r["pct_of_copy"],
                        "pct_of_datasheet": r["pct_of_datasheet"],
                        "target_pct": target,
                        "meets_target": None if target is None else r["pct_of_copy"] >= target,
                    }
                )
    return {
        "salsa": salsa,
        "ratio_from": at_least(TARGETS["ratio_from"])[0],
        "bandwidth_from": at_least(TARGETS["bandwidth_from"])[0],
        "copy_gb_per_s": records[0]["copy_gb_per_s"],
        "datasheet_gb_per_s": records[0]["datasheet_gb_per_s"],
        "ratios": ratios,
        "bandwidth": bandwidth,
    }


def overhead_headline(records: list[dict]) -> list[dict]:
    salsa = "salsa_fast_triton" if any(r["optimizer"] == "salsa_fast_triton" for r in records) else "salsa_fast_torch"
    rows = []
    for r in records:
        if r["optimizer"] == salsa:
            adam = next(a for a in records if a["workload"] == r["workload"] and a["optimizer"] == "adam_fused")
            rows.append(
                {
                    "workload": r["workload"],
                    "n_params": r["n_params"],
                    "optimizer": salsa,
                    "adam_fused_ms": adam["ms_per_step"],
                    "salsa_ms": r["ms_per_step"],
                    "ratio_vs_adam": r["ratio_vs_adam"],
                    "forwards_per_step": r["forwards_per_step"],
                    "searched_fraction": r["searched_fraction"],
                    "steps": r["steps"],
                }
            )
    return rows


# -- the files ------------------------------------------------------------------------------------


def git_revision() -> str | None:
    try:
        git = dict(cwd=ROOT, capture_output=True, text=True, timeout=10)
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git)
        dirty = subprocess.run(["git", "status", "--porcelain"], **git)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def device_record(device: torch.device) -> dict:
    env = environment(device)
    env["git"] = git_revision()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            cuda=torch.version.cuda,
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
    return env


def write_tests_file(path: str, stage: dict, counts: dict | None) -> None:
    out = stage["output"]
    if len(out) > 4_000_000:  # keep the head (collection) and the tail (failures, summary)
        out = out[:1_000_000] + "\n[... cut ...]\n" + out[-3_000_000:]
    head = [f"$ {stage['command']}", f"status: {stage['status']} ({stage['seconds']} s)"]
    if counts:
        head.append(
            "counts ({source}): {passed} passed, {failed} failed, {errors} errors, {skipped} skipped".format(**counts)
        )
        head += [f"FAILED {t}" for t in counts["failed_tests"]]
    with open(path, "w") as fh:
        fh.write("\n".join(head) + "\n\n" + out + "\n")


def _n(n: int) -> str:
    return f"{n:.0e}".replace("e+0", "e")


def _mark(ok) -> str:
    return "-" if ok is None else "yes" if ok else "**no**"


def _header(suite: dict) -> list[str]:
    env = suite["environment"]
    gpu = f", CUDA {env['cuda']}, {env['memory_gib']} GiB, {env['multiprocessors']} SMs" if env.get("cuda") else ""
    lines = [
        f"# salsa_fast on {env['device_name']} ({env['device']}): the suite",
        "",
        f"{env['date']}; torch {env['torch']}{gpu}; triton {env['triton']}; Python {env['python']}; "
        f"commit {env.get('git') or 'unknown'}. `{suite['command']}`: {suite['seconds']:.0f} s of a "
        f"{suite['budget_s']:.0f} s budget.",
        "",
        "| stage | status | seconds | note |",
        "| --- | --- | ---: | --- |",
    ]
    for s in suite["stages"]:
        note = s.get("note") or s.get("reason", "")
        lines.append(f"| {s['stage']} | {s['status']} | {s.get('seconds', 0):.0f} | {note} |")
    return lines


def _step_section(head: dict) -> list[str]:
    lines = []
    if head["ratio_from"] < TARGETS["ratio_from"]:
        lines += ["", "(Sizes below the targets' ranges: a smoke check, not a measurement of the targets.)"]
    lines += [
        "",
        f"## Non-search step vs Adam(fused) from {_n(head['ratio_from'])} (`{head['salsa']}`; targets from "
        f"{_n(TARGETS['ratio_from'])}: `step`, with the non-finite probe, <= {TARGETS['ratio']['step']}x; "
        f"`step_kernel`, the update alone, <= {TARGETS['ratio']['step_kernel']}x)",
        "",
        "| n | dtype | pass | Adam(fused) ms | SaLSA ms | ratio | target | target met |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in head["ratios"]:
        lines.append(
            f"| {_n(r['n_params'])} | {r['dtype']} | {r['pass']} | {r['adam_fused_ms']:.3f} | "
            f"{r['salsa_step_ms']:.3f} | {r['ratio']:.3f}x | {r['target']}x | {_mark(r['meets_target'])} |"
        )
    sheet = f", datasheet {head['datasheet_gb_per_s']:.0f} GB/s" if head["datasheet_gb_per_s"] else ""
    lines += [
        "",
        f"## Bandwidth from {_n(head['bandwidth_from'])} (measured copy {head['copy_gb_per_s']:.0f} GB/s{sheet})",
        "",
        f"Byte floor over time; targets from {_n(TARGETS['bandwidth_from'])}: the step >= "
        f"{TARGETS['step_pct']:.0f}% of the copy, search passes within 15% of their floors "
        f"(>= {TARGETS['search_pct']:.0f}%).",
        "",
        "| n | dtype | optimizer | pass | GB/s | % of copy | % of datasheet | target met |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in head["bandwidth"]:
        sheet = "-" if r["pct_of_datasheet"] is None else f"{r['pct_of_datasheet']:.0f}%"
        lines.append(
            f"| {_n(r['n_params'])} | {r['dtype']} | {r['optimizer']} | {r['pass']} | {r['gb_per_s']:.0f} | "
            f"{r['pct_of_copy']:.0f}% | {sheet} | {_mark(r['meets_target'])} |"
        )
    return lines


def _overhead_section(rows: list[dict]) -> list[str]:
    lines = [
        "",
        f"## Whole training steps ({rows[0]['steps']} per run; every optimizer: the overhead file)",
        "",
        "| workload | params | Adam(fused) ms | SaLSA ms | vs Adam(fused) | forwards/step | searched |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['n_params'] / 1e6:.2f}M | {r['adam_fused_ms']:.2f} | {r['salsa_ms']:.2f} | "
            f"{r['ratio_vs_adam']:.2f}x | {r['forwards_per_step']:.2f} | {r['searched_fraction']:.0%} |"
        )
    return lines


def _profile_section(prof: dict) -> list[str]:
    from profile_steps import profiled_steps_table  # (its table, here as in its own file)

    return [
        "",
        f"## One step of each kind ({prof['workload']}, backend {prof['backend']}; the profile file has more)",
        "",
        *profiled_steps_table(prof),
    ]


def summary_markdown(suite: dict) -> str:
    lines = _header(suite)
    if suite.get("optimizer_step"):
        lines += _step_section(suite["optimizer_step"])
    if suite.get("overhead"):
        lines += _overhead_section(suite["overhead"])
    if suite.get("profile"):
        lines += _profile_section(suite["profile"])
    for s in suite["stages"]:
        if s["status"] in ("failed", "timeout") and s.get("tail"):
            lines += ["", f"## {s['stage']}: {s['status']} ({s.get('reason', '')})", "", "```", s["tail"][-3000:]]
            lines += ["```"]
    return "\n".join(lines) + "\n"


def write_suite(suite: dict, f: dict[str, str]) -> None:
    with open(f["suite"], "w") as fh:
        json.dump(suite, fh, indent=2, default=str)
    try:
        text = summary_markdown(suite)
    except Exception as e:  # a formatting slip must not cost the run: the JSON has everything
        text = f"# gpu_suite: the summary could not be written ({e!r}); see {os.path.basename(f['suite'])}\n"
    with open(f["summary"], "w") as fh:
        fh.write(text)


# -- main -----------------------------------------------------------------------------------------


def finish_stage(name: str, result: dict, f: dict[str, str], tmp: str, suite: dict, cuda: bool) -> None:
    """Read what the stage wrote into the suite record, and judge it."""
    if result["status"] in ("not run", "skipped") or result["reason"].startswith("missing module"):
        result["tail"] = result.pop("output")
        return
    found = None
    if name == "tests":
        found = junit_counts(os.path.join(tmp, "junit.xml")) or output_counts(result["output"])
        write_tests_file(f["tests"], result, found)
        suite["tests"] = found
        result["note"] = "{passed} passed, {failed} failed, {errors} errors, {skipped} skipped".format(**found)
        if cuda and result["status"] == "ok" and found["passed"] == 0:
            result["status"], result["reason"] = "failed", "no test passed"
    elif name == "optimizer_step":
        found = read_json(f["optimizer_step_json"])
        if found:
            suite["optimizer_step"] = step_headline(found)
            sizes = sorted({r["n_params"] for r in found})
            result["note"] = f"{len(found)} records, {_n(sizes[0])}..{_n(sizes[-1])}"
    elif name == "profile":
        found = read_json(os.path.join(tmp, "profile.json"))
        if found:
            suite["profile"] = found
            result["note"] = ", ".join(f"{p['step']}: {p['host_ms']:.1f} ms host" for p in found["profiled"])
    elif name == "overhead":
        found = read_json(f["overhead_json"])
        if found:
            suite["overhead"] = overhead_headline(found)
            result["note"] = f"{len({r['workload'] for r in found})} workloads, {found[0]['steps']} steps each"
    if result["status"] == "ok" and not found:
        result["status"], result["reason"] = "failed", "it wrote no results"
    if result["status"] != "ok" and result.get("note"):
        result["note"] = f"{result['reason']}; kept: {result['note']}"
    result["tail"] = result.pop("output")[-TAIL_CHARS:]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the (at most eight) files")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check of every stage")
    parser.add_argument("--tag", help="file name suffix (default: from the device name, e.g. h200; cpu)")
    parser.add_argument(
        "--budget",
        type=float,
        default=500.0,
        help="seconds for all stages (one past its deadline takes <= 25 s to stop)",
    )
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run these stages alone")
    parser.add_argument("--skip", nargs="+", choices=STAGES, default=[], help="leave these stages out")
    parser.add_argument("--tests", nargs="+", help="test files or node ids instead of the defaults")
    parser.add_argument("--test-workers", type=int, default=4, help="pytest-xdist workers on CUDA (0: none)")
    parser.add_argument("--test-timeout", type=int, default=120, help="seconds per test (with pytest-timeout)")
    parser.add_argument("--maxfail", type=int, default=20, help="stop the tests after this many failures (0: never)")
    parser.add_argument("--sizes", nargs="+", help="optimizer_step sizes (default 1e6 1e7 1e8 1e9 on CUDA)")
    parser.add_argument("--repeats", type=int, default=10, help="optimizer_step: timed calls per pass")
    parser.add_argument("--overhead-steps", type=int, help="overhead: steps per run (default 300; 6 with --quick)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the stages' output")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def child_environment(cuda: bool, quick: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", TQDM_MININTERVAL="5")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # this salsa_fast
    if cuda:
        env.pop("TRITON_INTERPRET", None)  # the kernels compile for the GPU
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu means it for the tests too, also on a GPU machine
        if quick:
            env["OMP_NUM_THREADS"] = "1"  # a smoke check: no OpenMP spinning against other work on a small CPU
    return env


def _not_run(name: str, cmd: list[str], status: str, reason: str) -> dict:
    return {"stage": name, "status": status, "seconds": 0.0, "reason": reason, "command": shlex.join(cmd), "output": ""}


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    env_record = device_record(torch.device(args.device))
    tag = args.tag or default_tag(args.device, env_record["device_name"], args.quick)
    out = os.path.abspath(args.out)  # the stages run from the repository root
    os.makedirs(out, exist_ok=True)
    f = files(out, tag)
    selected = [s for s in STAGES if (not args.only or s in args.only) and s not in args.skip]
    child_env = child_environment(cuda, args.quick)
    suite = {
        "suite": "gpu_suite",
        "command": "python benchmarks/gpu_suite.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "tag": tag,
        "budget_s": args.budget,
        "seconds": 0.0,
        "environment": env_record,
        "stages": [_not_run(s, [], "skipped", "not selected") for s in STAGES if s not in selected],
    }
    for s in suite["stages"]:
        s.pop("output")

    start = time.monotonic()
    deadline, total_share = start, sum(SHARES[s] for s in selected) or 1.0
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        plan = commands(args, cuda, f, tmp)
        for name in selected:
            deadline += args.budget * SHARES[name] / total_share  # what earlier stages left unused carries over
            limit = deadline - time.monotonic()
            print(
                f"[gpu_suite {_clock(start)}] {name}: start, {limit:.0f} s left for it\n  $ {shlex.join(plan[name])}",
                flush=True,
            )
            missing = [m for m in REQUIRES[name] if importlib.util.find_spec(m) is None]
            if missing:
                result = _not_run(name, plan[name], "failed", f"missing module(s): {', '.join(missing)}")
            elif limit < 5:
                result = _not_run(name, plan[name], "not run", "no time left in the budget")
            else:
                result = run_stage(name, plan[name], limit, os.path.join(tmp, f"{name}.log"), child_env, not args.quiet)
            try:
                finish_stage(name, result, f, tmp, suite, cuda)
            except Exception as e:  # a slip in reading one stage's results must not stop the others
                result.update(status="failed", reason=f"reading its results: {e!r}")
                result["tail"] = result.pop("output", result.get("tail", ""))[-TAIL_CHARS:]
            suite["stages"] = sorted(suite["stages"] + [result], key=lambda s: STAGES.index(s["stage"]))
            suite["seconds"] = time.monotonic() - start
            write_suite(suite, f)  # after every stage: a run cut short keeps what it did
            note = result.get("note") or result.get("reason") or ""
            print(
                f"[gpu_suite {_clock(start)}] {name}: {result['status']} in {result['seconds']:.0f} s. {note}",
                flush=True,
            )

    with open(f["summary"]) as fh:
        print("\n" + fh.read())
    print(f"files in {out}: {', '.join(sorted(os.path.basename(p) for p in f.values() if os.path.exists(p)))}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in suite["stages"]) else 1


def _clock(start: float) -> str:
    seconds = int(time.monotonic() - start)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    sys.exit(main())
