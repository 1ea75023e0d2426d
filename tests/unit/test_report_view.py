"""What a reader of a report sees first: the two-line summary, the short per-iteration table (the same
table model in report.md and report.html), every metric in a collapsed section and in metrics.csv; the
comparison of several runs; and the HTML page as headless Chromium renders it at 1280 px, every plot
loaded. Built from run directories written here (no actor)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.compare import comparison_figure, write_comparison
from pipeline.report import summary_lines, write_report
from pipeline.rundir import RunDir
from pipeline.tables import HEADLINE

TITLES = [c.title for c in HEADLINE]


SLOPE = {"dpo": 0.0, "ipo": -0.006, "wdpo": 0.004, "apo": 0.009}


def metrics_rows(iterations: int, algorithm: str, saved: float) -> list[dict]:
    """Rows shaped like the loop's (the same keys, plausible values; each method its own trend)."""
    d = SLOPE.get(algorithm, 0.0)
    rows = [
        {
            "iteration": 0,
            "eval_reward_mean": 0.78125,
            "win_rate_vs_initial": 0.5,
            "time_eval_s": 1.2,
            "train_prompts": 256,
            "eval_prompts": 64,
            "train_kept": 256,
            "eval_kept": 64,
        }
    ]
    for it in range(1, iterations + 1):
        gen = int(3000 * (1 - saved)) + it
        rows.append(
            {
                "iteration": it,
                "reward_mean": 0.6 + (0.03 + d) * it,
                "reward_std": 0.21,
                "eval_reward_mean": 0.78125 + (0.01 + d) * it - (0.02 if it == iterations else 0.0),
                "win_rate_vs_initial": 0.5 + (0.02 + d) * it,
                "pairs": 200 - it,
                "pairs_dropped_ties": 56 + it,
                "pair_reward_gap_mean": 0.7,
                "training_skipped": False,
                "generated_tokens": gen,
                "prompts_regenerated": 256 if saved == 0 else 128,
                "prompts_reused": 0 if saved == 0 else 128,
                "generated_tokens_if_all": 3000.0 + it,
                "generation_saved_fraction": 1 - gen / (3000.0 + it),
                "distinct_response_fraction": 0.9,
                "loss": (0.69 - (0.05 + d) * it) * (3.0 if algorithm == "ipo" else 1.0),
                "pair_accuracy": 0.55 + (0.04 + d) * it,
                "train_steps": 13,
                "trained_pairs": 198,
                "chosen_reward": 0.01 * it,
                "rejected_reward": -0.01 * it,
                "apo_step_norm": 0.4 if algorithm == "apo" else None,
                "time_generate_s": 9.5,
                "time_score_s": 0.4,
                "time_train_s": 21.0,
                "time_sync_s": 0.8,
                "time_eval_s": 2.1,
                "time_total_s": 34.2 + it,
            }
        )
    return rows


