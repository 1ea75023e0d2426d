"""Per-iteration reports, rebuilt from the run directory's files alone.

`write_report(run_dir)` reads config.yaml, metrics.jsonl and samples.jsonl and writes report.md,
report.html, metrics.csv and plots/*.png beside them. The report leads with a two-line summary and the
short per-iteration table (one `Table`, rendered to Markdown and to HTML); every metric follows in a
collapsed section of the HTML and in metrics.csv. The driver rewrites it after every iteration
(`pipeline.sinks`); `onalign report` calls the same function on finished or interrupted runs
(`pipeline.compare` puts several runs on shared axes).
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.metrics import TIMESTAMPS  # noqa: E402
from pipeline.rundir import RunDir, RunDirError  # noqa: E402
from pipeline.tables import HEADLINE, Table, headline_cells, num, page, saved_tokens, total  # noqa: E402

PLOTS = {
    "eval_reward.png": "Eval reward and win rate vs the initial policy",
    "rollout_rewards.png": "Reward distribution of rollouts",
    "loss.png": "Loss and pair accuracy",
    "pair_weights.png": "wDPO pair weights",
    "tokens.png": "Generated vs saved tokens (OPTune selection)",
    "time.png": "Time per iteration",
}
TIME_KEYS = ["time_generate_s", "time_score_s", "time_train_s", "time_sync_s", "time_eval_s"]


def config_value(tree, *keys: str, default=None):
    """tree[k1][k2]...: `default` where a level is missing or not a mapping."""
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return default
        tree = tree[k]
    return tree


def report_dir(path: str | os.PathLike) -> Path:
    out = Path(path)
    try:
        (out / "plots").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"cannot write the report to '{out}' ({e.strerror or e}); choose another with --out"
        ) from None
    return out


def open_run(run_dir: str | os.PathLike) -> RunDir:
    """A run directory that exists and holds a run: anything else is one clear error, nothing is created."""
    rd = RunDir(run_dir)
    where = f"'{rd.where}'" + (f" (local copy {rd.root})" if rd.url else "")
    if not rd.root.exists():
        raise RunDirError(f"run directory {where} does not exist")
    if not rd.root.is_dir():
        raise RunDirError(f"{where} is not a directory; give the run directory (the one holding metrics.jsonl)")
    if not rd.metrics_path.exists() and not rd.config_path.exists():
        raise RunDirError(f"{where} holds no run (no metrics.jsonl or config.yaml)")
    return rd


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def empty_axes(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


@contextmanager
def _figure(path: Path, title: str):
    """One PNG (750 x 480 px, shown about 580 px wide in report.html): yields the axes, then titles, lays
    out, saves and closes the figure."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    try:
        yield ax
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_axisbelow(True)
        fig.tight_layout()
        fig.savefig(path, dpi=150)
    finally:
        plt.close(fig)


