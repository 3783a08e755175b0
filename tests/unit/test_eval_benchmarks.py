"""Each benchmark read through the real reader from tiny files written in its published layout (parquet with
``datasets`` Image structs, a JSON object of records with image paths, VLMEvalKit TSV with base64 images): the
subset filters, the options, the answer types, and bad rows skipped and counted."""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from megatron_pgpo.data.files import DataError
from megatron_pgpo.evaluation.benchmarks import (BENCHMARKS, IMAGE_ONLY_QUESTION, load_benchmark, options_in_text)


def png(colour=(200, 30, 30), size=(28, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, rows, image_columns=(), list_image_columns=()):
    import datasets

    features = {}
    for col in image_columns:
        features[col] = datasets.Image()
    for col in list_image_columns:
        features[col] = datasets.Sequence(datasets.Image())
    ds = datasets.Dataset.from_list(rows)
    for col, feature in features.items():
        ds = ds.cast_column(col, feature)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


def image(b=None):
    return {"bytes": b if b is not None else png(), "path": None}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    # geo3k: EasyR1's layout (problem with "<image>", answer = the choice's text, images = a list), in data/
    write_parquet(root / "geo3k/data/test-00000-of-00001.parquet", [
        {"problem": "<image>Find x.", "answer": "2 \\sqrt { 221 }", "images": [image()]},
        {"problem": "<image>Find y.", "answer": "120", "images": [image()]},
        {"problem": "<image>Find z.", "answer": "", "images": [image()]},  # empty answer: skipped
        {"problem": "<image>Find w.", "answer": "3", "images": [image(b"not a png")]},  # corrupt image
    ], list_image_columns=["images"])
    write_parquet(root / "geo3k/data/train-00000-of-00001.parquet", [  # not the test split: never read
        {"problem": "<image>Train.", "answer": "1", "images": [image()]}], list_image_columns=["images"])
    # mmk12: options as "A. ..." lines in the question, a letter answer
    write_parquet(root / "mmk12/data/test-00000-of-00001.parquet", [
        {"id": "m1", "subject": "math", "question": "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6", "answer": "B",
         "image": image()}], image_columns=["image"])
    # mathverse testmini: five versions, multi-choice and free-form; Vision Only has an empty question
    verse = []
    for version in ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only"):
        verse.append({"sample_index": f"{len(verse) + 1}", "problem_index": "1", "problem_version": version,
                      "question": "" if version == "Vision Only" else "Find the angle.\nChoices:\nA:40°\nB:50°",
                      "answer": "B", "question_type": "multi-choice", "image": image()})
    verse.append({"sample_index": "99", "problem_index": "2", "problem_version": "Text Dominant",
                  "question": "How long?", "answer": "14", "question_type": "free-form", "image": image()})
    write_parquet(root / "mathverse/testmini.parquet", verse, image_columns=["image"])
    (root / "mathverse_v").symlink_to(root / "mathverse")
    # dynamath: split sample_variant1 among ten, decoded_image, answer_type
    for variant in (1, 2):
        write_parquet(root / f"dynamath/data/sample_variant{variant}-00000-of-00001.parquet", [
            {"id": "0", "question": "Is it convex? Choices: (A) yes (B) no", "image": "images/0.png",
             "decoded_image": image(), "ground_truth": "A", "answer_type": "multiple choice", "subject": "PL",
             "knowledge_level": "high school"},
            {"id": "1", "question": "Find the area.", "image": "images/1.png", "decoded_image": image(),
             "ground_truth": "2.0944", "answer_type": "float", "subject": "PL", "knowledge_level": "college"},
        ], image_columns=["decoded_image"])
    # mathvision: options as a list (or the five letters only: choices in the image), "<image1>" in the question
    write_parquet(root / "mathvision/data/test-00000-of-00001.parquet", [
        {"id": "1", "question": "<image1>\nWhich cube?", "options": ["1", "2", "3", "4", "5"], "image": "images/1.jpg",
         "decoded_image": image(), "answer": "C", "solution": None, "level": 2, "subject": "logic"},
        {"id": "2", "question": "<image1>\nWhich one?", "options": ["A", "B", "C", "D", "E"], "image": "images/2.jpg",
         "decoded_image": image(), "answer": "E", "solution": None, "level": 1, "subject": "logic"},
        {"id": "3", "question": "<image1>\nHow many?", "options": [], "image": "images/3.jpg",
         "decoded_image": image(), "answer": "\\frac{4}{3}", "solution": None, "level": 3, "subject": "algebra"},
    ], image_columns=["decoded_image"])
    # logicvista: the GitHub dataset.json (an object keyed by id) with images/ beside it
    lv = root / "logicvista/data"
    (lv / "images").mkdir(parents=True)
    (lv / "images/0.jpg").write_bytes(png())
    (lv / "images/1.jpg").write_bytes(png())
    (lv / "dataset.json").write_text(json.dumps({
        "v1_0": {"imagename": "0.jpg", "question": "Which two? (A) x (B) y (C) z (D) w", "answer": "B, D",
                 "reasoning": "", "skill": ["spatial"]},
        "v1_1": {"imagename": "1.jpg", "question": "Which? (A) x (B) y", "answer": "A", "skill": []},
        "v1_2": {"imagename": "missing.jpg", "question": "Which? (A) x (B) y", "answer": "A", "skill": []},
        "v1_3": {"imagename": "1.jpg", "question": "Which?", "answer": "", "skill": []},
    }))
    # mmmu_pro: standard (10 options) with options as a Python-list string and image_1..image_7
    blank = {f"image_{i}": None for i in range(1, 8)}
    write_parquet(root / "mmmu_pro/standard (10 options)/test-00000-of-00001.parquet", [
        {"id": "p1", "question": "<image 1> What is shown?", "options": "['cat', 'dog', 'bird']", "explanation": "",
         **blank, "image_1": image(), "img_type": "['Photo']", "answer": "B", "topic_difficulty": "Easy",
         "subject": "Art"},
        {"id": "p2", "question": "<image 1> vs <image 2>?", "options": "['x', 'y']", "explanation": "",
         **blank, "image_1": image(), "image_2": image(), "img_type": "['Photo']", "answer": "A",
         "topic_difficulty": "Easy", "subject": "Art"},
    ], image_columns=[f"image_{i}" for i in range(1, 8)])
    return root


def test_every_benchmark_has_a_fixture(data_dir):
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(BENCHMARKS)


def test_geo3k(data_dir):
    problems, skipped = load_benchmark("geo3k", data_dir)
    assert [p.question for p in problems] == ["Find x.", "Find y."]  # the test split only, "<image>" removed
    assert [p.answer_type for p in problems] == ["expression", "expression"]
    assert problems[0].image.size == (28, 28) and problems[0].image.mode == "RGB"
    assert skipped.counts == {"an empty answer": 1, "a missing or unreadable image (UnidentifiedImageError)": 1}


def test_mmk12(data_dir):
    (p,), _ = load_benchmark("mmk12", data_dir)
    assert p.uid == "m1" and p.answer == "B" and p.answer_type == "choice"
    assert p.options == {"A": "3", "B": "4", "C": "5", "D": "6"}


def test_mathverse_multi_choice_and_vision_subset(data_dir):
    problems, _ = load_benchmark("mathverse", data_dir)
    assert len(problems) == 5 and all(p.answer_type == "choice" for p in problems)  # free-form left out
    assert problems[-1].question == IMAGE_ONLY_QUESTION and problems[0].options == {"A": "40°", "B": "50°"}
    vision, _ = load_benchmark("mathverse_v", data_dir)
    assert [p.uid for p in vision] == ["3", "4", "5"]


def test_dynamath_first_variant_only(data_dir):
    problems, _ = load_benchmark("dynamath", data_dir)
    assert [(p.answer, p.answer_type) for p in problems] == [("A", "choice"), ("2.0944", "number")]
    assert problems[0].options == {"A": "yes", "B": "no"}


def test_mathvision_options(data_dir):
    problems, _ = load_benchmark("mathvision", data_dir)
    first, letters_only, free = problems
    assert first.question == "Which cube?\nChoices:\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) 5"
    assert first.options["C"] == "3" and first.answer_type == "choice"
    assert letters_only.question == "Which one?" and letters_only.options == {}  # the choices are in the image
    assert letters_only.answer_type == "choice" and free.answer_type == "expression"


def test_logicvista_json_object_with_image_paths(data_dir):
    problems, skipped = load_benchmark("logicvista", data_dir)
    assert [(p.uid, p.answer, p.answer_type) for p in problems] == [("v1_0", "B, D", "choice"),
                                                                      ("v1_1", "A", "choice")]
    assert sum(skipped.counts.values()) == 2  # a missing image file, an empty answer


def test_mmmu_pro_single_image_items(data_dir):
    problems, skipped = load_benchmark("mmmu_pro", data_dir)
    (p,) = problems
    assert p.question == "What is shown?\nChoices:\n(A) cat\n(B) dog\n(C) bird" and p.options["B"] == "dog"
    assert skipped.counts == {"several images (one image slot per prompt)": 1}


def test_vlmevalkit_tsv(tmp_path):
    b64 = base64.b64encode(png()).decode()
    d = tmp_path / "mathverse"
    d.mkdir()
    header = "index\timage\tquestion\tanswer\tA\tB\tquestion_type\tproblem_version\n"
    rows = [f"1\t{b64}\tWhich?\tA\tred\tblue\tmulti-choice\tVision Only\n",
            f"2\t{b64}\tHow many?\t3\t\t\tfree-form\tText Lite\n"]
    (d / "MathVerse_MINI.tsv").write_text(header + "".join(rows))
    (p,), _ = load_benchmark("mathverse", tmp_path)
    assert p.options == {"A": "red", "B": "blue"} and p.answer == "A" and p.image.size == (28, 28)


def test_limit_and_clear_errors(data_dir, tmp_path):
    assert len(load_benchmark("mathverse", data_dir, limit=2)[0]) == 2
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu'; valid: geo3k, mmk12"):
        load_benchmark("mmmu", data_dir)
    with pytest.raises(DataError, match="no such directory; put the geo3k files there"):
        load_benchmark("geo3k", tmp_path)
    (tmp_path / "geo3k").mkdir()
    (tmp_path / "geo3k/test.jsonl").write_text(json.dumps({"problem": "x", "answer": "", "images": []}) + "\n")
    with pytest.raises(DataError, match="no usable problem"):
        load_benchmark("geo3k", tmp_path)


def test_options_in_question_text():
    assert options_in_text("Q?\nChoices:\nA:40°\nB:50°\nC:60°") == {"A": "40°", "B": "50°", "C": "60°"}
    assert options_in_text("Is it? Choices: (A) yes (B) no") == {"A": "yes", "B": "no"}
    assert options_in_text("What is 2+2?\nA. 3\nB. 4") == {"A": "3", "B": "4"}
    assert options_in_text("Find x.") == {}
