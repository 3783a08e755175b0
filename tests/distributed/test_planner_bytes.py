"""The planner's weight, gradient and optimizer bytes equal those of the real Megatron objects.

Each case builds a tiny Qwen2.5-VL stage, wraps it exactly as training does (``MegatronPolicy``: Megatron DDP with
fp32 gradient reduction + Megatron's Adam, distributed or not), takes one optimizer step so Adam's moments exist,
and measures bytes from the tensors themselves: parameter storages (deduplicated: with the distributed optimizer
the parameters are views into one padded buffer), DDP's ``grad_data`` buffers, the optimizer's fp32 master copies
(parameters in its groups that are not model storage) and its ``exp_avg`` / ``exp_avg_sq``. The planner's numbers
come from the config alone (``planner.model_size`` + ``planner.buffers``). Layouts: TP=2 (DP=1), DP=2 (per-rank
optimizer shards) and PP=2 with tied embeddings (the shared-embedding bucket), in fp32 and bf16.
"""
from __future__ import annotations

import pytest

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)

# (dtype, distributed optimizer) combinations run in one worker call per layout
COMBOS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def _measure(config_dir, combos):
    """Build, wrap, step; measure bytes per combination on this rank."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.trainer.policy import MegatronPolicy

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    out = []
    for dtype, distributed in combos:
        model = build_model(config_dir, tp=tp, pp=pp, dtype=dtype)
        tensors = [(n, p.numel(), bool(getattr(p, "shared_embedding", False))) for n, p in model.named_parameters()]
        cfg = load_config(None, [f"parallel.use_distributed_optimizer={str(distributed).lower()}",
                                 f"parallel.tensor_model_parallel_size={tp}",
                                 f"parallel.pipeline_model_parallel_size={pp}", f"model.dtype={dtype}"])
        policy = MegatronPolicy(model, cfg)
        ok, _, _ = policy.optimizer.step()  # zero gradients: creates Adam's moments, changes nothing
        assert ok

        def storage(t):
            return t.untyped_storage().data_ptr()

        param_storages = {}
        for p in model.parameters():
            param_storages[storage(p)] = p.untyped_storage().nbytes()
        grad_buffers = [b.grad_data for b in policy.model.buffers + policy.model.expert_parallel_buffers]
        grad_storages = {storage(g) for g in grad_buffers}
        assert all(storage(p.main_grad) in grad_storages for p in model.parameters())
        optimizers = getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])
        master = moments = 0
        for opt in optimizers:
            for group in opt.optimizer.param_groups:
                master += sum(p.numel() * p.element_size() for p in group["params"]
                              if storage(p) not in param_storages)
            for state in opt.optimizer.state.values():
                moments += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
        out.append({
            "dtype": dtype, "distributed": distributed, "tensors": tensors,
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "weights": sum(param_storages.values()),
            "grads": sum(g.numel() * g.element_size() for g in grad_buffers),
            "grad_dtypes": sorted({str(g.dtype) for g in grad_buffers}),
            "master": master, "moments": moments,
            "stage": ps.get_pipeline_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
            "dp": ps.get_data_parallel_world_size(),
        })
        del policy, model
    return out


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny import tiny_hf_config

    root = tmp_path_factory.mktemp("planner_bytes")
    for preset in ("tiny", "tiny-gqa"):
        tiny_hf_config(preset).save_pretrained(root / preset)
    return root


def _check(results, config_dir, tp, pp):
    from megatron_pgpo.models.qwen2_5_vl.hf_config import load_hf_config
    from megatron_pgpo.planner.buffers import training_state_bytes
    from megatron_pgpo.planner.model_size import ModelShape, stage_tensors

    shape = ModelShape.from_hf(load_hf_config(config_dir))
    for rank_results in results:
        for r in rank_results:
            predicted_tensors = stage_tensors(shape, tp, pp, r["stage"])
            assert r["tensors"] == [(t.name, t.numel, t.shared_embedding) for t in predicted_tensors]
            assert r["param_dtypes"] == [{"fp32": "torch.float32", "bf16": "torch.bfloat16"}[r["dtype"]]]
            assert r["grad_dtypes"] == ["torch.float32"]  # grad_reduce_in_fp32
            predicted = training_state_bytes(predicted_tensors, r["dtype"], r["dp"], r["distributed"], r["dp_rank"])
            measured = (r["weights"], r["grads"], r["master"], r["moments"])
            assert measured == (predicted.weights, predicted.grads, predicted.master_params,
                                predicted.adam_moments), (r["dtype"], r["distributed"], r["stage"], r["dp_rank"])
            if r["dtype"] == "bf16":
                assert r["master"] > 0
    return results


def test_bytes_at_tp2(workers, config_dirs):
    results = _check(workers.run(_measure, str(config_dirs / "tiny"), COMBOS, tp=2), config_dirs / "tiny", 2, 1)
    # the distributed optimizer pads: the padded buffer is what the GPU holds
    fp32_plain, fp32_dist = results[0][0], results[0][1]
    assert fp32_dist["grads"] > fp32_plain["grads"]


def test_bytes_at_dp2_distributed_optimizer_shards(workers, config_dirs):
    combos = [("bf16", True), ("bf16", False)]
    results = _check(workers.run(_measure, str(config_dirs / "tiny"), combos, tp=1), config_dirs / "tiny", 1, 1)
    dist0, dist1 = results[0][0], results[1][0]
    plain = results[0][1]
    # each DP rank keeps about half of the replicated optimizer state
    assert dist0["moments"] + dist1["moments"] == plain["moments"]
    assert dist0["moments"] != plain["moments"]


def test_bytes_at_pp2_with_tied_embeddings(workers, config_dirs):
    combos = [("bf16", True), ("fp32", False)]
    results = _check(workers.run(_measure, str(config_dirs / "tiny-gqa"), combos, pp=2), config_dirs / "tiny-gqa",
                     1, 2)
    stage1 = results[1][0]
    assert stage1["tensors"][-1][0] == "language_model.output_layer.weight" and stage1["tensors"][-1][2]


# --------------------------------------------------------------------------------------------- activations
def _decoder_saved_bytes(config_dir, seq, batch):
    """Bytes the stage's decoder saves for backward (autograd's saved tensors, once per storage, parameters
    excluded) for each recompute mode, bf16, sequence parallel when TP > 1."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.planner.activations import saved_activation_bytes

    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for recompute in ("none", "selective", "full"):
        model = build_model(config_dir, tp=tp, dtype="bf16", sequence_parallel=tp > 1, recompute=recompute).train()
        lm = model.language_model
        torch.manual_seed(0)
        hidden = torch.randn(seq // tp if tp > 1 else seq, batch, lm.config.hidden_size, dtype=torch.bfloat16,
                             requires_grad=True)
        rotary = lm.rotary_pos_emb(torch.arange(seq)[None, None, :].expand(3, batch, seq), lm.mrope_section)
        measured = saved_activation_bytes(lambda: lm.decoder(hidden, attention_mask=None, rotary_pos_emb=rotary),
                                          exclude=model.parameters())
        out[recompute] = (measured, len(lm.decoder.layers))
    return out