def make_run(root: Path, name: str, algorithm: str = "dpo", iterations: int = 6, rho: float = 1.0) -> Path:
    from common.config_files import load_config

    out = root / name
    overrides = [f"output_dir={out}", f"iterations={iterations}", f"algorithm.name={algorithm}"]
    if rho < 1.0:
        overrides += ["selection.mode=lowest_reward", f"selection.rho={rho}"]
    cfg = load_config("configs/demo-cpu.yaml", overrides)
    rd = RunDir(out)
    rd.prepare()
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    for row in metrics_rows(iterations, algorithm, 0.0 if rho == 1.0 else 1 - rho):
        rd.append_metrics(row)
        it = row["iteration"]
        if it:
            rd.append_samples(
                {
                    "iteration": it,
                    "rollout_rewards": [0.1 * (k % 10) + 0.02 * it for k in range(64)],
                    "pair_weights": [0.5 + 0.01 * k for k in range(40)] if algorithm == "wdpo" else None,
                }
            )
        rd.append_samples(
            {
                "iteration": it,
                "eval_rewards": [0.8] * 4,
                "examples": [
                    {"prompt": f"Reverse the word: {w}", "response": w[::-1] if it else w, "reward": 1.0 if it else 0.2}
                    for w in ["apple", "river", "stone|pipe", "lamp"]
                ],
            }
        )
    return out


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts, and whether it sits inside <details>."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.depth_details = 0
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "details":
            self.depth_details += 1
        elif tag == "table":
            self.tables.append({"rows": [], "in_details": self.depth_details > 0})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag == "details":
            self.depth_details -= 1
        elif tag in ("td", "th") and self.cell is not None:
            self.tables[-1]["rows"][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def md_tables(md: str) -> list[list[list[str]]]:
    """The Markdown tables of a document (header row first, separator row dropped)."""
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = []
                tables.append(current)
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        else:
            current = None
    return tables


@pytest.fixture
def run(tmp_path):
    out = make_run(tmp_path, "demo-dpo", "wdpo", iterations=6, rho=0.5)
    write_report(out)
    return out


def test_report_md_leads_with_the_summary_and_the_short_table(run):
    md = (run / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.strip()]
    assert lines[0] == "# onalign run report"
    # two summary lines: start -> final eval reward, best iteration, total generation saved
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "0.781 → 0.845" in lines[1] and "best 0.851 at iteration 5" in lines[1]
    saved = sum(r["generated_tokens_if_all"] - r["generated_tokens"] for r in rows[1:])
    if_all = sum(r["generated_tokens_if_all"] for r in rows[1:])
    assert f"Generation saved: {saved:,.0f} of {if_all:,.0f} tokens ({saved / if_all:.0%})" in lines[2]
    # then one short table, one row per iteration
    first = md_tables(md)[0]
    assert lines[3].startswith("| iteration |")
    assert first[0] == TITLES
    assert [int(r[0]) for r in first[1:]] == [r["iteration"] for r in rows]
    for cells, row in zip(first[1:], rows, strict=True):
        assert float(cells[1]) == pytest.approx(row["eval_reward_mean"], abs=5e-4)
    assert first[1][3] == "-" and first[2][8].endswith("(50%)")  # iteration 0 has no rollouts
    # the full 30-odd columns are not in the Markdown: they are in metrics.csv, linked
    assert not any(len(t[0]) > len(TITLES) for t in md_tables(md))
    assert "[metrics.csv](metrics.csv)" in md


def test_metrics_csv_holds_every_metric_at_full_precision(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    with (run / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    assert list(table[0]) == keys and len(table) == len(rows)
    for got, row in zip(table, rows, strict=True):
        for k in keys:
            v = row.get(k)
            if isinstance(v, float):
                assert float(got[k]) == v
            elif v is None:
                assert got[k] == ""


def test_report_html_shows_the_same_short_table_and_the_full_one_collapsed(run):
    page = (run / "report.html").read_text()
    parser = Tables()
    parser.feed(page)
    first, *_, last = parser.tables
    md_first = md_tables((run / "report.md").read_text())[0]
    assert first["rows"] == md_first and not first["in_details"]  # one table model, two renderings
    assert last["in_details"] and len(last["rows"][0]) == len(
        next(csv.reader((run / "metrics.csv").open()))
    )  # every column, collapsed
    assert page.index("class='summary'") < page.index("<table")
    assert "<details>" in page and "<details open" not in page


def test_summary_lines_on_runs_that_have_not_trained():
    assert summary_lines([], {}) == ["No iteration recorded yet.", "Generation saved: none yet."]
    first, second = summary_lines([{"iteration": 0, "eval_reward_mean": 0.5}], {})
    assert "0.500 at iteration 0" in first and "none yet" in second
    rows = [{"iteration": 0, "eval_reward_mean": 0.5}] + metrics_rows(2, "dpo", 0.0)[1:]
    first, second = summary_lines(rows, {"selection": {"mode": "all", "rho": 1.0}})
    assert "→" in first and "Generation saved: 0 tokens" in second and "regenerates every prompt" in second


def test_comparison_of_three_methods_one_panel_per_metric_runs_named_in_the_legend(tmp_path):
    from pipeline.compare import COMPARED

    runs = [
        make_run(tmp_path, "dpo", "dpo"),
        make_run(tmp_path, "ipo", "ipo"),
        make_run(tmp_path, "optune", "wdpo", rho=0.5),
    ]
    from pipeline.cli import main

    assert main(["report", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "plots" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert all(f"| {name} (" in md for name in ("dpo", "ipo", "optune"))

    import matplotlib.pyplot as plt

    labelled = [
        (f"{p.name} (x)", [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]) for p in runs
    ]
    fig = comparison_figure(labelled)
    try:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in panels] == [t for _, t in COMPARED]
        for ax in panels:
            assert len(ax.get_lines()) == 3  # every run on every metric's panel
            assert ax.get_legend() is None
        # one legend, naming the runs, with a distinct marker and line style per run
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == [label for label, _ in labelled]
        styles = {(line.get_marker(), line.get_linestyle(), line.get_color()) for line in panels[0].get_lines()}
        assert len(styles) == 3
        # the legend sits above the panels, not over a curve
        fig.canvas.draw()
        top_of_panels = max(ax.get_window_extent().y1 for ax in panels)
        assert legend.get_window_extent().y0 >= top_of_panels
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- the page in a browser

CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0, width: i.clientWidth};
  });
  var out = document.createElement('pre');
  out.id = 'onalign-check';
  out.textContent = JSON.stringify({images: imgs, scrollWidth: document.documentElement.scrollWidth,
                                     clientWidth: document.documentElement.clientWidth});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("headless Chromium is not installed (Debian/Ubuntu: apt-get install chromium)")


def browse(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--allow-file-access-from-files",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,2400",
        "--virtual-time-budget=5000",
        *args,
        page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def rendered(page: Path, tmp_path: Path) -> dict:
    """What the page shows at 1280 px: each image loaded or not, and the page's width."""
    probe = page.with_name("_rendered_" + page.name)  # beside the page: the same relative image paths
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    try:
        res = browse(probe, tmp_path, "--dump-dom")
    finally:
        probe.unlink()
    found = re.search(r"<pre id=\"onalign-check\">(.*?)</pre>", res.stdout, re.S)
    assert found, res.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_report_html_renders_in_chromium_at_1280px_with_every_plot_loaded(run, tmp_path):
    from pipeline.report import PLOTS

    page = run / "report.html"
    seen = rendered(page, tmp_path)
    assert sorted(i["src"] for i in seen["images"]) == sorted(f"plots/{p}" for p in PLOTS)
    assert all(i["loaded"] for i in seen["images"]), seen["images"]
    assert all(i["width"] >= 400 for i in seen["images"]), seen["images"]  # plots large enough to read
    assert seen["scrollWidth"] <= seen["clientWidth"]  # no sideways scrolling at 1280 px
    shot = run / "report-1280.png"
    res = browse(page, tmp_path, f"--screenshot={shot}")
    assert shot.is_file() and shot.read_bytes()[:4] == b"\x89PNG", res.stderr[-2000:]


def test_comparison_html_renders_in_chromium_with_its_plot_loaded(tmp_path):
    runs = [make_run(tmp_path, n, a) for n, a in (("dpo", "dpo"), ("ipo", "ipo"), ("apo", "apo"))]
    write_comparison(runs, tmp_path / "cmp")
    seen = rendered(tmp_path / "cmp" / "comparison.html", tmp_path)
    assert [i["src"] for i in seen["images"]] == ["plots/comparison.png"]
    assert all(i["loaded"] for i in seen["images"]) and seen["scrollWidth"] <= seen["clientWidth"]
