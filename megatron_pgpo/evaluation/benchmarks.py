"""The paper's eight benchmarks, each read from its files as published, into ``Problem`` s.

Put each benchmark's files in ``DATA_DIR/<name>/`` as the hub download lays them out, subfolders included (e.g.
``huggingface-cli download --repo-type dataset hiyouga/geometry3k --local-dir DATA_DIR/geo3k``); each benchmark
reads the files matching the first of its patterns that matches (``megatron-pgpo eval --list``):

===========  ==========================================================  ========================================
name         files (as published)                                         problems used
===========  ==========================================================  ========================================
geo3k        hiyouga/geometry3k ``test`` parquet: problem, answer,       all 601; the answer is the correct
             images (EasyR1's layout)                                     choice's text (LaTeX-ish)
mmk12        FanqingM/MMK12 ``test`` parquet: question (options as        all 2000; answer: a letter
             ``A. ...`` lines), answer, image
mathverse    AI4Math/MathVerse ``testmini`` parquet/json: question,       ``question_type == multi-choice`` (as
             answer, image, question_type, problem_version                PAPO: free-form filtered out)
mathverse_v  the same files                                               multi-choice and ``problem_version`` in
                                                                          Vision Intensive / Dominant / Only
dynamath     DynaMath/DynaMath_Sample split ``sample_variant1``:          all 501 of the variant's file
             question, ground_truth, decoded_image, answer_type
mathvision   MathLLMs/MathVision ``test``: question, options (list),      all; options rendered as choices
             answer, decoded_image
logicvista   lscpku/LogicVista ``test`` parquet, or the GitHub            all with an answer; multi-letter
             ``data/dataset.json`` (+ ``images/``)                        answers ("B, D") need every letter
mmmu_pro     MMMU/MMMU_Pro ``standard (10 options)`` (used when its      single-image items (our prompt has one
             folder is there) or ``vision``, ``test``: question,          image slot; others skipped, counted)
             options (a Python-list string), image_1..7 / image
===========  ==========================================================  ========================================

Any benchmark directory may hold VLMEvalKit's TSV instead (``index``, base64 ``image``, ``question``, option
columns ``A`` .. ``J``, ``answer``; the same filters apply where its columns exist). Sources: the hub cards and the
evaluation code of PAPO (MikeWangWZHL/PAPO, PAPO-Eval), VPPO (huaixuheqing/VPPO-RL), MathVerse
(ZrrSkywalker/MathVerse), MMMU-Pro (MMMU-Benchmark/MMMU) and VLMEvalKit (``vlmeval/dataset``). The MathVerse_V
version set is inferred from PAPO's count (1,308 = 436 multi-choice problems x 3 vision versions).

Rows that cannot be used (no image, an unreadable or several images, an empty question and image, an empty answer)
are skipped and counted per reason; rows outside a benchmark's subset are left out without counting.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..data.files import DataError, SkipCounter
from .readers import count_images, files_and_rows, load_image
from .scoring import letters, number_value

#: Shown when a problem's question is entirely in its image (MathVerse Vision Only, MMMU-Pro vision).
IMAGE_ONLY_QUESTION = "Answer the question shown in the image."


@dataclass
class Problem:
    """One benchmark item, shaped like a training ``Example`` (``question``, ``image``, ``answer``, ``task``,
    ``uid``) so the rollout code serves both. ``question`` is the prompt text, options included.

    The image is kept as it was stored (compressed bytes, a path, a PIL image) and decoded on each access to
    ``image`` (checked once at load): thousands of decoded full-size images would not fit in host memory.
    """

    uid: str
    question: str
    image_ref: Any
    answer: str
    answer_type: str  # scoring.ANSWER_TYPES
    task: str  # the benchmark's name
    options: Dict[str, str] = field(default_factory=dict)  # letter -> option text, where known
    base_dir: Path = Path(".")
    max_pixels: Optional[int] = None
    min_pixels: Optional[int] = None

    @property
    def image(self):
        """The RGB image, resized into ``[min_pixels, max_pixels]``."""
        from ..data.files import fit_pixels

        return fit_pixels(load_image(self.image_ref, self.base_dir), self.max_pixels, self.min_pixels)


@dataclass(frozen=True)
class Fields:
    """What a benchmark's row function extracts from one row."""

    question: str
    answer: str
    image: Any
    options: Dict[str, str] = field(default_factory=dict)
    answer_type: Optional[str] = None  # None: inferred from the answer and options
    uid: Optional[str] = None


