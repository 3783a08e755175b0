"""Benchmark answer checking, per answer type: at least ten written forms each, taken from the benchmarks' own
documented examples (MathVerse / MathVision / MMMU-Pro option letters, LogicVista's multi-letter answers,
DynaMath's float answers, Geo3k's LaTeX values), and the reason kept for every 0."""
from __future__ import annotations

import pytest

from megatron_pgpo.evaluation.scoring import BenchmarkScorer, letters, number_value, numbers_equal


@pytest.fixture(scope="module")
def scorer():
    with BenchmarkScorer(num_workers=0) as s:
        yield s


def judge(scorer, answer, gold, kind, options=None, boxed=True):
    response = f"<think>...</think> \\boxed{{{answer}}}" if boxed else answer
    return scorer.judge_many([response], [gold], [kind], [options or {}])[0]


OPTIONS = {"A": "6", "B": "8", "C": "12 cm", "D": "\\frac{1}{2}", "E": "\\sqrt{3}"}


@pytest.mark.parametrize("answer", [
    "C", "(C)", "C.", "C)", "c", "\\text{C}", "Option C", "option: C", "C. 12 cm", "(C) 12 cm", "C: 12 cm", "12 cm",
    "12", "12\\,\\text{cm}", "$C$",
])
def test_choice_forms_that_name_the_gold_option(scorer, answer):
    j = judge(scorer, answer, "C", "choice", OPTIONS)
    assert j.correct and j.reason == "correct", (answer, j)


@pytest.mark.parametrize("answer, reason", [
    ("B", "wrong option"), ("(A)", "wrong option"), ("B. 8", "wrong option"), ("8", "wrong option"), ("9", "names no option"),
    ("A, C", "wrong option"), ("the third one", "names no option"),
])
def test_choice_forms_that_do_not(scorer, answer, reason):
    j = judge(scorer, answer, "C", "choice", OPTIONS)
    assert not j.correct and j.reason == reason, (answer, j)


def test_choice_option_text_goes_to_math_verify(scorer):
    assert judge(scorer, "0.5", "D", "choice", OPTIONS).correct  # \frac{1}{2}
    assert judge(scorer, "3^{1/2}", "E", "choice", OPTIONS).correct  # \sqrt{3}


@pytest.mark.parametrize("answer, gold, ok", [
    ("A, B", "A, B", True), ("B, A", "A, B", True), ("AB", "A, B", True), ("A and B", "A, B", True),
    ("(A), (B)", "A, B", True), ("A", "A, B", False), ("A, B, C", "A, B", False), ("A,B", "AB", True),
    ("B C", "B, C", True), ("C", "C", True),
])
def test_multi_letter_answers_logicvista(scorer, answer, gold, ok):
    assert judge(scorer, answer, gold, "choice").correct is ok, (answer, gold)


def test_letter_sets():
    assert letters("A, B") == frozenset("AB") and letters("ABD") == frozenset("ABD")
    assert letters("AAB") is None and letters("12") is None and letters("x") == frozenset("X")


@pytest.mark.parametrize("answer, gold", [
    ("12", "12"), ("12.0", "12"), ("12 cm", "12"), ("12\\,\\text{cm}", "12"), ("12 \\mathrm{cm}", "12 cm"),
    ("30^\\circ", "30"), ("30°", "30"), ("30^{\\circ}", "30 degrees"), ("50\\%", "50"), ("0.5", "50%"),
    ("1,000", "1000"), ("3.1416", "3.1416"), ("-2.5", "-2.5"), ("7 units", "7"), ("4.0 m^2", "4"),
    ("\\frac{1}{2}", "0.5"), ("0.33333", "0.3333"),
])
def test_numbers_with_units_percent_and_degrees(scorer, answer, gold):
    j = judge(scorer, answer, gold, "number")
    assert j.correct, (answer, gold, j)


@pytest.mark.parametrize("answer, gold", [
    ("13", "12"), ("12.1", "12"), ("3.14", "3.1416"), ("-12", "12"), ("50", "0.6"), ("1000", "100"),
    ("12 cm", "13 cm"), ("\\frac{1}{3}", "0.5"), ("0.0", "1"), ("120", "12"),
])
def test_wrong_numbers(scorer, answer, gold):
    j = judge(scorer, answer, gold, "number")
    assert not j.correct and j.reason == "wrong value", (answer, gold, j)


def test_number_parsing():
    assert number_value("12\\,\\text{cm}")[0] == 12 and number_value("50\\%") == (50, True)
    assert number_value("\\frac{1}{2}") is None and number_value("x = 3") is None
    assert numbers_equal("12 apples", "12") is True and numbers_equal("twelve", "12") is None


@pytest.mark.parametrize("answer, gold", [
    ("2\\sqrt{221}", "2\\sqrt{221}"), ("\\frac{7}{2}", "3.5"), ("x=3", "3"), ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\frac{\\pi}{4}", "\\pi/4"), ("4\\pi", "4 \\pi"), ("2^{10}", "1024"), ("\\dfrac{3}{4}", "0.75"),
    ("10\\sqrt{3}", "10 \\sqrt { 3 }"), ("y = 2x + 1", "y=1+2x"), ("\\{1, 2\\}", "\\{2, 1\\}"),
])
def test_latex_expressions_geo3k_mathvision(scorer, answer, gold):
    j = judge(scorer, answer, gold, "expression")
    assert j.correct, (answer, gold, j)


@pytest.mark.parametrize("answer, gold", [
    ("2\\sqrt{3}", "3\\sqrt{2}"), ("\\frac{7}{3}", "3.5"), ("x=4", "3"), ("2^{9}", "1024"),
    ("\\pi", "\\pi/4"), ("y=2x", "y=2x+1"), ("5", "\\sqrt{5}"), ("12", "2\\sqrt{221}"), ("0", "1"),
    ("\\infty", "1"),
])
def test_wrong_expressions(scorer, answer, gold):
    assert not judge(scorer, answer, gold, "expression").correct, (answer, gold)


@pytest.mark.parametrize("answer, gold, ok", [
    ("Yes", "yes", True), ("triangle", "Triangle", True), ("increasing", "increasing", True),
    ("  Red  ", "red", True), ("\\text{parallel}", "parallel", True), ("5", "5.0", True), ("1/2", "0.5", True),
    ("no", "yes", False), ("square", "triangle", False), ("decreasing", "increasing", False),
])
def test_free_form_mathverse_mathvision(scorer, answer, gold, ok):
    assert judge(scorer, answer, gold, "free").correct is ok, (answer, gold)


def test_reasons_for_zero(scorer):
    assert judge(scorer, "C", "C", "choice", boxed=False).reason == "no boxed answer"
    assert judge(scorer, "1" * 2000, "1", "number").reason == "answer too long"
    assert judge(scorer, "", "1", "number").reason == "no boxed answer"  # an empty box
    with pytest.raises(ValueError, match="valid: choice, number, expression, free"):
        judge(scorer, "1", "1", "integer")
