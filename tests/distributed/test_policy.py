"""The policy update through Megatron's schedules equals a plain computation on the whole batch.

At DP=2 (each rank trains on half the batch, in micro-batches) and at TP=2 (vocab-parallel logits, sharded
weights), the gradients Megatron accumulates must equal the gradient of the clipped token-mean loss of the whole
global batch computed in one autograd call on the same weights: this pins down the loss scaling over
micro-batches and DP ranks, the response mask and the label shift.
"""
import pytest

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)

N_SAMPLES = 8


def _samples(seed=0):
    import torch

    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID
    from megatron_pgpo.trainer.batch import Sample

    gen = torch.Generator().manual_seed(seed)
    # Three groups (i % 3) as rollouts make them: one prompt and one image per group, group prompts of 9-11 tokens.
    images = [torch.randn(16, 1176, generator=gen) for _ in range(3)]
    out = []
    for i in range(N_SAMPLES):
        g = i % 3
        prompt = [5, 6 + g] + [8] * g + [VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * 4 + [VISION_END_TOKEN_ID, 7]
        response = torch.randint(0, 990, (2 + i,), generator=gen).tolist()
        out.append(Sample(prompt_ids=prompt, response_ids=response, pixel_values=images[g], group=g,
                          image_grid_thw=torch.tensor([[1, 4, 4]])))
    return out


def shifted_logprobs(logits, input_ids, vocab_size):
    """Reference: ``[B, S]`` log-prob of every token given its prefix, from the full-sequence vocab-parallel
    ``logits [B, S, V/TP]`` (0 at position 0), the way the policy computed them before response-token logits."""
    import torch

    from megatron_pgpo.parallel.vocab_parallel import vocab_parallel_logprobs

    lp = vocab_parallel_logprobs(logits[:, :-1], input_ids[:, 1:], vocab_size=vocab_size)
    return torch.nn.functional.pad(lp, (1, 0))


def shifted_entropy(logits, vocab_size):
    """Reference: ``[B, S]`` entropy of the distribution predicting each token (0 at position 0)."""
    import torch

    from megatron_pgpo.parallel.vocab_parallel import vocab_parallel_entropy

    return torch.nn.functional.pad(vocab_parallel_entropy(logits[:, :-1], vocab_size=vocab_size), (1, 0))


#: The KL-to-reference and entropy terms of the penalised case (``penalties=True``).
PENALTIES = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)


