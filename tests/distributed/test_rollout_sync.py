"""Megatron (TP=2, and PP=2) -> vLLM weight sync on a tiny random Qwen2.5-VL (``tiny-gqa``), prompts WITH images.

Two gloo training processes (the session's worker pool); rank 0 -- the engine owner -- holds ONE multiprocess vLLM
engine (fp32, CPU) for the whole module, started from the original checkpoint and reused by every test (the
deployment ``vllm_engine`` documents; the multiprocess engine has no side effects on the worker processes, which
other test modules share). Each case perturbs the Megatron weights with its own seed, syncs them into vLLM and
exports them through the converter path; this process runs transformers ``generate`` on the export, and vLLM's
greedy fp32 tokens must equal it token for token.

Log-prob tolerance: vLLM's returned log-prob of each sampled token vs ``vocab_parallel_logprobs`` on the Megatron
TP=2 logits: max abs difference < 1e-4 (fp32; different kernels and reduction orders, measured ~1e-6).
"""
from __future__ import annotations

import pytest

from megatron_pgpo.rollout.check_sync import first_difference, hf_greedy, synthetic_image

MAX_TOKENS = 12
LOGPROB_ATOL = 1e-4
_STATE: dict = {}  # per worker process: the engine (rank 0 only)

# Two prompts with different images (sizes differ, so the image token counts differ).
QUESTIONS = ("What is in the image ?", "Describe the picture .")
IMAGE_SIZES = ((100, 80), (64, 112))


def _requests():
    from megatron_pgpo.rollout.check_sync import image_messages
    from megatron_pgpo.rollout.engine import RolloutRequest

    return [RolloutRequest(image_messages(q), synthetic_image(i, size))
            for i, (q, size) in enumerate(zip(QUESTIONS, IMAGE_SIZES))]


def _engine(ckpt: str, run_dir: str):
    """Rank 0's engine, created once per module (None on other ranks); ``sync_weights`` starts it."""
    from megatron_pgpo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig
    from megatron_pgpo.rollout.weight_sync import is_engine_owner

    if not is_engine_owner():
        return None
    if "engine" not in _STATE:
        engine = VLLMEngine(VLLMEngineConfig(model_path=ckpt, run_dir=run_dir, max_model_len=512,
                                             kv_cache_memory_bytes=64 << 20))
        _STATE["engine"] = engine
    return _STATE["engine"]


def _shutdown_engine():
    engine = _STATE.pop("engine", None)
    if engine is not None:
        engine.shutdown()


def _greedy(engine):
    from megatron_pgpo.rollout.engine import SamplingConfig

    requests = _requests()
    outputs = engine.generate(requests, SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS))
    return {"tokens": [o.response_token_ids for o in outputs], "prompts": [engine.prompt_text(r) for r in requests],
            "version": outputs[0].weight_version}


