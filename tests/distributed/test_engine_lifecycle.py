"""The loop's calls into its rollout engine, in order, with a recording engine (the transformers engine with every
lifecycle call logged): sample, then sleep so training has the GPU; wake the weights, update them, wake the KV
cache; evaluate; sample again. On the CPU sleep and wake are no-ops for the real engines; on a GPU vLLM's sleep
mode frees its memory between the rollouts and the sync (``rollout.sleep_mode``), and the order is what matters.

Two gloo ranks at TP=1 (DP=2): each is its replica's engine owner, so both record."""
import pytest

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)


def _lifecycle_case(ckpt, run_dir):
    from megatron_pgpo.config import load_config
    from megatron_pgpo.data.synthetic import SyntheticTask
    from megatron_pgpo.evaluation.benchmarks import problems_from_examples
    from megatron_pgpo.rollout.check_sync import load_megatron
    from megatron_pgpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig
    from megatron_pgpo.trainer import rollouts as rollouts_module
    from megatron_pgpo.trainer.prompts import PromptStream

    calls = []

    class Recording(TransformersEngine):
        def generate(self, requests, sampling):
            calls.append("generate")
            return super().generate(requests, sampling)

        def update_weights(self, named_tensors):
            calls.append("update_weights")
            return super().update_weights(named_tensors)

        def sleep(self):
            calls.append("sleep")
            self._asleep = frozenset(("weights", "kv_cache"))  # what a sleeping vLLM engine reports

        def wake(self, tags=None):
            calls.append(f"wake:{','.join(tags or ['all'])}")
            self._asleep = self._asleep - frozenset(tags or self._asleep)

    class RecordingRollouts(rollouts_module.Rollouts):
        def _make_engine(self):
            engine = Recording(TransformersEngineConfig(model_path=self.cfg.model.hf_path, max_model_len=512))
            engine.start()
            return engine

    cfg = load_config(None, [f"model.hf_path={ckpt}", "rollout.engine=transformers", "rollout.n=2",
                             "rollout.max_new_tokens=4", "data.rollout_batch_size=2", "trainer.global_batch_size=2",
                             "trainer.micro_batch_size=2", "reward.num_workers=0",
                             "algorithm.dapo.dynamic_sampling=false", "eval.k=2", "eval.temperature=1.0"])
    from megatron.core import parallel_state as ps

    model = load_megatron(ckpt)
    dataset = SyntheticTask("colour", 16, 0, "train")
    rollouts = RecordingRollouts(cfg, run_dir, model.image_token_id, ps.get_data_parallel_world_size(),
                                 ps.get_data_parallel_rank())
    stream = PromptStream(len(dataset), 0)
    samples, _ = rollouts.batch(dataset, stream, 0)
    asleep = rollouts.engine.usable is False
    rollouts.sync(model, "local")
    evaluated = rollouts.evaluate({"val": problems_from_examples([dataset[i] for i in range(3)])})
    rollouts.batch(dataset, stream, 1)
    rollouts.close()
    return {"calls": calls, "samples": len(samples), "unusable_while_asleep": asleep, "evaluated": evaluated}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from megatron_pgpo.demo.tiny_model import build_demo_checkpoint

    return str(build_demo_checkpoint(tmp_path_factory.mktemp("lifecycle") / "hf", task="colour"))


def test_engine_sleeps_after_rollouts_and_wakes_weights_then_kv_cache_around_the_sync(workers, checkpoint, tmp_path):
    per_rank = workers.run(_lifecycle_case, checkpoint, str(tmp_path / "run"), tp=1, pp=1, timeout_s=240)
    for report in per_rank:  # both ranks own an engine at DP=2
        assert report["samples"] == 4  # 2 prompts x 2 samples, gathered from both replicas
        assert report["unusable_while_asleep"]
        # eval.k=2 samples of 3 problems, shared by the two replicas, judged on rank 0, the same stats on both
        assert sorted(report["evaluated"]) == ["eval/accuracy", "eval/val/avg@2", "eval/val/pass@2"]
        assert report["evaluated"] == per_rank[0]["evaluated"]
        assert 0 <= report["evaluated"]["eval/val/avg@2"] <= report["evaluated"]["eval/val/pass@2"] <= 1
        assert report["calls"] == ["generate", "sleep", "wake:weights", "update_weights", "wake:kv_cache",
                                   "generate", "generate", "sleep"]