def _update_grads_vs_reference(hf_path, tp, aggregation, sp=False, share_prompts=True, penalties=False):
    import torch
    from megatron.core import parallel_state as ps

    from megatron_pgpo.algorithms import clipped_policy_loss
    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID
    from megatron_pgpo.trainer.batch import collate, length_bucketed_micro_batches, prompt_grouped_micro_batches
    from megatron_pgpo.trainer.policy import MegatronPolicy, update_loss_func

    # The reference never uses sequence parallelism; the model under test may (same weights, same names).
    ref = build_model(hf_path, tp=tp)
    load_hf_into_model(ref, hf_path, ps.get_tensor_model_parallel_rank(), tp)
    model = build_model(hf_path, tp=tp, sequence_parallel=sp)
    load_hf_into_model(model, hf_path, ps.get_tensor_model_parallel_rank(), tp)
    multiple = tp if sp else 1
    samples = _samples()
    full = collate(samples, list(range(N_SAMPLES)), IMAGE_TOKEN_ID, 2, pad_to_multiple_of=multiple)
    gen = torch.Generator().manual_seed(1)
    advantages = torch.randn(N_SAMPLES, generator=gen)
    noise = 0.2 * torch.randn(full.input_ids.shape, generator=gen)

    # Reference: one autograd call on the whole batch (autograd.grad, so DDP's hooks are not involved).
    logits = ref(full.input_ids, full.position_ids, pixel_values=full.pixel_values,
                 image_grid_thw=full.image_grid_thw, image_mask=full.image_mask)
    logp = shifted_logprobs(logits, full.input_ids, ref.vocab_size)
    old_logp = (logp.detach() + noise) * full.response_mask
    token_adv = advantages[:, None] * full.response_mask
    terms = {}
    if penalties:  # a fixed stand-in for the frozen reference's log-probs, and the entropy with its gradient
        ref_logp = (logp.detach() - 0.3 * torch.rand(full.input_ids.shape, generator=gen)) * full.response_mask
        terms = dict(PENALTIES, ref_logp=ref_logp, entropy=shifted_entropy(logits, ref.vocab_size))
    ref_loss, _ = clipped_policy_loss(logp, old_logp, token_adv, full.response_mask, aggregation=aggregation,
                                      **terms)
    ref_params = dict(ref.named_parameters())
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref_loss, [ref_params[n] for n, _ in params], allow_unused=True)

    # The distributed optimizer reduce-scatters: each DP rank holds the reduced gradient of its shard only.
    # All-reduce here so every rank's full gradient can be compared (the distributed path is tested below).
    cfg = load_config(None, [f"parallel.tensor_model_parallel_size={tp}", f"algorithm.aggregation={aggregation}",
                             "parallel.use_distributed_optimizer=false", f"parallel.sequence_parallel={str(sp).lower()}",
                             f"trainer.share_prompts={str(share_prompts).lower()}"])
    policy = MegatronPolicy(model, cfg)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, N_SAMPLES, dp))
    local = [samples[i] for i in mine]
    split = prompt_grouped_micro_batches if share_prompts else length_bucketed_micro_batches
    micro = [collate(samples, [mine[j] for j in idx], IMAGE_TOKEN_ID, 2, pad_to_multiple_of=multiple)
             for idx in split(local, 4 if share_prompts else 2)]
    assert policy.share_prompts == share_prompts
    if share_prompts:  # a micro-batch holds two or more responses to one prompt, so packing is exercised
        assert any(len(set(mb.prompt_keys)) < len(mb.prompt_keys) for mb in micro)
    # The scoring pass (image and text-only rows stacked) gives the reference's log-probs on response tokens.
    logp_err = 0.0
    for out in policy.score(micro):
        for row, i in enumerate(out.indices):
            mask = full.response_mask[i][: out.logp.shape[1]]
            logp_err = max(logp_err, float((out.logp[row][mask] - logp[i][: out.logp.shape[1]][mask]).abs().max()))
    extras = [{"old_logp": old_logp[mb.indices][:, : mb.input_ids.shape[1]],
               "advantages": token_adv[mb.indices][:, : mb.input_ids.shape[1]],
               **({"ref_logp": terms["ref_logp"][mb.indices][:, : mb.input_ids.shape[1]]} if penalties else {})}
              for mb in micro]
    policy.model.zero_grad_buffer()
    policy.model.train()
    from functools import partial

    loss_func = partial(update_loss_func, vocab_size=model.vocab_size, loss_name="clipped",
                        loss_kwargs=dict(aggregation=aggregation, global_num_tokens=float(full.response_mask.sum()),
                                         global_num_seqs=float(N_SAMPLES), **(PENALTIES if penalties else {})),
                        scale=float(len(micro) * dp))
    reported = policy._run(micro, extras, "update", loss_func, False)
    diffs = {n: float((p.main_grad - g).abs().max()) for (n, p), g in zip(params, ref_grads) if g is not None}
    total_loss = sum(float(r["loss"]) for r in reported)
    scale = max(float(g.abs().max()) for g in ref_grads if g is not None)
    return {"max_diff": max(diffs.values()), "n": len(diffs), "loss": total_loss, "ref_loss": float(ref_loss),
            "grad_scale": scale, "logp_err": logp_err}


@pytest.mark.parametrize("tp, aggregation, sp, share_prompts, penalties", [
    (1, "token-mean", False, True, False), (1, "seq-mean-token-mean", False, True, False),
    (1, "token-mean", False, False, False), (2, "token-mean", False, True, False), (2, "token-mean", True, True, False),
    (2, "token-mean", True, False, False), (2, "token-mean", True, True, True), (1, "seq-mean-token-mean", False, True,
                                                                                 True)])
def test_megatron_update_gradients_equal_whole_batch_reference(workers, tiny_hf_checkpoint, tp, aggregation, sp,
                                                               share_prompts, penalties):
    """DP=2 (tp=1) and TP=2 with sequence parallelism off and on, with and without shared-prompt packing, against
    one process's whole-batch autograd (every sequence in its own row); ``penalties``: with the KL-to-reference
    and entropy terms (the entropy's gradient through the vocab-parallel entropy)."""
    results = workers.run(_update_grads_vs_reference, str(tiny_hf_checkpoint), tp, aggregation, sp, share_prompts,
                          penalties, tp=tp)
    for r in results:
        assert r["n"] > 40  # language and vision parameters all received gradients
        assert r["grad_scale"] > 1e-3
        assert r["max_diff"] < 1e-5, r
        assert r["logp_err"] < 1e-5, r
    if tp == 1:  # DP=2: each rank's loss is its share of the global token mean
        assert sum(r["loss"] for r in results) == pytest.approx(results[0]["ref_loss"], abs=1e-5)
    else:
        assert results[0]["loss"] == pytest.approx(results[0]["ref_loss"], abs=1e-5)


