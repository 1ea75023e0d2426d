"""Several runs on shared axes (`onalign report RUN RUN ... --out DIR`): one panel per metric in
plots/comparison.png, and a table of each run's start, final and best eval reward and its generation."""

from __future__ import annotations

import math
import os
from pathlib import Path

from pipeline.report import config_value, empty_axes, open_run, plt, report_dir, run_name
from pipeline.tables import Table, cell, num, page, saved_tokens, total

# (metric, panel title): one panel per metric in comparison.png
COMPARED = [
    ("eval_reward_mean", "Eval reward (greedy, held-out prompts)"),
    ("win_rate_vs_initial", "Win rate vs the initial policy"),
    ("reward_mean", "Rollout reward mean"),
    ("loss", "Training loss"),
    ("pair_accuracy", "Pair accuracy"),
    ("cumulative_generated_tokens", "Generated tokens, cumulative"),
]
STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    if key == "cumulative_generated_tokens":
        tr = [r for r in rows if r["iteration"] > 0]
        cum, running = [], 0.0
        for r in tr:
            running += total([r.get("generated_tokens")])
            cum.append(running)
        return [r["iteration"] for r in tr], cum
    pts = [(r["iteration"], num(r.get(key))) for r in rows]
    pts = [(i, v) for i, v in pts if not math.isnan(v)]
    return [i for i, _ in pts], [v for _, v in pts]


def comparison_figure(runs: list[tuple[str, list[dict]]]):
    """One panel per metric, the runs told apart by colour, marker and line style, one legend of the runs'
    names above the panels. Returns the matplotlib figure (the caller saves and closes it)."""
    ncols = 3
    nrows = math.ceil(len(COMPARED) / ncols)
    legend_rows = math.ceil(len(runs) / ncols) or 1
    top = 0.1 + 0.25 * legend_rows  # inches above the panels for the legend
    height = 3.2 * nrows + top
    fig, axes = plt.subplots(nrows, ncols, figsize=(13, height), squeeze=False)
    for ax, (key, title) in zip(axes.flat, COMPARED, strict=False):
        drawn = False
        for n, (label, rows) in enumerate(runs):
            x, y = _series(rows, key)
            marker, style = STYLES[n % len(STYLES)]
            if x:
                # later runs drawn thinner and smaller: a run hidden under another's equal values still shows
                size, width = max(7.0 - 1.2 * n, 3.0), max(2.2 - 0.4 * n, 1.0)
                ax.plot(
                    x, y, marker=marker, linestyle=style, color=f"C{n}", label=label, markersize=size, linewidth=width
                )
                drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if not drawn:
            empty_axes(ax, "no values")
    for ax in list(axes.flat)[len(COMPARED) :]:
        ax.set_visible(False)
    handles = [
        plt.Line2D([], [], color=f"C{n}", marker=STYLES[n % len(STYLES)][0], linestyle=STYLES[n % len(STYLES)][1])
        for n in range(len(runs))
    ]
    fig.legend(
        handles,
        [label for label, _ in runs],
        loc="upper center",
        ncol=min(len(runs), ncols) or 1,
        fontsize=9,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - top / height))
    return fig


def write_comparison(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Several runs (methods, rho values) on shared axes, one panel per metric, the runs named in the legend."""
    runs = []
    for d in run_dirs:  # every run is read (and a missing or damaged one refused) before anything is written
        rd = open_run(d)
        cfg = rd.read_config() or {}
        label = f"{run_name(rd)} ({config_value(cfg, 'algorithm', 'name', default='?')}, "
        label += f"{config_value(cfg, 'selection', 'mode', default='?')} rho={config_value(cfg, 'selection', 'rho', default='?')})"
        runs.append((label, rd.read_metrics()))
    out = report_dir(out_dir)
    fig = comparison_figure(runs)
    try:
        fig.savefig(out / "plots" / "comparison.png", dpi=110)
    finally:
        plt.close(fig)
    table = Table(
        header=["run", "iterations", "start eval reward", "final eval reward", "best (iteration)", "final win rate"]
        + ["generated tokens", "tokens saved"],
        rows=[],
        left=(0,),
    )
    for label, rows in runs:
        last = rows[-1] if rows else {}
        evals = [(r["iteration"], num(r.get("eval_reward_mean"))) for r in rows]
        evals = [e for e in evals if not math.isnan(e[1])]
        best = max(evals, key=lambda e: e[1]) if evals else None
        trained = [r for r in rows if r["iteration"] > 0]
        table.rows.append(
            [
                label,
                str(last.get("iteration", 0)),
                cell(evals[0][1] if evals else None, "{:.3f}"),
                cell(last.get("eval_reward_mean"), "{:.3f}"),
                f"{best[1]:.3f} ({best[0]})" if best else "-",
                cell(last.get("win_rate_vs_initial"), "{:.2f}"),
                f"{total(r.get('generated_tokens') for r in trained):,.0f}",
                f"{sum(saved_tokens(r) for r in trained):,.0f}",
            ]
        )
    md = ["# onalign comparison", ""] + table.markdown() + ["", "![comparison](plots/comparison.png)", ""]
    (out / "comparison.md").write_text("\n".join(md), encoding="utf-8")
    body = [
        "<h1>onalign comparison</h1>",
        "<div class='wide'>",
        table.html(),
        "</div>",
        "<h2>Per iteration</h2>",
        "<img src='plots/comparison.png' alt='the runs compared, one panel per metric' style='width:100%'>",
    ]
    (out / "comparison.html").write_text(page("onalign comparison", body), encoding="utf-8")
    return out / "comparison.md"
