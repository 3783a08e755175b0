"""Bucketing of HF-named tensors for weight sync, the worker-side update transaction, and the tiny tokenizer."""
from __future__ import annotations

import pytest
import torch

from megatron_pgpo.rollout.weight_sync import GroupOrderError, fused_group_key, iter_buckets, tensor_bytes


# ----------------------------------------------------------------------------------------------- fused groups
@pytest.mark.parametrize("name, key", [
    ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.qkv_proj"),
    ("model.layers.3.self_attn.v_proj.bias", "model.layers.3.self_attn.qkv_proj"),
    ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_up_proj"),
    ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj"),
    ("visual.blocks.1.mlp.gate_proj.bias", "visual.blocks.1.mlp.gate_up_proj"),
    ("visual.blocks.1.attn.qkv.weight", "visual.blocks.1.attn.qkv"),
    ("visual.merger.mlp.0.bias", "visual.merger.mlp.0"),
    ("lm_head.weight", "lm_head"),
])
def test_fused_group_key(name, key):
    assert fused_group_key(name) == key


@pytest.fixture(scope="module")
def tiny_stream():
    """(mappings, [(hf_name, tensor)]) of the ``tiny`` preset in export order, tensors of the real shapes."""
    from megatron_pgpo.models.qwen2_5_vl.hf_config import TextDims  # makes torchvision importable first
    from megatron_pgpo.models.qwen2_5_vl.mapping import param_mappings
    from megatron_pgpo.models.qwen2_5_vl.tiny import tiny_hf_config
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = tiny_hf_config("tiny")
    with torch.device("meta"):
        vision = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
    shapes = {"visual." + k: v.shape for k, v in vision.state_dict().items()}
    dims = TextDims.from_hf(config)
    mappings = param_mappings(dims, list(shapes))
    gen = torch.Generator().manual_seed(0)
    stream = []
    for m in mappings:
        for name in m.hf:
            numel = int(torch.Size(shapes.get(name, (int(torch.randint(1, 300, (1,), generator=gen)),))).numel())
            stream.append((name, torch.empty(min(numel, 4096))))
    return mappings, stream


@pytest.mark.parametrize("bucket_bytes", [1, 3000, 20_000, 512 << 20])
def test_buckets_keep_groups_and_mappings_whole(tiny_stream, bucket_bytes):
    mappings, stream = tiny_stream
    buckets = list(iter_buckets(iter(stream), bucket_bytes))
    flat = [name for bucket in buckets for name, _ in bucket]
    assert flat == [name for name, _ in stream]  # nothing lost, reordered or duplicated
    where = {name: i for i, bucket in enumerate(buckets) for name, _ in bucket}
    groups = {}
    for name, _ in stream:
        groups.setdefault(fused_group_key(name), set()).add(where[name])
    assert all(len(b) == 1 for b in groups.values()), "a fused group was split across buckets"
    for m in mappings:  # whole ParamMappings, and qkv weight + bias of a layer together
        assert len({where[n] for n in m.hf}) == 1
    for layer in range(2):
        a = f"model.layers.{layer}.self_attn."
        assert where[a + "q_proj.weight"] == where[a + "v_proj.bias"]
        assert where[f"model.layers.{layer}.mlp.gate_proj.weight"] == where[f"model.layers.{layer}.mlp.up_proj.weight"]
    assert where["visual.blocks.0.mlp.gate_proj.bias"] == where["visual.blocks.0.mlp.up_proj.weight"]
    for bucket in buckets:  # over the limit only when the bucket is a single group
        size = sum(tensor_bytes(t) for _, t in bucket)
        assert size <= bucket_bytes or len({fused_group_key(n) for n, _ in bucket}) == 1
    if bucket_bytes == 1:
        assert len(buckets) == len(groups)
    if bucket_bytes == 512 << 20:
        assert len(buckets) == 1


def test_buckets_pack_greedily():
    t = torch.empty(10)  # 40 bytes
    stream = [(f"m.{i}.weight", t) for i in range(5)]
    assert [len(b) for b in iter_buckets(stream, 100)] == [2, 2, 1]
    assert [len(b) for b in iter_buckets(stream, 120)] == [3, 2]


