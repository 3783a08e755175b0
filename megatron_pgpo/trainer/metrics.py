"""Per-step metrics to every sink at once: ``metrics.jsonl`` (always), TensorBoard, wandb (offline by default).

``metrics.jsonl`` in the run directory holds one JSON object per step: ``{"step": int, "time": unix seconds,
<metric>: float, ...}``; it is appended and flushed after every step, so nothing is lost on a crash, and on
resume the lines of steps after the checkpoint are dropped so the file never holds a step twice.
Documented keys are in ``METRIC_KEYS``; others may appear.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Mapping, Optional

METRIC_KEYS: Dict[str, str] = {
    "reward/mean": "mean reward of the step's responses (0.9 accuracy + 0.1 format by default)",
    "reward/accuracy": "fraction of responses whose boxed answer is correct",
    "reward/format": "fraction of responses with <think>...</think> and a boxed answer",
    "response/length_mean": "mean response length in tokens",
    "response/clip_ratio": "fraction of responses cut at max_new_tokens",
    "vd/score_mean": "mean visual dependency S over valid tokens",
    "vd/log1p_mean": "mean log(1 + S) over valid tokens",
    "vd/frac_above_tau": "fraction of valid tokens with normalised importance I >= tau",
    "vd/sanitized": "tokens whose S was NaN, inf, negative or above s_max",
    "actor/loss": "policy loss (mean over the step's updates)",
    "actor/clip_fraction": "fraction of tokens where the clipped surrogate was used",
    "actor/approx_kl": "k3 estimate of KL(old || new) at the sampled tokens",
    "actor/entropy": "mean token entropy of the policy",
    "actor/grad_norm": "global gradient norm before clipping",
    "actor/skipped_updates": "updates skipped for a non-finite loss or gradient",
    "actor/lr": "learning rate",
    "perf/tokens_per_s": "response tokens trained per second of step time",
    "time/rollout": "seconds generating responses",
    "time/reward": "seconds scoring responses",
    "time/old_logprob": "seconds of the old-policy (image) and text-only passes",
    "time/update": "seconds of policy updates",
    "time/sync": "seconds syncing weights into the rollout engine",
    "time/step": "seconds of the whole step",
    "eval/accuracy": "held-out accuracy (greedy), on evaluation steps",
}


def _finite(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Writes each step's metrics to ``run_dir/metrics.jsonl`` and the enabled sinks; only rank 0 should own one.

    Args:
        run_dir: the run directory.
        tensorboard: also write TensorBoard events under ``run_dir/tensorboard``.
        wandb: also log to wandb (``wandb_mode`` offline writes ``run_dir/wandb``).
        resume_step: drop jsonl lines of steps > this (resuming from the checkpoint of that step).
    """

    def __init__(self, run_dir: str, tensorboard: bool = True, wandb: bool = False, wandb_mode: str = "offline",
                 wandb_project: str = "megatron-pgpo", config: Optional[dict] = None,
                 resume_step: Optional[int] = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=(
                resume_step + 1 if resume_step is not None else None))
        self._wandb = None
        if wandb and wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb as wandb_lib

            self._wandb = wandb_lib.init(project=wandb_project, dir=str(self.run_dir), mode=wandb_mode,
                                         config=config or {}, resume="allow", id=self.run_dir.name)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` for ``step``; non-finite values are written as null (JSON has no NaN)."""
        record = {"step": int(step), "time": time.time()}
        record.update({k: _finite(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and value is not None:
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "time"}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str) -> list:
    """All records of ``run_dir/metrics.jsonl`` in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
