"""``RolloutEngine`` on transformers ``generate`` (``rollout.engine=transformers``): for machines without vLLM
(a GPU box with only torch and transformers) and as an independent reference for the vLLM engine.

It runs in the engine owner's own process, on its device, with the checkpoint's processor, so it needs nothing
but transformers. What it shares with ``VLLMEngine`` (a test compares the two on a tiny checkpoint):

* prompts: the chat template of the checkpoint, image placeholders expanded by the same processor, so the
  ``prompt_token_ids`` it reports are the ids vLLM reports and the trainer checks;
* stopping: the tokenizer's EOS and the generation config's EOS ids (vLLM adds both as stop tokens), the stop
  token included in the response, as vLLM does; ``finish_reason`` ``stop`` or ``length``;
* log-probs: of the raw model logits, before temperature / top-k / top-p (vLLM's ``raw_logprobs``), in fp32,
  recorded step by step (``_RawLogprobs``: one ``[rows, V]`` row of log-probs held at a time, never the whole
  ``[rows, steps, V]`` logits that ``output_logits`` would keep: 40 GB for 64 x 2048 tokens of a 152k vocabulary);
* sampling: only what ``SamplingConfig`` says (a fresh ``GenerationConfig``: the checkpoint's generation defaults,
  e.g. Qwen2.5-VL's repetition penalty, are ignored, as vLLM does with ``generation_config="vllm"``);
* seeds: ``seed`` makes a call reproducible (a forked RNG is seeded per generate
  batch, so the trainer's RNG is untouched), though the random streams differ from vLLM's;
* weights: ``update_weights`` takes HF-named full tensors as one transaction (unusable from the first tensor until
  every expected name has arrived), copying into the module's parameters (``module_name`` maps the checkpoint
  names to transformers' in-memory names); tied embeddings update the head with the embedding.

Batches are left-padded (``padding_side="left"``) and generated ``batch_size`` sequences at a time; with
``sampling.n`` > 1 each prompt is repeated ``n`` times. Speed is transformers' (no paged KV cache, no continuous
batching): fine for checks and small runs, not for a 72B rollout.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from .engine import (RolloutOutput, RolloutRequest, SamplingConfig, VersionedEngine,
                     WeightUpdateError, expected_weight_names)

log = logging.getLogger(__name__)

#: Checkpoint (hub) name prefixes -> transformers 5 in-memory prefixes of ``Qwen2_5_VLForConditionalGeneration``.
_PREFIXES = (("visual.", "model.visual."), ("model.", "model.language_model."), ("lm_head.", "lm_head."))


def module_name(hf_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.language_model.layers.0.mlp.up_proj.weight``;
    ``visual.merger.mlp.0.bias`` -> ``model.visual.merger.mlp.0.bias``; ``lm_head.weight`` unchanged."""
    for saved, in_memory in _PREFIXES:
        if hf_name.startswith(saved):
            return in_memory + hf_name[len(saved):]
    raise KeyError(f"{hf_name!r} is not a Qwen2.5-VL checkpoint tensor name")


class _RawLogprobs:
    """A logits processor that records the log-prob of each generated token under the raw logits (divided by
    ``temperature`` when given: vLLM's ``processed_logprobs`` without top-k / top-p).

    transformers runs custom processors before its sampling warpers (temperature, top-k, top-p), so the scores it
    sees at step ``t`` are the model's raw logits. The token chosen at step ``t`` is only known at step ``t + 1``
    (the last column of ``input_ids``), so one step's log-softmax is kept until then; ``finish`` reads the last
    step's from the final sequences."""

    def __init__(self, temperature: float = 1.0):
        self.previous = None
        self.picked: List[torch.Tensor] = []
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.picked.append(self.previous.gather(1, input_ids[:, -1:])[:, 0])
        logits = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
        self.previous = torch.log_softmax(logits, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor, steps: int) -> torch.Tensor:
        """``[rows, steps]`` log-probs of the ``steps`` generated tokens at the end of ``sequences``."""
        if self.previous is not None and len(self.picked) < steps:
            self.picked.append(self.previous.gather(1, sequences[:, -1:])[:, 0])
        self.previous = None
        if not self.picked:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.picked, dim=1).cpu()


@dataclass
class TransformersEngineConfig:
    """How to build the transformers engine.

    model_path: HF checkpoint dir (weights, tokenizer, chat template, preprocessor config): the starting weights.
    device: where the model runs (the owner's training device).
    dtype: ``float32`` (CPU, parity checks) or ``bfloat16`` (GPU).
    attn_implementation: transformers' attention (``sdpa``; ``eager`` for bit-level comparisons).
    max_model_len: prompt + response tokens; a longer prompt is an error (the trainer skips those beforehand).
    batch_size: sequences per ``generate`` call.
    logprobs_mode: ``raw_logprobs`` (the model's log-softmax) or ``processed_logprobs`` (of the logits divided by
        the sampling temperature, what the trainer scores at ``rollout.temperature``), as vLLM's setting.
    """

    model_path: str
    device: str = "cpu"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    max_model_len: int = 2048
    batch_size: int = 64
    logprobs_mode: str = "raw_logprobs"


