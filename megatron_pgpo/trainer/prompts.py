"""Prompt side of a step: the deterministic prompt stream (resumable), the chat messages, and the image inputs
the training passes need for each prompt.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Sequence, Tuple

import torch

#: Appended to every question by the default template: the format the 0.1 format reward checks.
INSTRUCTION = "Think inside <think> </think> , then give the final answer in \\boxed{} ."

#: ``data.prompt_template``'s default: the question, then the format instruction.
DEFAULT_TEMPLATE = "{question} " + INSTRUCTION


def render_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """``template`` with ``{question}`` replaced (plain replacement: braces elsewhere, as in ``\\boxed{}``, stay)."""
    if "{question}" not in template:
        raise ValueError(f"a prompt template needs a {{question}} placeholder, got {template!r}")
    return template.replace("{question}", question)


def messages_for(question: str, template: str = DEFAULT_TEMPLATE) -> List[Dict[str, Any]]:
    """One user turn with the image first, then the question in ``template`` (with the answer-format
    instruction)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": render_prompt(question, template)}]}]


@dataclass
class PromptStream:
    """An endless, reshuffled-per-epoch stream of dataset indices; ``position`` makes it resumable exactly.

    Epoch ``e`` visits ``range(size)`` in the order of ``random.Random(seed * 100003 + e).shuffle``.
    """

    size: int
    seed: int
    shuffle: bool = True
    position: int = 0

    def _order(self, epoch: int) -> List[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> List[int]:
        out = []
        while len(out) < count:
            epoch, offset = divmod(self.position, self.size)
            order = self._order(epoch)
            chunk = order[offset: offset + count - len(out)]
            out.extend(chunk)
            self.position += len(chunk)
        return out

    @property
    def epoch(self) -> int:
        return self.position // self.size


class ImageEncoder:
    """The checkpoint's image processor: PIL image -> (pixel_values [patches, C*T*P*P], grid_thw [1, 3]).

    The same preprocessing vLLM applies, so the number of image tokens matches the engine's prompt ids (checked
    by the trainer for every prompt).
    """

    def __init__(self, model_path: str):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_path)
        self.merge = getattr(self.processor, "merge_size", 2)
        self._cache: Dict[Hashable, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, key: Hashable, image) -> Tuple[torch.Tensor, torch.Tensor]:
        if key not in self._cache:
            out = self.processor(images=[image], return_tensors="pt")
            self._cache[key] = (out["pixel_values"].float(), out["image_grid_thw"].long())
            if len(self._cache) > 4096:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    def num_tokens(self, grid: torch.Tensor) -> int:
        return int(grid.prod()) // (self.merge * self.merge)


class PromptLength:
    """Tokens of an example's prompt as the engine will see it: the chat template's text tokens with the image
    placeholder expanded to the processor's image-token count (computed from the image size, no pixel work)."""

    def __init__(self, model_path: str, template: str = DEFAULT_TEMPLATE):
        from ..compat.torchvision_ops import ensure_torchvision_importable

        ensure_torchvision_importable()  # AutoImageProcessor may reach for torchvision (docs/stack.md)
        from transformers import AutoImageProcessor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.processor = AutoImageProcessor.from_pretrained(model_path)
        self.merge = getattr(self.processor, "merge_size", 2)
        self.template = template

    def __call__(self, example) -> int:
        text = self.tokenizer.apply_chat_template(messages_for(example.question, self.template), tokenize=False,
                                                  add_generation_prompt=True)
        n_text = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        width, height = example.image.size
        patches = self.processor.get_number_of_image_patches(height, width, {})
        return n_text - 1 + patches // (self.merge * self.merge)  # the placeholder becomes the image tokens


def split_round_robin(items: Sequence, parts: int, index: int) -> List:
    """Items ``index, index + parts, ...``: this DP rank's share."""
    return list(items[index::parts])
