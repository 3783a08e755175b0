"""The demo's starting point: a tiny Qwen2.5-VL-architecture checkpoint with a word-level vocabulary for the
built-in task, warmed up on the answer *format* (random answers) so RL starts above zero reward.

docs/pgpo_spec.md section 6 measured this recipe: ~250 supervised steps on the format with random answers leave the
model at ~0.95 format rate and chance accuracy (1/6 on the colour task); RL then has to learn to read the image.

**[ours] The format is learned with and without the image.** Every warm-up step also trains the same targets on
the visual-blind sequence (no token attends to the image: PGPO's text-only pass, docs/pgpo_spec.md section 1). Trained
only with the image, two of three seeds measured (transformers, k3 and exact) put a spurious visual dependency of
S ~ 1-5 on ``</think>`` (the model relied on the image tokens to decide when to close the reasoning block) while
every other token was at ~1e-5; PGPO then ranked ``</think>`` first in every response and gave the answer token weight 0
for the whole run. With both variants, S after the warm-up is ~1e-5 on every token (as the spec measured), and
the visual dependency RL finds is the one it creates: the answer reading the image.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import List, Sequence

import torch

#: Whole-token markers of the response format (the word-level pre-tokenizer would split them otherwise).
FORMAT_TOKENS = ("<think>", "</think>", "\\boxed{")


def demo_words(task: str, extra_tasks: Sequence[str] = ()) -> List[str]:
    """Vocabulary of the demo tokenizer: chat-template words, the task's questions and answers, the format; then
    the words of ``extra_tasks`` (after the others, so ``task``'s ids do not depend on them)."""
    from ..data.synthetic import answer_vocabulary, question_vocabulary
    from ..models.qwen2_5_vl.tiny_tokenizer import DEFAULT_WORDS
    from ..trainer.prompts import INSTRUCTION

    words = list(DEFAULT_WORDS) + list(FORMAT_TOKENS) + ["the", "answer", "is", "i", "see"]
    words += question_vocabulary(task) + answer_vocabulary(task) + INSTRUCTION.replace("\\boxed{}", "").split()
    for extra in extra_tasks:
        words += question_vocabulary(extra) + answer_vocabulary(extra)
    seen, out = set(), []
    for w in words:
        if w not in seen and not any(c.isspace() for c in w):
            seen.add(w)
            out.append(w)
    return out


def build_demo_checkpoint(path: Path, task: str = "colour", preset: str = "tiny", seed: int = 0,
                          extra_tasks: Sequence[str] = ()) -> Path:
    """Tiny random weights + word-level tokenizer (format markers as whole tokens) + image processor config;
    ``extra_tasks``' words are in the vocabulary too (``demo_words``)."""
    from tokenizers import AddedToken

    from ..models.qwen2_5_vl.tiny import save_tiny_checkpoint
    from ..models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer, save_tiny_processor

    path = Path(path)
    save_tiny_checkpoint(path, preset, seed)
    words = demo_words(task, extra_tasks)
    save_tiny_processor(path, words)
    tokenizer = build_tiny_tokenizer(words)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in FORMAT_TOKENS])
    assert len(tokenizer) == tokenizer.vocab_size, "format tokens must reuse vocabulary ids"
    tokenizer.save_pretrained(path)
    return path


def format_response(answer: str) -> str:
    """The warm-up's target response for ``answer``: the format the reward checks, in 9 tokens (10 with EOS)."""
    return f"<think> the answer is {answer} </think> \\boxed{{{answer}}}"


