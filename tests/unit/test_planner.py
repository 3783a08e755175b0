"""The parallelism planner (megatron_pgpo/planner): counts against transformers and meta-device Megatron builds,
memory arithmetic against hand-computed numbers, the recommender's choices and explanations, and the CLI.

The bytes of weights, gradients and optimizer state against real Megatron buffers are in
tests/distributed/test_planner_bytes.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_pgpo.models.qwen2_5_vl.hf_config import padded_vocab_size
from megatron_pgpo.planner.activations import (layer_activation_bytes, scoring_logits_bytes,
                                               unchunked_scoring_logits_bytes, update_logits_bytes)
from megatron_pgpo.planner.buffers import ddp_buffer_layout, optimizer_shard_numel, training_state_bytes
from megatron_pgpo.planner.model_size import (ModelShape, TensorSpec, hf_parameter_count, megatron_parameter_count,
                                              stage_parameter_count, stage_tensors)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "examples" / "hf_configs"
SIZES = ("3b", "7b", "32b", "72b")
GIB = 1 << 30


def _config(size):
    from megatron_pgpo.models.qwen2_5_vl.hf_config import load_hf_config

    return load_hf_config(CONFIG_DIR / f"qwen2_5_vl_{size}.json")


@pytest.fixture(scope="module")
def shapes():
    return {size: ModelShape.from_hf(_config(size)) for size in SIZES}


# ------------------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize("size", SIZES)
def test_parameter_count_equals_transformers(shapes, size):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(_config(size))
    shape = shapes[size]
    assert hf_parameter_count(shape) == sum(p.numel() for p in model.parameters())  # tied weights once
    vision = [t for t in stage_tensors(shape, 1, 1, 0) if t.is_vision]
    assert sum(t.numel for t in vision) == sum(p.numel() for p in model.model.visual.parameters())
    t = shape.text
    padding_rows = megatron_parameter_count(shape, tp=1) - hf_parameter_count(shape)
    assert padding_rows == (-t.vocab_size % 128) * t.hidden_size * (1 if t.tie_word_embeddings else 2)


@pytest.mark.parametrize("size", SIZES)
def test_stage_counts_closed_form_and_sum(shapes, size):
    shape = shapes[size]
    t = shape.text
    for tp in (1, 2):
        for pp in (1, 2, 4):
            counts = [stage_parameter_count(shape, tp, pp, s) for s in range(pp)]
            assert counts == [sum(x.numel for x in stage_tensors(shape, tp, pp, s)) for s in range(pp)]
            if tp == 1:  # the stages together are the model, plus the last stage's copy of a tied embedding
                tied_copy = t.tie_word_embeddings and pp > 1
                copy = padded_vocab_size(t.vocab_size, 128, 1) * t.hidden_size if tied_copy else 0
                assert sum(counts) == megatron_parameter_count(shape) + copy


def test_72b_shard_by_hand(shapes):
    """TP=8: qkv (64 + 2 x 8) x 128 / 8 = 1280 rows (+ bias), proj 8192 x 1024, fc1 2 x 3696 x 8192, fc2 8192 x
    3696, two norms: 109,724,928 per layer; 10 layers per stage at PP=8; vocabulary 152064 padded to the next multiple
    of 128 x 8 = 1024, 152576, so each embedding shard is 19072 x 8192."""
    shape = shapes["72b"]
    layer = 1280 * 8192 + 1280 + 8192 * 1024 + 2 * 3696 * 8192 + 8192 * 3696 + 2 * 8192
    assert layer == 109_724_928
    vocab_shard = 152576 // 8 * 8192
    assert stage_parameter_count(shape, 8, 8, 3) == 10 * layer
    assert stage_parameter_count(shape, 8, 8, 7) == 10 * layer + 8192 + vocab_shard
    hf_total = 73_410_777_344  # transformers' count (tests/unit/test_published_configs.py)
    vision = hf_total - 80 * (layer * 8 - 14 * 8192) - 8192 - 2 * 152064 * 8192  # TP=1 layer: norms once
    assert stage_parameter_count(shape, 8, 8, 0) == 10 * layer + vocab_shard + vision


def test_meta_device_builds_equal_the_formula(shapes):
    """72B at TP=8 / PP=8 (every stage, TP ranks 0 and 7) and 3B (tied embeddings) at TP=2 / PP=4, built on the
    meta device with a fake process group in one child process; plus one 3B shard in a fresh process of its own,
    which must equal the re-initialised build."""
    from megatron_pgpo.planner.meta_check import build_meta_shards, compare

    big = dict(config=str(CONFIG_DIR / "qwen2_5_vl_72b.json"), tp=8, pp=8,
               shards=[(s, r) for s in range(8) for r in (0, 7)])
    small = dict(config=str(CONFIG_DIR / "qwen2_5_vl_3b.json"), tp=2, pp=4,
                 shards=[(s, r) for s in range(4) for r in (0, 1)])
    # an uneven split that PP does not allow evenly: 28 layers (7B) at PP=3 as 6 + 11 + 11
    uneven = dict(config=str(CONFIG_DIR / "qwen2_5_vl_7b.json"), tp=1, pp=3, first_stage_layers=6,
                  shards=[(s, 0) for s in range(3)])
    built = build_meta_shards([big, small, uneven])
    for size, request in (("72b", big), ("3b", small), ("7b", uneven)):
        mine = [b for b in built if b["config"] == request["config"]]
        assert [(b["stage"], b["tp_rank"]) for b in mine] == [tuple(x) for x in request["shards"]]
        checks = compare(shapes[size], request["tp"], request["pp"], mine,
                         first_stage_layers=request.get("first_stage_layers"))
        assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    layers = [sum(1 for n, _, _ in b["tensors"] if n.endswith("linear_proj.weight"))
              for b in built if b["config"] == uneven["config"]]
    assert layers == [6, 11, 11]
    last_3b = [b for b in built if b["config"] == small["config"] and b["stage"] == 3 and b["tp_rank"] == 1]
    assert last_3b[0]["tensors"][-1][0] == "language_model.output_layer.weight"  # the tied head's copy
    fresh = build_meta_shards([dict(small, shards=[(3, 1)])], isolation="process")
    assert fresh[0]["tensors"] == last_3b[0]["tensors"]


# ------------------------------------------------------------------------------------------------ bytes
def test_buffer_padding_by_hand():
    """Tensors of 100, 64 and 1000 elements, distributed optimizer, DP=2: laid out in reverse (1000 at 0, 64 at 1024
    after aligning to 64, 100 at 1088), the bucket padded to lcm(2, 128) = 128 -> 1280; DP rank 0 owns [0, 640):
    640 elements of the first tensor; rank 1 owns [640, 1280): 360 + 64 + 100 = 524."""
    tensors = [TensorSpec("a", 100), TensorSpec("b", 64), TensorSpec("c", 1000)]
    layout = ddp_buffer_layout(tensors, dp=2, distributed_optimizer=True)
    assert layout.tensor_ranges == ((0, 1000), (1024, 1088), (1088, 1188))
    assert layout.buckets == ((0, 1280),) and layout.numel == 1280
    assert [optimizer_shard_numel(layout, 2, r) for r in (0, 1)] == [640, 524]
    plain = ddp_buffer_layout(tensors, dp=2, distributed_optimizer=False)
    assert plain.numel == 1164 and plain.padding == 0
    bf16 = training_state_bytes(tensors, "bf16", dp=2, distributed_optimizer=True)  # the larger DP rank
    assert (bf16.weights, bf16.grads, bf16.master_params, bf16.adam_moments) == (2 * 1280, 4 * 1280, 4 * 640, 8 * 640)
    replicated = training_state_bytes(tensors, "bf16", dp=2, distributed_optimizer=False)
    assert (replicated.weights, replicated.grads, replicated.optimizer) == (2 * 1164, 4 * 1164, 12 * 1164)
    fp32 = training_state_bytes(tensors, "fp32", dp=1, distributed_optimizer=False)
    assert (fp32.weights, fp32.grads, fp32.master_params, fp32.adam_moments) == (4 * 1164, 4 * 1164, 0, 8 * 1164)
    shared = [TensorSpec("v", 10), TensorSpec("emb", 100, shared_embedding=True), TensorSpec("w", 10)]
    assert ddp_buffer_layout(shared, 1, True).buckets == ((0, 128), (128, 256), (256, 384))


def test_qwen_layer_activations_by_hand():
    """s=1024, b=2, h=4096, a=32, g=8 (d=128), f=11008, TP=2 with sequence parallelism, bf16 (module docstring):
    SP-split 2 x (2h + 4) + 2 x 2h; TP-split without recompute 3 x 2h + 6as + 2h + 10f, with selective recompute
    2h + 2gd + 2(h + 2gd) + 2h + 10f; unsplit 8d per token, plus the [s, s] mask (none) or an int32 (selective)."""
    s, b, h, a, g, f, d = 1024, 2, 4096, 32, 8, 11008, 128
    sp_split = (2 * (2 * h + 4) + 2 * 2 * h) / 2
    none = s * b * (sp_split + (3 * 2 * h + 6 * a * s + 2 * h + 10 * f) / 2 + 8 * d) + s * s
    selective = s * b * (sp_split + (2 * h + 2 * g * d + 2 * (h + 2 * g * d) + 2 * h + 10 * f) / 2 + 8 * d) + 4
    assert none == 384_311_296 and selective == 179_838_980
    assert layer_activation_bytes(s, b, h, a, g, f, 2, True, "none") == none
    assert layer_activation_bytes(s, b, h, a, g, f, 2, True, "selective") == selective
    assert layer_activation_bytes(s, b, h, a, g, f, 2, True, "full") == s * b * h  # the SP-split bf16 input
    assert layer_activation_bytes(s, b, h, a, g, f, 2, False, "full") == 2 * s * b * h


@pytest.mark.parametrize("images, side, attention, recompute", [
    (1, 16, "eager", False), (2, 16, "eager", False), (1, 24, "sdpa", False), (2, 16, "sdpa", False),
    (1, 16, "eager", True), (2, 24, "sdpa", True)])
def test_vision_activations_equal_what_the_tower_saves(images, side, attention, recompute):
    """The tiny preset's vision tower as the model builds it (transformers, bf16, training mode) on side x side-patch
    images, eager or SDPA attention, with and without recompute: every tensor autograd saves for backward, counted
    once per storage, parameters excluded."""
    from types import SimpleNamespace

    import torch

    from megatron_pgpo.models.qwen2_5_vl.model import Qwen2_5_VLMegatronModel
    from megatron_pgpo.models.qwen2_5_vl.tiny import tiny_hf_config
    from megatron_pgpo.planner.activations import saved_activation_bytes, vision_activation_bytes, vision_block_bytes
    from megatron_pgpo.planner.model_size import VisionDims

    config = tiny_hf_config("tiny")
    torch.manual_seed(0)
    owner = SimpleNamespace(hf_config=config, config=SimpleNamespace(params_dtype=torch.bfloat16))
    tower = Qwen2_5_VLMegatronModel._build_vision_tower(owner, None, attention, recompute).train()
    v = VisionDims.from_hf(config)
    patches = side * side
    pixels = torch.randn(images * patches, v.patch_input, dtype=torch.bfloat16)
    grid = torch.tensor([[1, side, side]] * images)
    measured = saved_activation_bytes(lambda: tower(pixels, grid_thw=grid), exclude=tower.parameters())
    index_tensors = 2 * (patches // 4) * images * 8  # two int64 window-order indices per merged token
    predicted = vision_activation_bytes(patches, images, v.hidden_size, v.num_heads, v.ffn_hidden_size, v.depth,
                                        v.full_attention_blocks, v.window_patches, v.patch_input,
                                        attention=attention, recompute=recompute)
    if recompute:
        # Non-reentrant checkpointing keeps each block's input itself (autograd's saved-tensor hooks never see it)
        # and rebuilds one block during the backward pass: both are in the formula, neither in the measurement.
        hidden = 2 * v.hidden_size * v.depth
        rebuilt = vision_block_bytes(patches, v.hidden_size, v.num_heads, v.ffn_hidden_size, 2, attention)
        predicted -= images * patches * (hidden + rebuilt)
    assert measured == predicted + index_tensors


def test_logits_terms_by_hand():
    tokens, v = 2 * 2048, 152064 // 8  # micro-batch 2, responses of 2048 tokens, 72B's vocabulary at TP=8
    stacked = 2 * tokens * v * 2  # bf16 image + text-only rows of the response tokens
    buffers = 2 * (4 << 20)  # two 4 MiB fp32 chunks
    assert unchunked_scoring_logits_bytes(tokens, v, 2) == stacked + 2 * tokens * v * 4
    assert scoring_logits_bytes(tokens, v, 2, "k3", 1024) == stacked + buffers
    assert scoring_logits_bytes(tokens, v, 2, "exact", 1024) == stacked + 2 * 1024 * v * 4
    assert scoring_logits_bytes(tokens, v, 2, "exact", 16) == stacked + buffers  # tiny KL chunks: log-probs' rule
    # GRPO/DAPO: no text-only rows
    assert scoring_logits_bytes(tokens, v, 2, "k3", 1024, text_only_pass=False) == stacked // 2 + buffers
    assert unchunked_scoring_logits_bytes(tokens, v, 2, text_only_pass=False) == stacked // 2 + tokens * v * 4
    assert update_logits_bytes(tokens, v, 2) == 2 * tokens * v * 2  # logits and their gradient


def test_memory_plan_by_hand(shapes):
    """72B, TP=8 PP=8 DP=4, bf16, distributed optimizer: the middle stages' state is 2 + 4 bytes per element plus
    12 bytes per element over DP (10 layers x 109,724,928 = 1,097,249,280 elements: every tensor a multiple of 64,
    the bucket a multiple of lcm(4, 128)); vLLM at rollout TP=8: 2 x 80 x 1 x 128 x 2 B = 40,960 B per token."""
    from dataclasses import replace

    from megatron_pgpo.planner.memory import Layout, Workload, estimate

    layout = Layout(tp=8, pp=8, dp=4, rollout_tp=8, sequence_parallel=True, recompute="full")
    work = Workload(prompt_length=4096, response_length=2048, rollout_batch_size=384, n=5, micro_batch_size=1,
                    global_batch_size=128)
    plan = estimate(shapes["72b"], layout, work, gpu_memory_gib=80, gpu_memory_utilization=0.5, reserve_gib=2)
    mid = plan.stages[3]
    n = 1_097_249_280
    assert (mid.weights, mid.grads, mid.optimizer) == (2 * n, 4 * n, 12 * n // 4)
    assert plan.rollout.kv_bytes_per_token == 40_960
    assert plan.rollout.kv_needed == 96 * 5 * 6144 * 40_960  # 384 prompts / 4 engines x 5 samples
    assert plan.rollout.weights == -(-hf_parameter_count(shapes["72b"]) * 2 // 8)
    # vLLM sleeps during training (the default): training has the GPU minus the reserve; while vLLM generates,
    # its share and the training state kept on the GPU must fit together; offloaded, nothing of training stays
    assert plan.training_budget == 78 * GIB
    assert plan.rollout_headroom == 78 * GIB - 40 * GIB - max(s.state for s in plan.stages)
    # the weight sync: stage 0's state, the engine's woken weights, a bucket (at least the 8192 x 152064 bf16
    # embedding, a group of its own) twice: gathered and packed for CUDA IPC
    assert plan.rollout.sync_buffers == 2 * 152064 * 8192 * 2
    assert plan.sync_headroom == 78 * GIB - plan.rollout.weights - plan.stages[0].state - plan.rollout.sync_buffers
    assert plan.headroom == min(plan.training_headroom, plan.rollout_headroom, plan.sync_headroom)
    assert plan.limit == "while training, on stage 0" and plan.headroom == plan.training_headroom  # the vision tower
    small = estimate(shapes["3b"], replace(layout, tp=1, pp=1, dp=2, rollout_tp=1, sequence_parallel=False,
                                           weight_sync_bucket_mb=4096), work, gpu_memory_gib=80)
    assert small.rollout.sync_buffers == 2 * 4096 * 2**20
    # the KL penalty's frozen reference: one more copy of each stage's weights, kept even when offloading
    with_ref = estimate(shapes["72b"], replace(layout, reference_model=True, offload_during_rollout=True), work,
                        gpu_memory_gib=80)
    assert [s.reference for s in with_ref.stages] == [s.weights for s in plan.stages]
    assert with_ref.stages[3].state == mid.state + mid.weights
    assert with_ref.rollout_headroom == 38 * GIB - max(s.weights for s in plan.stages)
    huge = estimate(shapes["3b"], replace(small.layout, weight_sync_bucket_mb=60000, offload_during_rollout=True), work,
                    gpu_memory_gib=80)
    assert huge.sync_headroom < 0 and not huge.fits and huge.limit == "during the weight sync, on stage 0"
    assert any("during the weight sync" in p and "weight_sync_bucket_mb" in p for p in huge.problems), huge.problems
    offloaded = estimate(shapes["72b"], replace(layout, offload_during_rollout=True), work, gpu_memory_gib=80)
    assert offloaded.rollout_headroom == 38 * GIB and offloaded.training_budget == 78 * GIB
    awake = estimate(shapes["72b"], replace(layout, sleep_mode=False), work, gpu_memory_gib=80)
    assert awake.training_budget == 38 * GIB and awake.headroom == awake.training_headroom
    assert plan.micro_batches_per_update == 160
    h = 8192
    per_layer_input = 6144 * h * 2 // 8  # full recompute keeps each layer's SP-sharded input
    working = layer_activation_bytes(6144, 1, h, 64, 8, 29568, 8, True, "none", fused_swiglu=True)  # CUDA fuses
    sent = 6144 * h * 2 // 8
    rotary_frequencies = 6144 * 128 * 4  # kept once per stage by the checkpoints
    assert mid.activations == int((8 - 3) * (10 * per_layer_input + sent + rotary_frequencies) + working)


# ------------------------------------------------------------------------------------------------ recommender
def _options(**kw):
    from megatron_pgpo.planner.recommend import Options

    return Options(**kw)


def _workload(**kw):
    from megatron_pgpo.planner.memory import Workload

    base = dict(prompt_length=4096, response_length=2048, rollout_batch_size=384, n=5, micro_batch_size=2,
                global_batch_size=128)
    return Workload(**{**base, **kw})


def test_recommender_prefers_the_smallest_model_parallel_layout_that_fits(shapes):
    from megatron_pgpo.planner.recommend import recommend, valid_layouts

    assert (3, 1) not in valid_layouts(shapes["7b"], 24) and (8, 1) not in valid_layouts(shapes["7b"], 8)  # 28 heads
    rec = recommend(shapes["7b"], _workload(max_pixels=200_704), _options(gpus=8, recompute="full"))
    assert rec.best is not None and rec.best.fits
    fitting = [p for p in rec.plans if p.fits]
    smallest = min(p.layout.tp * p.layout.pp for p in fitting)
    assert rec.best.layout.tp * rec.best.layout.pp == smallest
    assert rec.best.headroom == max(p.headroom for p in fitting if p.layout.tp * p.layout.pp == smallest)
    # the micro-batch is the largest power of two that still fits the chosen layout
    from megatron_pgpo.planner.recommend import plan_layout

    mb, lay = rec.micro_batch_size, rec.best.layout
    assert rec.best.workload.micro_batch_size == mb
    bigger = plan_layout(shapes["7b"], _workload(max_pixels=200_704, micro_batch_size=2 * mb),
                         _options(gpus=8, recompute="full"), lay.tp, lay.pp)
    assert not bigger.fits
    if mb < 2:
        assert rec.notes == [f"nothing fits at micro-batch 2; the largest that fits is {mb}"]


def test_a_plan_that_cannot_fit_says_why(shapes):
    from megatron_pgpo.planner.recommend import Options, plan_layout, recommend

    # vLLM resident during training (no sleep mode): no single change makes it fit, so a combined one is proposed
    options = _options(gpus=32, gpu_memory_gib=80, recompute="full", sleep_mode=False)
    rec = recommend(shapes["72b"], _workload(), options, tp=8, pp=4)
    assert rec.best is None and rec.closest is not None
    closest = rec.closest
    assert closest.workload.micro_batch_size == 1
    over = -closest.headroom / GIB
    assert over > 0
    message = " ".join(rec.notes)
    assert "nothing fits on 32 x 80 GiB GPUs, even at micro-batch 1" in message
    assert f"on stage {closest.peak_stage.stage}" in message and f"{over:.1f} GiB over" in message
    assert "activations" in message and "optimizer state" in message
    # the combined suggestion was re-estimated: applying its flags really fits
    assert rec.suggestions and rec.suggestions[-1].startswith("together: ")
    tokens = rec.suggestions[-1].split(": ")[1].split()
    values = {}
    for i, token in enumerate(tokens):  # "--flag value" or a switch "--flag"
        if token.startswith("--"):
            values[token] = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else True
    work = _workload(micro_batch_size=1, max_pixels=int(values.get("--max-pixels", 1003520)))
    opts = Options(**{**options.__dict__, "gpus": int(values.get("--gpus", 32)),
                      "gpu_memory_utilization": float(values.get("--gpu-memory-utilization", 0.5)),
                      "vision_recompute": "--vision-recompute" in values,
                      "offload_during_rollout": "--offload-during-rollout" in values})
    assert plan_layout(shapes["72b"], work, opts, 8, 4).fits

    # with vLLM's sleep mode (the default) the same run needs one change only
    rec = recommend(shapes["72b"], _workload(), _options(gpus=32, gpu_memory_gib=80, recompute="full"), tp=8, pp=4)
    assert rec.best is None and rec.suggestions and not rec.suggestions[-1].startswith("together: ")

    # vLLM alone cannot start: 72B weights at rollout TP=1 are 137 GiB
    rec = recommend(shapes["72b"], _workload(), _options(gpus=8, rollout_tp=1, recompute="full"), tp=8, pp=1)
    assert any("vLLM needs" in note and "rollout TP=1" in note and "GiB over" in note for note in rec.notes)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_json_output_parses(capsys):
    from megatron_pgpo.cli import main

    code = main(["plan", "--model", "7b", "--gpus", "8", "--max-pixels", "200704", "--recompute", "full", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["fits"] is True
    assert doc["hf_parameters"] == 8_292_166_656
    rec = doc["recommended"]
    assert rec["fits"] and rec["headroom_bytes"] > 0 and rec["gpus"] == 8
    assert rec["layout"]["tp"] * rec["layout"]["pp"] * rec["layout"]["dp"] == 8
    assert all({"weights", "grads", "optimizer", "activations", "peak"} <= set(s) for s in rec["stages"])


def test_cli_reads_a_run_config_and_reports_a_misfit(capsys):
    from megatron_pgpo.cli import main

    config = str(CONFIG_DIR.parent / "qwen2_5_vl_72b_pgpo.yaml")
    code = main(["plan", "--model", "72b", "--config", config, "--gpus", "32", "--json"])
    doc = json.loads(capsys.readouterr().out)
    plan = doc["plans"][0]
    assert (plan["layout"]["tp"], plan["layout"]["pp"], plan["layout"]["recompute"]) == (8, 4, "full")
    assert plan["layout"]["vision_recompute"] and plan["layout"]["offload_during_rollout"]  # from the config
    assert plan["layout"]["sleep_mode"] and plan["gpu_memory_utilization"] == 0.8
    assert plan["workload"]["micro_batch_size"] >= 2 and plan["workload"]["n"] == 5  # from 2, raised while it fits
    assert plan["workload"]["text_only_pass"] is True  # PGPO
    assert code == 0 and doc["fits"] is True
    # the same run with vLLM resident during training (its 0.8 share leaves training 14 GiB): a misfit, explained
    code = main(["plan", "--model", "72b", "--config", config, "--gpus", "32", "--no-sleep-mode", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["fits"] is False and doc["notes"] and doc["closest"]["problems"]
    assert "gpu_memory_utilization 0.8" in doc["closest"]["problems"][0]


def test_cli_grpo_config_has_no_text_only_rows(capsys, tmp_path):
    from megatron_pgpo.cli import main

    grpo = tmp_path / "grpo.yaml"
    recipe = (CONFIG_DIR.parent / "qwen2_5_vl_7b_pgpo.yaml").read_text()
    grpo.write_text(recipe.replace("advantage: pgpo", "advantage: grpo"))
    main(["plan", "--model", "7b", "--config", str(grpo), "--gpus", "8", "--json"])
    assert json.loads(capsys.readouterr().out)["plans"][0]["workload"]["text_only_pass"] is False


@pytest.mark.parametrize("argv, message", [
    (["--model", "7b", "--gpus", "0"], "--gpus must be >= 1"),
    (["--model", "7b", "--gpus", "8", "--tp", "3"], "does not divide --gpus 8"),
    (["--model", "7b", "--gpus", "8", "--tp", "8"], "TP=8 does not divide attention heads (28)"),
    (["--model", "7b", "--gpus", "8", "--n", "1"], "--n must be >= 2"),
    (["--model", "7b", "--gpus", "8", "--gpu-memory-utilization", "1.5"], "must be in (0, 1)"),
    (["--hf-config", "/nonexistent/config.json", "--gpus", "8"], "no such file or directory"),
])
def test_cli_rejects_bad_input(argv, message):
    from megatron_pgpo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["plan", *argv])
    assert message in str(exc.value)


def test_pipeline_splits_by_hand():
    from megatron_pgpo.models.qwen2_5_vl.hf_config import ModelConfigError, stage_layer_counts
    from megatron_pgpo.planner.recommend import pipeline_splits

    assert stage_layer_counts(80, 4) == [20, 20, 20, 20]
    assert stage_layer_counts(80, 4, first=14) == [14, 22, 22, 22]  # stage 0 also holds the vision tower
    assert stage_layer_counts(28, 8, first=1, last=3) == [1, 4, 4, 4, 4, 4, 4, 3]  # PP=8 does not divide 28
    assert stage_layer_counts(4, 2, first=1) == [1, 3]
    for args, message in (((28, 8), "does not divide"), ((4, 2, 1, 1), "must equal the 4 layers"),
                          ((10, 3, 5), "cannot share the remaining 5"), ((4, 2, 0), r"in \[1, 3\]")):
        with pytest.raises(ModelConfigError, match=message):
            stage_layer_counts(*args)
    # the even split, then the three least uneven lighter first stages
    assert pipeline_splits(80, 4) == [(None, None), (17, None), (14, None), (11, None)]
    assert pipeline_splits(36, 8) == [(1, None)]  # 1 + 7 x 5: PP=8 does not divide 36
    # 28 at PP=8: no lighter first stage alone works (the other 7 stages would need a share above it), so the last
    # stage is made lighter too: the middle six take 4 each
    assert pipeline_splits(28, 8) == [(1, 3), (2, 2), (3, 1)]
    splits = pipeline_splits(28, 8)
    assert splits and all(sum(stage_layer_counts(28, 8, f, l)) == 28 for f, l in splits)
    assert all(stage_layer_counts(28, 8, f, l)[0] < stage_layer_counts(28, 8, f, l)[1] for f, l in splits)
    assert pipeline_splits(36, 1) == [(None, None)]
