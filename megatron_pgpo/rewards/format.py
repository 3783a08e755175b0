"""Format reward: did the response think first and then give a boxed final answer?

A response earns format 1.0 iff, after stripping leading whitespace, it

1. starts with ``<think>``,
2. contains a closing ``</think>``, and
3. after the first ``</think>`` contains a box (``\\boxed{...}``, ``\\boxed {...}`` or ``\\fbox{...}``) whose
   braces balance,

else 0.0. The box may be empty: whether the answer is right (or present) is the accuracy reward's job.

Written with ``str.find``/``startswith`` and the linear box scanner of ``answer.py`` instead of one big regex:
a pattern like ``<think>.*</think>.*\\\\boxed\\{.*\\}`` backtracks quadratically on long hostile responses,
while this stays linear (a 1 MB response costs milliseconds).
"""
from __future__ import annotations

from .answer import extract_boxed_answers

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def format_reward(text: str) -> float:
    """1.0 if ``text`` is ``<think>...</think>`` followed by a balanced box, else 0.0 (see the module docstring)."""
    body = text.lstrip()
    if not body.startswith(THINK_OPEN):
        return 0.0
    close = body.find(THINK_CLOSE, len(THINK_OPEN))
    if close < 0:
        return 0.0
    return 1.0 if extract_boxed_answers(body[close + len(THINK_CLOSE) :]) else 0.0