def _legend_below(ax, handles=None, labels=None) -> None:
    """The legend in one row under the axes, where it covers no data."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    ax.legend(
        handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(handles), fontsize=8, frameon=False
    )


def _violins(ax, dist: list[tuple[int, list[float]]], ylabel: str) -> None:
    """One distribution per iteration (mean marked)."""
    ax.violinplot([d for _, d in dist], positions=[i for i, _ in dist], showmeans=True)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_xticks([i for i, _ in dist])


def _plots(rows: list[dict], samples: list[dict], plot_dir: Path, algorithm: str) -> None:
    plot_dir.mkdir(parents=True, exist_ok=True)
    its = [r["iteration"] for r in rows]
    train_rows = [r for r in rows if r["iteration"] > 0]
    tits = [r["iteration"] for r in train_rows]

    with _figure(plot_dir / "eval_reward.png", "Eval reward per iteration") as ax:
        ax.plot(its, [num(r.get("eval_reward_mean")) for r in rows], "o-", label="eval reward (greedy)")
        ax.plot(its, [num(r.get("win_rate_vs_initial")) for r in rows], "s--", label="win rate vs initial")
        ax.set_xlabel("iteration")
        ax.set_xticks(its)
        _legend_below(ax)

    with _figure(plot_dir / "rollout_rewards.png", "Rollout reward distribution") as ax:
        dist = [(s["iteration"], s["rollout_rewards"]) for s in samples if s.get("rollout_rewards")]
        if dist:
            _violins(ax, dist, "reward")
        else:
            empty_axes(ax, "no rollouts yet")

    with _figure(plot_dir / "loss.png", "Loss and pair accuracy") as ax:
        if any(r.get("loss") is not None for r in train_rows):
            ax.plot(tits, [num(r.get("loss")) for r in train_rows], "o-", label="loss (left axis)")
            ax2 = ax.twinx()
            ax2.plot(
                tits,
                [num(r.get("pair_accuracy")) for r in train_rows],
                "s--",
                color="C1",
                label="pair accuracy (right axis)",
            )
            ax2.set_ylim(0, 1.05)
            ax.set_xlabel("iteration")
            ax.set_xticks(tits)
            (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
            _legend_below(ax, h1 + h2, l1 + l2)
        else:
            empty_axes(ax, "no training step yet")

    with _figure(plot_dir / "pair_weights.png", "wDPO pair weights") as ax:
        weights = [(s["iteration"], s["pair_weights"]) for s in samples if s.get("pair_weights")]
        if weights:
            _violins(ax, weights, "weight g(beta2 * reward gap)")
        else:
            empty_axes(ax, f"no pair weights: algorithm '{algorithm}' is not wdpo")

    with _figure(plot_dir / "tokens.png", "Generated vs saved tokens") as ax:
        if train_rows:
            gen = [num(r.get("generated_tokens")) for r in train_rows]
            saved = [saved_tokens(r) for r in train_rows]
            ax.bar(tits, gen, label="generated")
            ax.bar(tits, saved, bottom=gen, label="saved by selection", color="C2")
            ax.set_xlabel("iteration")
            ax.set_ylabel("tokens")
            ax.set_xticks(tits)
            _legend_below(ax)
        else:
            empty_axes(ax, "no rollouts yet")

    with _figure(plot_dir / "time.png", "Time per iteration") as ax:
        if train_rows:
            bottom = [0.0] * len(train_rows)
            for key in TIME_KEYS:
                vals = [num(r.get(key)) if r.get(key) is not None else 0.0 for r in train_rows]
                ax.bar(tits, vals, bottom=bottom, label=key.removeprefix("time_").removesuffix("_s"))
                bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
            ax.set_xlabel("iteration")
            ax.set_ylabel("seconds")
            ax.set_xticks(tits)
            _legend_below(ax)
        else:
            empty_axes(ax, "no iteration yet")


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


# ---------------------------------------------------------------- one table model, two renderings


def headline_table(rows: list[dict]) -> Table:
    return Table(
        header=[c.title for c in HEADLINE], rows=[headline_cells(r) for r in rows], keys=[c.key for c in HEADLINE]
    )


def full_table(rows: list[dict]) -> Table:
    cols = [c for c in _columns(rows) if c not in TIMESTAMPS]
    return Table(header=cols, rows=[[_fmt(r.get(c)) for c in cols] for r in rows], keys=cols)


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    """Every metric of every iteration, full precision (lists and mappings as JSON)."""
    cols = _columns(rows)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(
                ["" if r.get(c) is None else json.dumps(r[c]) if isinstance(r[c], list | dict) else r[c] for c in cols]
            )


def summary_lines(rows: list[dict], cfg: dict) -> list[str]:
    """The report's two opening lines: eval reward from start to end (and its best iteration), and the
    generation that prompt selection saved."""
    evals = [(r["iteration"], num(r.get("eval_reward_mean"))) for r in rows]
    evals = [(i, v) for i, v in evals if not math.isnan(v)]
    if not evals:
        return ["No iteration recorded yet.", "Generation saved: none yet."]
    (i0, start), (i1, final) = evals[0], evals[-1]
    best_it, best = max(evals, key=lambda e: e[1])
    if i1 == i0:
        first = f"Eval reward {start:.3f} at iteration {i0}; no training iteration recorded yet."
    else:
        first = (
            f"Eval reward {start:.3f} → {final:.3f} ({final - start:+.3f}) from iteration {i0} to {i1}; "
            f"best {best:.3f} at iteration {best_it}."
        )
    trained = [r for r in rows if r["iteration"] > 0]
    saved = sum(saved_tokens(r) for r in trained)
    if_all = total(r.get("generated_tokens_if_all") for r in trained)
    generated = total(r.get("generated_tokens") for r in trained)
    mode, rho = (
        config_value(cfg, "selection", "mode", default="all"),
        config_value(cfg, "selection", "rho", default=1.0),
    )
    if not trained:
        second = "Generation saved: none yet (no training iteration)."
    elif mode == "all" and not saved:
        second = (
            f"Generation saved: 0 tokens; selection.mode=all regenerates every prompt ({generated:,.0f} generated)."
        )
    else:
        share = f" ({saved / if_all:.0%})" if if_all else ""
        second = (
            f"Generation saved: {saved:,.0f} of {if_all:,.0f} tokens{share} by prompt selection ({mode}, rho={rho})."
        )
    return [first, second]


def sync_line(rows: list[dict]) -> str | None:
    """What the per-iteration sync check (`sync_logp_max_abs_diff`) found, or None where it never ran."""
    gaps = [(r["iteration"], num(r.get("sync_logp_max_abs_diff"))) for r in rows if r["iteration"] > 0]
    checked = [(i, g) for i, g in gaps if not math.isnan(g)]
    if not checked:
        return None
    worst_it, worst = max(checked, key=lambda e: e[1])
    return (
        f"Weight sync checked in {len(checked)} of {len(gaps)} iterations: the engine sampled from the trainers' "
        f"weights (log-probs within {worst:.1e} per token, largest at iteration {worst_it})."
    )


def _examples_table(examples: list[dict]) -> Table:
    return Table(
        header=["prompt", "initial", "reward", "latest", "reward"],
        rows=[
            [
                e["prompt"],
                repr(e["initial"]),
                f"{e['initial_reward']:.3f}",
                repr(e["latest"]),
                f"{e['latest_reward']:.3f}",
            ]
            for e in examples
        ],
        left=(0, 1, 3),
    )


# ---------------------------------------------------------------- pages


def run_name(rd: RunDir) -> str:
    return rd.where.rstrip("/").rsplit("/", 1)[-1]


def _summary(cfg: dict) -> list[tuple[str, str]]:
    def g(*keys: str):
        return config_value(cfg, *keys)

    return [
        ("model", str(g("model", "path"))),
        (
            "reward",
            f"{g('reward', 'kind')}: {g('reward', 'function') if g('reward', 'kind') == 'function' else g('reward', 'model_path') or g('reward', 'url')}",
        ),
        (
            "algorithm",
            f"{g('algorithm', 'name')} (beta={g('algorithm', 'beta')}, nll_coef={g('algorithm', 'nll_coef')}, reference={g('algorithm', 'reference')})",
        ),
        ("selection", f"{g('selection', 'mode')} (rho={g('selection', 'rho')})"),
        ("iterations", str(g("iterations"))),
        (
            "rollout",
            f"n={g('rollout', 'n_samples')}, T={g('rollout', 'temperature')}, max_new_tokens={g('rollout', 'max_new_tokens')}",
        ),
        (
            "training",
            f"ZeRO-{g('train', 'zero_stage')}, {g('train', 'num_workers')} ranks, lr={g('train', 'lr')}, epochs={g('train', 'epochs')}",
        ),
    ]


def _examples(samples: list[dict]) -> list[dict]:
    """Initial vs latest eval answers for the first few eval prompts."""
    evals = [s for s in samples if s.get("examples")]
    if not evals:
        return []
    first, last = evals[0], evals[-1]
    return [
        {
            "prompt": a["prompt"],
            "initial": a["response"],
            "initial_reward": a["reward"],
            "latest": b["response"],
            "latest_reward": b["reward"],
            "latest_iteration": last["iteration"],
        }
        for a, b in zip(first["examples"], last["examples"], strict=False)
    ]


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Rebuild report.md, report.html, metrics.csv and plots/ from the run's files; returns the HTML path.
    A missing or damaged run directory is a RunDirError naming the file (and line)."""
    rd = open_run(run_dir)
    cfg = rd.read_config() or {}
    rows, samples, changes = rd.read_metrics(), rd.read_samples(), rd.read_config_changes()
    out = report_dir(out_dir or rd.root)
    try:
        return _write_report(rd, cfg, rows, samples, changes, out)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RunDirError(
            f"cannot build the report of '{rd.where}': a row of metrics.jsonl, samples.jsonl or "
            f"config_changes.jsonl holds an unexpected value ({type(e).__name__}: {e})"
        ) from None