def _score_vs_transformers(hf_path, tp, sp, share_prompts, view="text_only"):
    """The scoring pass (both estimators) at this layout vs. a plain full-vocabulary torch computation on the
    transformers model's logits: the normal forward, and the second view's: the visual-blind forward in its
    attention-mask form, or (``view="masked_image"``, PAPO / VPPO) the normal forward on the masked images."""
    from types import SimpleNamespace

    import torch
    from megatron.core import parallel_state as ps

    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.parity import hf_logits, load_hf_model
    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID
    from megatron_pgpo.trainer.batch import collate
    from megatron_pgpo.trainer.policy import MegatronPolicy

    samples = _samples()
    if view == "masked_image":  # one mask per prompt (group), as the rollouts make them
        from megatron_pgpo.algorithms.perception import mask_patches

        fill = torch.full((1176,), -1.5)
        masked = {g: mask_patches(samples[g].pixel_values, 0.9, torch.Generator().manual_seed(g), fill)
                  for g in range(3)}
        for s in samples:
            s.masked_pixel_values = masked[s.group]
    full = collate(samples, list(range(N_SAMPLES)), IMAGE_TOKEN_ID, 2)
    inputs = SimpleNamespace(input_ids=full.input_ids, pixel_values=full.pixel_values,
                             image_grid_thw=full.image_grid_thw, image_mask=full.image_mask,
                             position_ids=full.position_ids,
                             attention_mask=torch.tensor([[t < s.length for t in range(full.input_ids.shape[1])]
                                                          for s in samples]).long())
    hf_model = load_hf_model(hf_path)
    ref = hf_logits(hf_model, inputs)
    if view == "masked_image":
        inputs.pixel_values = full.masked_pixel_values
        ref["text_only"] = hf_logits(hf_model, inputs)["image"]
    lp_img = torch.log_softmax(ref["image"][:, :-1].double(), -1)
    lp_txt = torch.log_softmax(ref["text_only"][:, :-1].double(), -1)
    target = full.input_ids[:, 1:, None]
    pad = torch.nn.functional.pad
    expected = {"logp": pad(lp_img.gather(-1, target)[..., 0], (1, 0)),
                "logp_text": pad(lp_txt.gather(-1, target)[..., 0], (1, 0)),
                "entropy": pad(-(lp_img.exp() * lp_img).sum(-1), (1, 0)),
                "exact": pad((lp_img.exp() * (lp_img - lp_txt)).sum(-1), (1, 0))}
    d = expected["logp_text"] - expected["logp"]
    expected["k3"] = torch.expm1(d) - d

    model = build_model(hf_path, tp=tp, sequence_parallel=sp)
    load_hf_into_model(model, hf_path, ps.get_tensor_model_parallel_rank(), tp)
    multiple = tp if sp else 1
    # Micro-batches with 2-3 responses per prompt (shared) and with three different prompts (nothing shared).
    micro = [collate(samples, idx, IMAGE_TOKEN_ID, 2, pad_to_multiple_of=multiple)
             for idx in ([0, 3, 6], [1, 4, 7], [2, 5], [0, 4, 2])]
    errors, scores = {}, {}
    for estimator in ("k3", "exact"):
        cfg = load_config(None, [f"parallel.tensor_model_parallel_size={tp}", f"algorithm.pgpo.estimator={estimator}",
                                 f"parallel.sequence_parallel={str(sp).lower()}",
                                 f"trainer.share_prompts={str(share_prompts).lower()}"])
        for out in MegatronPolicy(model, cfg).score(micro, view=view):
            for row, i in enumerate(out.indices):
                mask = full.response_mask[i]
                # A micro-batch is narrower than the whole batch, or wider (padded to a multiple of TP under SP).
                width = min(out.logp.shape[1], mask.shape[0])
                assert not mask[width:].any() and not out.logp[row][:width][~mask[:width]].any()
                assert not out.logp[row][width:].any()
                got = {"logp": out.logp[row], "logp_text": out.logp_text[row], "entropy": out.entropy[row],
                       estimator: out.scores[row]}
                for key, value in got.items():
                    err = float((value[:width][mask[:width]].double() - expected[key][i][mask]).abs().max())
                    errors[key] = max(errors.get(key, 0.0), err)
                scores.setdefault(estimator, []).append(expected[estimator][i][mask])
    return {"errors": errors, "score_scale": {k: float(torch.cat(v).abs().max()) for k, v in scores.items()}}


