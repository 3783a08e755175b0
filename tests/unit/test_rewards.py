"""Rule-based rewards: box extraction, choice/number normalisation, math-verify equivalence, format, weights, and
hostile inputs through the killable worker pool (each must come back as a valid result within the time limit)."""
from __future__ import annotations

import math
import threading
import time

import pytest

from megatron_pgpo.rewards import (
    RewardResult,
    RewardScorer,
    VerifierPool,
    answers_match,
    compute_reward,
    extract_boxed_answers,
    format_reward,
    ground_truth_answer,
    last_boxed_answer,
    match_outcome,
    normalize_choice,
    normalize_number,
    quick_match,
)

TIMEOUT_S = 2.0
MARGIN_S = 4.0  # worker kill + bookkeeping on a loaded 2-core machine; a missing limit would blow far past this
POW_TOWER = r"\boxed{10^{10^{10^{10}}}}"  # math-verify needs > 5 s for this


@pytest.fixture(scope="module")
def scorer():
    s = RewardScorer(num_workers=2, timeout_s=TIMEOUT_S)
    # Warm the workers up (spawn + sympy import) so that the timed tests measure verification only.
    assert [r.accuracy for r in s.score_batch([r"\boxed{\frac{1}{2}}", r"\boxed{x=3}"], ["0.5", "3"])] == [1.0, 1.0]
    yield s
    s.close()


def _timed_score(scorer, response, gold="1"):
    t0 = time.monotonic()
    (result,) = scorer.score_batch([response], [gold])
    elapsed = time.monotonic() - t0
    assert isinstance(result, RewardResult)
    assert elapsed < TIMEOUT_S + MARGIN_S, f"took {elapsed:.1f} s"
    return result


# --------------------------------------------------------------------------------------------- box extraction
@pytest.mark.parametrize(
    "text, boxes",
    [
        (r"so \boxed{\frac{1}{2}}.", [r"\frac{1}{2}"]),
        (r"\boxed{1} then \boxed {2} then \fbox{3}", ["1", "2", "3"]),
        (r"\boxed{\boxed{3}}", [r"\boxed{3}"]),  # the inner box belongs to the outer one
        (r"\boxed{\{1,2\}}", [r"\{1,2\}"]),  # escaped braces do not close the box
        (r"\boxed{unclosed \boxed{4}", ["4"]),
        (r"\boxedx{5} \fboxsep{6}", []),  # longer command names are not boxes
        (r"\boxed{}", [""]),
        ("no box at all", []),
        ("}} \\boxed{a}", ["a"]),  # stray closing braces before the box are ignored
    ],
)
def test_extract_boxed_answers(text, boxes):
    assert extract_boxed_answers(text) == boxes


@pytest.mark.parametrize(
    "text, answer",
    [
        (r"first \boxed{1}, final \boxed{2}", "2"),  # the last box wins
        (r"\boxed{ \boxed{3} }", "3"),  # a box inside a box is unwrapped
        (r"\boxed{\boxed{1}+\boxed{2}}", r"\boxed{1}+\boxed{2}"),  # not one wrapping box: kept
        (r"\fbox{ 7 }", "7"),
        ("nothing boxed", None),
        (r"\boxed{", None),
    ],
)
def test_last_boxed_answer(text, answer):
    assert last_boxed_answer(text) == answer


def test_ground_truth_answer_uses_the_box_of_a_worked_solution():
    assert ground_truth_answer(r"Adding gives \boxed{42}.") == "42"
    assert ground_truth_answer("  0.5 ") == "0.5"


@pytest.mark.parametrize(
    "s, letter",
    [("C", "C"), ("(c)", "C"), ("C.", "C"), ("C)", "C"), (r"\text{C}", "C"), ("Option C", "C"),
     ("answer: (B)", "B"), ("$D$", "D"), (r"\textbf{(A)}", "A"),
     ("CD", None), ("3", None), ("", None), ("(C", None), ("C" * 100, None)],
)
def test_normalize_choice(s, letter):
    assert normalize_choice(s) == letter


