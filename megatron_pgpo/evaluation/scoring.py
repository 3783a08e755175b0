"""Benchmark answer checking: the training verifier (``rewards/``) extended to the answer forms benchmarks use,
keeping the reason a response scored 0.

The response's answer is its last top-level ``\\boxed{...}`` (the format the prompt asks for, as in training). Then,
by the problem's answer type:

``choice``      gold is one option letter, or several ("A, B", "AC": LogicVista has multi-answer items). The
                prediction counts when it names the same letters: ``C``, ``(C)``, ``C.``, ``\\text{C}``,
                ``Option C``, a letter followed by its option text (``C. 12 cm``, ``(C) 12``), or the text of the
                gold option alone (``12 cm`` for ``C: 12 cm``; compared as text, as a number, then by math-verify).
``number``      gold and prediction are numbers, possibly with a unit, a percent sign or degrees (``12 cm``,
                ``12\\,\\text{cm}``, ``50\\%``, ``30^\\circ``, ``30°``); units are dropped, a percent also matches its
                fraction (``50%`` == ``0.5``), and values are equal within ``REL_TOL`` of the gold. Otherwise (a
                fraction, a root) math-verify decides.
``expression``  LaTeX expressions and equations: the training verifier (exact text, plain numbers, math-verify).
``free``        anything else: the training verifier, then case-insensitive text equality.

Math-verify calls run in the killable ``VerifierPool`` (a hard time limit per sample), like the training reward.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Dict, List, Optional, Sequence, Tuple

from ..rewards.answer import DEFAULT_MAX_ANSWER_CHARS, canonical_text, last_boxed_answer, normalize_choice
from ..rewards.verify import Outcome, VerifierPool, quick_match

ANSWER_TYPES = ("choice", "number", "expression", "free")

#: Relative tolerance of numeric answers (DynaMath's floats are given to 2-3 decimals).
REL_TOL = 1e-4

#: Why a response scored what it did (``Judgement.reason``).
REASONS = ("correct", "no boxed answer", "answer too long", "wrong option", "names no option", "wrong value",
           "verifier timeout", "verifier error")


@dataclass(frozen=True)
class Judgement:
    correct: bool
    reason: str  # one of REASONS
    answer: Optional[str]  # the extracted boxed answer


# ------------------------------------------------------------------------------------------- option letters
_MULTI = re.compile(r"^\s*\(?([A-Z])\)?(?:\s*(?:,|and|&|;|\s)\s*\(?([A-Z])\)?)+\s*$")
_LETTER_THEN_TEXT = re.compile(r"^\s*(?:\\text\{)?\(?([A-Za-z])(?:\)|\.|:|\s-)\s*(.+?)\}?\s*$", re.DOTALL)


def letters(s: str) -> Optional[frozenset]:
    """The option letters ``s`` names: one (``C``, ``(c)``, ``Option C``) or several upper-case ones (``A, B``,
    ``A and C``, ``AC``); None if it names none."""
    if len(s) > 64:
        return None
    one = normalize_choice(s)
    if one is not None:
        return frozenset(one)
    stripped = s.strip().replace("$", "")
    if re.fullmatch(r"[A-Z]{2,10}", stripped) and len(set(stripped)) == len(stripped):
        return frozenset(stripped)
    m = _MULTI.match(stripped)
    if m is not None:
        return frozenset(re.findall(r"[A-Z]", stripped))
    return None


def letter_and_text(s: str) -> Optional[Tuple[str, str]]:
    """``("C", "12 cm")`` for ``C. 12 cm`` / ``(C) 12 cm`` / ``C: 12 cm``; None otherwise."""
    m = _LETTER_THEN_TEXT.match(s)
    if m is None or not m.group(2).strip():
        return None
    return m.group(1).upper(), m.group(2).strip()


# ------------------------------------------------------------------------------------------- numbers with units
_UNIT_WRAPPERS = re.compile(r"\\(?:text|mathrm|mbox|textrm|operatorname)\s*\{[^{}]*\}")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_NUMBER_HEAD = re.compile(r"^\s*([+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+)\s*(.*)$", re.DOTALL)
_UNIT_TAIL = re.compile(r"^(?:[A-Za-z]{1,12}(?:\^?\{?[23]\}?)?(?:/[A-Za-z]{1,8})?|units?|square units|sq\.? units)"
                        r"\.?$")


def number_value(s: str) -> Optional[Tuple[Decimal, bool]]:
    """(value, is_percent) of a number written with an optional unit, percent sign or degrees; None if ``s`` is
    not one (fractions and other LaTeX are left to math-verify)."""
    if len(s) > 64:
        return None
    t = s.strip().strip("$").strip()
    t = _DEGREES.sub("", t).replace("\\,", "").replace("\\ ", " ").replace("{,}", ",").replace("\\!", "")
    percent = False
    if t.endswith("\\%") or t.endswith("%"):
        percent, t = True, t[:-2] if t.endswith("\\%") else t[:-1]
    t = _UNIT_WRAPPERS.sub(lambda m: " " + m.group(0)[m.group(0).index("{") + 1:-1] + " ", t).strip()
    m = _NUMBER_HEAD.match(t)
    if m is None:
        return None
    tail = m.group(2).strip()
    if tail in ("\\%", "%"):
        percent, tail = True, ""
    if tail and not _UNIT_TAIL.match(tail):
        return None
    try:
        return Decimal(m.group(1).replace(",", "")), percent
    except InvalidOperation:
        return None


def numbers_equal(pred: str, gold: str) -> Optional[bool]:
    """Whether two numbers-with-units are equal within ``REL_TOL``; None if either is not such a number."""
    p, g = number_value(pred), number_value(gold)
    if p is None or g is None:
        return None
    (pv, p_pct), (gv, g_pct) = p, g
    candidates = [pv]
    if p_pct != g_pct:  # 50% may be written 0.5, and 0.5 as 50%
        candidates.append(pv / 100 if p_pct else pv * 100)
    tol = Decimal(str(REL_TOL)) * max(abs(gv), Decimal(1))
    return any(abs(c - gv) <= tol for c in candidates)


# ------------------------------------------------------------------------------------------- judging
def _same_text(answer: str, option: str) -> bool:
    """The answer is the option's text: equal as text (case-insensitive) or as numbers with units."""
    if canonical_text(answer).lower() == canonical_text(option).lower():
        return True
    return bool(numbers_equal(answer, option))


