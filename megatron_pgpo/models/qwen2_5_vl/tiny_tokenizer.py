"""A word-level tokenizer, Qwen2.5-VL chat template and image processor config for the tiny checkpoints.

The tiny checkpoints (``tiny.py``) have no tokenizer; vLLM and ``AutoProcessor`` need one. ``save_tiny_processor``
writes, next to the weights, everything that makes the directory a complete local Qwen2.5-VL checkpoint:
``tokenizer.json`` + ``tokenizer_config.json`` (+ the chat template) and ``preprocessor_config.json``.

Vocabulary layout (``vocab_size`` = 1000 by default, matching ``tiny.VOCAB_SIZE``):

=======  ==========================  =================================================
id       token                       role
=======  ==========================  =================================================
0        ``<unk>``                   any word outside the vocabulary
1..      ``words`` in the given order  the real vocabulary (the demo passes ~250 words)
...      ``w{id}``                   fillers, so every id the model can emit decodes
993      ``<|im_start|>``
994      ``<|endoftext|>``           padding
995      ``<|im_end|>``              EOS = ``tiny.EOS_TOKEN_ID`` (Qwen's chat models stop on im_end)
996      ``<|vision_start|>``        ``tiny.VISION_START_TOKEN_ID``
997      ``<|vision_end|>``          ``tiny.VISION_END_TOKEN_ID``
998      ``<|video_pad|>``           ``tiny.VIDEO_TOKEN_ID``
999      ``<|image_pad|>``           ``tiny.IMAGE_TOKEN_ID``
=======  ==========================  =================================================

Text is split on whitespace and punctuation (``Whitespace`` pre-tokenizer); decoding joins tokens with spaces.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

from .tiny import (EOS_TOKEN_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID,
                   VOCAB_SIZE)

UNK_TOKEN = "<unk>"
IM_START_TOKEN_ID = VOCAB_SIZE - 7
PAD_TOKEN_ID = VOCAB_SIZE - 6


def special_tokens(vocab_size: int = VOCAB_SIZE) -> Dict[str, int]:
    """Special token -> id at the top of a ``vocab_size`` vocabulary (see the module table)."""
    top = vocab_size - VOCAB_SIZE  # the table is written for 1000; shift for other sizes
    return {
        "<|im_start|>": IM_START_TOKEN_ID + top,
        "<|endoftext|>": PAD_TOKEN_ID + top,
        "<|im_end|>": EOS_TOKEN_ID + top,
        "<|vision_start|>": VISION_START_TOKEN_ID + top,
        "<|vision_end|>": VISION_END_TOKEN_ID + top,
        "<|video_pad|>": VIDEO_TOKEN_ID + top,
        "<|image_pad|>": IMAGE_TOKEN_ID + top,
    }


#: Words of the default chat template's fixed text plus a few common ones, so templated prompts tokenize
#: without ``<unk>``.
DEFAULT_WORDS = (
    "system", "user", "assistant", "You", "are", "a", "helpful", ".", ",", "?", "!", ":", "What", "is", "in",
    "the", "image", "Describe", "picture", "color", "how", "many", "answer", "think", "<", ">", "/", "boxed",
    "{", "}", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "yes", "no", "red", "green", "blue", "one",
    "two", "three",
)

# Qwen2.5-VL's chat template (images and videos; ``add_vision_id`` numbers them), as shipped with the models.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Image processor settings: Qwen2.5-VL's (patch 14, merge 2, temporal patch 2, CLIP mean/std) with small pixel
#: bounds so a test image becomes a handful of tokens (56x56 -> 4 patches -> 1 merged token minimum).
IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "min_pixels": 56 * 56,
    "max_pixels": 112 * 112,
    "size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
}


def build_tiny_tokenizer(words: Optional[Sequence[str]] = None, vocab_size: int = VOCAB_SIZE):
    """A ``PreTrainedTokenizerFast`` with the module's vocabulary layout and chat template.

    Args:
        words: the real vocabulary, ids 1.. in order (default ``DEFAULT_WORDS``); duplicates and words that
            contain whitespace are errors.
        vocab_size: total ids, the model's vocabulary size.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(DEFAULT_WORDS if words is None else words)
    specials = special_tokens(vocab_size)
    first_special = min(specials.values())
    if len(set(words)) != len(words):
        raise ValueError("duplicate words in the vocabulary")
    bad = [w for w in words if not w or any(c.isspace() for c in w) or w in specials or w == UNK_TOKEN]
    if bad:
        raise ValueError(f"words must be non-empty, without whitespace, and not special tokens: {bad[:5]}")
    if 1 + len(words) > first_special:
        raise ValueError(f"{len(words)} words do not fit below the special tokens (at most {first_special - 1})")
    vocab = {UNK_TOKEN: 0}
    vocab.update({w: i + 1 for i, w in enumerate(words)})
    vocab.update({f"w{i}": i for i in range(len(vocab), first_special)})
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK_TOKEN, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=list(specials))
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def save_tiny_processor(path: Union[str, Path], words: Optional[Sequence[str]] = None,
                        vocab_size: int = VOCAB_SIZE) -> Path:
    """Write the tokenizer, chat template and ``preprocessor_config.json`` into ``path`` (a checkpoint dir)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(words, vocab_size).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR, indent=2) + "\n")
    return path


def save_tiny_vl_checkpoint(path: Union[str, Path], preset: str = "tiny", seed: int = 0,
                            words: Optional[Sequence[str]] = None) -> Path:
    """A complete local checkpoint dir: tiny random weights (``tiny.save_tiny_checkpoint``) + processor files."""
    from .tiny import save_tiny_checkpoint

    save_tiny_checkpoint(path, preset, seed)
    return save_tiny_processor(path, words)