@pytest.mark.parametrize(
    "s, number",
    [("3", "3"), ("3.0", "3"), ("3.00", "3"), ("1,000", "1000"), ("1{,}000", "1000"), ("-0.0", "0"),
     ("+5", "5"), (".5", "0.5"), ("1,00", None), ("1e3", None), (r"\frac{1}{2}", None), ("x", None)],
)
def test_normalize_number(s, number):
    assert normalize_number(s) == number


# ------------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        (r"\frac12", "0.5"),
        ("x=3", "3"),
        ("C", "(C)"),
        ("c", "C"),
        (r"\text{(B)}", "B"),
        ("3.00", "3"),
        ("1,000", "1000"),
        (r"\sqrt{2}", r"\frac{2}{\sqrt{2}}"),
        (r"\{2,1\}", r"\{1,2\}"),
        ("x^2+2x+1", "(x+1)^2"),
    ],
)
def test_equivalent_answers_match(pred, gold):
    assert answers_match(pred, gold) is True


@pytest.mark.parametrize(
    "pred, gold",
    [("4", "3"), ("D", "C"), ("C", "3"), ("3", "C"), ("[1,2)", "(1,2)"), (r"\frac{1}{3}", "0.5"), ("", "1"),
     ("1", ""), ("1,00", "100")],
)
def test_different_answers_do_not_match(pred, gold):
    assert answers_match(pred, gold) is False


def test_fast_path_decides_without_math_verify():
    assert quick_match(r"\frac{1}{2}", r" \frac{1}{2} ") is True
    assert quick_match("3.0", "3") is True and quick_match("3.5", "3") is False
    assert quick_match(r"\frac{1}{2}", "0.5") is None  # left to math-verify


def test_answers_match_off_the_main_thread():
    # math-verify's signal-based timeout raises there; the helper must switch it off instead of failing.
    got = []
    thread = threading.Thread(target=lambda: got.append(answers_match(r"\frac{1}{2}", "0.5")))
    thread.start()
    thread.join(60)
    assert got == [True]


def test_in_process_timeout_in_main_thread_is_reported():
    t0 = time.monotonic()
    outcome = match_outcome("10^{10^{10^{10}}}", "1", timeout_s=1.0)
    assert (outcome.matched, outcome.timed_out) == (False, True)
    assert time.monotonic() - t0 < 1.0 + MARGIN_S


# ------------------------------------------------------------------------------------------------ reward, format
GOOD = "<think>half of one</think> The answer is \\boxed{\\frac{1}{2}}."


@pytest.mark.parametrize(
    "response, fmt",
    [
        (GOOD, 1.0),
        ("  \n" + GOOD, 1.0),  # leading whitespace is fine
        (r"<think></think>\boxed{}", 1.0),
        (r"half \boxed{0.5}", 0.0),  # no think block
        (r"<think>thinking \boxed{0.5}", 0.0),  # never closed
        (r"<think>\boxed{0.5}</think> so one half", 0.0),  # box only before </think>
        (r"<think>a</think> \boxed{0.5", 0.0),  # unbalanced box
        (r"I think <think>a</think> \boxed{1}", 0.0),  # does not start with <think>
        (r"<think>a</think>b</think> \fbox{1}", 1.0),
    ],
)
def test_format_reward(response, fmt):
    assert format_reward(response) == fmt