@pytest.mark.parametrize("tp, sp, share_prompts, view", [
    (1, False, True, "text_only"), (1, False, False, "text_only"), (2, False, True, "text_only"),
    (2, True, True, "text_only"), (2, True, False, "text_only"), (2, True, True, "masked_image"),
    (2, False, False, "masked_image")])
def test_scoring_pass_equals_full_vocab_reference_on_transformers(workers, tiny_hf_checkpoint, tp, sp,
                                                                  share_prompts, view):
    """Old log-probs, the second view's log-probs (text-only, or masked image for PAPO / VPPO), entropy, k3 and
    the exact KL of every response token, computed from the response-token logits only (each group's prompt once
    per micro-batch with ``share_prompts``), equal torch's full-vocabulary numbers on transformers' two forwards of
    every sequence on its own."""
    for r in workers.run(_score_vs_transformers, str(tiny_hf_checkpoint), tp, sp, share_prompts, view, tp=tp):
        assert set(r["errors"]) == {"logp", "logp_text", "entropy", "k3", "exact"}
        assert r["score_scale"]["k3"] > 1e-3 and r["score_scale"]["exact"] > 1e-3  # the image matters here
        for key, err in r["errors"].items():
            assert err < 2e-5, (key, r)


def _one_step_params(hf_path, distributed_optimizer):
    import torch
    from megatron.core import parallel_state as ps

    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID
    from megatron_pgpo.trainer.batch import collate
    from megatron_pgpo.trainer.policy import MegatronPolicy

    model = build_model(hf_path)
    load_hf_into_model(model, hf_path)
    samples = _samples()
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, N_SAMPLES, dp))
    mb = collate(samples, mine, IMAGE_TOKEN_ID, 2)
    gen = torch.Generator().manual_seed(2)
    full_adv = torch.randn(N_SAMPLES, generator=gen)
    extras = [{"old_logp": torch.full(mb.input_ids.shape, -2.0) * mb.response_mask,
               "advantages": full_adv[mine][:, None] * mb.response_mask}]
    total = float(sum(len(s.response_ids) for s in samples))
    cfg = load_config(None, [f"parallel.use_distributed_optimizer={str(distributed_optimizer).lower()}",
                             "trainer.lr=1e-2"])
    policy = MegatronPolicy(model, cfg)
    stats = policy.update([mb], extras, total, float(N_SAMPLES))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, stats


def test_distributed_optimizer_step_equals_replicated_optimizer(workers, tiny_hf_checkpoint):
    sharded = workers.run(_one_step_params, str(tiny_hf_checkpoint), True, tp=1)
    plain = workers.run(_one_step_params, str(tiny_hf_checkpoint), False, tp=1)
    for (params_a, stats_a), (params_b, stats_b) in zip(sharded, plain):
        assert stats_a["actor/skipped_updates"] == 0.0 and stats_a["actor/grad_norm"] > 0
        assert stats_a["actor/grad_norm"] == pytest.approx(stats_b["actor/grad_norm"], rel=1e-5)
        assert max(float((params_a[n] - params_b[n]).abs().max()) for n in params_a) < 1e-6
    # both DP ranks hold the same weights after the step
    assert max(float((sharded[0][0][n] - sharded[1][0][n]).abs().max()) for n in sharded[0][0]) == 0.0


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_policy"), "tiny", seed=0)


