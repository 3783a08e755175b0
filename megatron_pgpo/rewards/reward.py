"""Rule-based reward of a response: ``accuracy_weight * accuracy + format_weight * format``.

* accuracy (0 or 1): the last top-level ``\\boxed{...}`` of the response is equivalent to the ground truth
  (``verify.py``); no box, an empty box, or a box longer than ``max_answer_chars`` scores 0 without parsing.
* format (0 or 1): ``<think>...</think>`` then a balanced box (``format.py``).

``compute_reward`` scores one response in this process (math-verify's own alarms only); ``RewardScorer`` scores
a batch with the string work done here and the math-verify calls in a ``VerifierPool`` of killable workers, so
that no response, however hostile, takes more than ``timeout_s`` of verification.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .answer import DEFAULT_MAX_ANSWER_CHARS, ground_truth_answer, last_boxed_answer
from .format import format_reward
from .verify import DEFAULT_TIMEOUT_S, Outcome, VerifierPool, match_outcome, quick_match

DEFAULT_ACCURACY_WEIGHT = 0.9
DEFAULT_FORMAT_WEIGHT = 0.1


@dataclass
class RewardResult:
    score: float  # accuracy_weight * accuracy + format_weight * format
    accuracy: float  # 1.0 if the boxed answer matches the ground truth, else 0.0
    format: float  # 1.0 if <think>...</think> then a box, else 0.0
    timed_out: bool  # verification hit the time limit (accuracy is then 0.0)
    answer: str | None  # the extracted final answer, None if the response has no box
    error: str | None = None  # verification failed otherwise (its worker died, or it raised): accuracy 0.0

    @property
    def failed(self) -> bool:
        """The answer could not be judged (timed out or errored) and scored 0 for that reason."""
        return self.timed_out or self.error is not None


def _check_weights(accuracy_weight: float, format_weight: float) -> None:
    for name, value in (("accuracy_weight", accuracy_weight), ("format_weight", format_weight)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0 (defaults 0.9 / 0.1), got {value!r}")


def _check_max_answer_chars(max_answer_chars: int) -> None:
    if isinstance(max_answer_chars, bool) or not isinstance(max_answer_chars, int) or max_answer_chars < 1:
        raise ValueError(f"max_answer_chars must be an int >= 1 (default 1000), got {max_answer_chars!r}")


def _prepare(response: str, ground_truth: str, max_answer_chars: int) -> tuple[str | None, str, Outcome | None]:
    """(answer, gold, decided): ``decided`` is set when no math-verify call is needed."""
    answer = last_boxed_answer(response)
    gold = ground_truth_answer(ground_truth)
    if not answer or len(answer) > max_answer_chars:
        return answer, gold, Outcome(False)
    decided = quick_match(answer, gold)
    return answer, gold, None if decided is None else Outcome(decided)


def _result(
    response: str, answer: str | None, outcome: Outcome, accuracy_weight: float, format_weight: float
) -> RewardResult:
    accuracy = 1.0 if outcome.matched else 0.0
    fmt = format_reward(response)
    return RewardResult(
        score=accuracy_weight * accuracy + format_weight * fmt,
        accuracy=accuracy,
        format=fmt,
        timed_out=outcome.timed_out,
        answer=answer,
        error=outcome.error,
    )


def compute_reward(
    response: str,
    ground_truth: str,
    accuracy_weight: float = DEFAULT_ACCURACY_WEIGHT,
    format_weight: float = DEFAULT_FORMAT_WEIGHT,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
) -> RewardResult:
    """Reward of one response, computed in this process (no hard time limit; use ``RewardScorer`` for that)."""
    _check_weights(accuracy_weight, format_weight)
    _check_max_answer_chars(max_answer_chars)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    answer, gold, outcome = _prepare(response, ground_truth, max_answer_chars)
    if outcome is None:
        outcome = match_outcome(answer, gold, timeout_s)  # type: ignore[arg-type]  # answer is set when undecided
    return _result(response, answer, outcome, accuracy_weight, format_weight)


class RewardScorer:
    """Batch reward with a hard per-sample verification limit; reuse one instance (its workers persist).

    Args:
        accuracy_weight, format_weight: weights of the two 0/1 terms (>= 0).
        timeout_s: wall-clock limit on verifying one answer; past it the worker is killed and accuracy is 0.
        num_workers: verifier processes; 0 verifies in-process with no hard limit (tests, debugging).
        max_answer_chars: longer boxed answers score accuracy 0 without being parsed.
        mp_context: "forkserver" or "spawn" (never "fork", see ``VerifierPool``).
    """

    def __init__(
        self,
        accuracy_weight: float = DEFAULT_ACCURACY_WEIGHT,
        format_weight: float = DEFAULT_FORMAT_WEIGHT,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        num_workers: int = 4,
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        mp_context: str = "forkserver",
    ):
        _check_weights(accuracy_weight, format_weight)
        _check_max_answer_chars(max_answer_chars)
        self.accuracy_weight = float(accuracy_weight)
        self.format_weight = float(format_weight)
        self.max_answer_chars = max_answer_chars
        # The pool validates timeout_s, num_workers and mp_context.
        self.pool = VerifierPool(num_workers=num_workers, timeout_s=timeout_s, mp_context=mp_context)

    @property
    def timeout_s(self) -> float:
        return self.pool.timeout_s

    def score_batch(self, responses: Sequence[str], ground_truths: Sequence[str]) -> list[RewardResult]:
        """One RewardResult per response; ``ground_truths[i]`` is the label of ``responses[i]``."""
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"score_batch needs one ground truth per response: got {len(responses)} responses and "
                f"{len(ground_truths)} ground truths (repeat each prompt's label for every sampled response)"
            )
        for name, items in (("responses", responses), ("ground_truths", ground_truths)):
            for i, item in enumerate(items):
                if not isinstance(item, str):
                    raise TypeError(f"{name}[{i}] must be a str (decode token ids first), got {type(item).__name__}")
        prepared = [_prepare(r, g, self.max_answer_chars) for r, g in zip(responses, ground_truths)]
        todo = [i for i, (_, _, decided) in enumerate(prepared) if decided is None]
        checked = self.pool.match_many([(prepared[i][0], prepared[i][1]) for i in todo])
        outcomes = [decided for _, _, decided in prepared]
        for i, outcome in zip(todo, checked):
            outcomes[i] = outcome
        return [
            _result(r, answer, outcome, self.accuracy_weight, self.format_weight)  # type: ignore[arg-type]
            for r, (answer, _, _), outcome in zip(responses, prepared, outcomes)
        ]

    def close(self) -> None:
        """Stop the verifier workers (a later ``score_batch`` restarts them)."""
        self.pool.close()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
