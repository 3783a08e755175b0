"""Shared-prompt packing, on hand-computed cases: layout, columns, positions, the block mask, and the images of
each packed row. (That packed rows give the same logits and gradients as one row per response is checked on the
model, against transformers and a whole-batch autograd reference, in tests/distributed/test_policy.py.)"""
import pytest
import torch

from megatron_pgpo.trainer.batch import Sample, collate, predicting_positions, prompt_grouped_micro_batches
from megatron_pgpo.trainer.packing import images_of, pack_shared_prompts, shared_prompt_mask, stack_packed

IMG, VS, VE = 999, 996, 997


def _sample(group, response, n_text=2, image_seed=None):
    prompt = list(range(10, 10 + n_text)) + [VS, IMG, IMG, IMG, IMG, VE, 5]
    pixels = torch.randn(16, 8, generator=torch.Generator().manual_seed(group if image_seed is None else image_seed))
    return Sample(prompt_ids=prompt, response_ids=response, group=group, pixel_values=pixels,
                  image_grid_thw=torch.tensor([[1, 4, 4]]))


def _pack(mb):
    return pack_shared_prompts(mb.input_ids, mb.position_ids, mb.image_mask, mb.lengths, mb.prompt_lengths,
                               mb.prompt_keys)


def test_two_responses_share_one_row_and_keep_their_positions():
    samples = [_sample(0, [1, 2, 3]), _sample(1, [4], n_text=3), _sample(0, [5, 6])]
    mb = collate(samples, [0, 1, 2], IMG, 2)
    packed = _pack(mb)
    # rows in order of first appearance: group 0 (prompt of 9 + responses 3 + 2), group 1 (10 + 1), width 14
    assert packed.input_ids.shape == (2, 14) and packed.members == [[0, 2], [1]]
    assert packed.input_ids[0].tolist() == samples[0].prompt_ids + [1, 2, 3, 5, 6]
    assert packed.input_ids[1, :11].tolist() == samples[1].prompt_ids + [4]
    assert packed.segment[0].tolist() == [0] * 9 + [1, 1, 1, 2, 2]
    assert packed.segment[1].tolist() == [0] * 10 + [1] + [-1] * 3
    assert packed.row_of.tolist() == [0, 1, 0]
    # every token keeps its own position ids: the second response starts where the first did
    assert packed.column[2].tolist()[:11] == list(range(9)) + [12, 13]
    for b in range(3):
        cols = packed.column[b, : mb.lengths[b]]
        assert torch.equal(packed.position_ids[:, packed.row_of[b], cols], mb.position_ids[:, b, : mb.lengths[b]])
    assert torch.equal(packed.position_ids[:, 0, 12], packed.position_ids[:, 0, 9])
    assert packed.image_mask[0].sum() == 4 and packed.image_mask[0, :9].tolist() == mb.image_mask[0, :9].tolist()
    # the logits predicting each response token: its first token is predicted by the shared last prompt token
    rows, cols = packed.positions_of(*predicting_positions(mb.response_mask))
    assert rows.tolist() == [0, 0, 0, 1, 0, 0]
    assert cols.tolist() == [8, 9, 10, 9, 8, 12]


def test_block_mask_prompt_shared_responses_private_padding_isolated():
    segment = torch.tensor([[0, 0, 1, 1, 2, -1]])
    allowed = ~shared_prompt_mask(segment)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],   # response 2 sees the prompt, not response 1
        [0, 0, 0, 0, 0, 1],   # padding sees itself only (no empty softmax row)
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_stacked_variants_pad_to_one_width_with_isolated_padding():
    samples = [_sample(0, [1, 2, 3]), _sample(0, [5, 6])]
    mb = collate(samples, [0, 1], IMG, 2)
    image = _pack(mb)
    t = mb.text_only
    n_visual = mb.image_mask.sum(1).tolist()
    text = pack_shared_prompts(t.input_ids, t.position_ids, torch.zeros_like(t.valid),
                               [n - v for n, v in zip(mb.lengths, n_visual)],
                               [n - v for n, v in zip(mb.prompt_lengths, n_visual)], mb.prompt_keys)
    assert text.input_ids[0].tolist() == [10, 11, VS, VE, 5, 1, 2, 3, 5, 6]
    ids, pos, img, mask = stack_packed(image, text, width_multiple=4)
    assert ids.shape == (2, 16) and pos.shape == (3, 2, 16) and mask.shape == (2, 1, 16, 16)
    assert torch.equal(ids[1, :10], text.input_ids[0]) and not img[1].any()
    assert mask[1, 0, 10:, :10].all() and not mask[1, 0, 12, 12]  # padding neither sees nor is seen
    assert mask[1, 0, :10, 10:].all()


def test_images_of_takes_each_rows_first_image_and_rejects_a_different_one():
    samples = [_sample(0, [1]), _sample(1, [2]), _sample(0, [3])]
    mb = collate(samples, [0, 1, 2], IMG, 2)
    packed = _pack(mb)
    pixels, grid = images_of(packed.members, mb.image_counts, mb.pixel_values, mb.image_grid_thw)
    assert torch.equal(pixels, torch.cat([samples[0].pixel_values, samples[1].pixel_values]))
    assert grid.tolist() == [[1, 4, 4], [1, 4, 4]]
    odd = [_sample(0, [1]), _sample(0, [3], image_seed=7)]  # same group id and prompt, another image
    mb = collate(odd, [0, 1], IMG, 2)
    with pytest.raises(ValueError, match="not their images"):
        images_of(_pack(mb).members, mb.image_counts, mb.pixel_values, mb.image_grid_thw)


def test_a_shared_key_with_different_prompts_is_an_error():
    samples = [_sample(0, [1]), _sample(0, [2], n_text=3)]
    mb = collate(samples, [0, 1], IMG, 2)
    with pytest.raises(ValueError, match="not their prompt"):
        pack_shared_prompts(mb.input_ids, mb.position_ids, mb.image_mask, mb.lengths, mb.prompt_lengths, [0, 0])


def test_prompt_grouped_micro_batches_keep_groups_together():
    samples = [_sample(g, [1] * n, n_text=2 + g % 2) for g, n in ((0, 3), (1, 2), (0, 5), (1, 4), (2, 1), (2, 6))]
    parts = prompt_grouped_micro_batches(samples, 2)
    assert sorted(i for p in parts for i in p) == list(range(6))
    # longest prompts first (group 1), then by group, then longest response first
    assert parts == [[3, 1], [2, 0], [5, 4]]
