"""The Pareto front's table and pictures: ranks, the table, ``pareto.png`` and ``pareto.html``.

Pure functions: :func:`rank_trials` ranks a results frame, :func:`front_metrics` sums it up,
:func:`front_table` adds run ids and links, and the tracker uploads to the parent run what
:func:`write_front_files` writes: besides ``pareto.png`` (the default pair, see :func:`_axes`),
one ``pareto-<y>-vs-<x>.png`` per pair of the spec's objectives (:func:`objective_pairs`: 3
objectives give 3 pictures), each showing the whole front projected onto that pair.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from search.rundir.layout import PARETO_FILE
from search.rundir.pareto import front_indices, hypervolume_2d, pareto_ranks
from search.tracking.store import run_url

FRONT_FILES = (PARETO_FILE, "pareto.png", "pareto.html")  # the parent run's front artifacts


def rank_trials(df_all: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """Rows with finite objectives, with a ``pareto_rank`` column (0 = front)."""
    cols = list(objectives)
    missing = [c for c in ["trial_key", *cols] if c not in df_all.columns]
    if missing:
        raise ValueError(f"df_all lacks columns {missing}: has {list(df_all.columns)}")
    df = df_all.copy()
    for c in cols:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df = df[df[cols].notna().all(axis=1)].reset_index(drop=True)
    df["trial_key"] = df["trial_key"].astype(str)
    points = df[cols].to_numpy(dtype=float).tolist()
    df["pareto_rank"] = pareto_ranks(points, [objectives[c] for c in cols]) if points else []
    return df


def front_metrics(ranked: pd.DataFrame, front: set[str], counters: Mapping[str, float], *,
                  max_params_ref: float | None) -> dict[str, float]:
    """The parent run's front metrics: ``counters``, ``front_size`` and ``hypervolume`` (error
    vs parameters, with ``max_params_ref`` as the parameter reference)."""
    values = {**counters, "front_size": len(front)}
    if {"val_accuracy", "nonzero_params"} <= set(ranked.columns):
        values["hypervolume"] = hypervolume_2d(
            (1.0 - ranked["val_accuracy"]).tolist(), ranked["nonzero_params"].tolist(),
            max_params_ref=max_params_ref)
    return values


def front_table(ranked: pd.DataFrame, front: set[str], *, objectives: Mapping[str, str],
                names: Mapping[str, str], run_ids: Mapping[str, str], ui_url: str,
                experiment_id: str | None) -> pd.DataFrame:
    """Every ranked trial with its run id, UI link, arch string and ``on_front`` flag.

    ``names``/``run_ids``: trial key -> child run name (``ArchConfig.canonical()``) / run id.
    """
    rows = []
    for rec in ranked.to_dict("records"):
        key = rec["trial_key"]
        run_id = run_ids.get(key, "")
        rows.append({
            "trial_key": key,
            "pareto_rank": int(rec["pareto_rank"]),
            **{c: rec[c] for c in ("val_accuracy", "val_accuracy_se", "test_accuracy",
                                   "nonzero_params", "macs", *objectives) if c in rec},
            "arch": names.get(key) or str(rec.get("arch", key)),
            "run_id": run_id,
            "url": run_url(ui_url, experiment_id, run_id) if run_id else "",
            "on_front": key in front,
        })
    columns = ["trial_key", "pareto_rank", "val_accuracy", "nonzero_params", "arch",
               "run_id", "url", "on_front"]
    # An empty table keeps on_front boolean: table[table["on_front"]] on an empty object column
    # would select columns, not rows (a search stopped before any trial finished).
    table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns).astype({"on_front": bool})
    x_col = _axes(objectives)[1]
    return table.sort_values(["pareto_rank", x_col], kind="stable").reset_index(drop=True)


def objective_pairs(objectives: Mapping[str, str]) -> list[tuple[str, str]]:
    """(y, x) for every pair of objectives, in the spec's order; a maximised one goes up when
    the pair mixes directions (int8_accuracy vs flash_bytes), else the first one does."""
    pairs = []
    for a, b in itertools.combinations(objectives, 2):
        pairs.append((b, a) if objectives[a] == "min" and objectives[b] == "max" else (a, b))
    return pairs


def pair_file(y_col: str, x_col: str) -> str:
    """The parent run's artifact name of the (y, x) front picture."""
    return f"pareto-{y_col}-vs-{x_col}.png"


