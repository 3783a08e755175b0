"""``trainer.offload_during_rollout``: the training state leaves device memory and comes back bit-exact.

Two gloo ranks at DP=2 with the distributed optimizer (fp32, and bf16 with its fp32 master shards): after one
update (so Adam has state), ``offload`` releases the parameter and gradient buffers' storage and moves the master
shards and Adam's moments to host memory; ``reload`` restores every tensor exactly; and an update after the round
trip gives the same parameters as a twin policy that never offloaded. (A whole run with offloading reproducing one
without is checked by tests/integration/test_train_loop.py's resume test.)"""
import pytest

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)


def _policy(ckpt, dtype):
    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.trainer.policy import MegatronPolicy

    cfg = load_config(None, [f"model.hf_path={ckpt}", f"model.dtype={dtype}", "trainer.lr=1e-3",
                             "parallel.use_distributed_optimizer=true"])
    model = build_model(ckpt, dtype=dtype)
    load_hf_into_model(model, ckpt)
    return MegatronPolicy(model, cfg)


def _update(policy, seed):
    import torch
    from megatron.core import parallel_state as ps

    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID
    from megatron_pgpo.trainer.batch import Sample, collate

    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(16, 1176, generator=gen)
    prompt = [5, 6, VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * 4 + [VISION_END_TOKEN_ID, 7]
    samples = [Sample(prompt_ids=prompt, response_ids=torch.randint(10, 900, (4 + i,), generator=gen).tolist(),
                      pixel_values=image, image_grid_thw=torch.tensor([[1, 4, 4]]), group=0) for i in range(4)]
    advantages = torch.randn(4, generator=gen)
    mine = list(range(ps.get_data_parallel_rank(), 4, ps.get_data_parallel_world_size()))
    mb = collate(samples, mine, IMAGE_TOKEN_ID, 2)
    old = torch.zeros(mb.input_ids.shape)
    for so in policy.score([mb]):
        old = so.logp
    extras = [{"old_logp": old + 0.1 * mb.response_mask, "advantages": advantages[mine][:, None] * mb.response_mask}]
    policy.update([mb], extras, float(sum(len(s.response_ids) for s in samples)), 4.0)


def _state(policy):
    from megatron_pgpo.trainer.offload import _optimizer_tensors

    params = {n: p.detach().clone() for n, p in policy.model.module.named_parameters()}
    return params, [t.detach().clone() for t in _optimizer_tensors(policy.optimizer)]


def _round_trip_case(ckpt, dtype):
    import torch

    from megatron_pgpo.trainer.offload import _ddp_buffers, _optimizer_tensors, offloaded

    policy, twin = _policy(ckpt, dtype), _policy(ckpt, dtype)
    _update(policy, 1)
    _update(twin, 1)
    params, optimizer = _state(policy)
    moved_to_host = []
    for _ in range(2):  # the second round trip reuses the first one's host buffers
        with offloaded(policy.model, policy.optimizer):
            released = all(b.param_data.untyped_storage().size() == 0 and b.grad_data.untyped_storage().size() == 0
                           for b in _ddp_buffers(policy.model))
            moved_to_host = [t.device.type for t in _optimizer_tensors(policy.optimizer)]
    params_after, optimizer_after = _state(policy)
    exact = (all(torch.equal(params[n], params_after[n]) for n in params)
             and all(torch.equal(a, b) for a, b in zip(optimizer, optimizer_after)))
    _update(policy, 2)
    _update(twin, 2)
    final, twin_final = _state(policy)[0], _state(twin)[0]
    return {"released": released, "exact": exact, "n_optimizer_tensors": len(optimizer),
            "host": set(moved_to_host), "same_as_twin": all(torch.equal(final[n], twin_final[n]) for n in final),
            "moved": any(not torch.equal(params[n], final[n]) for n in final)}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_offload_round_trip_is_bit_exact(workers, dtype, tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny import save_tiny_checkpoint

    ckpt = str(save_tiny_checkpoint(tmp_path_factory.mktemp("offload") / "ckpt", "tiny", seed=0))
    for report in workers.run(_round_trip_case, ckpt, dtype, tp=1, pp=1, timeout_s=240):
        assert report["released"], report  # the buffers' device storage was given up
        assert report["n_optimizer_tensors"] > 0 and report["host"] <= {"cpu"}
        assert report["exact"], report
        assert report["moved"] and report["same_as_twin"], report