@pytest.mark.parametrize(
    "tail",
    ["x" * 1_000_000, "\\boxed{" * 150_000, "{" * 1_000_000, "}{" * 500_000, "</think>" * 125_000],
)
def test_format_reward_is_linear_on_1mb(tail):
    t0 = time.monotonic()
    assert format_reward("<think>" + tail) == 0.0
    assert format_reward("<think></think>" + tail + r"\boxed{1}") == 1.0
    assert time.monotonic() - t0 < 1.0  # a backtracking regex takes minutes here


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        (GOOD, "0.5", RewardResult(1.0, 1.0, 1.0, False, r"\frac{1}{2}")),
        (GOOD, "0.4", RewardResult(0.1, 0.0, 1.0, False, r"\frac{1}{2}")),
        (r"\boxed{C}", "C", RewardResult(0.9, 1.0, 0.0, False, "C")),
        ("<think>x</think> it is 3", "3", RewardResult(0.0, 0.0, 0.0, False, None)),  # no box
        ("<think>x</think> \\boxed{ }", "3", RewardResult(0.1, 0.0, 1.0, False, "")),  # empty box
        (r"\boxed{1,000}", r"worked: \boxed{1000}", RewardResult(0.9, 1.0, 0.0, False, "1,000")),
    ],
)
def test_compute_reward(response, gold, expected):
    assert compute_reward(response, gold) == expected


def test_weights():
    got = compute_reward(GOOD, "0.5", accuracy_weight=2.0, format_weight=0.5)
    assert got.score == 2.5
    got = compute_reward(GOOD, "7", accuracy_weight=2.0, format_weight=0.5)
    assert (got.score, got.accuracy, got.format) == (0.5, 0.0, 1.0)
    assert compute_reward(GOOD, "0.5", accuracy_weight=1.0, format_weight=0.0).score == 1.0


def test_answers_longer_than_the_cap_are_not_parsed():
    long_answer = "1+" * 600 + "1"  # 1201 chars, mathematically 601
    assert compute_reward(rf"\boxed{{{long_answer}}}", "601").accuracy == 0.0
    assert compute_reward(rf"\boxed{{{long_answer}}}", "601", max_answer_chars=2000).accuracy == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"accuracy_weight": -0.1}, "accuracy_weight must be a finite number >= 0"),
        ({"format_weight": math.nan}, "format_weight must be a finite number >= 0"),
        ({"timeout_s": 0}, "timeout_s must be > 0"),
        ({"num_workers": -1}, "num_workers must be an int >= 0"),
        ({"max_answer_chars": 0}, "max_answer_chars must be an int >= 1"),
        ({"mp_context": "fork"}, "'fork' is unsafe"),
    ],
)
def test_scorer_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardScorer(**kwargs)


def test_score_batch_validates_inputs(scorer):
    with pytest.raises(ValueError, match="got 2 responses and 1 ground truths"):
        scorer.score_batch(["a", "b"], ["1"])
    with pytest.raises(TypeError, match=r"responses\[1\] must be a str"):
        scorer.score_batch(["a", None], ["1", "2"])
    assert scorer.score_batch([], []) == []


def test_score_batch_matches_compute_reward(scorer):
    responses = [GOOD, GOOD, r"\boxed{x=3}", r"\boxed{\frac12}", r"\boxed{(D)}", "no box", r"\boxed{2^{10}}"]
    golds = ["0.5", "0.4", "3", "0.5", "C", "1", "1024"]
    got = scorer.score_batch(responses, golds)
    assert got == [compute_reward(r, g) for r, g in zip(responses, golds)]
    assert [r.accuracy for r in got] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------------------ hostile input
def test_power_tower_times_out(scorer):
    result = _timed_score(scorer, "<think>big</think>" + POW_TOWER)
    assert result == RewardResult(0.1, 0.0, 1.0, True, "10^{10^{10^{10}}}")


def test_500_nested_braces_exceed_the_answer_cap(scorer):
    answer = "{" * 500 + "1" + "}" * 500
    result = _timed_score(scorer, rf"\boxed{{{answer}}}")
    assert result == RewardResult(0.0, 0.0, 0.0, False, answer)


