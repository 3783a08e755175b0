"""The PNG summary (matplotlib, Agg): S histogram, metrics, token strips."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List

from .common import S_COLOR, _text_color, score_rgb, weight_rgb


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


