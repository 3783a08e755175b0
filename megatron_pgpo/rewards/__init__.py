"""Rule-based rewards for math / multiple-choice answers: accuracy of the last ``\\boxed{}`` plus a format bonus.

``RewardScorer(...).score_batch(responses, ground_truths)`` is the trainer's entry point; it verifies answers in
killable worker processes so that no response can stall a training step. No torch import here or below.
"""
from .answer import (
    DEFAULT_MAX_ANSWER_CHARS,
    extract_boxed_answers,
    ground_truth_answer,
    last_boxed_answer,
    normalize_choice,
    normalize_number,
)
from .format import format_reward
from .reward import DEFAULT_ACCURACY_WEIGHT, DEFAULT_FORMAT_WEIGHT, RewardResult, RewardScorer, compute_reward
from .verify import DEFAULT_TIMEOUT_S, Outcome, VerifierPool, answers_match, match_outcome, quick_match

__all__ = [
    "DEFAULT_ACCURACY_WEIGHT",
    "DEFAULT_FORMAT_WEIGHT",
    "DEFAULT_MAX_ANSWER_CHARS",
    "DEFAULT_TIMEOUT_S",
    "Outcome",
    "RewardResult",
    "RewardScorer",
    "VerifierPool",
    "answers_match",
    "compute_reward",
    "extract_boxed_answers",
    "format_reward",
    "ground_truth_answer",
    "last_boxed_answer",
    "match_outcome",
    "normalize_choice",
    "normalize_number",
    "quick_match",
]
