"""The demo checkpoint's warm-up: its visual-blind forward is PGPO's text-only pass (checked against the form that
drops the image tokens, transformers on both sides), and a short warm-up trains both variants."""
import random

import pytest
import torch

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megatron_pgpo.demo.tiny_model import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "hf", task="colour", seed=3)


def _batch(path, n=3):
    """Right-padded prompt + response rows of different lengths, as ``warm_up`` builds them."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from megatron_pgpo.data.synthetic import SyntheticTask
    from megatron_pgpo.demo.tiny_model import collate, encode_example

    tokenizer, processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    data, rng = SyntheticTask("colour", 8, seed=4, split="train"), random.Random(0)
    image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    encoded = [encode_example(tokenizer, processor, data[i], "<think> the answer is red" + " red" * rng.randrange(4)
                              + " </think> \\boxed{red}", image_token_id) for i in range(n)]
    images, attention = collate(encoded, tokenizer.pad_token_id, image_token_id)
    assert len({int(a.sum()) for a in attention}) > 1, "rows of equal length would not test the padding"
    return images, attention


def test_visual_blind_forward_equals_the_sequence_without_its_image_tokens(demo):
    """Every real text position: the masked forward's logits equal those of the row with its image tokens (and
    padding) removed, at the original 3-D positions and without pixels (docs/pgpo_spec.md section 1's two forms)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_pgpo.demo.tiny_model import visual_blind_inputs

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo, attn_implementation="eager").eval()
    images, attention = _batch(demo)
    blind = visual_blind_inputs(images, attention, model.config)
    # The positions are transformers' own for the full sequence (the drop form below reuses them).
    hf_positions, _ = model.model.get_rope_index(images["input_ids"], images["mm_token_type_ids"],
                                                 images["image_grid_thw"], attention_mask=attention)
    valid = attention.bool()
    assert torch.equal(blind["position_ids"][:, valid], hf_positions[:, valid])
    with torch.no_grad():
        masked = model(**{k: v for k, v in blind.items() if k != "labels"}).logits
        normal = model(attention_mask=attention, **{k: v for k, v in images.items() if k != "labels"}).logits
    for row in range(len(attention)):
        keep = (attention[row] == 1) & (images["mm_token_type_ids"][row] == 0)
        with torch.no_grad():
            dropped = model(input_ids=images["input_ids"][row, keep][None],
                            position_ids=blind["position_ids"][:, row, keep][:, None]).logits[0]
        torch.testing.assert_close(masked[row, keep], dropped, atol=2e-5, rtol=1e-5)
        # ... and the image reaches the normal forward (else this test could not tell the two apart).
        assert (normal[row, keep] - dropped).abs().max() > 1e-3


def test_a_short_warm_up_lowers_both_losses(demo, tmp_path):
    """A few steps lower the loss of the image forward and of the visual-blind forward (no NaN from the fully
    masked padding rows of the 4-D mask)."""
    import shutil

    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_pgpo.demo.tiny_model import visual_blind_inputs, warm_up

    path = tmp_path / "hf"
    shutil.copytree(demo, path)
    images, attention = _batch(path)

    def losses():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
        with torch.no_grad():
            return (float(model(attention_mask=attention, **images).loss),
                    float(model(**visual_blind_inputs(images, attention, model.config)).loss))

    before = losses()
    info = warm_up(path, steps=8, batch_size=4, seed=1, progress=False)
    after = losses()
    assert info["loss"] > 0
    assert after[0] < 0.8 * before[0] and after[1] < 0.8 * before[1], (before, after)