def _first_pass(answer: str, gold: str, answer_type: str, options: Dict[str, str]
                ) -> Tuple[Optional[Judgement], Optional[Tuple[str, str]], str]:
    """(a decision, or the (pred, gold) pair math-verify must decide, and the reason if it says no)."""
    def decided(ok: bool, reason: str) -> Tuple[Judgement, None, str]:
        return Judgement(ok, "correct" if ok else reason, answer), None, reason

    if answer_type == "choice":
        gold_letters = letters(gold)
        if gold_letters is None:  # a choice item whose label is the option text: compare with the text
            answer_type, gold = "free", gold
        else:
            named = letters(answer)
            if named is None:
                pair = letter_and_text(answer)
                if pair is not None and (not options or pair[0] in options):
                    named = frozenset(pair[0])
            if named is not None:
                return decided(named == gold_letters, "wrong option")
            gold_text = options.get(next(iter(gold_letters))) if len(gold_letters) == 1 else None
            if gold_text is None:
                return decided(False, "names no option")
            named_texts = [letter for letter, text in options.items() if _same_text(answer, text)]
            if named_texts:
                return decided(frozenset(named_texts) & gold_letters == gold_letters, "wrong option")
            return None, (answer, gold_text), "names no option"
    if answer_type == "number":
        equal = numbers_equal(answer, gold)
        if equal is not None:
            return decided(equal, "wrong value")
    quick = quick_match(answer, gold)
    if quick:
        return decided(True, "")
    if answer_type == "free" and canonical_text(answer).lower() == canonical_text(gold).lower():
        return decided(True, "")
    return None, (answer, gold), "wrong value"


def _final(outcome: Outcome, answer: str, reason: str) -> Judgement:
    if outcome.matched:
        return Judgement(True, "correct", answer)
    if outcome.timed_out:
        return Judgement(False, "verifier timeout", answer)
    if outcome.error:
        return Judgement(False, "verifier error", answer)
    return Judgement(False, reason, answer)


class BenchmarkScorer:
    """Scores responses against benchmark problems; reuse one instance (its verifier workers persist).

    ``num_workers=0`` verifies in-process (tests); ``timeout_s`` bounds one math-verify comparison.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0,
                 max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS):
        self.pool = VerifierPool(num_workers=num_workers, timeout_s=timeout_s)
        self.max_answer_chars = max_answer_chars

    def judge_many(self, responses: Sequence[str], golds: Sequence[str], answer_types: Sequence[str],
                   options: Sequence[Dict[str, str]]) -> List[Judgement]:
        """One ``Judgement`` per response (``golds[i]``, ``answer_types[i]``, ``options[i]`` describe its problem)."""
        out: List[Optional[Judgement]] = []
        todo: List[Tuple[int, Tuple[str, str], str]] = []
        for i, (response, gold, kind, opts) in enumerate(zip(responses, golds, answer_types, options)):
            if kind not in ANSWER_TYPES:
                raise ValueError(f"answer type {kind!r}: valid: {', '.join(ANSWER_TYPES)}")
            answer = last_boxed_answer(response)
            if not answer:
                out.append(Judgement(False, "no boxed answer", answer))
                continue
            if len(answer) > self.max_answer_chars:
                out.append(Judgement(False, "answer too long", answer))
                continue
            decision, pair, reason = _first_pass(answer, gold.strip(), kind, opts)
            out.append(decision)
            if decision is None:
                todo.append((i, pair, reason))
        outcomes = self.pool.match_many([pair for _, pair, _ in todo])
        for (i, pair, reason), outcome in zip(todo, outcomes):
            out[i] = _final(outcome, last_boxed_answer(responses[i]) or "", reason)
        return out  # type: ignore[return-value]  # every slot filled

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "BenchmarkScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
