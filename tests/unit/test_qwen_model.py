"""Single-process parts of the Qwen2.5-VL model: 3-D positions against transformers, image slots vs. response
text, and the config/layout errors raised before any weight is read. (Logit parity: tests/distributed.)"""
from __future__ import annotations

import json

import pytest
import torch

from megatron_pgpo.models.qwen2_5_vl.hf_config import ModelConfigError, load_hf_config
from megatron_pgpo.models.qwen2_5_vl.parity import assemble_inputs, random_pixel_values, synthetic_batch
from megatron_pgpo.models.qwen2_5_vl.rope_index import get_rope_index, image_token_mask
from megatron_pgpo.models.qwen2_5_vl.tiny import tiny_hf_config


@pytest.fixture(scope="module")
def hf_model():
    from megatron_pgpo.models.qwen2_5_vl.tiny import build_tiny_hf_model

    return build_tiny_hf_model("tiny")


def _hf_positions(hf_model, input_ids, image_mask, grids, attention_mask=None):
    positions, _ = hf_model.model.get_rope_index(input_ids, image_mask.long(), grids, attention_mask=attention_mask)
    return positions


def _left_pad(inputs):
    """The same rows, padding moved to the left."""
    ids, am, im = inputs.input_ids.clone(), inputs.attention_mask.clone(), inputs.image_mask.clone()
    for b in range(ids.shape[0]):
        n = int(am[b].sum())
        ids[b] = torch.roll(ids[b], ids.shape[1] - n)
        am[b] = torch.roll(am[b], ids.shape[1] - n)
        im[b] = torch.roll(im[b], ids.shape[1] - n)
    return ids, am, im


LAYOUT_NAMES = ("one image", "image first, tall grid, image last", "two rows, right padding, two images in a row",
                "text-only row next to an image row", "three images back to back")


def _layouts(config):
    def build(rows, grids):
        return assemble_inputs(config, rows, grids, random_pixel_values(config, grids))

    return {
        "one image": build([[("text", 4), ("image", 0), ("text", 6)]], [(1, 4, 6)]),
        "image first, tall grid, image last": build([[("image", 0), ("text", 3), ("image", 1)]],
                                                    [(1, 8, 4), (1, 2, 2)]),
        "two rows, right padding, two images in a row": synthetic_batch(config, seed=1),
        "text-only row next to an image row": build([[("text", 9)], [("text", 2), ("image", 0), ("text", 2)]],
                                                    [(1, 6, 4)]),
        "three images back to back": build([[("text", 1), ("image", 0), ("image", 1), ("image", 2), ("text", 2)]],
                                           [(1, 2, 4), (1, 4, 2), (1, 2, 2)]),
    }


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_get_rope_index_equals_transformers(hf_model, layout):
    inputs = _layouts(hf_model.config)[layout]
    ours = get_rope_index(inputs.input_ids, inputs.image_mask, inputs.image_grid_thw, 2,
                          attention_mask=inputs.attention_mask)
    theirs = _hf_positions(hf_model, inputs.input_ids, inputs.image_mask, inputs.image_grid_thw,
                           inputs.attention_mask)
    assert torch.equal(ours, theirs)
    if bool(inputs.attention_mask.all()):  # without padding the mask argument is optional on both sides
        assert torch.equal(get_rope_index(inputs.input_ids, inputs.image_mask, inputs.image_grid_thw, 2),
                           _hf_positions(hf_model, inputs.input_ids, inputs.image_mask, inputs.image_grid_thw))


def test_get_rope_index_equals_transformers_with_left_padding(hf_model):
    inputs = synthetic_batch(hf_model.config, seed=2)
    ids, am, im = _left_pad(inputs)
    ours = get_rope_index(ids, im, inputs.image_grid_thw, 2, attention_mask=am)
    assert torch.equal(ours, _hf_positions(hf_model, ids, im, inputs.image_grid_thw, am))
    # padding is skipped: each row's real tokens get the positions they had with right padding
    for b in range(ids.shape[0]):
        assert torch.equal(ours[:, b, am[b].bool()], inputs.position_ids[:, b, inputs.attention_mask[b].bool()])


def test_text_after_an_image_resumes_at_start_plus_max_side():
    config = tiny_hf_config("tiny")
    inputs = assemble_inputs(config, [[("text", 2), ("image", 0), ("text", 2)]], [(1, 4, 8)],
                             random_pixel_values(config, [(1, 4, 8)]))
    positions = inputs.position_ids[:, 0]
    start = 3  # two text tokens + <|vision_start|>
    assert positions[:, start].tolist() == [3, 3, 3]
    first_text_after = start + 8  # <|vision_end|>, right after the 8 image tokens
    assert positions[:, first_text_after].tolist() == [3 + 4, 3 + 4, 3 + 4]  # max(4, 8) / 2 = 4