#: A row function returns Fields, a skip reason (counted), or None (outside the subset, not counted).
RowFn = Callable[[Dict[str, Any]], Union[Fields, str, None]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    patterns: Tuple[str, ...]  # file globs inside DATA_DIR/<name>/, first match wins
    row: RowFn
    source: str


# ------------------------------------------------------------------------------------------- helpers
_CHOICE_LINE = re.compile(r"(?:^|\n|\s)\(?([A-J])\s*[\):.：]\s*([^\n]*?)(?=\s+\(?[A-J]\s*[\):.：]\s|\n|$)")


def options_in_text(question: str) -> Dict[str, str]:
    """Options written in the question (``Choices:\\nA:40°\\nB:...``, ``(A) yes (B) no``, ``A. 3\\nB. 4``)."""
    tail = question[question.find("Choices"):] if "Choices" in question else question
    found = {m.group(1): m.group(2).strip() for m in _CHOICE_LINE.finditer(tail)}
    return found if len(found) >= 2 and "A" in found else {}


def render_options(question: str, options: Dict[str, str]) -> str:
    return question.rstrip() + "\nChoices:\n" + "\n".join(f"({k}) {v}" for k, v in options.items())


def infer_answer_type(answer: str, options: Dict[str, str]) -> str:
    named = letters(answer)
    if named is not None and (options or re.fullmatch(r"\s*\(?[A-J]\)?\s*(?:,\s*\(?[A-J]\)?\s*)*", answer)):
        return "choice"
    if number_value(answer) is not None:
        return "number"
    return "expression"


def _text(row: Dict[str, Any], *names: str) -> str:
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip() and str(value) != "nan":
            return str(value).strip()
    return ""


def _letter_columns(row: Dict[str, Any]) -> Dict[str, str]:
    """VLMEvalKit's option columns ``A`` .. ``J`` that are present and not empty."""
    return {k: str(row[k]).strip() for k in "ABCDEFGHIJ" if k in row and _text(row, k)}


def _strip_image_tags(text: str) -> str:
    return re.sub(r"<image\s*\d*>", "", text).strip()


# ------------------------------------------------------------------------------------------- the benchmarks
def _geo3k(row):
    question = _text(row, "problem", "question")
    return Fields(question, _text(row, "answer"), row.get("images", row.get("image")), _letter_columns(row),
                  answer_type=None if _letter_columns(row) else "expression")


def _mmk12(row):
    question = _text(row, "question")
    options = _letter_columns(row) or options_in_text(question)
    if _letter_columns(row):
        question = render_options(question, options)
    return Fields(question, _text(row, "answer"), row.get("image"), options, uid=_text(row, "id", "index") or None)


def _mathverse(vision_only: bool) -> RowFn:
    def row_fn(row):
        if _text(row, "question_type") and _text(row, "question_type") != "multi-choice":
            return None
        if vision_only and _text(row, "problem_version") not in ("Vision Intensive", "Vision Dominant",
                                                                  "Vision Only"):
            return None
        if _text(row, "problem_version") == "Text Only":
            return None
        question = _text(row, "question") or IMAGE_ONLY_QUESTION
        options = _letter_columns(row) or options_in_text(question)
        return Fields(question, _text(row, "answer"), row.get("image"), options, answer_type="choice",
                      uid=_text(row, "sample_index", "index") or None)
    return row_fn


def _dynamath(row):
    question = _text(row, "question")
    kind = _text(row, "answer_type").lower()
    answer_type = {"multiple choice": "choice", "float": "number", "int": "number"}.get(kind)
    image = row.get("decoded_image") if row.get("decoded_image") is not None else row.get("image")
    return Fields(question, _text(row, "ground_truth", "answer"), image, options_in_text(question), answer_type,
                  uid=_text(row, "id", "qid", "index") or None)


def _mathvision(row):
    question = _strip_image_tags(_text(row, "question"))
    options_list = row.get("options", row.get("choices"))
    if isinstance(options_list, str) and options_list.startswith("["):
        options_list = ast.literal_eval(options_list)
    options = {chr(65 + i): str(o).strip() for i, o in enumerate(options_list or [])} or _letter_columns(row)
    in_image = all(k == v for k, v in options.items())  # options A..E only named: the choices are in the image
    if options and not in_image:
        question = render_options(question, options)
    image = row.get("decoded_image") if row.get("decoded_image") is not None else row.get("image")
    return Fields(question, _text(row, "answer"), image, {} if in_image else options,
                  answer_type="choice" if options else None, uid=_text(row, "id", "index") or None)


def _logicvista(row):
    question = _text(row, "question")
    image = row.get("image") if row.get("image") is not None else ("images/" + _text(row, "imagename")
                                                                    if _text(row, "imagename") else None)
    return Fields(question, _text(row, "answer"), image, options_in_text(question),
                  uid=_text(row, "id", "__key__", "index") or None)


def _mmmu_pro(row):
    images = [row.get(f"image_{i}") for i in range(1, 8)]
    if count_images(images) > 1:
        return "several images (one image slot per prompt)"
    image = next((v for v in images if count_images([v])), row.get("image"))
    options_value = row.get("options")
    options_list = ast.literal_eval(options_value) if isinstance(options_value, str) else options_value
    options = {chr(65 + i): str(o).strip() for i, o in enumerate(options_list or [])} or _letter_columns(row)
    question = _strip_image_tags(_text(row, "question")) or IMAGE_ONLY_QUESTION
    return Fields(render_options(question, options) if options else question, _text(row, "answer"), image,
                  options, answer_type="choice", uid=_text(row, "id", "index") or None)


BENCHMARKS: Dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("geo3k", ("**/*test*", "**/*"), _geo3k, "hiyouga/geometry3k (test)"),
    Benchmark("mmk12", ("**/*test*", "**/*"), _mmk12, "FanqingM/MMK12 (test)"),
    Benchmark("mathverse", ("**/*testmini*", "**/*"), _mathverse(False), "AI4Math/MathVerse (testmini, multi-choice)"),
    Benchmark("mathverse_v", ("**/*testmini*", "**/*"), _mathverse(True),
              "AI4Math/MathVerse (testmini, multi-choice, vision versions)"),
    Benchmark("dynamath", ("**/sample_variant1-*", "**/sample_variant1.*", "**/*"), _dynamath,
              "DynaMath/DynaMath_Sample (sample_variant1)"),
    Benchmark("mathvision", ("**/test-*", "**/test.*", "**/*"), _mathvision, "MathLLMs/MathVision (test)"),
    Benchmark("logicvista", ("**/*test*", "**/dataset.json", "**/*"), _logicvista,
              "lscpku/LogicVista (test) or Yijia-Xiao/LogicVista data/dataset.json"),
    Benchmark("mmmu_pro", ("standard (10 options)/*", "vision/*", "**/*"), _mmmu_pro, "MMMU/MMMU_Pro (standard (10 options) or vision, test)"),
)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def benchmark_dir(data_dir: Union[str, Path], name: str) -> Path:
    directory = Path(data_dir) / name
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory; put the {name} files there "
                        f"({get_benchmark(name).source}; see `megatron-pgpo eval --list`)")
    return directory


