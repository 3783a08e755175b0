"""Shared pieces of the visualiser: colour scales, step selection, metrics and S statistics."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..trainer.samples_log import sample_steps, samples_dir, samples_path

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