def _fused_swiglu_saved_bytes(config_dir, seq, batch):
    """The decoder's saved bytes with Megatron's fused SwiGLU (``bias_activation_fusion``, what CUDA runs use), bf16,
    no recompute. Megatron wraps the kernel in torch.compile; dynamo is off here so it runs eagerly on the CPU (what
    autograd saves is the same: the autograd function keeps its input only)."""
    import torch
    import torch._dynamo

    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.planner.activations import saved_activation_bytes

    before, torch._dynamo.config.disable = torch._dynamo.config.disable, True
    try:
        model = build_model(config_dir, dtype="bf16", bias_activation_fusion=True).train()
        lm = model.language_model
        torch.manual_seed(0)
        hidden = torch.randn(seq, batch, lm.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        rotary = lm.rotary_pos_emb(torch.arange(seq)[None, None, :].expand(3, batch, seq), lm.mrope_section)
        return saved_activation_bytes(lambda: lm.decoder(hidden, attention_mask=None, rotary_pos_emb=rotary),
                                      exclude=model.parameters()), len(lm.decoder.layers)
    finally:
        torch._dynamo.config.disable = before


def test_fused_swiglu_activation_bytes_equal_what_megatron_saves(workers, config_dirs):
    """The planner's fused-SwiGLU coefficient (3 E f per token instead of 5 E f) against the real fused kernel."""
    from megatron_pgpo.models.qwen2_5_vl.hf_config import load_hf_config
    from megatron_pgpo.planner.activations import decoder_block_extra_bytes, layer_activation_bytes

    seq, batch = 128, 2
    t = load_hf_config(config_dirs / "tiny").text_config
    h = t.hidden_size
    measured, layers = workers.run(_fused_swiglu_saved_bytes, str(config_dirs / "tiny"), seq, batch, tp=1)[0]
    predicted = layers * layer_activation_bytes(seq, batch, h, t.num_attention_heads, t.num_key_value_heads,
                                                t.intermediate_size, norm_bytes=8 * h + 4, fused_swiglu=True)
    predicted += decoder_block_extra_bytes(seq, batch, h, t.num_attention_heads, final_norm=True, norm_bytes=8 * h + 4)
    assert measured == predicted


@pytest.mark.parametrize("tp", [1, 2])
def test_activation_bytes_equal_what_megatron_saves(workers, config_dirs, tp):
    """The decoder-layer formula of planner/activations.py against a real Megatron decoder (local spec, bf16) at
    TP=1 and TP=2 with sequence parallelism, no / selective / full recompute. On CPU Megatron falls back to torch's
    RMSNorm, which saves two fp32 copies of its input (8h + 4 bytes per token) instead of a fused norm's 2h + 4."""
    from megatron_pgpo.models.qwen2_5_vl.hf_config import load_hf_config
    from megatron_pgpo.planner.activations import decoder_block_extra_bytes, layer_activation_bytes

    seq, batch = 128, 2
    t = load_hf_config(config_dirs / "tiny").text_config
    h = t.hidden_size
    results = workers.run(_decoder_saved_bytes, str(config_dirs / "tiny"), seq, batch, tp=tp)
    for recompute, (measured, layers) in results[0].items():
        args = (seq, batch, h, t.num_attention_heads)
        predicted = layers * layer_activation_bytes(*args, t.num_key_value_heads, t.intermediate_size, tp, tp > 1,
                                                    recompute, norm_bytes=8 * h + 4)
        predicted += decoder_block_extra_bytes(*args, tp, tp > 1, recompute, final_norm=True, norm_bytes=8 * h + 4)
        assert measured == predicted, (recompute, measured, predicted)
    assert results[0]["full"][0] < results[0]["selective"][0] < results[0]["none"][0]
