"""Local dataset files in both layouts through real `datasets`: images round-trip, bad rows are skipped and
counted, an unusable file is a clear error."""
import io
import json

import pytest
from PIL import Image

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)

from megatron_pgpo.data.files import DataError, detect_layout, load_examples


def _png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_virl39k_layout_with_image_feature(tmp_path):
    import datasets

    rows = {
        "question": ["<image>What colour?", "Which one?", "", "Broken?"],
        "answer": ["red", "", "blue", "x"],
        "image": [{"bytes": _png((255, 0, 0)), "path": None}, {"bytes": _png((0, 0, 255)), "path": None},
                  {"bytes": _png((0, 255, 0)), "path": None}, {"bytes": b"not a png", "path": None}],
    }
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    examples, skipped = load_examples(str(tmp_path))
    assert [(e.question, e.answer) for e in examples] == [("What colour?", "red")]
    assert examples[0].image.getpixel((3, 3)) == (255, 0, 0)
    assert skipped.total == 3 and sorted(skipped.counts.values()) == [1, 1, 1]


def test_jsonl_geo3k_layout_with_image_paths(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((0, 255, 0)))
    lines = [{"problem": "Find x.", "answer": "3", "images": ["a.png"]},
             {"problem": "Missing image", "answer": "1", "images": ["nope.png"]}]
    path = tmp_path / "geo.jsonl"
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    examples, skipped = load_examples(str(path), prompt_length=lambda e: len(e.question.split()), max_prompt_length=5)
    assert [e.answer for e in examples] == ["3"] and examples[0].image.size == (28, 28)
    assert skipped.total == 1


def test_prompt_length_filter_and_no_usable_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((0, 255, 0)))
    path = tmp_path / "geo.jsonl"
    path.write_text(json.dumps({"problem": "Find x.", "answer": "3", "images": ["a.png"]}) + "\n")
    with pytest.raises(DataError, match="no usable row .*1 with a prompt longer than 5 tokens"):
        load_examples(str(path), prompt_length=lambda e: 100, max_prompt_length=5)


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="cannot detect the layout"):
        detect_layout(["text", "label"])
    with pytest.raises(DataError, match="missing \\['images'\\]"):
        detect_layout(["problem", "answer"], "geo3k")
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "none.parquet"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(str(tmp_path / "x.csv"))


def test_large_images_are_downscaled_to_max_pixels(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (400, 100), (10, 20, 30)).save(buf, format="PNG")
    (tmp_path / "big.png").write_bytes(buf.getvalue())
    path = tmp_path / "geo.jsonl"
    path.write_text(json.dumps({"problem": "Find x.", "answer": "3", "images": ["big.png"]}) + "\n")
    examples, _ = load_examples(str(path), max_pixels=10_000)
    w, h = examples[0].image.size
    assert w * h <= 10_000 and (w, h) == (200, 50)  # aspect kept
    assert load_examples(str(path))[0][0].image.size == (400, 100)


def test_prompt_length_counts_what_the_processor_and_chat_template_give(tmp_path):
    """``PromptLength`` (from the image size alone) equals the tokens of the real processed prompt."""
    from megatron_pgpo.data.files import Example
    from megatron_pgpo.demo.tiny_model import build_demo_checkpoint
    from megatron_pgpo.trainer.prompts import PromptLength, messages_for
    from transformers import AutoImageProcessor, AutoTokenizer

    ckpt = build_demo_checkpoint(tmp_path / "hf")
    count = PromptLength(str(ckpt))
    tokenizer, processor = AutoTokenizer.from_pretrained(ckpt), AutoImageProcessor.from_pretrained(ckpt)
    for size in [(56, 56), (112, 84), (30, 200)]:
        example = Example(image=Image.new("RGB", size), question="What colour is the square?", answer="red",
                          task="t", uid="u")
        text = tokenizer.apply_chat_template(messages_for(example.question), tokenize=False, add_generation_prompt=True)
        grid = processor(images=[example.image], return_tensors="pt")["image_grid_thw"]
        expected = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1 + int(grid.prod()) // 4
        assert count(example) == expected, size


def test_non_utf8_lines_bad_json_and_huge_images_are_skipped_and_counted(tmp_path):
    """One bad line no longer fails the whole .jsonl load; a 100-megapixel image is refused from its header,
    before ~300 MB of decoding."""
    from megatron_pgpo.data.files import MAX_SOURCE_PIXELS

    (tmp_path / "a.png").write_bytes(_png((0, 255, 0)))
    Image.new("1", (10_000, 10_000)).save(tmp_path / "huge.png")  # 1-bit: small to write, 1e8 pixels
    assert 10_000 * 10_000 > MAX_SOURCE_PIXELS
    good = json.dumps({"problem": "Find x.", "answer": "3", "images": ["a.png"]}).encode()
    lines = [good, b'{"problem": "caf\xe9", "answer": "1", "images": ["a.png"]}', b"{not json", b"[1, 2]", b"",
             json.dumps({"problem": "Big.", "answer": "2", "images": ["huge.png"]}).encode(), good]
    path = tmp_path / "geo.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    examples, skipped = load_examples(str(path))
    assert [e.answer for e in examples] == ["3", "3"]
    assert dict(skipped.counts) == {"text that is not UTF-8": 1, "a line that is not JSON": 1,
                                    "a line that is not a JSON object": 1,
                                    f"an image over {MAX_SOURCE_PIXELS} pixels": 1}
    path.write_bytes(lines[1] + b"\n" + lines[2] + b"\n")
    with pytest.raises(DataError, match="no usable row .*1 with text that is not UTF-8, 1 with a line that is not"):
        load_examples(str(path))
