"""benchmarks/gpu_suite.py, the one command for a GPU's first run, end to end on the CPU at tiny
sizes: a GPU run is rare, so the machinery it needs is kept working here."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

import gpu_suite  # noqa: E402


def test_gpu_suite_smoke_run(tmp_path):
    """Every stage runs in its subprocess and reports, and the folder holds the files a device
    run brings back (at most eight), no more."""
    assert gpu_suite.main(["--out", str(tmp_path), "--device", "cpu", "--quick", "--quiet"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) <= 8 and all(n.rsplit(".", 1)[0].endswith("_cpu_quick") for n in names), names
    suite = json.loads((tmp_path / "suite_cpu_quick.json").read_text())
    assert [(s["stage"], s["status"]) for s in suite["stages"]] == [(s, "ok") for s in gpu_suite.STAGES]
    assert suite["tests"]["failed"] == suite["tests"]["errors"] == 0 and suite["tests"]["skipped"] > 0
    assert {r["dtype"] for r in suite["optimizer_step"]["ratios"]} == {"float32", "bfloat16"}
    assert {r["pass"] for r in suite["optimizer_step"]["ratios"]} == {"step", "step_kernel"}
    assert [p["step"] for p in suite["profile"]["profiled"]] == ["non-search", "search"]
    assert len(suite["overhead"]) == 3
    summary = (tmp_path / "summary_cpu_quick.md").read_text()
    assert "| tests | ok |" in summary and "Non-search step vs Adam(fused)" in summary
