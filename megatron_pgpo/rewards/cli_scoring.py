"""`megatron-pgpo reward FILE.jsonl`: score a file of responses, with a progress bar and a summary.

Bad lines (not JSON, missing keys) are reported with their line numbers before any scoring starts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

CHUNK = 256  # responses per scoring call: bounds memory and keeps the progress bar moving


def read_pairs(path: str, response_key: str, answer_key: str) -> Tuple[List[dict], List[str]]:
    """Parse the JSONL file; returns (rows, errors) where errors name line numbers."""
    rows, errors = [], []
    p = Path(path)
    if not p.is_file():
        return [], [f"{path}: no such file"]
    with p.open(encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{lineno}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                errors.append(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                continue
            missing = [k for k in (response_key, answer_key) if k not in row]
            if missing:
                errors.append(f"{path}:{lineno}: missing key(s) {missing}; use --response-key/--answer-key")
                continue
            rows.append(row)
    if not rows and not errors:
        errors.append(f"{path}: no responses in the file")
    return rows, errors


def score_jsonl(path: str, out: Optional[str], reward_cfg, response_key: str = "response",
                answer_key: str = "answer") -> int:
    """Score every line; returns the process exit code (2 on unreadable input)."""
    from rich.console import Console
    from rich.progress import Progress

    from .reward import RewardScorer

    console = Console(stderr=True)
    rows, errors = read_pairs(path, response_key, answer_key)
    if errors:
        for err in errors[:20]:
            console.print(f"[red]error[/]: {err}")
        if len(errors) > 20:
            console.print(f"... and {len(errors) - 20} more")
        return 2
    results = []
    with RewardScorer(
        accuracy_weight=reward_cfg.accuracy_weight,
        format_weight=reward_cfg.format_weight,
        timeout_s=reward_cfg.timeout_s,
        num_workers=reward_cfg.num_workers,
        max_answer_chars=reward_cfg.max_answer_chars,
    ) as scorer, Progress(console=console, transient=True) as progress:
        task = progress.add_task("scoring", total=len(rows))
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start:start + CHUNK]
            results.extend(scorer.score_batch([str(r[response_key]) for r in chunk],
                                              [str(r[answer_key]) for r in chunk]))
            progress.advance(task, len(chunk))
    n = len(results)
    mean = lambda xs: sum(xs) / n  # noqa: E731
    summary = {
        "responses": n,
        "mean_reward": mean([r.score for r in results]),
        "accuracy": mean([r.accuracy for r in results]),
        "format_rate": mean([r.format for r in results]),
        "timed_out": sum(r.timed_out for r in results),
    }
    if out:
        with open(out, "w", encoding="utf-8", errors="surrogateescape") as fh:
            for row, res in zip(rows, results):
                row = dict(row, score=res.score, accuracy=res.accuracy, format=res.format,
                           timed_out=res.timed_out, extracted_answer=res.answer)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps(summary))
    return 0