def _pipeline_case(hf_path):
    """PP=2: the scoring pass's old log-probs and the update's gradients equal a one-stage reference (built in
    the same process, unsharded), compared per HF tensor name."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.hf_config import load_hf_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model, stage_mappings
    from megatron_pgpo.models.qwen2_5_vl.mapping import to_hf
    from megatron_pgpo.models.qwen2_5_vl.model import Qwen2_5_VLMegatronModel, build_model
    from megatron_pgpo.models.qwen2_5_vl.hf_config import to_transformer_config
    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID
    from megatron_pgpo.trainer.batch import collate, length_bucketed_micro_batches
    from megatron_pgpo.trainer.policy import MegatronPolicy

    pp_rank = ps.get_pipeline_model_parallel_rank()
    samples = _samples()
    full = collate(samples, list(range(N_SAMPLES)), IMAGE_TOKEN_ID, 2)
    gen = torch.Generator().manual_seed(1)
    advantages = torch.randn(N_SAMPLES, generator=gen)

    # One-stage reference in this process (pp=1 config: every layer, embedding and head).
    hf_config = load_hf_config(hf_path)
    ref = Qwen2_5_VLMegatronModel(hf_config, to_transformer_config(hf_config, tp=1, pp=1))
    load_hf_into_model(ref, hf_path)
    logits = ref(full.input_ids, full.position_ids, pixel_values=full.pixel_values,
                 image_grid_thw=full.image_grid_thw, image_mask=full.image_mask)
    logp = shifted_logprobs(logits, full.input_ids, ref.vocab_size)
    old_logp = (logp.detach() + 0.2 * torch.randn(logp.shape, generator=gen)) * full.response_mask
    token_adv = advantages[:, None] * full.response_mask
    from megatron_pgpo.algorithms import clipped_policy_loss

    ref_loss, _ = clipped_policy_loss(logp, old_logp, token_adv, full.response_mask)
    ref_loss.backward()
    ref_grads = {}
    for m in stage_mappings(ref, 0, 1):
        grads = to_hf(m.kind, [ref.state_dict(keep_vars=True)[m.mcore].grad], ref.dims, ref.vocab_size)
        ref_grads.update(zip(m.hf, grads))

    model = build_model(hf_path, pp=2)
    load_hf_into_model(model, hf_path, pp_rank=pp_rank, pp_size=2)
    cfg = load_config(None, ["parallel.pipeline_model_parallel_size=2", "parallel.use_distributed_optimizer=false",
                             "trainer.grad_clip=0"])
    policy = MegatronPolicy(model, cfg)
    micro = [collate(samples, idx, IMAGE_TOKEN_ID, 2) for idx in length_bucketed_micro_batches(samples, 3)]
    scored = policy.score(micro)
    logp_err = 0.0
    for out in scored:
        for row, i in enumerate(out.indices):
            width = full.response_mask[i].sum()
            logp_err = max(logp_err, float((out.logp[row][out.logp[row] != 0][:width] -
                                            logp[i][full.response_mask[i]]).abs().max()))
    # Without the text-only rows (GRPO/DAPO) the old log-probs are the same, and S is zero.
    image_only_err = 0.0
    for full_out, img_out in zip(scored, policy.score(micro, view=None)):
        image_only_err = max(image_only_err, float((full_out.logp - img_out.logp).abs().max()),
                             float(img_out.scores.abs().max()))
    extras = [{"old_logp": old_logp[mb.indices][:, : mb.input_ids.shape[1]],
               "advantages": token_adv[mb.indices][:, : mb.input_ids.shape[1]]} for mb in micro]
    from functools import partial

    from megatron_pgpo.trainer.policy import update_loss_func

    policy.model.zero_grad_buffer()
    policy.model.train()
    loss_func = partial(update_loss_func, vocab_size=model.vocab_size, loss_name="clipped",
                        loss_kwargs=dict(global_num_tokens=float(full.response_mask.sum())), scale=float(len(micro)))
    policy._run(micro, extras, "update", loss_func, False)
    grad_err, compared = 0.0, 0
    for m in stage_mappings(model, pp_rank, 2):
        grads = to_hf(m.kind, [model.state_dict(keep_vars=True)[m.mcore].main_grad], model.dims, model.vocab_size)
        for name, g in zip(m.hf, grads):
            grad_err = max(grad_err, float((g - ref_grads[name]).abs().max()))
            compared += 1
    return {"stage": pp_rank, "scored": len(scored), "logp_err": logp_err, "grad_err": grad_err,
            "compared": compared, "image_only_err": image_only_err}


def test_pipeline_parallel_score_and_update_equal_one_stage(workers, tiny_hf_checkpoint):
    results = workers.run(_pipeline_case, str(tiny_hf_checkpoint), tp=1, pp=2)
    first, last = sorted(results, key=lambda r: r["stage"])
    assert first["scored"] == 0 and last["scored"] == 3  # only the last stage reduces to per-token scalars
    assert last["logp_err"] < 1e-5
    assert last["image_only_err"] < 1e-6
    assert first["compared"] > 30 and last["compared"] >= 8  # vision + layer 0 on stage 0; layer 1 + head on 1
    for r in results:
        assert r["grad_err"] < 1e-5, r


def _resume_case(hf_path, ckpt_dir):
    """One update, save, then (a) a second update in this run, and (b) a fresh model + optimizer that loads the
    checkpoint and does the same second update: parameters must be bit-identical."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID
    from megatron_pgpo.trainer.batch import collate
    from megatron_pgpo.trainer.checkpoint import load_training_state, save_training_state
    from megatron_pgpo.trainer.policy import MegatronPolicy

    samples = _samples()
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, N_SAMPLES, dp))
    mb = collate(samples, mine, IMAGE_TOKEN_ID, 2)
    total = float(sum(len(s.response_ids) for s in samples))

    def extras(seed):
        gen = torch.Generator().manual_seed(seed)
        adv = torch.randn(N_SAMPLES, generator=gen)[mine]
        return [{"old_logp": torch.full(mb.input_ids.shape, -3.0) * mb.response_mask,
                 "advantages": adv[:, None] * mb.response_mask}]

    cfg = load_config(None, ["trainer.lr=1e-2"])

    def fresh():
        model = build_model(hf_path)
        load_hf_into_model(model, hf_path)
        return MegatronPolicy(model, cfg)

    policy = fresh()
    policy.update([mb], extras(1), total, float(N_SAMPLES))
    save_training_state(policy, ckpt_dir, {"step": 1})
    import random

    import numpy as np

    def draw():  # every RNG whose state the save must bring back
        return torch.rand(3).tolist() + [random.random(), float(np.random.rand())]

    expected_draw = draw()
    policy.update([mb], extras(2), total, float(N_SAMPLES))
    continued = {n: p.detach().clone() for n, p in policy.module.named_parameters()}

    resumed = fresh()
    state = load_training_state(resumed, ckpt_dir)
    resumed_draw = draw()
    resumed.update([mb], extras(2), total, float(N_SAMPLES))
    diff = max(float((p.detach() - continued[n]).abs().max()) for n, p in resumed.module.named_parameters())
    dist.barrier()
    return {"step": state["step"], "diff": diff, "rng_ok": expected_draw == resumed_draw}


