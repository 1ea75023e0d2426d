"""The docs say what the code does, and every measured figure has one home, BENCHMARKS.md (beside the command
that printed it): README, docs/ and code comments link there instead of quoting figures that drift."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.checkpoint import RESUMABLE

ROOT = Path(__file__).resolve().parents[2]
# Pages that quote no figure of their own (docs/perf-history.md is the record of past runs' figures).
GUIDES = ["README.md", "docs/internals.md", "docs/resume.md", "docs/own-model.md"]
PACKAGES = ["pipeline", "workers", "rewards", "common"]
# a ratio (1.5x), a share (24%), a duration (12 s, 3 minutes): not inside a name such as gpu-1x
FIGURE = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?(?:x\b|%|\s?(?:s|ms|minutes)\b)")


def test_resume_doc_lists_exactly_the_settings_a_resume_may_change():
    text = (ROOT / "docs/resume.md").read_text()
    listed = re.findall(r"^- `([\w.]+)`", text, flags=re.M)
    assert sorted(listed) == sorted(RESUMABLE)


def test_guides_quote_only_figures_that_stand_in_benchmarks():
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    stray = {
        (page, figure)
        for page in GUIDES
        for figure in FIGURE.findall((ROOT / page).read_text())
        if figure not in benchmarks
    }
    assert not stray, f"figures not in BENCHMARKS.md: {sorted(stray)}"


def test_code_comments_quote_no_measured_ratio():
    ratio = re.compile(r"(?<![\w.-])\d+\.\d+x\b")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for pkg in PACKAGES
        for path in sorted((ROOT / pkg).glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if ratio.search(line)
    ]
    assert not found, f"measured ratios in code (link BENCHMARKS.md instead): {found}"


def test_readme_is_a_short_guide_with_the_commands_on_its_first_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    first_screen = "\n".join(lines[:40])
    assert len(lines) < 170
    for command in ("make demo", "make test", "onalign run", "onalign report"):
        assert command in first_screen, command