def test_non_contiguous_group_is_an_error():
    t = torch.empty(1)
    stream = [("a.q_proj.weight", t), ("a.o_proj.weight", t), ("a.k_proj.weight", t)]
    with pytest.raises(GroupOrderError, match="qkv_proj"):
        list(iter_buckets(stream, 1 << 20))


def test_bucket_size_must_be_positive():
    with pytest.raises(ValueError):
        list(iter_buckets([("a.weight", torch.empty(1))], 0))


# ------------------------------------------------------------------------------------- worker-side transaction
class _FakeWorker:
    """Stands in for vLLM's worker: records what ``reload_weights`` received."""

    def __init__(self, fail_on=None):
        self.loaded, self.fail_on = {}, fail_on

    def reload_weights(self, weights_iterator):
        for name, tensor in weights_iterator:
            if name == self.fail_on:
                raise RuntimeError("reload failed")
            self.loaded[name] = tensor.clone()

    def _pgpo_refresh_tied_heads(self):  # needs a real vLLM model
        pass


def _worker(fail_on=None):
    from megatron_pgpo.rollout.vllm_worker import PGPOWorkerExtension

    return type("W", (_FakeWorker, PGPOWorkerExtension), {})(fail_on)


def test_worker_transaction_commits_complete_updates_only():
    from safetensors.torch import save

    w = _worker()
    w.pgpo_begin_update(1)
    blob = save({"a.weight": torch.ones(2), "b.weight": torch.zeros(3)})
    count, crc = w.pgpo_load_bucket(1, blob)
    assert count == 2 and crc is not None and torch.equal(w.loaded["a.weight"], torch.ones(2))
    with pytest.raises(RuntimeError, match="incomplete"):
        w.pgpo_commit(1, ["a.weight", "b.weight", "c.weight"])
    assert w.pgpo_weight_state() == {"version": 0, "pending": 1}
    w.pgpo_load_bucket(1, [("c.weight", torch.ones(1))])
    assert w.pgpo_commit(1, ["a.weight", "b.weight", "c.weight"]) == 1
    assert w.pgpo_weight_state() == {"version": 1, "pending": None}
    with pytest.raises(RuntimeError, match="open update"):  # no bucket outside an open update
        w.pgpo_load_bucket(2, [("a.weight", torch.ones(2))])


def test_worker_failed_reload_leaves_update_open():
    w = _worker(fail_on="b.weight")
    w.pgpo_begin_update(1)
    with pytest.raises(RuntimeError, match="reload failed"):
        w.pgpo_load_bucket(1, [("a.weight", torch.ones(1)), ("b.weight", torch.ones(1))])
    assert w.pgpo_weight_state() == {"version": 0, "pending": 1}


# ------------------------------------------------------------------------------------------- tiny tokenizer
def test_tiny_tokenizer_layout_and_template(tmp_path):
    from transformers import AutoTokenizer

    from megatron_pgpo.models.qwen2_5_vl import tiny
    from megatron_pgpo.models.qwen2_5_vl.tiny_tokenizer import save_tiny_processor

    save_tiny_processor(tmp_path, words=["red", "green", "blue"])
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == tiny.VOCAB_SIZE
    assert tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                                      "<|im_end|>"]) == [tiny.IMAGE_TOKEN_ID, tiny.VIDEO_TOKEN_ID,
                                                         tiny.VISION_START_TOKEN_ID, tiny.VISION_END_TOKEN_ID,
                                                         tiny.EOS_TOKEN_ID]
    assert tok.eos_token_id == tiny.EOS_TOKEN_ID
    assert tok("red blue purple").input_ids == [1, 3, 0]  # unknown word -> <unk> = 0
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "red"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>red<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert all(tok.convert_ids_to_tokens(i) is not None for i in range(tiny.VOCAB_SIZE))
    assert (tmp_path / "preprocessor_config.json").is_file()
    with pytest.raises(ValueError):
        save_tiny_processor(tmp_path, words=["a", "a"])