def test_checkpoint_resume_is_bit_identical(workers, tiny_hf_checkpoint, tmp_path):
    results = workers.run(_resume_case, str(tiny_hf_checkpoint), str(tmp_path), tp=1)
    for r in results:
        assert r["step"] == 1 and r["rng_ok"]
        assert r["diff"] == 0.0, r


def _repeated_updates(hf_path, tp, sp, dtype="fp32"):
    """Five updates on one fixed batch (a small lr keeps the ratios inside the clip range, where the clipped
    surrogate is not flat): the loss must go down at every step."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID
    from megatron_pgpo.trainer.batch import collate, length_bucketed_micro_batches
    from megatron_pgpo.trainer.policy import MegatronPolicy

    model = build_model(hf_path, tp=tp, sequence_parallel=sp, dtype=dtype)
    load_hf_into_model(model, hf_path, ps.get_tensor_model_parallel_rank(), tp)
    cfg = load_config(None, [f"parallel.tensor_model_parallel_size={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
                             "trainer.lr=1e-4", f"model.dtype={dtype}"])
    policy = MegatronPolicy(model, cfg)
    samples = _samples()
    micro = [collate(samples, idx, IMAGE_TOKEN_ID, 2, pad_to_multiple_of=tp if sp else 1)
             for idx in length_bucketed_micro_batches(samples, 4)]
    old = {i: out.logp[row] for out in policy.score(micro) for row, i in enumerate(out.indices)}
    adv = torch.randn(N_SAMPLES, generator=torch.Generator().manual_seed(3))
    extras = [{"old_logp": torch.stack([old[i] for i in mb.indices]),
               "advantages": adv[mb.indices][:, None] * mb.response_mask} for mb in micro]
    total = float(sum(len(s.response_ids) for s in samples))
    stats = [policy.update(micro, extras, total, float(N_SAMPLES)) for _ in range(5)]
    losses = [s["actor/loss"] for s in stats]
    # First update: ratio 1 everywhere, so the token-mean loss is minus the token-weighted mean advantage.
    first = -sum(float(adv[i]) * len(s.response_ids) for i, s in enumerate(samples)) / total
    return losses, first, [s["actor/grad_norm"] for s in stats], [s["actor/skipped_updates"] for s in stats]


@pytest.mark.parametrize("sp, dtype", [(False, "fp32"), (True, "fp32"), (False, "fp16")])
def test_loss_decreases_over_repeated_updates_on_a_fixed_batch(workers, tiny_hf_checkpoint, sp, dtype):
    """fp16 too: Megatron's dynamic loss scale must reach the backward pass (``grad_scale_func``), else every fp16
    gradient arrives divided by the initial 2^32 scale and the weights do not move."""
    results = workers.run(_repeated_updates, str(tiny_hf_checkpoint), 2, sp, dtype, tp=2)
    losses, first, _, skipped = results[0]
    assert skipped == [0.0] * 5
    tol = 1e-6 if dtype == "fp32" else 1e-3
    assert results[1][0] == pytest.approx(losses, abs=tol)  # TP ranks agree
    assert losses[0] == pytest.approx(first, abs=1e-5 if dtype == "fp32" else 1e-2)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 1e-3, losses


def _fp16_and_fp32_gradients(hf_path):
    return [_repeated_updates(hf_path, 2, False, dtype)[2][0] for dtype in ("fp32", "fp16")]


def test_fp16_gradient_has_the_fp32_scale(workers, tiny_hf_checkpoint):
    """The first update's gradient norm in fp16 equals fp32's up to fp16 rounding: the loss scale multiplies the
    loss before backward and is divided out after. Measured without ``grad_scale_func``: fp16's norm was fp32's
    / 65536 (the initial scale), which Adam's normalisation hides from the loss curve."""
    fp32, fp16 = workers.run(_fp16_and_fp32_gradients, str(tiny_hf_checkpoint), tp=2)[0]
    assert fp16 == pytest.approx(fp32, rel=0.05), (fp16, fp32)


