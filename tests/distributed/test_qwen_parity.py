"""The Megatron Qwen2.5-VL model equals transformers on the tiny presets, at TP=1, TP=2 and PP=2 (2 gloo workers).

Each tiny preset's HF checkpoint is written once per session; each worker builds its stage, loads its shard with
``load_hf_into_model`` and runs ``parity.synthetic_batch`` (two prompts of different lengths, right padding, one
with two images) through every stage: the image pass, the text-only pass in its cheap drop form and in its
attention-mask form. The parent runs transformers once per preset on the same batch (text-only reference: 4-D
mask + explicit 3-D positions) and compares, fp32 and eval mode, within 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from megatron_pgpo.models.qwen2_5_vl.parity import compare, hf_logits, load_hf_model, synthetic_batch

TOLERANCE = 1e-4
SEED = 3
PRESETS = ("tiny", "tiny-mha", "tiny-gqa")
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


# --------------------------------------------------------------------------------------------- worker side
def _megatron_passes(hf_path: str, seed: int, tp: int, pp: int, first_stage_layers=None):
    """Every pass's full-vocabulary logits from the one rank that holds them (last stage, TP/DP rank 0)."""
    from megatron.core import parallel_state as ps

    from megatron_pgpo.models.qwen2_5_vl.hf_config import load_hf_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.parity import megatron_logits

    model = build_model(load_hf_config(hf_path), tp=tp, pp=pp, init_weights=False,
                        first_stage_layers=first_stage_layers)
    load_hf_into_model(model, hf_path, tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp,
                       pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=pp)
    logits = megatron_logits(model, synthetic_batch(model.hf_config, seed))
    if logits is None or ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
        return None
    return logits


def _response_with_image_token(hf_path: str, tp: int):
    """A sampled response that contains ``<|image_pad|>`` as text: with ``prompt_lengths`` the image pass runs and
    the text-only pass keeps that token; counting every image token id instead is an error."""
    from megatron.core import parallel_state as ps

    from megatron_pgpo.models.qwen2_5_vl.hf_config import load_hf_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.parity import assemble_inputs, megatron_logits, random_pixel_values
    from megatron_pgpo.models.qwen2_5_vl.rope_index import image_token_mask
    from megatron_pgpo.models.qwen2_5_vl.text_only import drop_visual_tokens

    config = load_hf_config(hf_path)
    model = build_model(config, tp=tp, pp=1, init_weights=False)
    load_hf_into_model(model, hf_path, tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp)
    grids = [(1, 4, 4)]
    response = [5, config.image_token_id, 6, config.image_token_id, config.image_token_id, 7]
    prompt_length = 4 + (2 + 4) + 3
    inputs = assemble_inputs(config, [[("text", 4), ("image", 0), ("text", 3), ("text", response)]], grids,
                             random_pixel_values(config, grids), prompt_lengths=[prompt_length])
    mask = inputs.image_mask
    logits = megatron_logits(model, inputs, passes=("image", "text_only_drop"))
    dropped = drop_visual_tokens(inputs.input_ids, inputs.position_ids, mask)
    naive = image_token_mask(inputs.input_ids, config.image_token_id)
    try:
        model(inputs.input_ids, inputs.position_ids, pixel_values=inputs.pixel_values,
              image_grid_thw=inputs.image_grid_thw, image_mask=naive)
        naive_error = None
    except ValueError as exc:
        naive_error = str(exc)
    kept = dropped.input_ids[0][dropped.valid[0]]
    return {
        "finite": all(bool(torch.isfinite(v).all()) for v in logits.values()),
        "response_image_tokens_kept": int((kept == config.image_token_id).sum()),
        "image_slots": int(mask.sum()),
        "naive_error": naive_error,
    }


# --------------------------------------------------------------------------------------------- parent side
@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("qwen_tiny_hf")
    return {preset: str(save_tiny_checkpoint(root / preset, preset, seed=11)) for preset in PRESETS}


@pytest.fixture(scope="session")
def hf_reference(tiny_checkpoints):
    """Per preset: (inputs, transformers logits), computed once."""
    cache = {}

    def get(preset):
        if preset not in cache:
            model = load_hf_model(tiny_checkpoints[preset])
            inputs = synthetic_batch(model.config, SEED)
            cache[preset] = (inputs, hf_logits(model, inputs))
        return cache[preset]

    return get


def _one(results):
    held = [r for r in results if r is not None]
    assert len(held) == 1, f"expected exactly one rank to return logits, got {len(held)}"
    return held[0]


def _cases():
    for preset in PRESETS:
        for name, (tp, pp) in LAYOUTS.items():
            # tiny-mha and tiny-gqa tie the embeddings: at PP=2 the last stage's output-layer copy must be loaded
            yield pytest.param(preset, tp, pp, id=f"{preset}-{name}")


@pytest.mark.parametrize("preset,tp,pp", list(_cases()))
def test_megatron_logits_equal_transformers(workers, tiny_checkpoints, hf_reference, preset, tp, pp):
    inputs, reference = hf_reference(preset)
    logits = _one(workers.run(_megatron_passes, tiny_checkpoints[preset], SEED, tp, pp, tp=tp, pp=pp,
                              timeout_s=120))
    diffs = compare(logits, reference, inputs)
    assert diffs["image"] <= TOLERANCE, diffs
    assert diffs["text_only_drop"] <= TOLERANCE, diffs
    assert diffs["text_only_mask"] <= TOLERANCE, diffs

    text = inputs.text_positions
    drop, mask = logits["text_only_drop"][text], logits["text_only_mask"][text]
    assert float((drop - mask).abs().max()) <= TOLERANCE  # the cheap form equals the verification form
    # ...and neither is the image pass: text after an image must see a different context without it.
    assert float((mask - logits["image"][text]).abs().max()) > 1e-2
    assert float((reference["text_only"][text] - reference["image"][text]).abs().max()) > 1e-2
    # padding rows were really padded and every compared value is finite
    assert not bool(inputs.valid.all())
    assert all(bool(torch.isfinite(v[inputs.valid]).all()) for v in logits.values())


def test_uneven_pipeline_split_equals_transformers(workers, tiny_checkpoints, hf_reference):
    """PP=2 with 1 + 3 of tiny-gqa's 4 layers (parallel.first_stage_layers=1, tied embeddings): the loader maps
    each stage's HF layers from the split, and the logits equal transformers'."""
    inputs, reference = hf_reference("tiny-gqa")
    logits = _one(workers.run(_megatron_passes, tiny_checkpoints["tiny-gqa"], SEED, 1, 2, 1, tp=1, pp=2,
                              timeout_s=120))
    diffs = compare(logits, reference, inputs)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_response_image_token_is_text_not_an_image_slot(workers, tiny_checkpoints):
    results = workers.run(_response_with_image_token, tiny_checkpoints["tiny"], 2, tp=2, pp=1, timeout_s=120)
    for result in results:
        assert result["finite"]
        assert result["image_slots"] == 4  # one 4x4-patch image, merged 2x2
        assert result["response_image_tokens_kept"] == 3  # the text-only pass keeps them as text
        assert result["naive_error"] is not None and "image placeholder tokens" in result["naive_error"]
