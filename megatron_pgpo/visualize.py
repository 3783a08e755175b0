"""`megatron-pgpo visualize`: which response tokens depend on the image, and what PGPO made of it.

Reads the per-token sample records a run writes every ``logging.samples_every`` steps
(``RUN_DIR/samples/step_*.jsonl``, see ``trainer/samples_log.py``) and ``RUN_DIR/metrics.jsonl`` if present, and
writes two files:

- ``OUT/visual_dependency.html``, one self-contained page (inline CSS and SVG; no JavaScript, no network):
  summary statistics of S; the distribution of ``log10(S + 1e-8)`` over every response token of the chosen
  steps (the analogue of the paper's Figure 2a); mean S and accuracy over training steps (from the metrics);
  then sample responses, each shown twice, token by token: coloured by S (white -> purple, on a log scale
  shared by the whole page) and by its PGPO weight (blue below 1 = suppressed, white at 1, red above 1 =
  boosted). Hovering a token shows its exact S, weight, token id and position.
- ``OUT/visual_dependency.png`` (matplotlib, Agg): the same histogram, the metrics when present, and a strip of a
  few responses' tokens coloured by S and by weight.

By default the latest step with samples is shown; ``steps`` picks others (several, or ``"all"``).
"""
from __future__ import annotations

import html
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .trainer.samples_log import read_sample_records, sample_steps, samples_dir, samples_path

#: Added to S before log10, so S = 0 maps to -8 (the histogram's and the colour scale's floor).
LOG_FLOOR = 1e-8
#: Histogram bins per decade of S.
BINS_PER_DECADE = 4

S_COLOR = (84, 39, 143)      # purple: the most image-dependent token
W_LOW_COLOR = (33, 102, 172)   # blue: weight 0 (fully suppressed)
W_HIGH_COLOR = (178, 24, 43)   # red: the largest weight on the page (boosted)
MISSING_COLOR = (200, 200, 200)  # a null (non-finite) value

NO_SAMPLES_HINT = ("train with logging.samples_every > 0 (every that many steps the run writes "
                   "RUN_DIR/samples/step_NNNNNNNN.jsonl), then run `megatron-pgpo visualize RUN_DIR` again")


class VisualizationError(RuntimeError):
    """A problem with the run directory or the arguments, worded for the user."""


@dataclass
class VisualizationResult:
    html_path: Path
    png_path: Optional[Path]
    steps: List[int]
    num_responses: int
    num_shown: int
    num_tokens: int
    hist_edges: List[float]                   # log10(S + 1e-8) bin edges, len(hist_counts) + 1
    hist_counts: List[int]                    # tokens per bin; they add up to the tokens with a finite S
    s_stats: Dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- colour scales

def log_score(s: float) -> float:
    return math.log10(max(s, 0.0) + LOG_FLOOR)


def _lerp_from_white(color: Tuple[int, int, int], level: float) -> Tuple[int, int, int]:
    level = min(max(level, 0.0), 1.0)
    return tuple(int(round(255 + (c - 255) * level)) for c in color)


def score_level(s: Optional[float], lo: float, hi: float) -> float:
    """Position of ``log10(S + 1e-8)`` on the page's scale ``[lo, hi]``, in [0, 1] (0 for a null S)."""
    if s is None or hi <= lo:
        return 0.0
    return min(max((log_score(s) - lo) / (hi - lo), 0.0), 1.0)


def score_rgb(s: Optional[float], lo: float, hi: float) -> Tuple[int, int, int]:
    """White (S at the page's minimum) to purple (its maximum), monotone in S."""
    return MISSING_COLOR if s is None else _lerp_from_white(S_COLOR, score_level(s, lo, hi))


def weight_rgb(w: Optional[float], w_max: float) -> Tuple[int, int, int]:
    """Diverging around 1.0: blue for w < 1 (full at 0), white at 1, red for w > 1 (full at ``w_max``)."""
    if w is None:
        return MISSING_COLOR
    if w < 1.0:
        return _lerp_from_white(W_LOW_COLOR, 1.0 - w)
    return _lerp_from_white(W_HIGH_COLOR, (w - 1.0) / (w_max - 1.0) if w_max > 1.0 else 0.0)


