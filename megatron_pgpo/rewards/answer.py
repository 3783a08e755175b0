"""Pure string helpers: find the final ``\\boxed{...}`` answer and normalise multiple-choice letters and numbers.

Everything here is linear in the input length and never calls math-verify, so the reward code can run it on
untrusted model output in the trainer process and only send short, already-extracted answers to the (expensive,
time-limited) symbolic check in ``verify.py``.

Box syntax accepted: ``\\boxed{...}``, ``\\boxed {...}`` (whitespace before the brace) and ``\\fbox{...}``. Braces
must balance; ``\\{`` and ``\\}`` are literal braces (set notation) and do not count. Only top-level boxes are
answers: a box inside another box belongs to the outer one (``\\boxed{\\boxed{3}}`` is unwrapped to ``3``).
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# Answers longer than this are never handed to math-verify (accuracy 0): parsing cost grows with length, and no
# real final answer is this long.
DEFAULT_MAX_ANSWER_CHARS = 1000

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# One token per command name, escaped character or brace. Each alternative is a plain run or a fixed-width
# string, so matching is linear (no backtracking) and ordinary text is skipped at C speed.
_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[{}]", re.DOTALL)
_SPACE = " \t\r\n"
_MAX_UNWRAP = 4  # bound on nested wrappers peeled off one answer, so 10^5 nested boxes stay linear


def extract_boxed_answers(text: str) -> list[str]:
    """Contents of every top-level balanced box in ``text``, in order of appearance (unclosed boxes are skipped)."""
    starts = [i for i in (text.find(cmd) for cmd in _BOX_COMMANDS) if i >= 0]
    if not starts:
        return []
    n = len(text)
    box_opens: set[int] = set()  # positions of the '{' that opens a box
    stack: list[int] = []  # positions of unmatched '{'
    spans: list[tuple[int, int]] = []  # (open, close) of every closed box
    # Braces before the first box cannot change how a later box closes, so start scanning there.
    for m in _TOKEN.finditer(text, min(starts)):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}":
            if stack:  # an unmatched '}' is ignored, as a stray brace in prose should be
                opened = stack.pop()
                if opened in box_opens:
                    spans.append((opened, m.start()))
        elif tok in _BOX_COMMANDS:
            j = m.end()
            while j < n and text[j] in _SPACE:  # each whitespace char is skipped at most once: still linear
                j += 1
            if j < n and text[j] == "{":
                box_opens.add(j)
    spans.sort()
    answers = []
    last_close = -1
    for opened, closed in spans:
        if opened > last_close:  # skip boxes nested in the previous top-level box
            answers.append(text[opened + 1 : closed])
            last_close = closed
    return answers


def last_boxed_answer(text: str) -> str | None:
    """The stripped content of the last top-level box, unwrapping ``\\boxed{\\boxed{x}}`` to ``x``; None if no box."""
    answers = extract_boxed_answers(text)
    if not answers:
        return None
    # Unwrap a box that is the whole content (a box inside a box).
    return _strip_enclosing(answers[-1].strip(), _BOX_COMMANDS)


def _strip_enclosing(s: str, commands) -> str:
    """Strip up to ``_MAX_UNWRAP`` layers of ``\\command{...}`` that enclose the whole of ``s``."""
    for _ in range(_MAX_UNWRAP):
        inner = _strip_group(s, commands)
        if inner is None:
            break
        s = inner.strip()
    return s


def _match_brace(s: str, open_idx: int) -> int:
    """Index of the '}' closing the '{' at ``open_idx`` (escaped braces ignored), or -1 if it never closes."""
    depth = 0
    for m in _TOKEN.finditer(s, open_idx):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def _strip_group(s: str, commands: tuple[str, ...]) -> str | None:
    """The argument of ``s`` when ``s`` (stripped) is exactly ``\\cmd{arg}`` for one of ``commands``, else None."""
    if not s.endswith("}"):  # cheap reject before any scan
        return None
    for cmd in commands:
        if not s.startswith(cmd):
            continue
        j = len(cmd)
        if j < len(s) and s[j].isalpha():  # a longer command such as \boxedx
            continue
        while j < len(s) and s[j] in _SPACE:
            j += 1
        if j < len(s) and s[j] == "{" and _match_brace(s, j) == len(s) - 1:
            return s[j + 1 : -1]
    return None


def ground_truth_answer(ground_truth: str) -> str:
    """The answer a dataset label stands for: its last box if it has one (full worked solutions), else itself."""
    boxed = last_boxed_answer(ground_truth)
    return boxed if boxed is not None else ground_truth.strip()


# Wrappers that do not change what a short answer means.
_WRAPPERS = ("\\text", "\\textbf", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox")
_CHOICE_PREFIX = re.compile(r"(?:option|choice|answer)\s*:?\s*", re.IGNORECASE)
_CHOICE = re.compile(r"\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.):]?")
_MAX_SHORT = 64  # choice letters and plain numbers are short; longer strings are rejected before any regex


def _unwrap(s: str) -> str:
    """Strip surrounding whitespace, one ``$...$`` pair and ``\\text{...}``-style wrappers (each bounded)."""
    s = s.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$" and "$" not in s[1:-1]:
        s = s[1:-1].strip()
    return _strip_enclosing(s, _WRAPPERS)


def normalize_choice(s: str) -> str | None:
    """The upper-case option letter that ``s`` names (``C``, ``(c)``, ``C.``, ``C)``, ``\\text{C}``, ``Option C``)."""
    if len(s) > _MAX_SHORT:
        return None
    s = _unwrap(s)
    m = _CHOICE_PREFIX.match(s)
    if m is not None and m.end() < len(s):
        s = _unwrap(s[m.end() :])
    m = _CHOICE.fullmatch(s)
    if m is None:
        return None
    return next(g for g in m.groups() if g).upper()


_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")


def normalize_number(s: str) -> str | None:
    """Canonical decimal string of a plain number (``3.00`` -> ``3``, ``1,000`` -> ``1000``), else None.

    Only digits, one optional sign, thousands commas in groups of three (also LaTeX's ``{,}`` and ``\\,``) and a
    decimal point are accepted; anything else (fractions, exponents, units) is left to math-verify.
    """
    if len(s) > _MAX_SHORT:
        return None
    s = _unwrap(s).replace("{,}", ",").replace("\\,", ",")
    if _NUMBER.fullmatch(s) is None:
        return None
    try:
        value = Decimal(s.replace(",", ""))
    except InvalidOperation:  # unreachable given the regex; keep the helper total
        return None
    if value == 0:
        return "0"  # also folds -0 and 0.000
    return format(value.normalize(), "f")


def canonical_text(s: str) -> str:
    """Whitespace-collapsed, unwrapped form used for the exact-match fast path."""
    return " ".join(_unwrap(s).split())
