"""The rollout engine interface: what the trainer needs from an inference engine, and nothing else.

    engine = VLLMEngine(VLLMEngineConfig(model_path=..., run_dir=...))      # or any RolloutEngine
    with engine:                                                            # start() ... shutdown()
        outputs = engine.generate([RolloutRequest(messages, image)], SamplingConfig(n=4, seed=0))
        engine.update_weights(named_hf_tensors)                             # after each optimizer step

Weights cross this interface as full (unsharded) tensors under their Hugging Face names, in an order where the
tensors of one fused inference layer come together (see ``weight_sync.fused_group_key``). How they get there
(bucketing, TP gather, PP stages) is ``weight_sync``'s business; how an engine loads them is the engine's.

Consistency contract (every implementation): an update that fails or is interrupted part-way leaves the
engine **unusable** (``usable`` False, ``generate`` raises ``EngineUnusable``) until a later complete update
succeeds, so a caller can never sample from a mix of old and new weights. ``weight_version`` counts complete
updates since start.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

if TYPE_CHECKING:
    import torch

#: A chat in the OpenAI/HF message format: ``[{"role": "user", "content": [{"type": "image"}, {"type": "text",
#: "text": "..."}]}]``.
Messages = List[Dict[str, Any]]


class EngineUnusable(RuntimeError):
    """The engine may hold a mix of weight versions (a failed or interrupted update) or is not started."""


class WeightUpdateError(RuntimeError):
    """A weight update failed; the engine is unusable until a later complete update."""


def expected_weight_names(model_path: str) -> Set[str]:
    """The HF tensor names a complete update must contain: the checkpoint's, minus a tied ``lm_head``."""
    import json
    from pathlib import Path

    from ..models.qwen2_5_vl.hf_io import HFCheckpointReader

    with HFCheckpointReader(model_path) as reader:
        names = set(reader.names())
    config = json.loads((Path(model_path) / "config.json").read_text())
    if config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)):
        names.discard("lm_head.weight")
    return names


@dataclass
class RolloutRequest:
    """One prompt.

    prompt: either the prompt text, already chat-templated (with one ``<|vision_start|><|image_pad|>
        <|vision_end|>`` per image), or ``Messages`` that the engine templates with the checkpoint's chat template.
    image: an optional ``PIL.Image`` for the prompt's image placeholder.
    """

    prompt: Union[str, Messages]
    image: Any = None


@dataclass
class SamplingConfig:
    """Sampling of ``n`` responses per prompt.

    temperature 0 is greedy. ``top_k`` <= 0 and ``top_p`` = 1 disable those filters. ``seed``: the same seed, prompts
    and weights give the same samples (None: the engine's own random stream). ``stop_token_ids``: extra ids that end
    a response (the model's EOS always does).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    seed: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = ()


@dataclass
class RolloutOutput:
    """One sampled response.

    request_index / sample_index: which request (position in the ``generate`` list) and which of its ``n`` samples.
    prompt_token_ids: the prompt as the model saw it (image placeholders expanded to one token per merged patch).
    response_token_ids / logprobs: the sampled tokens and the log-probability of each under the policy that sampled
        it (raw model log-probs, before temperature / top-k / top-p, unless the engine is configured otherwise).
    finish_reason: ``"stop"`` (EOS or a stop token) or ``"length"`` (``max_tokens`` reached).
    """

    request_index: int
    sample_index: int
    prompt_token_ids: List[int]
    response_token_ids: List[int]
    text: str
    logprobs: List[float]
    finish_reason: str
    weight_version: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


class RolloutEngine(abc.ABC):
    """Abstract rollout engine (see the module docstring for the consistency contract).

    ``sleep`` / ``wake`` release and restore accelerator memory around training steps where the engine supports
    it; elsewhere (CPU) they are documented no-ops, so trainer code calls them unconditionally.
    """

    @abc.abstractmethod
    def start(self) -> None:
        """Create the engine (idempotent)."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> List[RolloutOutput]:
        """``len(requests) * sampling.n`` outputs, request-major. Raises ``EngineUnusable`` if not ``usable``."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> int:
        """Load a complete set of HF-named full tensors; returns the new ``weight_version``.

        Raises (and leaves the engine unusable) if the update fails or the iterator raises part-way.
        """

    @property
    @abc.abstractmethod
    def usable(self) -> bool:
        """Started and holding one complete set of weights."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Complete weight updates applied to this engine, restarts included (0: the checkpoint it started from)."""

    def sleep(self) -> None:
        """Release accelerator memory (weights and KV cache) until ``wake``; no-op where unsupported."""

    def wake(self, tags: Optional[Sequence[str]] = None) -> None:
        """Undo ``sleep`` for ``tags`` (``"weights"``, ``"kv_cache"``; None: everything); no-op where unsupported.
        The trainer wakes the weights before a weight update and the KV cache after it."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and free its resources (idempotent)."""

    def __enter__(self) -> "RolloutEngine":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class VersionedEngine(RolloutEngine):
    """The bookkeeping of the consistency contract that every engine here shares: a weight version, a usable flag
    that an update clears from its first tensor until it completes, and ``started`` from the engine's handle."""

    _version: int = 0
    _usable: bool = False
    _asleep: frozenset = frozenset()  # what ``sleep`` released and ``wake`` has not restored yet

    @abc.abstractmethod
    def _handle(self) -> Any:
        """The underlying engine object (None when not started)."""

    @property
    def started(self) -> bool:
        return self._handle() is not None

    @property
    def usable(self) -> bool:
        return self.started and self._usable and not self._asleep

    @property
    def weight_version(self) -> int:
        return self._version

    def restart(self) -> None:
        """Fresh engine from its checkpoint: the way back from a failed update or a dead engine process.

        ``weight_version`` keeps counting across restarts (versions are never reused), and an engine that had
        taken updates comes back unusable: it holds the checkpoint's weights again, not those of its version, so
        only the next complete ``update_weights`` (the trainer's sync) makes it sample again. An engine that never
        took an update is usable at once (version 0 is the checkpoint)."""
        self.shutdown()
        self.start()

    @contextlib.contextmanager
    def _update_transaction(self) -> Iterator[int]:
        """``with self._update_transaction() as version:`` load a complete set of weights. Unusable from the first
        tensor; usable at ``version`` only when the block completes; any exception leaves it unusable and comes out
        as ``WeightUpdateError``."""
        if not self.started:
            raise EngineUnusable("start() the engine first")
        version = self._version + 1
        self._usable = False
        try:
            yield version
        except WeightUpdateError:
            raise
        except Exception as exc:
            raise WeightUpdateError(f"weight update {version} failed; engine unusable until a complete update: "
                                    f"{exc}") from exc
        self._version, self._usable = version, True

    def _require_usable(self) -> None:
        if not self.usable:
            raise EngineUnusable("the engine is not started or a weight update failed; it may hold mixed weights "
                                 "(run a complete update_weights first)")
