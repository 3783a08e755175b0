"""The training step's batching at its edges, through ``Trainer._train_on`` on a real policy: a mini-batch with
fewer responses than data-parallel ranks (a rank with an empty share must still take part in every collective),
and an empty response (kept for its group's statistics, never trained on)."""
import pytest

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)


def _samples(empty=None):
    """Three single-response groups (a mini-batch of one group has one response: at DP=2 one rank gets none)."""
    import torch

    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID
    from megatron_pgpo.trainer.batch import Sample

    gen = torch.Generator().manual_seed(5)
    out = []
    for g in range(3):
        response = torch.randint(0, 990, (3 + 2 * g,), generator=gen).tolist()
        out.append(Sample(prompt_ids=[5, 6 + g, VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * 4 + [VISION_END_TOKEN_ID],
                          response_ids=response, reward=float(g % 2), group=g,
                          pixel_values=torch.randn(16, 1176, generator=gen), image_grid_thw=torch.tensor([[1, 4, 4]]),
                          extra={"accuracy": 0.0, "format": 0.0}))
    if empty is not None:  # a second response in group 0, empty: (placeholder token, trainable) as _sample makes it
        import dataclasses

        token, trainable = empty
        out.append(dataclasses.replace(out[0], response_ids=[token], reward=1.0, trainable=trainable,
                                       rollout_logprobs=None))
    return out


def _train_step(hf_path, overrides, empty=None):
    """One ``_train_on`` of ``_samples`` with a bare Trainer around a real policy; returns (parameters, stats)."""
    from megatron.core import parallel_state as ps
    import torch.distributed as dist

    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID
    from megatron_pgpo.trainer.loop import Trainer
    from megatron_pgpo.trainer.policy import MegatronPolicy

    cfg = load_config(None, ["trainer.lr=1e-2", "logging.samples_every=0", *overrides])
    model = build_model(hf_path)
    load_hf_into_model(model, hf_path)
    trainer = Trainer.__new__(Trainer)  # the attributes _train_on reads; no engine, no data
    trainer.cfg, trainer.policy, trainer.step = cfg, MegatronPolicy(model, cfg), 0
    trainer.rank, trainer.world = dist.get_rank(), dist.get_world_size()
    trainer.tp, trainer.pp = 1, 1
    trainer.dp, trainer.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    trainer.is_last_stage, trainer.image_token_id, trainer.merge = True, IMAGE_TOKEN_ID, 2
    initial = {n: p.detach().clone() for n, p in trainer.policy.module.named_parameters()}
    stats = trainer._train_on(_samples(empty))
    moved = max(float((p.detach() - initial[n]).abs().max()) for n, p in trainer.policy.module.named_parameters())
    return {n: p.detach().clone() for n, p in trainer.policy.module.named_parameters()}, stats, moved


#: one group per mini-batch; the entropy bonus gives a gradient even though single-response groups have zero
#: advantages
ONE_GROUP = ["trainer.global_batch_size=1", "algorithm.entropy_coef=0.01"]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny import save_tiny_checkpoint

    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_batches"), "tiny", seed=0))


def _diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_a_rank_with_no_responses_keeps_step_with_the_other(workers, single_worker, hf_checkpoint):
    """Before: the empty rank failed in ``max()`` over no micro-batches while the other waited in a collective."""
    (p0, stats, moved), (p1, _, _) = workers.run(_train_step, hf_checkpoint, ONE_GROUP, tp=1)  # DP=2
    one, one_stats, _ = single_worker.run(_train_step, hf_checkpoint, ONE_GROUP)[0]
    assert moved > 1e-3  # three real updates
    assert _diff(p0, p1) == 0.0  # the replicas agree
    # ... and equal one rank training on everything: the gradient (Adam would hide a wrong scale) and the weights
    # (measured 3.4e-5 after three lr 1e-2 steps: Adam's 1/sqrt(v) magnifies rounding where gradients are tiny)
    for key in ("actor/grad_norm", "actor/loss", "actor/entropy"):
        assert stats[key] == pytest.approx(one_stats[key], rel=1e-4), key  # a wrong scale would be 2x
    assert _diff(p0, one) < 1e-2 * moved
    assert stats["actor/skipped_updates"] == 0.0


def test_an_empty_response_counts_in_its_group_but_is_not_trained_on(single_worker, hf_checkpoint):
    """Group 0 gets a second, empty response (reward 1): its placeholder token must not matter (another token gives
    the same update) while its reward does (group 0's other response now has a non-zero advantage, so the update
    differs from the run without it); trained on, the placeholder would change the update."""
    def run(empty):
        return single_worker.run(_train_step, hf_checkpoint, ["algorithm.entropy_coef=0.01"], empty)[0]

    masked, stats, _ = run((0, False))
    other_token, _, _ = run((77, False))
    trained, _, _ = run((0, True))
    without, _, _ = run(None)
    assert _diff(masked, other_token) == 0.0
    assert _diff(masked, trained) > 1e-5 and _diff(masked, without) > 1e-5
    assert stats["check/token_adv_sum_err"] < 1e-4  # the masked row is not a response of length 1 there


def _refill_groups(hf_path, run_dir):
    """One rollout batch of 3 prompts from a 2-example dataset (the stream wraps: prompt 0 twice), sampled by the
    transformers engine."""
    from megatron_pgpo.config import load_config
    from megatron_pgpo.data.synthetic import SyntheticTask
    from megatron_pgpo.trainer.prompts import PromptStream
    from megatron_pgpo.trainer.rollouts import Rollouts
    from transformers import AutoConfig

    cfg = load_config(None, [f"model.hf_path={hf_path}", "rollout.engine=transformers", "rollout.n=2",
                             "rollout.max_new_tokens=3", "data.rollout_batch_size=3", "trainer.global_batch_size=1",
                             "trainer.micro_batch_size=2",
                             "reward.num_workers=1",
                             "algorithm.dapo.dynamic_sampling=false"])
    image_token_id = AutoConfig.from_pretrained(hf_path).image_token_id
    rollouts = Rollouts(cfg, run_dir, image_token_id, dp=1, dp_rank=0)
    try:
        samples, _ = rollouts.batch(SyntheticTask("colour", 2, 0, "train"), PromptStream(2, 0, shuffle=False), 0)
    finally:
        rollouts.close()
    import torch

    same = [[torch.equal(a.pixel_values, b.pixel_values) for b in samples] for a in samples]
    return [s.group for s in samples], same


def test_a_prompt_drawn_twice_in_a_step_makes_two_groups(single_worker, tmp_path):
    """Before: a group's id was its dataset index, so the two draws of prompt 0 merged into one group of 4."""
    from megatron_pgpo.demo.tiny_model import build_demo_checkpoint

    hf = build_demo_checkpoint(tmp_path / "hf", task="colour")
    groups, same_image = single_worker.run(_refill_groups, str(hf), str(tmp_path / "run"), timeout_s=300)[0]
    assert groups == [0, 0, 1, 1, 2, 2]
    assert same_image[0][4] and not same_image[0][2]  # draws 0 and 2 are the same prompt, draw 1 another
