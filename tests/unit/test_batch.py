"""Collation of sampled responses: masks select exactly the response tokens, image slots only in prompts,
positions match the rope index of each sequence alone, micro-batches cover every sample once."""
import torch

from megatron_pgpo.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_pgpo.trainer.batch import Sample, collate, length_bucketed_micro_batches

IMG, VS, VE = 999, 996, 997


def _sample(n_text_before, response, image=True):
    prompt = list(range(10, 10 + n_text_before)) + ([VS, IMG, IMG, IMG, IMG, VE] if image else []) + [5, 6]
    kw = dict(pixel_values=torch.randn(16, 8), image_grid_thw=torch.tensor([[1, 4, 4]])) if image else {}
    return Sample(prompt_ids=prompt, response_ids=response, **kw)


def test_collate_masks_and_positions():
    samples = [_sample(2, [7, 8, 9]), _sample(4, [IMG, 3]), _sample(1, [4], image=False)]
    mb = collate(samples, [0, 1, 2], image_token_id=IMG, spatial_merge_size=2)
    assert mb.input_ids.shape == (3, 14)
    # response positions, and an image token sampled inside a response is NOT an image slot
    assert mb.response_mask[0].nonzero().flatten().tolist() == [10, 11, 12]
    assert mb.response_mask[1].nonzero().flatten().tolist() == [12, 13]
    assert mb.image_mask[1].sum() == 4 and not mb.image_mask[1, 12]
    assert mb.image_mask[2].sum() == 0
    assert mb.pixel_values.shape == (32, 8) and mb.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 4]]
    # each row's positions equal the rope index of that sequence on its own (padding does not leak)
    for row, s in enumerate(samples):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        mask = mb.image_mask[row: row + 1, : ids.shape[1]]
        alone = get_rope_index(ids, mask, s.image_grid_thw, 2)
        assert torch.equal(mb.position_ids[:, row, : ids.shape[1]], alone[:, 0])
    # the text-only variant drops exactly the 4 image slots of image rows and keeps positions
    to = mb.text_only
    assert to.valid.sum(1).tolist() == [13 - 4, 14 - 4, 4]  # padding is not a token either
    restored = to.restore(to.position_ids[0][..., None].float(), mb.input_ids.shape[1], fill=-1)[..., 0]
    keep = ~mb.image_mask & (torch.arange(14) < torch.tensor([13, 14, 4])[:, None])
    assert torch.equal(restored[keep], mb.position_ids[0][keep].float())


def test_micro_batches_cover_every_sample_once_and_bucket_by_length():
    samples = [_sample(n, [1] * n) for n in (1, 9, 3, 7, 5)]
    parts = length_bucketed_micro_batches(samples, 2)
    assert sorted(i for p in parts for i in p) == list(range(5))
    assert parts[0] == [1, 3] and [len(p) for p in parts] == [2, 2, 1]


def test_sequence_multiple_for_sequence_parallelism_and_fp8():
    from megatron_pgpo.trainer.batch import sequence_multiple

    assert sequence_multiple(1, False, False) == 1
    assert sequence_multiple(4, False, False) == 1  # TP without SP: each rank sees the whole sequence
    assert sequence_multiple(4, True, False) == 4   # SP: S / TP tokens per rank
    assert sequence_multiple(4, False, True) == 16  # FP8: S x B divides by 16 for any micro-batch size
    assert sequence_multiple(8, True, True) == 128  # FP8 + SP: 16 tokens per rank
    for tp, sp in ((2, True), (8, True), (1, False)):
        m = sequence_multiple(tp, sp, True)
        assert (m // (tp if sp else 1)) % 16 == 0  # every rank's share of the sequence divides by 16


def test_collate_pads_to_the_fp8_multiple():
    from megatron_pgpo.trainer.batch import Sample, collate, sequence_multiple

    samples = [Sample(prompt_ids=[5, 6, 7], response_ids=[8] * n) for n in (3, 20)]
    mb = collate(samples, [0, 1], image_token_id=999, spatial_merge_size=2,
                 pad_to_multiple_of=sequence_multiple(2, True, True))
    assert mb.input_ids.shape[1] == 32 and mb.response_mask.sum() == 23  # 23 tokens -> 32 (16 x TP=2)
    assert mb.text_only.input_ids.shape[1] <= 32