def write_front_files(table: pd.DataFrame, out: Path, *, objectives: Mapping[str, str],
                      title: str) -> list[Path]:
    """pareto.csv (the front's rows), pareto.png, pareto.html and one
    ``pareto-<y>-vs-<x>.png`` per objective pair in folder ``out``."""
    csv, png, page = (out / name for name in FRONT_FILES)
    table[table["on_front"]].drop(columns="on_front").to_csv(csv, index=False)
    render_png(table, png, objectives=objectives, title=title)
    page.write_text(render_html(table, objectives=objectives, title=title))
    pairs = [out / pair_file(y, x) for y, x in objective_pairs(objectives)]
    for path, axes in zip(pairs, objective_pairs(objectives), strict=True):
        render_png(table, path, objectives=objectives, title=title, axes=axes)
    return [csv, png, page, *pairs]


def render_png(table: pd.DataFrame, path: Path, *, objectives: Mapping[str, str],
               title: str, axes: tuple[str, str] | None = None) -> None:
    """``axes`` (y, x), default :func:`_axes`: every trial in grey, the front in red, its
    members that no other member beats on this pair joined as a staircase; x on a log scale
    when it is a minimised, positive quantity (parameters, bytes, MACs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    y_col, x_col = axes or _axes(objectives)
    x_mode = objectives.get(x_col, "min")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    try:
        if len(table):
            rest = table[~table["on_front"]]
            front = table[table["on_front"]].sort_values(x_col)
            ax.scatter(rest[x_col], rest[y_col], s=18, c="#9aa5b1", label="trials")
            # With 3+ objectives a projected front is no staircase: join the pair's own best.
            pts = front[[y_col, x_col]].to_numpy(dtype=float).tolist()
            best = front.iloc[front_indices(pts, [objectives.get(y_col, "max"), x_mode])] \
                if pts else front
            # The attainment line: across then up/down when x is minimised, else the reverse.
            ax.step(best[x_col], best[y_col], where="post" if x_mode == "min" else "pre",
                    c="#d1495b", lw=1.2)
            ax.scatter(front[x_col], front[y_col], s=36, c="#d1495b", zorder=3,
                       label=f"Pareto front ({len(front)})")
            if x_mode == "min" and (table[x_col] > 0).all():
                ax.set_xscale("log")
                label = FuncFormatter(lambda v, _pos: _fmt(v))  # 2k, not 2x10^3
                ax.xaxis.set_major_formatter(label)
                # Label minor ticks only when there are too few decades for majors, and then
                # only 2, 3 and 5 x 10^k unless the span is tiny (6..9 crowd on a log axis).
                span = table[x_col].max() / table[x_col].min()

                def minor(v: float, _pos: int) -> str:
                    lead = round(v / 10 ** math.floor(math.log10(v)))
                    return _fmt(v) if span < 4 or lead in (2, 3, 5) else ""

                ax.xaxis.set_minor_formatter(FuncFormatter(minor) if span < 20
                                             else NullFormatter())
            ax.legend(loc="best")
        ax.set_xlabel(x_col)
        ax.set_ylabel(y_col)
        over = f", front over {', '.join(objectives)}" if len(objectives) > 2 else ""
        ax.set_title(f"{title}: {len(table)} trials{over}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _axes(objectives: Mapping[str, str]) -> tuple[str, str]:
    """(y, x): the first maximised objective up, the first minimised one across."""
    y = next((k for k, s in objectives.items() if s == "max"), "val_accuracy")
    x = next((k for k, s in objectives.items() if s == "min"), "nonzero_params")
    return y, x


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks covering [lo, hi] on a log axis (few enough to label)."""
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            t = m * 10.0**e
            if lo <= t <= hi:
                ticks.append(t)
    if len(ticks) > 8:
        ticks = [t for t in ticks if str(t).startswith("1")]
    return ticks or [lo, hi]


def _fmt(v: float) -> str:
    return f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"