def encode_example(tokenizer, processor, example, response: str, image_token_id: int):
    """(input_ids [L], labels [L], pixel_values, grid) for one prompt + target response."""
    from ..trainer.prompts import messages_for

    image = processor(images=[example.image], return_tensors="pt")
    n_image = int(image["image_grid_thw"].prod()) // 4
    prompt = tokenizer.apply_chat_template(messages_for(example.question), tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    i = prompt_ids.index(image_token_id)
    prompt_ids = prompt_ids[:i] + [image_token_id] * n_image + prompt_ids[i + 1:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    labels = [-100] * len(prompt_ids) + response_ids
    return ids, labels, image["pixel_values"], image["image_grid_thw"]


def collate(encoded, pad_token_id: int, image_token_id: int):
    """Right-padded model inputs for ``encode_example`` outputs: a dict of ``input_ids``, ``labels``,
    ``mm_token_type_ids`` [B, L], ``pixel_values`` and ``image_grid_thw``, and the attention mask [B, L]."""
    width = max(len(e[0]) for e in encoded)
    ids = torch.full((len(encoded), width), pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    mm = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (i, l, _, _) in enumerate(encoded):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(l)] = torch.tensor(l)
        attention[row, : len(i)] = 1
    mm[ids == image_token_id] = 1
    images = dict(input_ids=ids, labels=labels, mm_token_type_ids=mm, pixel_values=torch.cat([e[2] for e in encoded]),
                  image_grid_thw=torch.cat([e[3] for e in encoded]))
    return images, attention


def supervised_step(model, optimizer, images: dict, attention: torch.Tensor, visual_blind: bool) -> torch.Tensor:
    """One AdamW step on ``collate``'s batch, gradient norm clipped to 1; returns the loss. ``visual_blind``: the
    loss is the mean of the normal forward's and the visual-blind forward's (module docstring)."""
    loss = model(attention_mask=attention, **images).loss
    if visual_blind:
        loss = 0.5 * (loss + model(**visual_blind_inputs(images, attention, model.config)).loss)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def warm_up(path: Path, task: str = "colour", steps: int = 250, batch_size: int = 16, lr: float = 1e-3,
            seed: int = 0, progress: bool = True, visual_blind: bool = True) -> dict:
    """Supervised warm-up on the format with random answers; overwrites the weights in ``path``.

    ``visual_blind``: the loss is the mean of the normal forward's and the visual-blind forward's (module docstring).
    Returns ``{"loss": final loss, "seconds": wall time}``.
    """
    import time

    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from ..data.synthetic import SyntheticTask, answer_vocabulary

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoImageProcessor.from_pretrained(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = SyntheticTask(task, 512, seed=seed + 17, split="train")
    answers = answer_vocabulary(task)
    image_token_id = model.config.image_token_id
    start, loss = time.perf_counter(), torch.tensor(0.0)
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="format warm-up", unit="step")
    for _ in iterator:
        batch = [data[rng.randrange(len(data))] for _ in range(batch_size)]
        encoded = []
        for ex in batch:
            guess = rng.choice(answers)
            encoded.append(encode_example(tokenizer, processor, ex, format_response(guess), image_token_id))
        loss = supervised_step(model, optimizer, *collate(encoded, tokenizer.pad_token_id, image_token_id),
                               visual_blind=visual_blind)
        if progress:
            iterator.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(path, safe_serialization=True)
    return {"loss": float(loss.detach()), "seconds": time.perf_counter() - start}


def visual_blind_inputs(images: dict, attention: torch.Tensor, config) -> dict:
    """The same batch for a forward in which no token attends to an image token, at the original (3-D) positions:
    a 4-D additive mask ``[B, 1, L, L]`` (causal, padding and image keys blocked) and ``position_ids [3, B, L]``."""
    from ..models.qwen2_5_vl.rope_index import get_rope_index
    from ..models.qwen2_5_vl.text_only import visual_blind_attention_mask

    image_mask = images["mm_token_type_ids"].bool()
    positions = get_rope_index(images["input_ids"], image_mask, images["image_grid_thw"],
                               config.vision_config.spatial_merge_size, attention_mask=attention)
    blocked = visual_blind_attention_mask(image_mask) | (attention == 0)[:, None, None, :]
    additive = torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(torch.float32).min)
    return dict(images, attention_mask=additive, position_ids=positions)
