"""Keys that used to be accepted and ignored: the prompt template, data.min_pixels, and DAPO's filter metric."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from megatron_pgpo.config import load_config
from megatron_pgpo.data.files import fit_pixels
from megatron_pgpo.trainer.batch import Sample
from megatron_pgpo.trainer.prompts import DEFAULT_TEMPLATE, messages_for, render_prompt
from megatron_pgpo.trainer.rollouts import filter_values


def test_the_config_default_is_the_trainers_template():
    assert load_config(None, []).data.prompt_template == DEFAULT_TEMPLATE  # config stays torch-free: a copy


def test_template_is_rendered_with_braces_elsewhere_kept():
    assert render_prompt("2+2?", "Q: {question} Put it in \\boxed{}.") == "Q: 2+2? Put it in \\boxed{}."
    text = messages_for("What colour?", "{question} One word.")[0]["content"]
    assert text == [{"type": "image"}, {"type": "text", "text": "What colour? One word."}]
    assert messages_for("x")[0]["content"][1]["text"] == DEFAULT_TEMPLATE.replace("{question}", "x")
    with pytest.raises(ValueError, match="needs a {question} placeholder"):
        render_prompt("x", "no placeholder")


@pytest.mark.parametrize("size, lo, hi, expected", [
    ((10, 10), 400, None, (20, 20)),        # upscaled to at least 400 pixels, aspect kept
    ((30, 10), 1200, None, (60, 20)),
    ((100, 100), 400, 5000, (70, 70)),     # downscaled to at most 5000
    ((50, 40), 400, 5000, (50, 40)),       # inside: unchanged
])
def test_fit_pixels(size, lo, hi, expected):
    out = fit_pixels(Image.new("RGB", size), hi, lo)
    assert out.size == expected
    if lo is not None:
        assert out.width * out.height >= lo
    if hi is not None:
        assert out.width * out.height <= hi


def test_min_pixels_reaches_local_files(tmp_path):
    import io
    import json

    from megatron_pgpo.data.files import load_examples

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    (tmp_path / "img.png").write_bytes(buf.getvalue())
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "image": "img.png"}) + "\n")
    (example,), _ = load_examples(str(tmp_path / "d.jsonl"), min_pixels=256)
    assert example.image.size == (16, 16)


def _sample(group, reward, accuracy):
    return Sample(prompt_ids=[1], response_ids=[2], reward=reward, group=group, extra={"accuracy": accuracy})


def test_dapo_filter_metric():
    from megatron_pgpo.algorithms import dapo_keep_groups

    # group 0: every answer wrong, formats differ (rewards 0 / 0.1); group 1: answers differ
    samples = [_sample(0, 0.0, 0.0), _sample(0, 0.1, 0.0), _sample(1, 1.0, 1.0), _sample(1, 0.1, 0.0)]
    groups = torch.tensor([s.group for s in samples])
    by_reward = dapo_keep_groups(filter_values(samples, "reward"), groups)
    by_accuracy = dapo_keep_groups(filter_values(samples, "accuracy"), groups)
    assert by_reward.tolist() == [True, True, True, True]
    assert by_accuracy.tolist() == [False, False, True, True]  # DAPO's rule: all wrong is dropped
    with pytest.raises(ValueError, match="valid: reward, accuracy"):
        filter_values(samples, "format")
