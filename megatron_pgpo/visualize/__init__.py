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

from pathlib import Path
from typing import Optional, Sequence, Union

from ..trainer.samples_log import read_sample_records, samples_dir
from .common import (VisualizationError, VisualizationResult, _choose_steps, _score_stats, log_score,
                     read_metrics_series, score_histogram)
from .html_page import _metric_panels, _render_html
from .png import _render_png

__all__ = ["VisualizationError", "VisualizationResult", "visualize", "visualize_command"]

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