# ----------------------------------------------------------------------------------------- worker functions
def _sync_case(ckpt, run_dir, seed, bucket_bytes, export_dir, check_logprobs, first_stage_layers=None):
    """Load, perturb, sync, export; rank 0 returns vLLM greedy tokens (and log-prob comparisons at PP=1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pgpo.rollout.check_sync import load_megatron, megatron_response_logprobs, perturb_model_
    from megatron_pgpo.rollout.engine import SamplingConfig
    from megatron_pgpo.rollout.weight_sync import save_hf_checkpoint, sync_weights

    model = load_megatron(ckpt, first_stage_layers=first_stage_layers)
    perturb_model_(model, seed)
    engine = _engine(ckpt, run_dir)
    if engine is not None:
        engine.config.bucket_bytes = bucket_bytes
    sync_weights(model, engine, bucket_bytes=bucket_bytes)
    save_hf_checkpoint(model, export_dir, source_dir=ckpt, bucket_bytes=bucket_bytes)
    result = _greedy(engine) if engine is not None else {}
    if check_logprobs:  # sampled (temperature 1) responses, scored by Megatron at TP=2
        import torch

        shared = [None]
        if engine is not None:
            outs = engine.generate(_requests(), SamplingConfig(temperature=1.0, max_tokens=MAX_TOKENS, seed=11))
            shared = [[(text, o.prompt_token_ids, o.response_token_ids, o.logprobs)
                       for text, o in zip(result["prompts"], outs)]]
        tp_group = ps.get_tensor_model_parallel_group()
        dist.broadcast_object_list(shared, src=dist.get_global_rank(tp_group, 0), group=tp_group)
        diffs, prompt_match = [], []
        for request, (text, prompt_ids, response, vllm_logprobs) in zip(_requests(), shared[0]):
            megatron_logprobs, megatron_prompt = megatron_response_logprobs(model, ckpt, text, request.image, response)
            diffs.append(float((megatron_logprobs - torch.tensor(vllm_logprobs)).abs().max()))
            prompt_match.append(megatron_prompt == prompt_ids)
        result.update(logprob_max_abs_diff=diffs, prompt_ids_match=prompt_match,
                      sampled_lengths=[len(item[2]) for item in shared[0]])
    return result


def _failing_update_case(ckpt, run_dir, seed, export_dir):
    """(a) the stream dies part-way; (b) vLLM's reload itself raises. Each time: detected on every rank, the engine
    refuses to generate, and the next full sync restores exact weights."""
    from megatron_pgpo.rollout.check_sync import load_megatron, perturb_model_
    from megatron_pgpo.rollout.engine import EngineUnusable
    from megatron_pgpo.rollout.weight_sync import WeightSyncError, save_hf_checkpoint, sync_weights

    model = load_megatron(ckpt)
    perturb_model_(model, seed)
    engine = _engine(ckpt, run_dir)
    if engine is not None:
        engine.config.bucket_bytes = 64 << 10  # several buckets, so part of the model is loaded before the failure

    def dies_part_way(stream):
        for i, item in enumerate(stream):
            if i == 40:
                raise RuntimeError("trainer lost a rank mid-sync")
            yield item

    def bad_shape(stream):
        for name, tensor in stream:
            yield (name, tensor[:-1]) if name == "model.layers.3.mlp.down_proj.weight" else (name, tensor)

    report = {}
    for label, hook in (("stream", dies_part_way), ("reload", bad_shape)):
        raised = False
        try:
            sync_weights(model, engine, named_tensor_filter=hook)
        except WeightSyncError:
            raised = True
        report[f"{label}_raised"] = raised  # on every rank
        if engine is not None:
            report[f"{label}_usable"] = engine.usable
            report[f"{label}_needs_restart"] = engine.needs_restart
            try:
                _greedy(engine)
                report[f"{label}_generate"] = "answered"
            except EngineUnusable:
                report[f"{label}_generate"] = "refused"
            if not engine.needs_restart:
                report[f"{label}_worker_state"] = engine.worker_weight_state()
    sync_weights(model, engine)  # recovery: restarts the engine if needed, then the full model
    save_hf_checkpoint(model, export_dir, source_dir=ckpt)
    if engine is not None:
        report.update(_greedy(engine), recovered_usable=engine.usable)
    return report


def _sampling_case(ckpt, run_dir):
    from megatron_pgpo.rollout.engine import SamplingConfig

    engine = _engine(ckpt, run_dir)
    if engine is None:
        return None
    engine.start()  # no-op: the sync tests started it
    runs = [engine.generate(_requests(), SamplingConfig(n=2, temperature=1.0, top_p=0.9, top_k=50, max_tokens=8,
                                                        seed=seed)) for seed in (3, 3, 4)]
    return [[o.response_token_ids for o in run] for run in runs]


def _transformers_engine_case(ckpt, run_dir, seed):
    """The same synced weights in vLLM and in the transformers engine (both fed by ``sync_weights``): greedy tokens,
    prompt ids and log-probs side by side; seeded sampling; an incomplete update refused, then recovered."""
    from megatron_pgpo.rollout.check_sync import load_megatron, perturb_model_
    from megatron_pgpo.rollout.engine import EngineUnusable, SamplingConfig
    from megatron_pgpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig
    from megatron_pgpo.rollout.weight_sync import WeightSyncError, is_engine_owner, sync_weights

    model = load_megatron(ckpt)
    perturb_model_(model, seed)
    engine = _engine(ckpt, run_dir)
    hf = TransformersEngine(TransformersEngineConfig(model_path=ckpt, max_model_len=512)) if is_engine_owner() else None
    if hf is not None:
        hf.start()
    sync_weights(model, engine)
    sync_weights(model, hf)
    report = {}
    if hf is not None:
        greedy = SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS)
        report["vllm"] = [(o.prompt_token_ids, o.response_token_ids, o.logprobs, o.finish_reason)
                          for o in engine.generate(_requests(), greedy)]
        report["hf"] = [(o.prompt_token_ids, o.response_token_ids, o.logprobs, o.finish_reason)
                        for o in hf.generate(_requests(), greedy)]
        report["hf_version"] = hf.weight_version
        sampled = [[o.response_token_ids for o in hf.generate(_requests(), SamplingConfig(
            n=2, temperature=1.0, top_p=0.9, max_tokens=8, seed=s))] for s in (3, 3, 4)]
        report["sampled"] = sampled
    try:
        sync_weights(model, hf, named_tensor_filter=lambda stream: (item for item in stream
                                                                    if item[0] != "model.norm.weight"))
        report["incomplete_raised"] = False
    except WeightSyncError:
        report["incomplete_raised"] = True
    if hf is not None:
        report["incomplete_usable"] = hf.usable
        try:
            hf.generate(_requests(), SamplingConfig(temperature=0.0, max_tokens=2))
            report["incomplete_generate"] = "answered"
        except EngineUnusable:
            report["incomplete_generate"] = "refused"
    sync_weights(model, hf)
    if hf is not None:
        report["recovered"] = [o.response_token_ids for o in hf.generate(
            _requests(), SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS))]
        hf.shutdown()
    return report


# ---------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def setup(workers, tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny_tokenizer import save_tiny_vl_checkpoint

    root = tmp_path_factory.mktemp("rollout_sync")
    # tiny-gqa: 4 layers (2 per stage at PP=2), GQA, TIED embeddings (the case vLLM's CPU head packing gets wrong
    # without vllm_worker's refresh)
    ckpt = str(save_tiny_vl_checkpoint(root / "ckpt", "tiny-gqa", seed=0))
    yield workers, ckpt, str(root / "run"), root
    try:
        workers.run(_shutdown_engine, timeout_s=60)
    except Exception:  # the pool may be gone already; its workers' exit takes the engines with them
        pass


def _assert_matches_hf(result, export_dir):
    for i, (prompt, tokens) in enumerate(zip(result["prompts"], result["tokens"])):
        reference = hf_greedy(str(export_dir), prompt, synthetic_image(i, IMAGE_SIZES[i]), MAX_TOKENS)
        assert first_difference(tokens, reference) is None, (
            f"prompt {i}: vLLM {tokens} != transformers {reference} from position {first_difference(tokens, reference)}")


def test_tp2_sync_matches_transformers_and_megatron_logprobs(setup):
    workers, ckpt, run_dir, root = setup
    export = root / "export_tp2"
    result = workers.run(_sync_case, ckpt, run_dir, 1, 512 << 20, str(export), True, tp=2, pp=1, timeout_s=300)[0]
    assert result["version"] >= 1
    assert len(set(map(tuple, result["tokens"]))) == 2  # the two image prompts give different answers
    _assert_matches_hf(result, export)
    assert all(result["prompt_ids_match"])  # vLLM's expanded prompt == the HF processor's
    assert all(n > 0 for n in result["sampled_lengths"])
    print(f"[rollout-sync] vLLM vs Megatron TP=2 log-prob max |diff| per prompt: {result['logprob_max_abs_diff']}")
    assert max(result["logprob_max_abs_diff"]) < LOGPROB_ATOL, result["logprob_max_abs_diff"]


def test_tp2_many_tiny_buckets(setup):
    workers, ckpt, run_dir, root = setup
    export = root / "export_buckets"
    result = workers.run(_sync_case, ckpt, run_dir, 2, 4 << 10, str(export), False, tp=2, pp=1, timeout_s=180)[0]
    _assert_matches_hf(result, export)


def test_pp2_each_stage_contributes_its_layers(setup):
    workers, ckpt, run_dir, root = setup
    export = root / "export_pp2"
    result = workers.run(_sync_case, ckpt, run_dir, 3, 64 << 10, str(export), False, tp=1, pp=2, timeout_s=180)[0]
    _assert_matches_hf(result, export)


def test_pp2_uneven_split_exports_each_layer_under_its_hf_index(setup):
    """PP=2 with 1 + 3 of the 4 layers: each stage's layers leave under their global HF indices."""
    workers, ckpt, run_dir, root = setup
    export = root / "export_pp2_uneven"
    result = workers.run(_sync_case, ckpt, run_dir, 6, 64 << 10, str(export), False, 1, tp=1, pp=2,
                         timeout_s=180)[0]
    _assert_matches_hf(result, export)