def test_image_token_in_a_response_is_text(hf_model):
    config = hf_model.config
    image_id = config.image_token_id
    response = [7, image_id, image_id, 8]
    inputs = assemble_inputs(config, [[("text", 3), ("image", 0), ("text", 2), ("text", response)],
                                      [("text", 2), ("image", 1), ("text", [image_id, 5])]],
                             [(1, 4, 4), (1, 2, 4)], random_pixel_values(config, [(1, 4, 4), (1, 2, 4)]),
                             prompt_lengths=[3 + 6 + 2, 2 + 4])
    ids = inputs.input_ids
    naive = image_token_mask(ids, image_id)
    masked = image_token_mask(ids, image_id, prompt_lengths=torch.tensor([11, 6]))
    assert torch.equal(masked, inputs.image_mask)
    assert int(naive.sum()) == 4 + 2 + 2 + 1 and int(masked.sum()) == 4 + 2
    assert not bool(masked[0, 11:].any()) and not bool(masked[1, 6:].any())
    # positions: the response's image ids count up like text; transformers agrees when told the same slots
    positions = get_rope_index(ids, masked, inputs.image_grid_thw, 2, attention_mask=inputs.attention_mask)
    row0 = positions[0, 0, 11:15].tolist()
    assert row0 == list(range(row0[0], row0[0] + 4))
    assert torch.equal(positions, _hf_positions(hf_model, ids, masked, inputs.image_grid_thw, inputs.attention_mask))
    with pytest.raises(ValueError, match="image run|more image placeholder runs"):
        get_rope_index(ids, naive, inputs.image_grid_thw, 2, attention_mask=inputs.attention_mask)


# ------------------------------------------------------------------------------------------ layout and config errors
def _config(**text_overrides):
    config = tiny_hf_config("tiny")  # 2 layers, 4 heads, 2 KV groups, MLP 344
    for key, value in text_overrides.items():
        setattr(config.text_config, key, value)
    return config


@pytest.mark.parametrize("tp,pp,overrides,named,not_named", [
    (3, 1, {}, ["TP=3 does not divide attention heads (4)", "TP=3 does not divide KV groups (num_key_value_heads) (2)",
                "TP=3 does not divide the MLP intermediate size (344)"], ["PP="]),
    (4, 1, {}, ["TP=4 does not divide KV groups (num_key_value_heads) (2)"], ["attention heads", "MLP", "PP="]),
    (2, 1, {"intermediate_size": 345}, ["TP=2 does not divide the MLP intermediate size (345)"],
     ["attention heads", "KV groups", "PP="]),
    (1, 3, {}, ["PP=3 does not divide the 2 language layers"], ["TP="]),
    (4, 3, {}, ["TP=4 does not divide KV groups", "PP=3 does not divide the 2 language layers"], ["MLP"]),
])
def test_bad_layout_is_a_config_error_naming_the_problem(tp, pp, overrides, named, not_named):
    from megatron_pgpo.models.qwen2_5_vl.model import build_model

    with pytest.raises(ModelConfigError) as info:
        build_model(_config(**overrides), tp=tp, pp=pp)  # raises before Megatron state or weights are touched
    message = str(info.value)
    for text in named:
        assert text in message
    for text in not_named:  # only the real problems are named
        assert text not in message


def test_bad_layout_fails_before_any_weight_is_read(tmp_path):
    from megatron_pgpo.models.qwen2_5_vl.parity import check_layout, run_check

    _config().save_pretrained(tmp_path)  # config.json only: reading a weight would raise FileNotFoundError
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ModelConfigError, match="TP=8 does not divide attention heads"):
        run_check(tmp_path, tp=8, pp=1)
    with pytest.raises(ModelConfigError, match="PP=4 does not divide"):
        check_layout(tmp_path, 1, 4)
    assert check_layout(tmp_path, 2, 2).text_config.num_hidden_layers == 2


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2", None])
def test_unsupported_model_type_is_a_clear_error(tmp_path, model_type):
    raw = json.loads(_config().to_json_string())
    raw["model_type"] = model_type
    with pytest.raises(ModelConfigError, match=rf"unsupported model_type {model_type!r}.*qwen2_5_vl"):
        load_hf_config(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match="unsupported model_type"):
        load_hf_config(tmp_path)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelConfigError, match="no Hugging Face config"):
        load_hf_config(tmp_path)


def test_fused_kernels_follow_the_device_and_what_is_installed():
    from megatron_pgpo.models.qwen2_5_vl.hf_config import fused_kernels

    none = lambda name: False  # noqa: E731
    everything = lambda name: True  # noqa: E731
    off = dict(bias_activation_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False)
    assert fused_kernels(False, "local", everything) == off  # never on the CPU
    assert fused_kernels(True, "local", none) == dict(off, bias_activation_fusion=True)  # torch-only SwiGLU fusion
    assert fused_kernels(True, "transformer_engine", none)["gradient_accumulation_fusion"]  # TE fuses wgrad itself
    assert fused_kernels(True, "local", everything) == dict(bias_activation_fusion=True, masked_softmax_fusion=True,
                                                            gradient_accumulation_fusion=True)
