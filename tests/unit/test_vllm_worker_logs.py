"""vLLM's reload warns on every bucketed weight update about things that are expected there: "<Module>: Failed to
load weights" for modules holding only derived buffers, and "Following weights were not loaded" after each bucket
that is not the whole model. The worker extension drops exactly those, and keeps every other warning."""
import logging

from megatron_pgpo.rollout.vllm_worker import quiet_bucketed_reload_warnings

LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"
INPLACE = "vllm.model_executor.model_loader.reload.inplace"


def test_only_buffer_only_modules_and_partial_buckets_are_silenced(caplog):
    quiet_bucketed_reload_warnings()
    quiet_bucketed_reload_warnings()  # idempotent
    assert len(logging.getLogger(LAYERWISE).filters) == 1 and len(logging.getLogger(INPLACE).filters) == 1
    layerwise, inplace = logging.getLogger(LAYERWISE), logging.getLogger(INPLACE)
    with caplog.at_level(logging.WARNING):
        for module in ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm", "QKVParallelLinear"):
            layerwise.warning("%s: Failed to load weights", module)
        layerwise.warning("something else: %s", "RotaryEmbedding")
        inplace.warning("Following weights were not loaded from checkpoint: %s", {"lm_head.weight"})
        inplace.warning("Reloading with `is_checkpoint_format=True` requires ...")
    assert [r.getMessage() for r in caplog.records] == ["QKVParallelLinear: Failed to load weights",
                                                        "something else: RotaryEmbedding",
                                                        "Reloading with `is_checkpoint_format=True` requires ..."]