def render_html(table: pd.DataFrame, *, objectives: Mapping[str, str], title: str) -> str:
    """A self-contained page: inline SVG scatter (hover: arch and metrics; click: the run)."""
    y_col, x_col = _axes(objectives)
    w, h, ml, mr, mt, mb = 900, 520, 70, 20, 30, 50
    xs = table[x_col].astype(float).tolist() if len(table) else [1.0]
    ys = table[y_col].astype(float).tolist() if len(table) else [0.0]
    log_x = min(xs) > 0
    fx = math.log10 if log_x else float
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    pad = (x_hi - x_lo) * 0.05 or 0.5
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_lo, y_hi = min(ys), max(ys)
    ypad = (y_hi - y_lo) * 0.08 or 0.05
    y_lo, y_hi = y_lo - ypad, y_hi + ypad

    def px(v: float) -> float:
        return ml + (fx(v) - x_lo) / (x_hi - x_lo) * (w - ml - mr)

    def py(v: float) -> float:
        return mt + (y_hi - v) / (y_hi - y_lo) * (h - mt - mb)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
           f'<rect x="{ml}" y="{mt}" width="{w - ml - mr}" height="{h - mt - mb}" '
           'fill="none" stroke="#ccc"/>']
    x_ticks = _log_ticks(10**x_lo, 10**x_hi) if log_x else [
        x_lo + i * (x_hi - x_lo) / 5 for i in range(6)]
    for t in x_ticks:
        x = px(t)
        svg.append(f'<line x1="{x:.1f}" y1="{mt}" x2="{x:.1f}" y2="{h - mb}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{h - mb + 16}" text-anchor="middle">{_fmt(t)}</text>')
    for i in range(6):
        t = y_lo + i * (y_hi - y_lo) / 5
        y = py(t)
        svg.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{w - mr}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{t:.3f}</text>')
    svg.append(f'<text x="{(w + ml) / 2}" y="{h - 12}" text-anchor="middle">'
               f'{html.escape(x_col)}{" (log)" if log_x else ""}</text>'
               f'<text x="16" y="{(h - mb) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(h - mb) / 2})">{html.escape(y_col)}</text>')
    front = table[table["on_front"]].sort_values(x_col) if len(table) else table
    if len(front) > 1:
        pts = []
        for a, b in zip(front.to_dict("records"), front.to_dict("records")[1:], strict=False):
            pts += [f"{px(a[x_col]):.1f},{py(a[y_col]):.1f}", f"{px(b[x_col]):.1f},{py(a[y_col]):.1f}"]
        last = front.iloc[-1]
        pts.append(f"{px(last[x_col]):.1f},{py(last[y_col]):.1f}")
        svg.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="#d1495b"/>')
    for rec in sorted(table.to_dict("records"), key=lambda r: r["on_front"]):  # front on top
        tip = "\n".join([rec["arch"], f"{y_col} {rec[y_col]:.4f}", f"{x_col} {rec[x_col]:,.0f}",
                         f"pareto rank {rec['pareto_rank']}", f"trial {rec['trial_key']}"])
        dot = (f'<circle class="{"front" if rec["on_front"] else "trial"}" '
               f'cx="{px(rec[x_col]):.1f}" cy="{py(rec[y_col]):.1f}" '
               f'r="{5 if rec["on_front"] else 3.5}"><title>{html.escape(tip)}</title></circle>')
        if rec["url"]:
            dot = f'<a href="{html.escape(rec["url"])}" target="_blank" rel="noopener">{dot}</a>'
        svg.append(dot)
    svg.append("</svg>")
    rows = "".join(
        f'<tr><td>{_fmt_cell(r.get(y_col))}</td><td>{_fmt_cell(r.get("test_accuracy"))}</td>'
        f'<td>{_fmt_cell(r.get(x_col))}</td><td>{_fmt_cell(r.get("macs"))}</td>'
        f'<td><a href="{html.escape(r["url"])}" target="_blank" rel="noopener">'
        f'<code>{html.escape(r["arch"])}</code></a></td></tr>'
        for r in front.to_dict("records"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}: Pareto front</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #1f272d; }}
circle.trial {{ fill: #9aa5b1; }} circle.front {{ fill: #d1495b; }}
circle:hover {{ stroke: #1f272d; stroke-width: 2; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }}
td:last-child {{ text-align: left; }}
</style></head><body>
<h2>{html.escape(title)}: {len(front)} on the Pareto front of {len(table)} trials</h2>
<p>Hover a point for its architecture; click it to open its MLflow run.</p>
{"".join(svg)}
<table><tr><th>{html.escape(y_col)}</th><th>test_accuracy</th><th>{html.escape(x_col)}</th><th>macs</th><th style="text-align:left">architecture (MLflow run)</th></tr>
{rows}</table>
</body></html>
"""


def _fmt_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and v <= 1.0:
        return f"{v:.4f}"
    return f"{v:,.0f}" if isinstance(v, (int, float)) else html.escape(str(v))
