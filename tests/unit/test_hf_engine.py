"""The transformers rollout engine on its own (the comparison with vLLM is in tests/distributed/test_rollout_sync.py):
its log-probs are the raw model's (before temperature / top-k / top-p) even when sampling with them, left padding
in a batch of different images changes nothing, a seed reproduces a call, and a weight update is a transaction."""
from __future__ import annotations

import pytest
import torch

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny_tokenizer import save_tiny_vl_checkpoint
    from megatron_pgpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig

    ckpt = save_tiny_vl_checkpoint(tmp_path_factory.mktemp("hf_engine") / "ckpt", "tiny", seed=0)
    engine = TransformersEngine(TransformersEngineConfig(model_path=str(ckpt), max_model_len=256, batch_size=3))
    engine.start()
    yield engine
    engine.shutdown()


def _requests():
    from megatron_pgpo.rollout.check_sync import image_messages, synthetic_image
    from megatron_pgpo.rollout.engine import RolloutRequest

    # different image sizes: different prompt lengths, so the batch is left-padded
    return [RolloutRequest(image_messages("What is in the image ?"), synthetic_image(0, (100, 80))),
            RolloutRequest(image_messages("Describe the picture ."), synthetic_image(1, (64, 112)))]


def _raw_logprobs(engine, request, response):
    """Reference: one teacher-forced forward of prompt + response, alone (no padding), raw log-softmax."""
    inputs = engine.processor(text=[engine.prompt_text(request)], images=[request.image], return_tensors="pt")
    prompt = inputs["input_ids"]
    ids = torch.cat([prompt, torch.tensor([response])], dim=1)
    extra = torch.zeros(1, len(response), dtype=inputs["mm_token_type_ids"].dtype)
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                              image_grid_thw=inputs["image_grid_thw"],
                              mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], extra], dim=1)).logits
    steps = torch.log_softmax(logits[0, prompt.shape[1] - 1: -1].float(), dim=-1)
    return prompt[0].tolist(), steps.gather(1, torch.tensor(response)[:, None])[:, 0]


