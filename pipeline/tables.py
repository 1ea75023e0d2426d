"""Tables the console, the report and the comparison print: the headline columns (one list, one cell
format), and one `Table` rendered to Markdown and to HTML, with the page around it."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass


def num(v) -> float:
    """A metric as a float; NaN where it is missing or not a number."""
    try:
        return float("nan") if v is None or isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        return float("nan")


def total(values) -> float:
    """The sum of the values that are numbers."""
    return sum(x for x in map(num, values) if not math.isnan(x))


def saved_tokens(row: dict) -> float:
    """Tokens the iteration did not generate thanks to prompt selection (0 for iteration 0)."""
    gen, if_all = num(row.get("generated_tokens")), num(row.get("generated_tokens_if_all"))
    return 0.0 if math.isnan(gen) or math.isnan(if_all) else max(if_all - gen, 0.0)


def cell(value, pattern: str) -> str:
    """`value` in `pattern`; "-" where it is missing or NaN, the value as it is where it does not fit."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return pattern.format(value)
    except (TypeError, ValueError):
        return str(value)


@dataclass(frozen=True)
class Column:
    """A headline column: the metric's key, the console's short title, the report's title, the cell format."""

    key: str
    short: str
    title: str
    pattern: str


# what a reader looks at first: the console's row per iteration and the report's short table
HEADLINE = [
    Column("iteration", "it", "iteration", "{}"),
    Column("eval_reward_mean", "eval_reward", "eval reward", "{:.3f}"),
    Column("win_rate_vs_initial", "win_rate", "win rate vs initial", "{:.2f}"),
    Column("reward_mean", "rollout_reward", "rollout reward mean", "{:.3f}"),
    Column("pairs", "pairs", "pairs", "{}"),
    Column("loss", "loss", "loss", "{:.4f}"),
    Column("pair_accuracy", "pair_acc", "pair accuracy", "{:.2f}"),
    Column("generated_tokens", "gen_tokens", "generated tokens", "{:,}"),
    Column("tokens_saved", "gen_saved", "tokens saved", "{}"),
    Column("time_total_s", "time_s", "seconds", "{:.1f}"),
]


def headline_value(row: dict, key: str):
    """A headline column's value in `row` (`tokens_saved` is computed: tokens and share)."""
    if key != "tokens_saved":
        return row.get(key)
    if row.get("generated_tokens_if_all") is None:
        return None
    share = num(row.get("generation_saved_fraction"))
    return f"{saved_tokens(row):,.0f}" + ("" if math.isnan(share) else f" ({share:.0%})")


@dataclass
class Table:
    """Cells already formatted as text; rendered as a Markdown table and as an HTML table from the same
    data. `keys` (optional) are the metric names behind the headers (HTML tooltips); `left` are the
    indices of the columns of text (left-aligned; numbers are right-aligned)."""

    header: list[str]
    rows: list[list[str]]
    keys: list[str] | None = None
    left: tuple[int, ...] = ()

    def markdown(self) -> list[str]:
        def escape(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        align = [":---" if i in self.left else "---:" for i in range(len(self.header))]
        lines = ["| " + " | ".join(map(escape, self.header)) + " |", "|" + "|".join(align) + "|"]
        return lines + ["| " + " | ".join(map(escape, r)) + " |" for r in self.rows]

    def html(self, css_class: str = "") -> str:
        esc = html.escape

        def attrs(i: int) -> str:
            return " class='l'" if i in self.left else ""

        keys = self.keys or [""] * len(self.header)
        head = "".join(
            f"<th{attrs(i)}{f' title={esc(k)!r}' if k else ''}>{esc(h)}</th>"
            for i, (h, k) in enumerate(zip(self.header, keys, strict=True))
        )
        body = "".join(
            "<tr>" + "".join(f"<td{attrs(i)}>{esc(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in self.rows
        )
        cls = f" class='{css_class}'" if css_class else ""
        return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1f2328;margin:0;background:#fff}
main{max-width:1200px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:24px;margin:0 0 8px}h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #d8dee4;padding-bottom:4px}
.summary{font-size:16px;line-height:1.6;margin:8px 0 20px;padding:10px 14px;background:#f6f8fa;border-left:4px solid #2f81f7}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dee4;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f6f8fa;font-weight:600}th.l,td.l{text-align:left;white-space:normal}
tbody tr:nth-child(even){background:#fbfcfd}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:12px}
.plots img{width:100%;height:auto;border:1px solid #d8dee4;border-radius:4px}
.wide{overflow-x:auto;max-width:100%}details{margin-top:32px}summary{cursor:pointer;font-size:16px;font-weight:600}
.examples td{max-width:340px;overflow-wrap:anywhere}code{font-size:13px}.muted{color:#59636e}
"""


def page(title: str, body: list[str]) -> str:
    """A standalone HTML page (the report's style) around `body`."""
    return "\n".join(
        [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>",
            *body,
            "</main></body></html>",
        ]
    )


def headline_cells(row: dict) -> list[str]:
    """`row`'s headline columns as text."""
    return [cell(headline_value(row, c.key), c.pattern) for c in HEADLINE]