def test_failed_update_is_detected_and_never_served(setup):
    workers, ckpt, run_dir, root = setup
    export = root / "export_failure"
    per_rank = workers.run(_failing_update_case, ckpt, run_dir, 4, str(export), tp=2, pp=1, timeout_s=300)
    owner = per_rank[0]
    for report in per_rank:
        assert report["stream_raised"] and report["reload_raised"]
    assert owner["stream_usable"] is False and owner["stream_generate"] == "refused"
    assert owner["stream_needs_restart"] is False  # vLLM's params are intact: a full re-sync suffices
    assert owner["stream_worker_state"][0]["pending"] is not None  # the worker never committed the partial update
    assert owner["reload_usable"] is False and owner["reload_generate"] == "refused"
    assert owner["reload_needs_restart"] is True
    assert owner["recovered_usable"]
    _assert_matches_hf(owner, export)


def test_seeded_sampling_is_reproducible(setup):
    workers, ckpt, run_dir, _ = setup
    first, again, other = workers.run(_sampling_case, ckpt, run_dir, tp=2, pp=1, timeout_s=300)[0]
    assert first == again
    assert first != other
    assert first[0] != first[1]  # the n=2 samples of one prompt differ


@pytest.mark.gpu
def test_cuda_engine_sleep_wake_and_reload(tmp_path):
    """CUDA vLLM only (not installable on the CPU machines nor on the GPU check machine, see docs/stack.md): level-2
    sleep frees GPU memory, and waking the weights, re-sending them and waking the KV cache (the loop's order) gives
    the same greedy tokens as before."""
    pytest.importorskip("vllm")
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        pytest.skip("the installed vLLM is not a CUDA build")
    from megatron_pgpo.models.qwen2_5_vl.hf_io import HFCheckpointReader
    from megatron_pgpo.models.qwen2_5_vl.tiny_tokenizer import save_tiny_vl_checkpoint
    from megatron_pgpo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig
    from megatron_pgpo.rollout.weight_sync import fused_group_key

    ckpt = str(save_tiny_vl_checkpoint(tmp_path / "ckpt", "tiny", seed=0))
    config = VLLMEngineConfig(model_path=ckpt, run_dir=str(tmp_path / "run"), multiprocess=False,
                              kv_cache_memory_bytes=None, gpu_memory_utilization=0.2, enable_sleep_mode=True)
    with VLLMEngine(config) as engine:
        before = _greedy(engine)["tokens"]
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()  # level 2: weights and KV cache dropped, the engine unusable until a complete update
        assert not engine.usable and torch.cuda.mem_get_info()[0] > free_awake
        engine.wake(["weights"])  # the trainer's order: weights, the update, then the KV cache
        with HFCheckpointReader(ckpt) as reader:
            named = [(n, reader.tensor(n).cuda()) for n in sorted(reader.names(), key=fused_group_key)]
        assert engine.update_weights(named) == 1
        assert not engine.usable  # the KV cache is still asleep
        engine.wake(["kv_cache"])
        assert engine.usable and _greedy(engine)["tokens"] == before


