"""The main job runs end to end and writes its plot."""

import math

import pytest

from salsa_fast import demo


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo.png"
    result = demo.main(["--quick", "--no-progress", "--device", "cpu", "--out", str(out)])
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    salsa, adam = result["runs"]["SaLSA"], result["runs"]["Adam"]
    assert salsa.steps == adam.steps > 0
    assert salsa.forwards > salsa.steps  # it searched
    assert all(math.isfinite(v) and v > 0 for v in salsa.step_sizes)
    assert salsa.train_loss < 0.5 and salsa.test_accuracy > 0.8
    printed = capsys.readouterr().out
    assert "SaLSA / Adam wall time per step" in printed and "SaLSA step sizes" in printed


def test_smooth_is_debiased():
    assert demo.smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])
