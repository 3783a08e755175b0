"""The self-contained HTML page: token spans coloured by S and by PGPO weight, legend, SVG plots."""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .common import (BINS_PER_DECADE, LOG_FLOOR, MISSING_COLOR, S_COLOR, W_HIGH_COLOR, W_LOW_COLOR, _hex,
                     _text_color, score_rgb, weight_rgb)


CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 1.5em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta, .note { color: #555; font-size: .9em; }
table.stats { border-collapse: collapse; font-size: .9em; }
table.stats td, table.stats th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
.legend { display: flex; gap: 3em; flex-wrap: wrap; font-size: .85em; }
.legend .bar { width: 320px; height: 14px; border: 1px solid #999; }
.legend .ticks { width: 320px; display: flex; justify-content: space-between; color: #444; }
.plots { display: flex; gap: 1.5em; flex-wrap: wrap; }
svg text { font-family: system-ui, sans-serif; font-size: 11px; fill: #333; }
.card { border: 1px solid #ddd; border-left: 5px solid #bbb; border-radius: 4px; padding: .5em .8em;
        margin: .8em 0; }
.card.pos { border-left-color: #1a9850; } .card.neg { border-left-color: #d73027; }
.card .head { font-size: .88em; color: #333; margin-bottom: .3em; }
.card .qa { font-size: .82em; color: #555; margin-bottom: .4em; white-space: pre-wrap; }
.row { display: flex; align-items: baseline; gap: .6em; margin: .15em 0; }
.row .label { flex: 0 0 4.2em; font-size: .75em; color: #666; text-align: right; }
.row .toks { flex: 1; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
             line-height: 1.75; white-space: pre-wrap; word-break: break-all; }
.tok { border-radius: 2px; padding: 1px 0; }
.tok .mark { opacity: .6; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(x: Optional[float], spec: str = ".3g") -> str:
    return "null" if x is None else format(x, spec)


def _token_html(tok: str) -> str:
    """A token's visible text: escaped, with newlines, tabs and CR made visible (a newline still breaks the row)."""
    if tok == "":
        return '<span class="mark">\u2205</span>'
    text = html.escape(tok, quote=True)
    return (text.replace("\r", '<span class="mark">\u240d</span>').replace("\t", '<span class="mark">\u2192</span>\t')
            .replace("\n", '<span class="mark">\u21b5</span>\n'))


def _span(tok: str, tid: int, position: int, s: Optional[float], w: Optional[float],
          rgb: Tuple[int, int, int]) -> str:
    title = f"{tok!r}\nS = {s!r}\nweight = {w!r}\ntoken id = {tid}\nposition = {position}"
    return (f'<span class="tok" style="background:{_hex(rgb)};color:{_text_color(rgb)}" '
            f'title="{_esc(title).replace(chr(10), "&#10;")}">{_token_html(tok)}</span>')


SEP = " \u00b7 "


def _response_card(number: int, record: Dict[str, Any], lo: float, hi: float, w_max: float) -> str:
    tokens, ids, scores, weights = record["tokens"], record["token_ids"], record["scores"], record["weights"]
    advantage = record.get("group_advantage")
    kind = "pos" if advantage and advantage > 0 else "neg" if advantage and advantage < 0 else "zero"
    head = [f"#{number}", f"step {record['step']}", f"prompt {record['prompt_index']}",
            f"reward {_fmt(record.get('reward'))} (accuracy {_fmt(record.get('accuracy'), 'g')}, "
            f"format {_fmt(record.get('format'), 'g')})",
            f"advantage {_fmt(advantage, '+.4g')}", f"{len(tokens)} tokens"]
    finite = [(s, t) for t, s in enumerate(scores) if s is not None]
    if finite:
        s_top, t_top = max(finite)
        head.append(f"max S {s_top:.3g} at {tokens[t_top]!r}")
    qa = f"question: {record.get('question') or '(none)'}"
    if len(qa) > 600:
        qa = qa[:600] + " \u2026"
    qa += f"\ngold answer: {record.get('answer')}"
    rows = []
    for label, colors in (("S", [score_rgb(s, lo, hi) for s in scores]),
                          ("weight", [weight_rgb(w, w_max) for w in weights])):
        spans = "".join(_span(tokens[t], ids[t], t, scores[t], weights[t], colors[t]) for t in range(len(tokens)))
        rows.append(f'<div class="row {label}"><div class="label">{label}</div>'
                    f'<div class="toks">{spans or "(empty response)"}</div></div>')
    return (f'<div class="card {kind}"><div class="head">{_esc(SEP.join(head))}</div>'
            f'<div class="qa">{_esc(qa)}</div>{"".join(rows)}</div>')


def _legend(lo: float, hi: float, w_max: float) -> str:
    s_ticks = [max(10 ** (lo + (hi - lo) * k / 4) - LOG_FLOOR, 0.0) for k in range(5)]
    s_bar = f"linear-gradient(to right, #ffffff, {_hex(S_COLOR)})"
    one = 100.0 / w_max if w_max > 1 else 100.0
    w_bar = (f"linear-gradient(to right, {_hex(W_LOW_COLOR)} 0%, #ffffff {one:.2f}%, "
             f"{_hex(W_HIGH_COLOR)} 100%)")
    w_ticks = [0.0, 1.0, w_max] if w_max > 1 else [0.0, 1.0]
    return (
        '<div class="legend">'
        f'<div><b>S</b> (log scale, this page\'s range)<div class="bar" style="background:{s_bar}"></div>'
        f'<div class="ticks">{"".join(f"<span>{v:.2g}</span>" for v in s_ticks)}</div></div>'
        f'<div><b>PGPO weight</b> (blue &lt; 1 suppressed, red &gt; 1 boosted)'
        f'<div class="bar" style="background:{w_bar}"></div>'
        f'<div class="ticks">{"".join(f"<span>{v:.3g}</span>" for v in w_ticks)}</div></div>'
        f'<div><span class="tok" style="background:{_hex(MISSING_COLOR)}">grey</span>: null (non-finite) value</div>'
        '</div>')


def _svg_histogram(edges: List[float], counts: List[int], median_log: Optional[float]) -> str:
    width, height, left, right, top, bottom = 680, 250, 55, 15, 15, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi = edges[0], edges[-1]
    peak = max(max(counts), 1)
    x = lambda v: left + (v - lo) / (hi - lo) * plot_w  # noqa: E731
    parts = [f'<svg class="histogram" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for a, b, n in zip(edges, edges[1:], counts):
        h = n / peak * plot_h
        parts.append(f'<rect class="bin" data-count="{n}" x="{x(a):.1f}" y="{top + plot_h - h:.1f}" '
                     f'width="{max(x(b) - x(a) - 1, 1):.1f}" height="{h:.1f}" fill="{_hex(S_COLOR)}">'
                     f'<title>log10(S+1e-8) in [{a:g}, {b:g}): {n} tokens</title></rect>')
    base = top + plot_h
    parts.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#333"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#333"/>')
    for decade in range(int(lo), int(hi) + 1):
        parts.append(f'<line x1="{x(decade):.1f}" y1="{base}" x2="{x(decade):.1f}" y2="{base + 4}" stroke="#333"/>'
                     f'<text x="{x(decade):.1f}" y="{base + 16}" text-anchor="middle">1e{decade}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{peak}</text>'
                 f'<text x="{left - 6}" y="{base}" text-anchor="end">0</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">'
                 f'S + 1e-8 (log scale)</text>')
    parts.append(f'<text transform="translate(14,{top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 f'tokens</text>')
    if median_log is not None:
        parts.append(f'<line x1="{x(median_log):.1f}" y1="{top}" x2="{x(median_log):.1f}" y2="{base}" '
                     f'stroke="#e08214" stroke-dasharray="4 3"><title>median S</title></line>'
                     f'<text x="{x(median_log) + 4:.1f}" y="{top + 10}" fill="#e08214">median</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_series(title: str, series: List[Tuple[str, str, List[Tuple[int, float]]]], marked_steps: List[int]) -> str:
    """A small line plot: ``series`` = [(label, colour, [(step, value), ...]), ...] sharing one y axis."""
    width, height, left, right, top, bottom = 360, 200, 55, 12, 24, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    points = [p for _, _, pts in series for p in pts]
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_hi = y_lo + 1.0
    x = lambda v: left + (v - x_lo) / (x_hi - x_lo) * plot_w  # noqa: E731
    y = lambda v: top + plot_h - (v - y_lo) / (y_hi - y_lo) * plot_h  # noqa: E731
    base = top + plot_h
    parts = [f'<svg class="metric" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{left}" y="14" style="font-weight:600">{_esc(title)}</text>',
             f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#333"/>',
             f'<text x="{left - 5}" y="{top + 8}" text-anchor="end">{y_hi:.3g}</text>',
             f'<text x="{left - 5}" y="{base}" text-anchor="end">{y_lo:.3g}</text>',
             f'<text x="{left}" y="{base + 14}" text-anchor="middle">{x_lo}</text>',
             f'<text x="{left + plot_w}" y="{base + 14}" text-anchor="middle">{x_hi}</text>',
             f'<text x="{left + plot_w / 2}" y="{base + 28}" text-anchor="middle">step</text>']
    for step in marked_steps:
        if x_lo <= step <= x_hi:
            parts.append(f'<line x1="{x(step):.1f}" y1="{top}" x2="{x(step):.1f}" y2="{base}" stroke="#999" '
                         f'stroke-dasharray="3 3"><title>shown step {step}</title></line>')
    for k, (label, color, pts) in enumerate(series):
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        if len(pts) <= 60:
            parts.extend(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2" fill="{color}">'
                         f'<title>step {s}: {_esc(label)} = {v:.4g}</title></circle>' for s, v in pts)
        parts.append(f'<text x="{left + plot_w}" y="{top + 12 * k}" text-anchor="end" fill="{color}">'
                     f'{_esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


METRIC_PLOTS = (
    ("mean visual dependency S", [("vd/score_mean", "train", "#54278f")]),
    ("accuracy", [("reward/accuracy", "train", "#1a9850"), ("eval/accuracy", "held-out", "#e08214")]),
)


#: Colours of the per-benchmark series (``eval/<name>/avg@k``), in order of appearance.
BENCHMARK_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


def _metric_panels(metrics: Dict[str, List[Tuple[int, float]]]) -> List[Tuple[str, List[Tuple[str, str, list]]]]:
    panels = []
    for title, wanted in METRIC_PLOTS:
        series = [(label, color, metrics[key]) for key, label, color in wanted if metrics.get(key)]
        if series:
            panels.append((title, series))
    benchmarks = sorted(k for k in metrics if k.startswith("eval/") and "/avg@" in k and metrics[k])
    if benchmarks:
        panels.append(("benchmarks (avg@k)", [(key.split("/")[1], BENCHMARK_COLOURS[i % len(BENCHMARK_COLOURS)],
                                              metrics[key]) for i, key in enumerate(benchmarks)]))
    return panels


def _render_html(run_dir: str, steps: List[int], records: List[Dict[str, Any]], shown: List[Dict[str, Any]],
                 edges: List[float], counts: List[int], stats: Dict[str, float], lo: float, hi: float,
                 w_max: float, metrics: Dict[str, List[Tuple[int, float]]], num_tokens: int,
                 num_null: int) -> str:
    step_text = ", ".join(map(str, steps)) if len(steps) <= 12 else f"{steps[0]} to {steps[-1]} ({len(steps)} steps)"
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             f"<title>Visual dependency \u2014 {_esc(Path(run_dir).name)} step {_esc(step_text)}</title>",
             f"<style>{CSS}</style></head><body>",
             "<h1>Visual dependency of response tokens</h1>",
             f'<p class="meta">run {_esc(Path(run_dir).resolve())} \u00b7 step {_esc(step_text)} \u00b7 '
             f"{len(records)} responses, {num_tokens} tokens"
             + (f" ({num_null} with a null S)" if num_null else "") + "</p>",
             '<p class="note">S<sub>t</sub> = KL(policy with the image \u2016 policy without it) at response token '
             "t, under the policy that sampled the responses. PGPO gives each token the weight w<sub>t</sub> "
             "(a response's weights sum to its length) and the advantage w<sub>t</sub> \u00d7 the response's "
             "group advantage. Hover a token for its exact values.</p>",
             "<h2>Summary</h2><table class=\"stats\"><tr>"
             + "".join(f"<th>{h}</th>" for h in ("min S", "median", "90 %", "99 %", "max", "mean",
                                                  "share of \u03a3S in the top 10 % tokens",
                                                  "mean weight of the top 10 % tokens"))
             + "</tr><tr>"
             + "".join(f"<td>{stats[k]:.3g}</td>" for k in ("min", "median", "p90", "p99", "max", "mean",
                                                             "top10_share", "top10_weight"))
             + "</tr></table>",
             "<h2>Distribution of S over all response tokens</h2>",
             f'<p class="note">{sum(counts)} tokens, {BINS_PER_DECADE} bins per decade of S + 1e-8 '
             "(S = 0 falls at 1e-8).</p>",
             _svg_histogram(edges, counts, math.log10(stats["median"] + LOG_FLOOR))]
    panels = _metric_panels(metrics)
    if panels:
        parts.append("<h2>Over training (metrics.jsonl)</h2><div class=\"plots\">")
        parts.extend(_svg_series(title, series, steps) for title, series in panels)
        parts.append("</div>")
    parts.append(f"<h2>Responses ({len(shown)} of {len(records)})</h2>")
    parts.append(_legend(lo, hi, w_max))
    if len(steps) > 1:
        parts.append('<p class="note">Newest step first.</p>')
    parts.extend(_response_card(i + 1, record, lo, hi, w_max) for i, record in enumerate(shown))
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------- PNG