def _write_report(rd: RunDir, cfg: dict, rows: list[dict], samples: list[dict], changes: list[dict], out: Path) -> Path:
    algorithm = config_value(cfg, "algorithm", "name", default="?")
    _plots(rows, samples, out / "plots", algorithm)
    write_metrics_csv(rows, out / "metrics.csv")
    name = run_name(rd)
    lines = summary_lines(rows, cfg)
    lines += [line] if (line := sync_line(rows)) else []
    short, full = headline_table(rows), full_table(rows)
    settings = Table(header=["setting", "value"], rows=[list(kv) for kv in _summary(cfg)], left=(0, 1))
    examples = _examples(samples)
    changed = [
        (c["iteration"], k, old, new)
        for c in changes
        for k, (old, new) in (c.get("changes") or {}).items()
        if isinstance(c.get("changes"), dict)
    ]
    latest = examples[0]["latest_iteration"] if examples else None

    md = ["# onalign run report", ""]  # no run name: a report rebuilt from a copy of the run reads the same
    md += [f"**{lines[0]}**", ""] + [x for line in lines[1:] for x in (line, "")]
    md += short.markdown() + [""]
    md += [f"All {len(full.header)} metrics of every iteration: [metrics.csv](metrics.csv).", ""]
    md += ["## Plots", ""] + [f"![{title}](plots/{p})" for p, title in PLOTS.items()] + [""]
    if examples:
        md += [f"## Eval examples: initial vs latest policy (iteration {latest})", ""]
        md += _examples_table(examples).markdown() + [""]
    md += ["## Run settings", "", f"Run directory: `{rd.where}`", ""] + settings.markdown() + [""]
    if changed:
        md += ["Settings changed on resume:", ""]
        md += [f"- from iteration {it}: {k} {old!r} -> {new!r}" for it, k, old, new in changed] + [""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")

    esc = html.escape
    h = [f"<h1>onalign run report <span class='muted'>{esc(name)}</span></h1>"]
    h += [f"<p class='summary'><strong>{esc(lines[0])}</strong><br>{'<br>'.join(map(esc, lines[1:]))}</p>"]
    h += ["<div class='wide'>", short.html("headline"), "</div>"]
    h += ["<h2>Plots</h2><div class='plots'>"]
    h += [f"<img src='plots/{p}' alt='{esc(title)}' title='{esc(title)}'>" for p, title in PLOTS.items()]
    h += ["</div>"]
    if examples:
        h += [f"<h2>Eval examples: initial vs latest policy (iteration {latest})</h2>"]
        h += [_examples_table(examples).html("examples")]
    h += ["<h2>Run settings</h2>", f"<p>Run directory: <code>{esc(rd.where)}</code></p>", settings.html()]
    if changed:
        h += ["<p>Settings changed on resume:</p><ul>"]
        h += [
            f"<li>from iteration {it}: {esc(k)} {esc(repr(old))} &rarr; {esc(repr(new))}</li>"
            for it, k, old, new in changed
        ]
        h += ["</ul>"]
    h += [
        f"<details><summary>All {len(full.header)} metrics per iteration</summary>",
        "<p class='muted'>Also in <a href='metrics.csv'>metrics.csv</a> (full precision) and metrics.jsonl.</p>",
        "<div class='wide'>",
        full.html("full"),
        "</div></details>",
    ]
    path = out / "report.html"
    path.write_text(page(f"onalign report: {name}", h), encoding="utf-8")
    return path
