"""A rich progress bar for the training loop with the step's key numbers next to it (rank 0 only)."""
from __future__ import annotations

from typing import Dict


class StepProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, every: int = 1):
        self.enabled, self.every = enabled, every
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.progress.start()

    def update(self, step: int, stats: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if step % self.every and "eval/accuracy" not in stats:  # the bar moves every step, the numbers less often
            self.progress.update(self.task, completed=step)
            return
        parts = [f"reward {stats.get('reward/mean', float('nan')):.3f}",
                 f"acc {stats.get('reward/accuracy', float('nan')):.2f}",
                 f"fmt {stats.get('reward/format', float('nan')):.2f}",
                 f"{stats.get('time/step', 0.0):.1f}s/step"]
        if "eval/accuracy" in stats:
            parts.append(f"[green]held-out {stats['eval/accuracy']:.2f}")
        self.progress.update(self.task, completed=step, info="  ".join(parts))

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
