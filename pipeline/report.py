"""Per-iteration reports, rebuilt from the run directory's files alone.

`write_report(run_dir)` reads config.yaml, metrics.jsonl and samples.jsonl and writes report.md,
report.html and plots/*.png beside them. `write_comparison(runs, out)` puts several runs on shared
axes. The driver calls `Reporter.iteration_done` after every iteration; `onalign report` calls the
same functions on finished or interrupted runs.
"""

from __future__ import annotations

import html
import math
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.rundir import RunDir, RunDirError  # noqa: E402

PLOTS = {
    "eval_reward.png": "Eval reward and win rate vs the initial policy",
    "rollout_rewards.png": "Reward distribution of rollouts",
    "loss.png": "Loss and pair accuracy",
    "pair_weights.png": "wDPO pair weights",
    "tokens.png": "Generated vs saved tokens (OPTune selection)",
    "time.png": "Time per iteration",
}
TIME_KEYS = ["time_generate_s", "time_score_s", "time_train_s", "time_sync_s", "time_eval_s"]


def _num(v) -> float:
    try:
        return float("nan") if v is None or isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        return float("nan")


def _total(values) -> float:
    return sum(x for x in map(_num, values) if not math.isnan(x))


def _get(tree, *keys: str, default=None):
    """tree[k1][k2]...: `default` where a level is missing or not a mapping."""
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return default
        tree = tree[k]
    return tree


def _out_dir(path: str | os.PathLike) -> Path:
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


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


