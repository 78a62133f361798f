"""``benchmarks/transformer_lm.py --quick`` runs end to end and its records are sane. Nothing
about speed or about which optimizer wins is asserted: the committed study
(``benchmarks/results/transformer_lm_cpu.*``) reports that."""

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import transformer_lm as study  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("transformer_lm")
    paths = {ext: str(out / f"quick.{ext}") for ext in ("json", "md", "png")}
    threads = torch.get_num_threads()
    try:
        result = study.main(
            ["--quick", "--no-progress", "--json", paths["json"], "--markdown", paths["md"], "--plot", paths["png"]]
        )
    finally:
        torch.set_num_threads(threads)
    return result, paths


@pytest.mark.slow
def test_every_candidate_runs_with_finite_losses(quick_run):
    result, _ = quick_run
    records = result["records"]
    steps = study.QUICK.steps
    expected = {("adamw_tuned", lr) for lr in study.ADAMW_GRID} | {
        (name, None) for name in study.NAMES if name != "adamw_tuned"
    }
    assert {(r["candidate"], r["lr"]) for r in records} == expected
    for r in records:
        assert r["steps"] == steps and len(r["train_losses"]) == steps
        assert all(math.isfinite(v) for v in r["train_losses"] + r["curve"]["val_loss"])
        assert math.isfinite(r["final_val_loss"]) and r["final_val_bpb"] == pytest.approx(
            r["final_val_loss"] / math.log(2), rel=1e-5
        )
        assert r["curve"]["step"][0] == 0 and r["curve"]["step"][-1] == steps
        assert r["wall_s"] > 0 and r["curve"]["time_s"] == sorted(r["curve"]["time_s"])
        assert r["backwards"] == steps
    # same initialisation and the same validation windows for every candidate of a seed
    assert len({r["curve"]["val_loss"][0] for r in records}) == 1
    assert result["chosen_lr"] in study.ADAMW_GRID


@pytest.mark.slow
def test_salsa_records_its_searches(quick_run):
    result, _ = quick_run
    steps = study.QUICK.steps
    for r in result["records"]:
        if r["candidate"].startswith("salsa"):
            assert r["forwards"] >= steps and r["searches"] >= 1
            assert len(r["step_sizes"]) == steps and all(s > 0 and math.isfinite(s) for s in r["step_sizes"])
        else:
            assert r["forwards"] == steps and r["step_sizes"] == []
    scheduled = next(r for r in result["records"] if r["candidate"] == "salsa_schedule")
    # the schedule scales the updates: the effective step size is the found one times the lr factor
    assert scheduled["effective_step_sizes"][-1] < 0.2 * scheduled["step_sizes"][-1]


@pytest.mark.slow
def test_outputs_are_written(quick_run):
    result, paths = quick_run
    with open(paths["json"]) as f:
        saved = json.load(f)
    assert saved["environment"]["torch"] == torch.__version__ and saved["corpus"]["train_bytes"] > 0
    assert len(saved["records"]) == len(result["records"])
    with open(paths["md"]) as f:
        text = f.read()
    assert all(name in text for name in study.NAMES) and "interleaved" in text
    assert os.path.getsize(paths["png"]) > 10_000
