"""vLLM's layerwise reload warns "<Module>: Failed to load weights" for modules holding only derived buffers on
every weight update; the worker extension drops exactly those, and keeps the warning for any other module."""
import logging

from megatron_pgpo.rollout.vllm_worker import quiet_buffer_only_reload_warnings

LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def test_only_buffer_only_modules_are_silenced(caplog):
    quiet_buffer_only_reload_warnings()
    quiet_buffer_only_reload_warnings()  # idempotent
    logger = logging.getLogger(LOGGER)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for module in ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm", "QKVParallelLinear"):
            logger.warning("%s: Failed to load weights", module)
        logger.warning("something else: %s", "RotaryEmbedding")
    assert [r.getMessage() for r in caplog.records] == ["QKVParallelLinear: Failed to load weights",
                                                        "something else: RotaryEmbedding"]
