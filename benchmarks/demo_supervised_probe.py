"""How fast can the demo model learn to read the colour when it is *told* the answers? An upper bound on RL's speed.

    .venv/bin/python benchmarks/demo_supervised_probe.py [--seeds 0 1 2] [--lr 2e-4] [--steps 100]
                                                        [--side-task {bars,count}] [--warm-up-steps 250]

Per seed: the demo's checkpoint and format warm-up (``demo/tiny_model.py``, in transformers), then supervised
training on the *correct* colour (16 labelled examples per AdamW step, at the RL learning rate by default), and
every 10 steps the held-out accuracy of the answer token (argmax over the 6 colour names, teacher-forced, 96
examples). RL sees less per step (a reward, not the label), so the number of optimizer steps this needs to pass 0.8
bounds how soon RL can: measured on the 2-core machine (docs/pgpo_spec.md section 6), 80-100 steps at lr 2e-4,
which is why the demo makes 8 updates per rollout batch (``trainer.ppo_epochs=2``) rather than 4.

``--side-task`` mixes a perception task with *correct* answers into half of every warm-up batch (bars: which bar
is taller; count: how many shapes of a named colour), the way a real VLM's vision tower comes pretrained; the
probe then shows whether that shortens the colour task's start (measured, seeds 0-2: it did not; bars 80 / 100 /
over 100 steps, count over 100 on all three, against 100 / 80 / 100 without).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron_pgpo.models.qwen2_5_vl  # noqa: E402,F401  (torchvision shim before transformers' Qwen2.5-VL)
from megatron_pgpo.data.synthetic import SyntheticTask, answer_vocabulary  # noqa: E402
from megatron_pgpo.demo.tiny_model import (build_demo_checkpoint, collate, encode_example,  # noqa: E402
                                           format_response, supervised_step, warm_up)

BATCH = 16


def probe(seed: int, lr: float, steps: int, side_task: str | None, warm_up_steps: int, workdir: Path) -> dict:
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = build_demo_checkpoint(workdir / f"seed{seed}", task="colour", seed=seed,
                                 extra_tasks=[side_task] if side_task else [])
    start = time.perf_counter()
    if side_task is None:  # 1. the demo's own format warm-up (random colour answers)
        warm_up(path, task="colour", steps=warm_up_steps, seed=seed, progress=False)
    tokenizer, processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager").train()
    image_token_id = model.config.image_token_id
    colours = answer_vocabulary("colour")

    def encode(example, answer):
        return encode_example(tokenizer, processor, example, format_response(answer), image_token_id)

    def batch(encoded):
        return collate(encoded, tokenizer.pad_token_id, image_token_id)

    if side_task is not None:  # 1'. the same warm-up, half of every batch the side task with correct answers
        torch.manual_seed(seed)
        rng = random.Random(seed)
        warm = SyntheticTask("colour", 512, seed=seed + 17, split="train")
        side = SyntheticTask(side_task, 512, seed=seed + 17, split="train")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        for _ in range(warm_up_steps):
            encoded = []
            for k in range(BATCH):
                if k % 2:
                    example = side[rng.randrange(len(side))]
                    encoded.append(encode(example, example.answer))
                else:
                    encoded.append(encode(warm[rng.randrange(len(warm))], rng.choice(colours)))
            supervised_step(model, optimizer, *batch(encoded), visual_blind=True)
    warm_up_s = time.perf_counter() - start

    # 2. supervised colour reading, evaluated on the answer token every 10 steps
    val = SyntheticTask("colour", 96, seed=seed + 99, split="val")
    val_inputs, val_attention = batch([encode(e, e.answer) for e in val])
    colour_ids = torch.tensor(tokenizer.convert_tokens_to_ids(colours))
    # the answer is the 5th response token (<think> the answer is X); logits at position p predict token p + 1
    answer_pos = torch.stack([(row != -100).nonzero()[4, 0] for row in val_inputs["labels"]])
    truth = val_inputs["labels"][torch.arange(len(val)), answer_pos]

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            logits = model(attention_mask=val_attention, **val_inputs).logits
        model.train()
        picked = colour_ids[logits[torch.arange(len(val)), answer_pos - 1][:, colour_ids].argmax(-1)]
        return float((picked == truth).float().mean())

    train = SyntheticTask("colour", 2048, seed=seed + 23, split="train")
    rng = random.Random(seed + 5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve = [accuracy()]
    for step in range(1, steps + 1):
        examples = [train[rng.randrange(len(train))] for _ in range(BATCH)]
        supervised_step(model, optimizer, *batch([encode(e, e.answer) for e in examples]), visual_blind=False)
        if step % 10 == 0:
            curve.append(accuracy())
    first = next((10 * i for i, a in enumerate(curve) if a >= 0.8), None)
    return {"seed": seed, "lr": lr, "side_task": side_task, "warm_up_s": round(warm_up_s, 1),
            "first_step_at_0.8": first, "accuracy_every_10_steps": [round(a, 2) for a in curve]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=2e-4, help="supervised learning rate (the demo's RL lr: 2e-4)")
    parser.add_argument("--steps", type=int, default=100, help="supervised steps of 16 labelled examples")
    parser.add_argument("--side-task", choices=["bars", "count"], default=None,
                        help="perception task with correct answers in half of every warm-up batch")
    parser.add_argument("--warm-up-steps", type=int, default=250, help="the demo's format warm-up length")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            print(json.dumps(probe(seed, args.lr, args.steps, args.side_task, args.warm_up_steps, Path(tmp))),
                  flush=True)


if __name__ == "__main__":
    main()