def _save_before_any_update(hf_path, ckpt_dir):
    """A checkpoint taken before the first optimizer step (dynamic sampling may drop every group for a while):
    the save works, and a run resumed from it takes the same first update as one that never stopped."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID
    from megatron_pgpo.trainer.batch import collate
    from megatron_pgpo.trainer.checkpoint import load_training_state, save_training_state
    from megatron_pgpo.trainer.policy import MegatronPolicy

    samples = _samples()
    mine = list(range(ps.get_data_parallel_rank(), N_SAMPLES, ps.get_data_parallel_world_size()))
    mb = collate(samples, mine, IMAGE_TOKEN_ID, 2)
    adv = torch.randn(N_SAMPLES, generator=torch.Generator().manual_seed(4))[mine]
    extras = [{"old_logp": torch.full(mb.input_ids.shape, -3.0) * mb.response_mask,
               "advantages": adv[:, None] * mb.response_mask}]
    total = float(sum(len(s.response_ids) for s in samples))
    cfg = load_config(None, ["trainer.lr=1e-2", f"model.hf_path={hf_path}"])

    def fresh():
        model = build_model(hf_path)
        load_hf_into_model(model, hf_path)
        return MegatronPolicy(model, cfg)

    before = fresh()
    initial = {n: p.detach().clone() for n, p in before.module.named_parameters()}
    save_training_state(before, ckpt_dir, {"step": 0})
    unchanged = max(float((p.detach() - initial[n]).abs().max()) for n, p in before.module.named_parameters())
    before.update([mb], extras, total, float(N_SAMPLES))
    resumed = fresh()
    load_training_state(resumed, ckpt_dir)
    resumed.update([mb], extras, total, float(N_SAMPLES))
    diff = max(float((p.detach() - dict(before.module.named_parameters())[n].detach()).abs().max())
               for n, p in resumed.module.named_parameters())
    return {"unchanged": unchanged, "diff": diff}


def test_checkpoint_before_the_first_update(workers, tiny_hf_checkpoint, tmp_path):
    for r in workers.run(_save_before_any_update, str(tiny_hf_checkpoint), str(tmp_path), tp=1):
        assert r["unchanged"] == 0.0  # saving moved no weight
        assert r["diff"] == 0.0, r