def _hex(rgb: Tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _text_color(rgb: Tuple[int, int, int]) -> str:
    return "#fff" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 140 else "#111"


# ------------------------------------------------------------------------------------------------------ data

def _choose_steps(run_dir: str, steps: Union[None, str, int, Sequence[int]]) -> List[int]:
    if not Path(run_dir).is_dir():
        raise VisualizationError(f"run directory {run_dir} does not exist")
    available = sample_steps(run_dir)
    if not available:
        raise VisualizationError(f"no sample records in {samples_dir(run_dir)}: {NO_SAMPLES_HINT}")
    if steps is None or steps == "last":
        nonempty = [s for s in available if samples_path(run_dir, s).stat().st_size > 0]
        if not nonempty:
            raise VisualizationError(f"the sample files in {samples_dir(run_dir)} hold no responses: {NO_SAMPLES_HINT}")
        return [nonempty[-1]]
    if steps == "all":
        return available
    chosen = [int(steps)] if isinstance(steps, int) else sorted({int(s) for s in steps})
    missing = [s for s in chosen if s not in available]
    if missing:
        raise VisualizationError(f"no samples for step {', '.join(map(str, missing))} in {samples_dir(run_dir)}; "
                                 f"steps with samples: {', '.join(map(str, available))}")
    return chosen


def read_metrics_series(run_dir: str) -> Dict[str, List[Tuple[int, float]]]:
    """``metrics.jsonl`` as ``{key: [(step, value), ...]}`` (null values and unreadable lines skipped)."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    series: Dict[str, List[Tuple[int, float]]] = {}
    if not path.exists():
        return series
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def score_histogram(scores: Sequence[float]) -> Tuple[List[float], List[int]]:
    """Counts of ``log10(S + 1e-8)`` in bins of a quarter decade spanning whole decades around the data."""
    import numpy as np

    logs = np.array([log_score(s) for s in scores], dtype=np.float64)
    lo = math.floor(logs.min()) if logs.size else -8
    hi = max(math.ceil(logs.max()) if logs.size else 0, lo + 1)
    edges = np.linspace(lo, hi, (hi - lo) * BINS_PER_DECADE + 1)
    counts, _ = np.histogram(logs, bins=edges)
    return edges.tolist(), [int(c) for c in counts]


def _quantile(sorted_values: List[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    below = int(math.floor(pos))
    above = min(below + 1, len(sorted_values) - 1)
    return sorted_values[below] + (sorted_values[above] - sorted_values[below]) * (pos - below)


def _score_stats(scores: List[float], weights: List[Optional[float]]) -> Dict[str, float]:
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranked = [scores[i] for i in order]
    stats = {"min": ranked[0], "median": _quantile(ranked, 0.5), "p90": _quantile(ranked, 0.9),
             "p99": _quantile(ranked, 0.99), "max": ranked[-1], "mean": sum(ranked) / len(ranked)}
    top = order[len(order) - max(1, len(order) // 10):]
    total = sum(ranked)
    stats["top10_share"] = sum(scores[i] for i in top) / total if total > 0 else float("nan")
    top_weights = [weights[i] for i in top if weights[i] is not None]
    stats["top10_weight"] = sum(top_weights) / len(top_weights) if top_weights else float("nan")
    return stats


# ------------------------------------------------------------------------------------------------------ HTML

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


def _metric_panels(metrics: Dict[str, List[Tuple[int, float]]]) -> List[Tuple[str, List[Tuple[str, str, list]]]]:
    panels = []
    for title, wanted in METRIC_PLOTS:
        series = [(label, color, metrics[key]) for key, label, color in wanted if metrics.get(key)]
        if series:
            panels.append((title, series))
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

def _plain(tok: str, width: int = 6) -> str:
    text = tok.replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "\u240d")
    text = "".join(ch if ch.isprintable() else "\u00b7" for ch in text) or "\u2205"
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def _strip_window(record: Dict[str, Any], size: int) -> range:
    """``size`` token positions around the response's highest-S token."""
    n = len(record["tokens"])
    finite = [(s, t) for t, s in enumerate(record["scores"]) if s is not None]
    centre = max(finite)[1] if finite else 0
    start = min(max(centre - size // 2, 0), max(n - size, 0))
    return range(start, min(start + size, n))


def _render_png(path: Path, edges: List[float], counts: List[int], panels, steps: List[int],
                strip: List[Dict[str, Any]], lo: float, hi: float, w_max: float, window: int = 36) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    strip_rows = 3 * len(strip)
    fig = plt.figure(figsize=(13, 3.6 + 0.42 * strip_rows), dpi=110)
    grid = fig.add_gridspec(2 if strip else 1, 2 if panels else 1, height_ratios=[3.2, 0.42 * strip_rows]
                            if strip else None, hspace=0.3, wspace=0.25)
    ax = fig.add_subplot(grid[0, 0])
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=np.array(S_COLOR) / 255,
           edgecolor="white", linewidth=0.5)
    ax.set_xlabel("log10(S + 1e-8)")
    ax.set_ylabel("tokens")
    ax.set_title(f"Token visual dependency: {sum(counts)} tokens, step "
                 f"{steps[0] if len(steps) == 1 else f'{steps[0]}-{steps[-1]}'}", fontsize=10)
    if panels:
        ax_m = fig.add_subplot(grid[0, 1])
        title, series = panels[0]
        for label, color, pts in series:
            ax_m.plot([p[0] for p in pts], [p[1] for p in pts], color=color, label=f"{title} ({label})")
        ax_m.set_xlabel("step")
        ax_m.set_ylabel(title, fontsize=8)
        if len(panels) > 1:
            twin = ax_m.twinx()
            title2, series2 = panels[1]
            for label, color, pts in series2:
                twin.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linestyle="--",
                          label=f"{title2} ({label})")
            twin.set_ylabel(title2, fontsize=8)
            handles = ax_m.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            ax_m.legend(handles=handles, fontsize=7, loc="upper left")
        else:
            ax_m.legend(fontsize=7, loc="upper left")
        for step in steps:
            ax_m.axvline(step, color="#999", linestyle=":", linewidth=1)
        ax_m.set_title("over training (metrics.jsonl)", fontsize=10)
    if strip:
        ax_s = fig.add_subplot(grid[1, :])
        image = np.ones((strip_rows, window, 3))
        labels = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # glyphs missing from the default font
            for k, record in enumerate(strip):
                positions = _strip_window(record, window)
                for row, color_of in ((3 * k, lambda t: score_rgb(record["scores"][t], lo, hi)),
                                      (3 * k + 1, lambda t: weight_rgb(record["weights"][t], w_max))):
                    for col, t in enumerate(positions):
                        rgb = color_of(t)
                        image[row, col] = np.array(rgb) / 255
                        ax_s.text(col, row, _plain(record["tokens"][t]), ha="center", va="center", fontsize=5.5,
                                  color=_text_color(rgb), parse_math=False)
                labels.append((3 * k, f"#{k + 1} S (adv {record['group_advantage']:+.2f}, from token "
                                      f"{positions.start})" if record["group_advantage"] is not None
                               else f"#{k + 1} S"))
                labels.append((3 * k + 1, f"#{k + 1} weight"))
        ax_s.imshow(image, aspect="auto", interpolation="nearest")
        ax_s.set_yticks([r for r, _ in labels], [text for _, text in labels], fontsize=7)
        ax_s.set_xticks([])
        ax_s.set_title("tokens around each response's highest-S token: coloured by S (white -> purple, log scale) "
                       "and by PGPO weight (blue < 1 < red)", fontsize=9)
        for spine in ax_s.spines.values():
            spine.set_visible(False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ entry point

def visualize(run_dir: str, out_dir: Optional[str] = None, steps: Union[None, str, int, Sequence[int]] = None,
              max_responses: int = 24, png: bool = True, strip_responses: int = 4) -> VisualizationResult:
    """Write ``visual_dependency.html`` (and ``.png``) for the chosen steps of a run; see the module docstring.

    Args:
        run_dir: the run directory (``trainer.run_dir``) holding ``samples/`` and optionally ``metrics.jsonl``.
        out_dir: where to write (default ``RUN_DIR/visualization``).
        steps: None or ``"last"`` (the latest step with samples), ``"all"``, one step or a list of steps.
        max_responses: responses shown token by token (newest step first, in file order within a step); the
            histogram and statistics always cover every response of the chosen steps.
        png: also write the PNG (needs matplotlib).
        strip_responses: responses in the PNG's token strip (those with a nonzero advantage first).

    Raises ``VisualizationError`` with a message for the user when there is nothing to show.
    """
    if max_responses < 0:
        raise VisualizationError(f"max_responses must be >= 0, got {max_responses}")
    chosen = _choose_steps(run_dir, steps)
    records = [r for s in chosen for r in read_sample_records(run_dir, s)]
    if not records:
        raise VisualizationError(f"step {', '.join(map(str, chosen))} has no responses in {samples_dir(run_dir)}")
    all_scores = [s for r in records for s in r["scores"]]
    all_weights = [w for r in records for w in r["weights"]]
    finite = [(s, w) for s, w in zip(all_scores, all_weights) if s is not None]
    if not finite:
        raise VisualizationError(f"no token of step {', '.join(map(str, chosen))} has a score (all are null or "
                                 "the responses are empty)")
    scores = [s for s, _ in finite]
    edges, counts = score_histogram(scores)
    stats = _score_stats(scores, [w for _, w in finite])
    lo, hi = log_score(min(scores)), log_score(max(scores))
    w_max = max([w for w in all_weights if w is not None] + [1.0])

    newest_first = sorted(range(len(records)), key=lambda i: -records[i]["step"])  # stable: file order kept
    shown = [records[i] for i in newest_first[:max_responses]]
    metrics = read_metrics_series(run_dir)

    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "visualization"
    out.mkdir(parents=True, exist_ok=True)
    html_path = out / "visual_dependency.html"
    html_path.write_text(_render_html(run_dir, chosen, records, shown, edges, counts, stats, lo, hi, w_max, metrics,
                                      len(all_scores), len(all_scores) - len(scores)), encoding="utf-8")
    png_path = None
    if png:
        candidates = [r for r in shown if r["tokens"]]
        strip = ([r for r in candidates if r.get("group_advantage")] + [r for r in candidates
                                                                         if not r.get("group_advantage")])
        png_path = out / "visual_dependency.png"
        _render_png(png_path, edges, counts, _metric_panels(metrics), chosen, strip[:strip_responses], lo, hi,
                    w_max)
    return VisualizationResult(html_path=html_path, png_path=png_path, steps=chosen, num_responses=len(records),
                               num_shown=len(shown), num_tokens=len(all_scores), hist_edges=edges,
                               hist_counts=counts, s_stats=stats)


def visualize_command(run_dir: str, out_dir: Optional[str], steps, max_responses: int, png: bool = True) -> int:
    """The CLI's body: run ``visualize`` and print what was written (errors become a one-line message)."""
    try:
        result = visualize(run_dir, out_dir, steps, max_responses, png=png)
    except VisualizationError as exc:
        raise SystemExit(f"error: {exc}") from None
    except ImportError as exc:
        raise SystemExit(f"error: {exc}; install matplotlib or pass --no-png for the HTML page only") from None
    st = result.s_stats
    print(f"step {', '.join(map(str, result.steps))}: {result.num_responses} responses ({result.num_shown} shown), "
          f"{result.num_tokens} tokens; S median {st['median']:.3g}, 90 % {st['p90']:.3g}, max {st['max']:.3g}")
    print(f"wrote {result.html_path}")
    if result.png_path is not None:
        print(f"wrote {result.png_path}")
    return 0
