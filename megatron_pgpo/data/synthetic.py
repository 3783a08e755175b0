"""Built-in synthetic visual tasks: small PIL images whose answers need the image, generated from a seed.

They are the embedded default data (no download) and a real learning signal for tiny models. Every example is a
pure function of ``(task, seed, split, index)``, so the same seed gives the same dataset on every machine, and the
``val`` split never shares a random stream with ``train``.

==========  ==========  ====================================================  =====================
task        image       question                                              answers
==========  ==========  ====================================================  =====================
colour      56 x 56     What colour is the square?                            6 colour names
count       112 x 112   How many <colour> shapes are there?                   0-4
digits      112 x 56    What number is shown?                                 10-99
bars        56 x 56     Which bar is taller, left or right?                   left / right
==========  ==========  ====================================================  =====================

``colour`` is the default: docs/pgpo_spec.md section 6 measured that a ~0.6M-parameter model learns it on CPU (56 x 56
pixels = 16 patches of 14 px = 4 image tokens after the 2 x 2 merge). The text of the question never reveals the
answer, so the text-only pass cannot answer it: visual dependency concentrates on the answer tokens.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

from PIL import Image, ImageDraw, ImageFont

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class Example:
    """One prompt: an RGB image, a question and its ground-truth answer (a word or a number)."""

    image: Image.Image
    question: str
    answer: str
    task: str
    uid: str


def _rng(task: str, seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"{task}/{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _colour_square(rng: random.Random) -> Tuple[Image.Image, str, str]:
    name = rng.choice(list(COLOURS))
    img = Image.new("RGB", (56, 56), BACKGROUND)
    size = rng.randint(20, 40)
    x, y = rng.randint(0, 56 - size), rng.randint(0, 56 - size)
    ImageDraw.Draw(img).rectangle([x, y, x + size - 1, y + size - 1], fill=COLOURS[name])
    return img, "What colour is the square?", name


def _count_shapes(rng: random.Random) -> Tuple[Image.Image, str, str]:
    target = rng.choice(list(COLOURS))
    n_target = rng.randint(0, 4)
    n_other = rng.randint(0, 4)
    others = [c for c in COLOURS if c != target]
    colours = [target] * n_target + [rng.choice(others) for _ in range(n_other)]
    rng.shuffle(colours)
    img = Image.new("RGB", (112, 112), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cells = rng.sample(range(16), len(colours))  # a 4 x 4 grid keeps shapes apart, so counting is well defined
    for colour, cell in zip(colours, cells):
        cx, cy = (cell % 4) * 28 + 14, (cell // 4) * 28 + 14
        r = rng.randint(7, 11)
        box = [cx - r, cy - r, cx + r, cy + r]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=COLOURS[colour])
    return img, f"How many {target} shapes are there?", str(n_target)


def _digits(rng: random.Random) -> Tuple[Image.Image, str, str]:
    number = rng.randint(10, 99)
    img = Image.new("RGB", (112, 56), BACKGROUND)
    font = ImageFont.load_default(size=rng.randint(28, 36))
    draw = ImageDraw.Draw(img)
    draw.text((rng.randint(5, 45), rng.randint(2, 12)), str(number), fill=(20, 20, 20), font=font)
    return img, "What number is shown?", str(number)


def _bars(rng: random.Random) -> Tuple[Image.Image, str, str]:
    first = rng.randint(10, 49)
    heights = [first, rng.choice([h for h in range(10, 50) if abs(h - first) >= 6])]  # visibly different
    img = Image.new("RGB", (56, 56), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, h in enumerate(heights):
        x = 8 + i * 26
        draw.rectangle([x, 55 - h, x + 14, 55], fill=COLOURS["blue"])
    return img, "Which bar is taller, left or right?", "left" if heights[0] > heights[1] else "right"


TASKS: Dict[str, Callable[[random.Random], Tuple[Image.Image, str, str]]] = {
    "colour": _colour_square,
    "count": _count_shapes,
    "digits": _digits,
    "bars": _bars,
}


def answer_vocabulary(task: str) -> List[str]:
    """Every answer the task can have (e.g. to build a word-level tokenizer for a tiny model)."""
    return {
        "colour": list(COLOURS),
        "count": [str(i) for i in range(5)],
        "digits": [str(i) for i in range(10, 100)],
        "bars": ["left", "right"],
    }[_check(task)]


def question_vocabulary(task: str) -> List[str]:
    """The words of the task's questions."""
    words = {"colour": "What colour is the square?", "count": "How many shapes are there?",
             "digits": "What number is shown?", "bars": "Which bar is taller, left or right?"}[_check(task)]
    extra = list(COLOURS) if task == "count" else []
    return words.replace("?", " ?").replace(",", " ,").split() + extra


def _check(task: str) -> str:
    if task not in TASKS:
        raise KeyError(f"unknown synthetic task {task!r}; valid: {', '.join(TASKS)}")
    return task


def make_example(task: str, index: int, seed: int = 0, split: str = "train") -> Example:
    """The ``index``-th example of ``task`` for ``seed`` and ``split`` ("train" or "val")."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    image, question, answer = TASKS[_check(task)](_rng(task, seed, split, index))
    return Example(image=image, question=question, answer=answer, task=task, uid=f"{task}-{split}-{seed}-{index}")


class SyntheticTask:
    """A deterministic, indexable dataset of ``num_examples`` examples of one task and split."""

    def __init__(self, task: str = "colour", num_examples: int = 2048, seed: int = 0, split: str = "train"):
        _check(task)
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        self.task, self.num_examples, self.seed, self.split = task, num_examples, seed, split

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        return make_example(self.task, index, self.seed, self.split)