def test_transformers_engine_matches_vllm(setup):
    """``rollout.engine=transformers`` against vLLM on the same synced tiny checkpoint (fp32, CPU): the same greedy
    tokens and prompt ids, log-probs within 1e-4 (measured below), the same weight-update contract."""
    import torch

    workers, ckpt, run_dir, _ = setup
    per_rank = workers.run(_transformers_engine_case, ckpt, run_dir, 5, tp=2, pp=1, timeout_s=300)
    owner = per_rank[0]
    assert owner["hf_version"] == 1
    for (v_prompt, v_tokens, v_logp, v_finish), (h_prompt, h_tokens, h_logp, h_finish) in zip(owner["vllm"],
                                                                                               owner["hf"]):
        assert h_prompt == v_prompt
        assert first_difference(h_tokens, v_tokens) is None, (h_tokens, v_tokens)
        assert h_finish == v_finish and len(h_logp) == len(h_tokens)
        diff = float((torch.tensor(h_logp) - torch.tensor(v_logp)).abs().max())
        print(f"[rollout-sync] transformers vs vLLM greedy log-prob max |diff|: {diff:.2e}")
        assert diff < LOGPROB_ATOL
    first, again, other = owner["sampled"]
    assert first == again and first != other and first[0] != first[1]
    assert all(r["incomplete_raised"] for r in per_rank)
    assert owner["incomplete_usable"] is False and owner["incomplete_generate"] == "refused"
    assert owner["recovered"] == [tokens for _, tokens, _, _ in owner["hf"]]