def test_deep_nesting_under_the_cap_is_bounded(scorer):
    answer = "{" * 450 + "1" + "}" * 450  # 901 chars: parsed, ~2-3 s of math-verify unless killed
    result = _timed_score(scorer, rf"\boxed{{{answer}}}", gold="2")
    assert (result.score, result.accuracy, result.answer) == (0.0, 0.0, answer)


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("x" * 1_000_000 + r"\boxed{1}", "1", RewardResult(0.9, 1.0, 0.0, False, "1")),
        (r"\boxed{" + "9" * 1_000_000 + "}", "9", RewardResult(0.0, 0.0, 0.0, False, "9" * 1_000_000)),
        ("<think>\ud800</think>\\boxed{\ud800}", "1", RewardResult(0.1, 0.0, 1.0, False, "\ud800")),
        ("\udcff<think>\ud800</think>\\boxed{3}", "3", RewardResult(0.9, 1.0, 0.0, False, "3")),
        (b"<think>\xff</think>\\boxed{\xfe3}".decode("utf-8", "surrogateescape"), "3",
         RewardResult(0.1, 0.0, 1.0, False, "\udcfe3")),
        ("\x00<think>\x00</think>\\boxed{\x00}", "1", RewardResult(0.0, 0.0, 0.0, False, "\x00")),  # NUL is no space
        ("<think>\x00</think>\\boxed{4}\x00", "4", RewardResult(1.0, 1.0, 1.0, False, "4")),
    ],
    ids=["1mb-prose", "1mb-answer", "lone-surrogate", "surrogate-correct", "surrogateescape", "nul", "nul-correct"],
)
def test_hostile_strings(scorer, response, gold, expected):
    assert _timed_score(scorer, response, gold) == expected


def test_killed_worker_is_replaced_and_scoring_continues(scorer):
    procs_before = list(scorer.pool._workers)
    assert _timed_score(scorer, POW_TOWER).timed_out is True
    pids_after = {w.proc.pid for w in scorer.pool._workers}
    replaced = [w for w in procs_before if w.proc.pid not in pids_after]
    assert len(pids_after) == 2 and len(replaced) == 1  # exactly the busy worker was replaced ...
    assert replaced[0].proc.is_alive() is False  # ... and killed, not left running
    # Right away (the replacement may still be starting), correct answers needing math-verify score 1.
    t0 = time.monotonic()
    got = scorer.score_batch([r"\boxed{\frac{3}{4}}", r"\boxed{y=5}", r"\boxed{2\sqrt{2}}"], ["0.75", "5", r"\sqrt{8}"])
    assert [r.accuracy for r in got] == [1.0, 1.0, 1.0]
    assert time.monotonic() - t0 < TIMEOUT_S + MARGIN_S


def test_mixed_batch_keeps_order_and_limit(scorer):
    responses = [POW_TOWER, r"\boxed{\frac{1}{4}}", POW_TOWER, r"\boxed{x=7}", r"\boxed{8}"]
    t0 = time.monotonic()
    got = scorer.score_batch(responses, ["1", "0.25", "1", "7", "9"])
    # Two workers, two samples that each use the full limit: at most ~2 limits of wall time.
    assert time.monotonic() - t0 < 2 * TIMEOUT_S + MARGIN_S
    assert [(r.accuracy, r.timed_out) for r in got] == [(0.0, True), (1.0, False), (0.0, True), (1.0, False),
                                                        (0.0, False)]


def test_pool_lifecycle_and_in_process_mode():
    with VerifierPool(num_workers=1, timeout_s=TIMEOUT_S) as pool:
        assert [o.matched for o in pool.match_many([("x=3", "3"), ("4", "3")])] == [True, False]
        procs = [w.proc for w in pool._workers]
    assert pool._workers == [] and [p.is_alive() for p in procs] == [False]
    with VerifierPool(num_workers=0) as pool:  # in-process: no workers at all
        assert [o.matched for o in pool.match_many([(r"\frac12", "0.5")])] == [True]
        assert pool._workers == []