def test_sampled_logprobs_are_the_raw_models(engine):
    from megatron_pgpo.rollout.engine import SamplingConfig

    sampling = SamplingConfig(n=2, temperature=0.7, top_k=20, top_p=0.9, max_tokens=8, seed=5)
    outputs = engine.generate(_requests(), sampling)
    assert [(o.request_index, o.sample_index) for o in outputs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    worst = 0.0
    for o in outputs:
        prompt, reference = _raw_logprobs(engine, _requests()[o.request_index], o.response_token_ids)
        assert o.prompt_token_ids == prompt  # without the batch's left padding
        assert len(o.logprobs) == len(o.response_token_ids) > 0
        worst = max(worst, float((torch.tensor(o.logprobs) - reference).abs().max()))
    assert worst < 1e-4, worst
    again = engine.generate(_requests(), sampling)
    assert [o.response_token_ids for o in again] == [o.response_token_ids for o in outputs]
    other = engine.generate(_requests(), SamplingConfig(n=2, temperature=0.7, top_k=20, top_p=0.9, max_tokens=8,
                                                        seed=6))
    assert [o.response_token_ids for o in other] != [o.response_token_ids for o in outputs]


def test_weight_update_is_a_transaction(engine):
    from megatron_pgpo.models.qwen2_5_vl.hf_io import HFCheckpointReader
    from megatron_pgpo.rollout.engine import EngineUnusable, SamplingConfig, WeightUpdateError

    greedy = SamplingConfig(temperature=0.0, max_tokens=6)
    before = [o.response_token_ids for o in engine.generate(_requests(), greedy)]
    with HFCheckpointReader(engine.config.model_path) as reader:
        named = [(n, reader.tensor(n)) for n in reader.names()]
    version = engine.weight_version
    with pytest.raises(WeightUpdateError, match="incomplete"):
        engine.update_weights(named[:-1])
    assert not engine.usable and engine.weight_version == version
    with pytest.raises(EngineUnusable):
        engine.generate(_requests(), greedy)
    perturbed = [(n, t + 0.05 * torch.randn_like(t)) if n == "model.norm.weight" else (n, t) for n, t in named]
    assert engine.update_weights(perturbed) == version + 1 and engine.usable
    assert engine.update_weights(named) == version + 2
    assert [o.response_token_ids for o in engine.generate(_requests(), greedy)] == before
    with pytest.raises(WeightUpdateError, match="does not have"):
        engine.update_weights([("model.layers.99.mlp.up_proj.weight", named[0][1])])


def test_a_restarted_engine_keeps_its_version_and_waits_for_the_next_update(engine):
    """Before: a restart reset ``weight_version`` to 0 and the engine sampled the checkpoint's weights at once, so
    a rollout after an engine restart looked like one from the start of training."""
    from megatron_pgpo.models.qwen2_5_vl.hf_io import HFCheckpointReader
    from megatron_pgpo.rollout.engine import EngineUnusable, SamplingConfig

    with HFCheckpointReader(engine.config.model_path) as reader:
        named = [(n, reader.tensor(n)) for n in reader.names()]
    version = engine.update_weights(named)
    assert version >= 1 and engine.usable
    engine.restart()
    assert engine.weight_version == version and not engine.usable
    with pytest.raises(EngineUnusable):
        engine.generate(_requests(), SamplingConfig(temperature=0.0, max_tokens=4))
    assert engine.update_weights(named) == version + 1 and engine.usable


def test_check_sync_verdicts():
    """Before: PASS after comparing a single token (a response that starts with EOS proves nothing)."""
    from megatron_pgpo.rollout.check_sync import verdict

    assert verdict([5, 6, 7, 2], [5, 6, 7, 2], 4)[0] == 0
    assert verdict([5, 6, 8, 2], [5, 6, 7, 2], 4) == (1, "FAIL (first difference at response position 2)")
    code, message = verdict([2], [2], 4)
    assert code == 2 and "INCONCLUSIVE" in message and "1 token(s)" in message


def test_check_sync_reference_decodes_plain_greedy_whatever_the_generation_config(engine, tmp_path):
    """The checkpoint's generation_config.json (Qwen2.5-VL-Instruct ships repetition_penalty 1.05; here 10, and
    sampling on) must not change the reference: it equals an argmax loop over full forwards, as vLLM runs it."""
    import json
    import shutil

    from megatron_pgpo.rollout.check_sync import hf_greedy, image_messages, synthetic_image
    from megatron_pgpo.rollout.engine import RolloutRequest

    ckpt = tmp_path / "ckpt"
    shutil.copytree(engine.config.model_path, ckpt)
    config = json.loads((ckpt / "generation_config.json").read_text()) if (ckpt / "generation_config.json").exists() \
        else {}
    config.update(repetition_penalty=10.0, do_sample=True, temperature=0.7, top_k=5)
    (ckpt / "generation_config.json").write_text(json.dumps(config))
    request = RolloutRequest(image_messages("What is in the image ?"), synthetic_image(0, (100, 80)))
    prompt = engine.prompt_text(request)
    got = hf_greedy(str(ckpt), prompt, request.image, 8)
    inputs = engine.processor(text=[prompt], images=[request.image], return_tensors="pt")
    ids, tokens = inputs["input_ids"], []
    eos = engine.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for _ in range(8):  # the reference: argmax of a full forward per token
        extra = torch.zeros(1, ids.shape[1] - inputs["input_ids"].shape[1], dtype=inputs["mm_token_type_ids"].dtype)
        with torch.no_grad():
            logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                                  mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], extra], dim=1)).logits
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        if token in eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert got == tokens
    assert len(set(tokens)) < len(tokens)  # it repeats tokens: a repetition penalty of 10 would have changed it