class TransformersEngine(VersionedEngine):
    """Rollouts with transformers ``generate``; see the module docstring."""

    def __init__(self, config: TransformersEngineConfig):
        self.config = config
        self.model = None
        self.processor = None
        self._params: Dict[str, torch.nn.Parameter] = {}
        self._expected: Set[str] = set()
        self._eos: List[int] = []
        self._version = 0
        self._usable = False

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self.model is not None:
            return
        from ..compat.torchvision_ops import ensure_torchvision_importable

        ensure_torchvision_importable()
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        cfg = self.config
        self.processor = AutoProcessor.from_pretrained(cfg.model_path)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            cfg.model_path, dtype=getattr(torch, cfg.dtype), attn_implementation=cfg.attn_implementation)
        self.model = model.to(cfg.device).eval()
        self._params = dict(self.model.named_parameters())
        self._expected = expected_weight_names(cfg.model_path)
        unknown = sorted(n for n in self._expected if module_name(n) not in self._params)
        if unknown:
            raise RuntimeError(f"{len(unknown)} checkpoint tensors have no parameter in transformers' model, e.g. "
                               f"{unknown[:3]}: the name mapping (module_name) no longer fits this transformers")
        eos = [self.processor.tokenizer.eos_token_id]
        gen_eos = self.model.generation_config.eos_token_id
        eos += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        self._eos = sorted({int(e) for e in eos if e is not None})
        self._usable = self._version == 0  # see VersionedEngine.restart

    def shutdown(self) -> None:
        self.model, self.processor, self._params = None, None, {}
        self._usable = False

    def _handle(self):
        return self.model

    # ------------------------------------------------------------------------------------------- generation
    def _pad_id(self) -> int:
        pad = self.processor.tokenizer.pad_token_id
        return self._eos[0] if pad is None else int(pad)

    def prompt_text(self, request: RolloutRequest) -> str:
        if isinstance(request.prompt, str):
            return request.prompt
        return self.processor.apply_chat_template(request.prompt, tokenize=False, add_generation_prompt=True)

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> List[RolloutOutput]:
        self._require_usable()
        rows = [(i, j) for i in range(len(requests)) for j in range(sampling.n)]
        texts = [self.prompt_text(r) for r in requests]
        outputs: List[RolloutOutput] = []
        for chunk, start in enumerate(range(0, len(rows), self.config.batch_size)):
            part = rows[start: start + self.config.batch_size]
            seed = None if sampling.seed is None else sampling.seed + chunk
            outputs += self._generate_rows(part, requests, texts, sampling, seed)
        return outputs

    @torch.no_grad()
    def _generate_rows(self, rows: List[Tuple[int, int]], requests: Sequence[RolloutRequest], texts: List[str],
                       sampling: SamplingConfig, seed: Optional[int]) -> List[RolloutOutput]:
        images = [requests[i].image for i, _ in rows if requests[i].image is not None]
        inputs = self.processor(text=[texts[i] for i, _ in rows], images=images or None, return_tensors="pt",
                                padding=True, padding_side="left")
        attention = inputs["attention_mask"].bool()
        prompts = [ids[keep].tolist() for ids, keep in zip(inputs["input_ids"], attention)]  # without the padding
        width = inputs["input_ids"].shape[1]
        longest = int(attention.sum(dim=1).max())
        if longest >= self.config.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens does not fit max_model_len={self.config.max_model_len}")
        from transformers import GenerationConfig, LogitsProcessorList

        greedy = sampling.temperature == 0
        stop = set(self._eos) | set(sampling.stop_token_ids)
        config = GenerationConfig(
            max_new_tokens=min(sampling.max_tokens, self.config.max_model_len - longest), do_sample=not greedy,
            temperature=1.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy or sampling.top_k <= 0 else sampling.top_k, eos_token_id=sorted(stop),
            pad_token_id=self._pad_id(), return_dict_in_generate=True)
        scaled = self.config.logprobs_mode == "processed_logprobs" and not greedy
        recorder = _RawLogprobs(sampling.temperature if scaled else 1.0)
        device = torch.device(self.config.device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**inputs.to(device), generation_config=config,
                                      logits_processor=LogitsProcessorList([recorder]))
        new_tokens = out.sequences[:, width:].cpu()
        token_logprobs = recorder.finish(out.sequences, new_tokens.shape[1])  # [rows, steps]
        results = []
        for k, (i, j) in enumerate(rows):
            tokens, finish = [], "length"
            for t in new_tokens[k].tolist():
                tokens.append(t)
                if t in stop:
                    finish = "stop"
                    break
            logprobs = token_logprobs[k, : len(tokens)].tolist()
            results.append(RolloutOutput(
                request_index=i, sample_index=j, prompt_token_ids=prompts[k], response_token_ids=tokens,
                text=self.processor.tokenizer.decode(tokens, skip_special_tokens=True), logprobs=logprobs,
                finish_reason=finish, weight_version=self._version))
        return results

    # ------------------------------------------------------------------------------------------ weight update
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> int:
        """Copy a complete set of HF-named full tensors into the model; returns the new weight version.

        Raises ``EngineUnusable`` when not started, ``WeightUpdateError`` (engine left unusable) on any failure.
        """
        received: Set[str] = set()
        with self._update_transaction() as version, torch.no_grad():  # mixed weights until the last tensor
            for name, tensor in named_tensors:
                target = self._params.get(module_name(name)) if name in self._expected else None
                if target is None:
                    raise WeightUpdateError(f"tensors the model does not have: {name!r}")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise WeightUpdateError(f"{name}: shape {tuple(tensor.shape)}, the model has "
                                            f"{tuple(target.shape)}")
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                received.add(name)
            missing = self._expected - received
            if missing:
                raise WeightUpdateError(f"update {version} is incomplete: {len(missing)} tensors never arrived, e.g. "
                                        f"{sorted(missing)[:3]}")
        return self._version