def load_benchmark(name: str, data_dir: Union[str, Path], limit: Optional[int] = None,
                   max_pixels: Optional[int] = None, min_pixels: Optional[int] = None
                   ) -> Tuple[List[Problem], SkipCounter]:
    """The usable problems of benchmark ``name`` from ``data_dir/name/`` and the rows skipped per reason."""
    bench = get_benchmark(name)
    directory = benchmark_dir(data_dir, name)
    skipped, problems, seen = SkipCounter(), [], set()
    rows = 0
    for path, i, row in files_and_rows(directory, bench.patterns):
        rows += 1
        where = f"{path.name} row {i}"
        fields = bench.row(row)
        if fields is None:
            continue
        if isinstance(fields, str):
            skipped.skip(fields, where)
            continue
        if not fields.answer:
            skipped.skip("an empty answer", where)
            continue
        try:
            load_image(fields.image, path.parent)  # checked now, decoded again when used
        except Exception as exc:  # noqa: BLE001 - a missing, corrupt or multiple image
            skipped.skip(f"a missing or unreadable image ({type(exc).__name__})", where)
            continue
        uid = fields.uid or f"{path.stem}:{i}"
        if uid in seen:
            uid = f"{uid}@{path.stem}:{i}"
        seen.add(uid)
        question = fields.question.replace("<image>", "").strip()
        problems.append(Problem(uid=uid, question=question, image_ref=fields.image, answer=fields.answer,
                                answer_type=fields.answer_type or infer_answer_type(fields.answer, fields.options),
                                task=name, options=dict(fields.options), base_dir=path.parent,
                                max_pixels=max_pixels, min_pixels=min_pixels))
        if limit is not None and len(problems) >= limit:
            break
    if rows == 0:
        raise DataError(f"{directory}: no {', '.join(bench.patterns)} files with rows (.parquet, .jsonl, .json, .tsv)")
    if not problems:
        reasons = ", ".join(f"{n} with {r}" for r, n in skipped.counts.items()) or "no row in the subset"
        raise DataError(f"{name} ({directory}): no usable problem ({reasons})")
    return problems, skipped


def describe() -> List[Tuple[str, str, str]]:
    """(name, source, file patterns) of every benchmark, for ``--list``."""
    return [(b.name, b.source, ", ".join(b.patterns)) for b in BENCHMARKS.values()]


def problems_from_examples(examples: Sequence[Any], name: str = "val") -> List[Problem]:
    """A held-out set of training ``Example`` s (``data.val_path`` or the synthetic task) as a benchmark."""
    return [Problem(uid=str(i), question=e.question, image_ref=e.image, answer=e.answer,
                    answer_type="free", task=name) for i, e in enumerate(examples)]
