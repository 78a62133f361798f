"""The documentation's measured numbers are those of the committed results
(``benchmarks/results/``): ``benchmarks/readme_tables.py`` renders every result block of README.md
and docs/ from its JSON, and the pages must hold exactly that; it draws the plots they show from
the same results. No benchmark runs here; after a new run, ``python benchmarks/readme_tables.py``
rewrites the blocks and redraws the plots."""

import ast
import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import readme_tables as rt  # noqa: E402


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return {str(path): path.read_text() for path in rt.documents()}


@pytest.fixture(scope="module")
def readme(pages) -> str:
    """All pages as one text (blocks do not span pages)."""
    return "\n".join(pages.values())


def _page_with(pages: dict[str, str], needle: str) -> tuple[str, str]:
    return next((name, text) for name, text in pages.items() if needle in text)


def test_every_page_matches_the_committed_results(pages):
    rendered = rt.render_documents(pages)
    for name, text in pages.items():
        if rendered[name] != text:
            import difflib

            diff = "".join(
                difflib.unified_diff(text.splitlines(True), rendered[name].splitlines(True), name, "rendered")
            )
            pytest.fail(f"{name} differs from benchmarks/results/; run python benchmarks/readme_tables.py\n{diff}")


def test_every_plot_a_page_shows_is_drawn_from_results(pages):
    shown = {m for text in pages.values() for m in re.findall(r"\]\((?:docs/)?img/([\w.-]+\.png)\)", text)}
    assert shown and shown == set(rt.PLOTS), "the plots the pages show and PLOTS disagree"
    for name, spec in rt.PLOTS.items():
        assert (Path(ROOT) / rt.IMAGES / name).is_file(), name
        assert (Path(ROOT) / spec.source).is_file() and (Path(ROOT) / spec.script).is_file(), name


def test_every_block_names_an_existing_results_file_that_is_rendered(readme):
    blocks = rt.blocks(readme)
    assert {b["name"] for b in blocks} == set(rt.BLOCKS), "the pages' blocks and BLOCKS disagree"
    for b in blocks:
        spec = rt.BLOCKS[b["name"]]
        assert b["source"] == spec.source, b
        assert b["source"].startswith("benchmarks/results/") and b["source"].endswith(".json"), b
        path = os.path.join(ROOT, b["source"])
        assert os.path.isfile(path), f"block {b['name']} names {b['source']}, which does not exist"
        with open(path) as f:
            lines = spec.render(json.load(f))(rt.WIDTH - len(b["indent"]))
        assert any(line.strip() for line in lines), b["name"]
        # what the README holds between the markers is what was rendered, not left-over text
        body = readme.split("\n")[b["start"] : b["end"]]
        assert [line.removeprefix(b["indent"]) for line in body] == lines, b["name"]


def test_the_byte_table_is_not_a_results_block(readme):
    assert readme.count("<!-- byte-table") == 1 and readme.count("<!-- /byte-table -->") == 1
    start, end = readme.index("<!-- byte-table"), readme.index("<!-- /byte-table -->")
    for b in rt.blocks(readme):
        marker = readme.split("\n")[b["start"] - 1]
        assert not (start <= readme.index(marker) <= end), b["name"]


def test_each_script_writing_a_result_says_how_to_refresh_it():
    """The first paragraph of the docstring is the script's --help description."""
    for spec in rt.BLOCKS.values():
        with open(os.path.join(ROOT, spec.script)) as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        description = doc.split("\n\n")[0]
        assert "python benchmarks/readme_tables.py" in description, spec.script
        assert spec.source.removeprefix("benchmarks/") in description, spec.script


def test_a_stale_page_fails_the_check_with_a_diff(readme, tmp_path, capsys):
    row = next(line for line in readme.split("\n") if line.startswith("| `salsa_fast.SaLSA` |"))
    cells = row.split(" | ")
    damaged = " | ".join([*cells[:2], "9.99x", *cells[3:]])  # (its ratio to Adam)
    stale = readme.replace(row, damaged, 1)
    assert stale != readme
    path = tmp_path / "README.md"
    path.write_text(stale)
    assert rt.main(["--check", "--readme", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"-{damaged}" in out and f"+{row}" in out
    assert path.read_text() == stale  # --check changes nothing
    assert rt.main(["--readme", str(path)]) == 0
    assert path.read_text() == readme


@pytest.mark.parametrize("damage", ["unknown block", "wrong source", "missing block"])
def test_a_block_that_does_not_match_a_results_file_is_an_error(readme, damage):
    if damage == "unknown block":
        text = readme.replace("results:headline:", "results:nowhere:").replace(
            "/results:headline ", "/results:nowhere "
        )
    elif damage == "wrong source":
        text = readme.replace(
            "rendered from benchmarks/results/cpu_training_step_mlp4m.json",
            "rendered from benchmarks/results/none.json",
            1,
        )
    else:
        b = next(b for b in rt.blocks(readme) if b["name"] == "headline")
        lines = readme.split("\n")
        text = "\n".join(lines[: b["start"] - 1] + lines[b["end"] + 1 :])
    assert text != readme
    with pytest.raises(ValueError):
        rt.render_documents({"the pages": text})


def test_a_block_on_two_pages_is_an_error(pages):
    name, text = _page_with(pages, "<!-- results:headline:")
    with pytest.raises(ValueError, match="more than one page"):
        rt.render_documents({**pages, "copy.md": text})


def test_prose_that_a_new_result_contradicts_is_refused():
    """The rounding prose says float64 is "invisible": a run where it is not must not render."""
    with open(os.path.join(ROOT, "benchmarks", "results", "memory_cpu.json")) as f:
        result = json.load(f)
    result["drift"][0]["max_abs_param_diff"] = 1e-3
    with pytest.raises(rt.ProseMismatch):
        rt.memory_rounding(result)


def test_rounding_helpers():
    assert rt.up(1.0367e-13) == "1.1e-13" and rt.up(2.6e-5, 1) == "3e-5" and rt.up(3.0e-5, 1) == "3e-5"
    assert rt.near(0.03149881) == "3.1e-2" and rt.near(1.5329e-5) == "1.5e-5"
    assert rt.sig(214.0) == "214" and rt.sig(0.001004) == "0.001" and rt.sig(0.3323) == "0.33"