@contextmanager
def _figure(path: Path, title: str):
    """One small PNG: yields the axes, then titles, lays out, saves and closes the figure."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    try:
        yield ax
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _plots(rows: list[dict], samples: list[dict], plot_dir: Path, algorithm: str) -> None:
    plot_dir.mkdir(parents=True, exist_ok=True)
    its = [r["iteration"] for r in rows]
    train_rows = [r for r in rows if r["iteration"] > 0]
    tits = [r["iteration"] for r in train_rows]

    with _figure(plot_dir / "eval_reward.png", "Eval reward per iteration") as ax:
        ax.plot(its, [_num(r.get("eval_reward_mean")) for r in rows], "o-", label="eval reward (greedy)")
        ax.plot(its, [_num(r.get("win_rate_vs_initial")) for r in rows], "s--", label="win rate vs initial")
        ax.set_xlabel("iteration")
        ax.set_xticks(its)
        ax.legend(fontsize=8)

    with _figure(plot_dir / "rollout_rewards.png", "Rollout reward distribution") as ax:
        dist = [(s["iteration"], s["rollout_rewards"]) for s in samples if s.get("rollout_rewards")]
        if dist:
            ax.violinplot([d for _, d in dist], positions=[i for i, _ in dist], showmeans=True)
            ax.set_xlabel("iteration")
            ax.set_ylabel("reward")
        else:
            _empty(ax, "no rollouts yet")

    with _figure(plot_dir / "loss.png", "Loss and pair accuracy") as ax:
        if any(r.get("loss") is not None for r in train_rows):
            ax.plot(tits, [_num(r.get("loss")) for r in train_rows], "o-", label="loss")
            ax2 = ax.twinx()
            ax2.plot(tits, [_num(r.get("pair_accuracy")) for r in train_rows], "s--", color="C1", label="pair accuracy")
            ax2.set_ylim(0, 1.05)
            ax.set_xlabel("iteration")
            ax.legend(loc="upper left", fontsize=8)
            ax2.legend(loc="upper right", fontsize=8)
        else:
            _empty(ax, "no training step yet")

    with _figure(plot_dir / "pair_weights.png", "wDPO pair weights") as ax:
        weights = [(s["iteration"], s["pair_weights"]) for s in samples if s.get("pair_weights")]
        for it, w in weights:
            ax.hist(w, bins=20, alpha=0.5, label=f"iter {it}")
        if weights:
            ax.set_xlabel("pair weight g(beta2 * reward gap)")
            ax.legend(fontsize=8)
        else:
            _empty(ax, f"no pair weights: algorithm '{algorithm}' is not wdpo")

    with _figure(plot_dir / "tokens.png", "Generated vs saved tokens") as ax:
        if train_rows:
            gen = [_num(r.get("generated_tokens")) for r in train_rows]
            saved = [max(_num(r.get("generated_tokens_if_all")) - g, 0.0) for r, g in zip(train_rows, gen, strict=True)]
            ax.bar(tits, gen, label="generated")
            ax.bar(tits, saved, bottom=gen, label="saved by selection", color="C2")
            ax.set_xlabel("iteration")
            ax.set_ylabel("tokens")
            ax.legend(fontsize=8)
        else:
            _empty(ax, "no rollouts yet")

    with _figure(plot_dir / "time.png", "Time breakdown") as ax:
        if train_rows:
            bottom = [0.0] * len(train_rows)
            for key in TIME_KEYS:
                vals = [_num(r.get(key)) if r.get(key) is not None else 0.0 for r in train_rows]
                ax.bar(tits, vals, bottom=bottom, label=key.removeprefix("time_").removesuffix("_s"))
                bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
            ax.set_xlabel("iteration")
            ax.set_ylabel("seconds")
            ax.legend(fontsize=8)
        else:
            _empty(ax, "no iteration yet")


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _summary(cfg: dict) -> list[tuple[str, str]]:
    def g(*keys: str):
        return _get(cfg, *keys)

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
    """Rebuild report.md, report.html and plots/ from the run's files; returns the HTML path. A missing or
    damaged run directory is a RunDirError naming the file (and line)."""
    rd = open_run(run_dir)
    cfg = rd.read_config() or {}
    rows, samples, changes = rd.read_metrics(), rd.read_samples(), rd.read_config_changes()
    out = _out_dir(out_dir or rd.root)
    try:
        return _write_report(rd, cfg, rows, samples, changes, out)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RunDirError(
            f"cannot build the report of '{rd.where}': a row of metrics.jsonl, samples.jsonl or "
            f"config_changes.jsonl holds an unexpected value ({type(e).__name__}: {e})"
        ) from None


def _write_report(rd: RunDir, cfg: dict, rows: list[dict], samples: list[dict], changes: list[dict], out: Path) -> Path:
    algorithm = _get(cfg, "algorithm", "name", default="?")
    _plots(rows, samples, out / "plots", algorithm)
    cols = _columns(rows)
    summary = _summary(cfg)
    examples = _examples(samples)
    changed = [
        (c["iteration"], k, old, new)
        for c in changes
        for k, (old, new) in (c.get("changes") or {}).items()
        if isinstance(c.get("changes"), dict)
    ]

    md = ["# onalign run report", "", f"Run directory: `{rd.root}`", ""]
    md += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary] + [""]
    if changed:
        md += ["Settings changed on resume:", ""]
        md += [f"- from iteration {it}: {k} {old!r} -> {new!r}" for it, k, old, new in changed] + [""]
    md += ["## Metrics per iteration", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows] + [""]
    md += ["## Plots", ""] + [f"![{title}](plots/{name})" for name, title in PLOTS.items()] + [""]
    if examples:
        md += [
            "## Eval examples: initial vs latest policy",
            "",
            "| prompt | initial | reward | latest | reward |",
            "|---|---|---|---|---|",
        ]
        md += [
            f"| {e['prompt']} | {e['initial']!r} | {e['initial_reward']:.3f} | {e['latest']!r} | "
            f"{e['latest_reward']:.3f} |"
            for e in examples
        ]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    esc = html.escape
    h = [
        "<!doctype html><html><head><meta charset='utf-8'><title>onalign report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{margin:4px}</style></head><body>",
        "<h1>onalign run report</h1>",
        f"<p>Run directory: <code>{esc(str(rd.root))}</code></p><table>",
    ]
    h += [f"<tr><th>{esc(k)}</th><td style='text-align:left'>{esc(v)}</td></tr>" for k, v in summary]
    h += ["</table>"]
    if changed:
        h += ["<p>Settings changed on resume:</p><ul>"]
        h += [
            f"<li>from iteration {it}: {esc(k)} {esc(repr(old))} &rarr; {esc(repr(new))}</li>"
            for it, k, old, new in changed
        ]
        h += ["</ul>"]
    h += ["<h2>Metrics per iteration</h2><table><tr>"] + [f"<th>{esc(c)}</th>" for c in cols] + ["</tr>"]
    for r in rows:
        h += ["<tr>"] + [f"<td>{esc(_fmt(r.get(c)))}</td>" for c in cols] + ["</tr>"]
    h += ["</table><h2>Plots</h2>"]
    h += [f"<img src='plots/{name}' alt='{esc(title)}' title='{esc(title)}'>" for name, title in PLOTS.items()]
    if examples:
        h += [
            "<h2>Eval examples: initial vs latest policy</h2><table><tr><th>prompt</th><th>initial</th>"
            "<th>reward</th><th>latest</th><th>reward</th></tr>"
        ]
        h += [
            f"<tr><td>{esc(e['prompt'])}</td><td>{esc(e['initial'])}</td><td>{e['initial_reward']:.3f}</td>"
            f"<td>{esc(e['latest'])}</td><td>{e['latest_reward']:.3f}</td></tr>"
            for e in examples
        ]
        h += ["</table>"]
    h += ["</body></html>"]
    path = out / "report.html"
    path.write_text("\n".join(h), encoding="utf-8")
    return path


def write_comparison(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Several runs (methods, rho values) on shared axes: eval reward, win rate and generated tokens."""
    runs = []
    for d in run_dirs:  # every run is read (and a missing or damaged one refused) before anything is written
        rd = open_run(d)
        cfg = rd.read_config() or {}
        label = f"{rd.root.name} ({_get(cfg, 'algorithm', 'name', default='?')}, "
        label += f"{_get(cfg, 'selection', 'mode', default='?')} rho={_get(cfg, 'selection', 'rho', default='?')})"
        runs.append((label, rd.read_metrics()))
    out = _out_dir(out_dir)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, rows in runs:
        its = [r["iteration"] for r in rows]
        axes[0].plot(its, [_num(r.get("eval_reward_mean")) for r in rows], "o-", label=label)
        axes[1].plot(its, [_num(r.get("win_rate_vs_initial")) for r in rows], "o-", label=label)
        tr = [r for r in rows if r["iteration"] > 0]
        cum, total = [], 0.0
        for r in tr:
            total += _total([r.get("generated_tokens")])
            cum.append(total)
        axes[2].plot([r["iteration"] for r in tr], cum, "o-", label=label)
    for ax, title in zip(axes, ["eval reward", "win rate vs initial", "cumulative generated tokens"], strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "plots" / "comparison.png", dpi=100)
    plt.close(fig)
    md = [
        "# onalign comparison",
        "",
        "| run | iterations | final eval reward | final win rate | generated tokens |",
        "|---|---|---|---|---|",
    ]
    for label, rows in runs:
        last = rows[-1] if rows else {}
        tokens = _total(r.get("generated_tokens") for r in rows if r["iteration"] > 0)
        md.append(
            f"| {label} | {last.get('iteration', 0)} | {_fmt(last.get('eval_reward_mean'))} | "
            f"{_fmt(last.get('win_rate_vs_initial'))} | {int(tokens)} |"
        )
    md += ["", "![comparison](plots/comparison.png)"]
    (out / "comparison.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    body = "\n".join(md[:-1]).replace("\n", "<br>\n")
    (out / "comparison.html").write_text(
        f"<!doctype html><html><body><pre>{html.escape(body)}</pre><img src='plots/comparison.png'></body></html>",
        encoding="utf-8",
    )
    return out / "comparison.md"


class Reporter:
    """What the driver calls after each iteration: console row, report rewrite, TensorBoard scalars."""

    def __init__(self, rundir: RunDir, cfg, console) -> None:
        self.rundir, self.console = rundir, console
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(rundir.root / "tensorboard"))
        self.wandb = _init_wandb(rundir, cfg, console) if cfg.wandb else None

    def iteration_done(self, row: dict) -> None:
        self.console.iteration_done(row)
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["iteration"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["iteration"])
        write_report(self.rundir.root)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(rundir: RunDir, cfg, console):
    """A W&B run in `OUTPUT_DIR/wandb/`, offline unless WANDB_MODE says otherwise; a resumed run keeps
    its W&B id (stored in `OUTPUT_DIR/wandb_id`), so `wandb sync` joins the pieces into one run."""
    try:
        import wandb
    except ImportError:
        console.log("wandb=true but wandb is not installed (pip install wandb); skipping W&B logging")
        return None
    id_file = rundir.root / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(
        dir=str(rundir.root),
        project=cfg.wandb_project,
        name=rundir.root.name,
        id=run_id,
        resume="allow",
        mode=os.environ.get("WANDB_MODE", "offline"),
        config=cfg.model_dump(mode="json"),
        settings=wandb.Settings(quiet=True),
    )
