"""``megatron-pgpo check-sync``: does a weight sync put exactly the trainer's weights into vLLM?

    megatron-pgpo check-sync --hf-path DIR --tp 2 [--pp 1] [--seed 1] [--bucket-mb 512]

1. starts TP x PP CPU processes (gloo), loads the HF checkpoint into Megatron (``loading.load_hf_into_model``);
2. changes every weight by a seeded perturbation (``perturb_model_``: noise drawn on the full HF tensor, then
   sharded through ``mapping.to_mcore``, so it is the same at any TP/PP);
3. starts a multiprocess vLLM engine on rank 0 from the ORIGINAL checkpoint and syncs the Megatron weights into it
   (``weight_sync.sync_weights``);
4. exports the same Megatron weights to an HF checkpoint through the converter path (``mapping.to_hf`` via
   ``loading.gather_hf_tensors``, ``weight_sync.save_hf_checkpoint``);
5. compares vLLM's fp32 greedy output with transformers ``generate`` on that export (plain greedy on both sides:
   the checkpoint's generation_config.json gives EOS only), for a prompt with a synthetic image: PASS, FAIL with the
   first differing position, or INCONCLUSIVE when the identical responses are shorter than ``--min-tokens``. Exit
   code 0 / 1 / 2.

The checkpoint dir needs a tokenizer, chat template and ``preprocessor_config.json``
(``models.qwen2_5_vl.tiny_tokenizer.save_tiny_processor`` adds them to a tiny checkpoint). The helpers here
(``load_megatron``, ``perturb_model_``, ``hf_greedy``, ``megatron_response_logprobs``) are reused by the tests.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

DEFAULT_QUESTION = "What is in the image ?"


# --------------------------------------------------------------------------------------------- shared helpers
def synthetic_image(seed: int = 0, size: Tuple[int, int] = (100, 80)):
    """A seeded random RGB ``PIL.Image`` (width, height)."""
    import numpy as np
    from PIL import Image

    width, height = size
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def image_messages(question: str = DEFAULT_QUESTION) -> List[Dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def load_megatron(hf_path: str, transformer_impl: str = "local", first_stage_layers: Optional[int] = None):
    """This rank's Megatron stage (parallel state already initialised), loaded from ``hf_path``, in eval mode
    (``first_stage_layers``: an uneven pipeline split)."""
    from megatron.core import parallel_state as ps

    from ..models.qwen2_5_vl.loading import load_hf_into_model
    from ..models.qwen2_5_vl.model import build_model

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    model = build_model(hf_path, tp=tp, pp=pp, init_weights=False, transformer_impl=transformer_impl,
                        first_stage_layers=first_stage_layers)
    load_hf_into_model(model, hf_path, ps.get_tensor_model_parallel_rank(), tp, ps.get_pipeline_model_parallel_rank(),
                       pp, transformer_impl)
    return model.eval()


def perturb_model_(model, seed: int, scale: float = 0.1, transformer_impl: str = "local") -> None:
    """Add seeded noise to every weight: ``scale * N(0, 1)`` on matrices, half that on vectors (norms, biases).

    The noise is drawn per HF tensor (generator seeded by ``seed`` and the tensor's name) and sharded with
    ``mapping.to_mcore``, so the perturbed model is the same at every TP/PP layout. Scale 0.1 on the tiny presets
    makes greedy output depend on the prompt and image (their random init alone repeats one token).
    """
    import torch
    from megatron.core import parallel_state as ps

    from ..models.qwen2_5_vl.loading import stage_mappings
    from ..models.qwen2_5_vl.mapping import to_hf, to_mcore

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    params = dict(model.state_dict(keep_vars=True))
    mappings = stage_mappings(model, ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
                              transformer_impl)
    for m in mappings:
        target = params[m.mcore]
        # the full HF shapes, from the mapping itself applied to meta copies of this rank's shard
        shapes = [t.shape for t in to_hf(m.kind, [target.to("meta")] * tp_size, model.dims, model.vocab_size)]
        noise_hf = []
        for name, shape in zip(m.hf, shapes):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise_hf.append(torch.randn(shape, generator=gen) * (scale if len(shape) > 1 else scale / 2))
        noise = to_mcore(m.kind, noise_hf, model.dims, tp_rank, tp_size, padded_vocab=model.padded_vocab_size)
        with torch.no_grad():
            target.add_(noise.to(target.dtype))


def hf_greedy(hf_path: str, prompt: str, image, max_tokens: int) -> List[int]:
    """transformers fp32 greedy ``generate`` on ``hf_path`` (eager attention): the response token ids.

    Plain greedy decoding, as the engine runs it (``generation_config="vllm"``): the checkpoint's
    ``generation_config.json`` gives only the EOS ids. Its sampling settings would otherwise apply here and not in
    the engine (Qwen2.5-VL-Instruct ships ``repetition_penalty`` 1.05), and the two could differ on a real
    checkpoint for a reason that is not the weights. (Replacing the model's generation config, not passing one:
    ``generate`` fills a passed config's default-valued fields from the model's.)
    """
    import torch

    from ..compat.torchvision_ops import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AutoProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(hf_path)
    inputs = processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_path, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    eos = model.generation_config.eos_token_id
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos if isinstance(eos, int) else None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def megatron_response_logprobs(model, hf_path: str, prompt: str, image, response: Sequence[int]):
    """``([len(response)] float32 log-probs, prompt token ids)`` of ``response`` after ``prompt`` (+ ``image``) under
    the Megatron model.

    Single pipeline stage only (PP = 1); TP any (``vocab_parallel_logprobs`` on the vocab-parallel logits).
    The prompt ids are the processor's (image placeholders expanded), for comparison with the engine's.
    """
    import torch
    from megatron.core import parallel_state as ps
    from transformers import AutoProcessor

    from ..parallel.vocab_parallel import vocab_parallel_logprobs
    from ..models.qwen2_5_vl.rope_index import get_rope_index, image_token_mask

    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("megatron_response_logprobs runs one pipeline stage (PP=1)")
    inputs = AutoProcessor.from_pretrained(hf_path)(text=[prompt], images=[image], return_tensors="pt")
    prompt_ids = inputs["input_ids"]
    ids = torch.cat([prompt_ids, torch.tensor([list(response)], dtype=torch.long)], dim=1)
    lengths = torch.tensor([prompt_ids.shape[1]])
    mask = image_token_mask(ids, model.image_token_id, lengths)
    position_ids = get_rope_index(ids, mask, inputs["image_grid_thw"], model.spatial_merge_size)
    with torch.no_grad():
        logits = model(ids, position_ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                       image_mask=mask)
    start = prompt_ids.shape[1] - 1
    shard = logits[:, start:start + len(response)].float()
    logprobs = vocab_parallel_logprobs(shard, ids[:, start + 1:], model.vocab_size,
                                       ps.get_tensor_model_parallel_group())
    return logprobs[0], prompt_ids[0].tolist()


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first position where ``a`` and ``b`` differ (a length difference counts), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ------------------------------------------------------------------------------------------------ the check
def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, result_queue) -> None:
    import torch

    from ..compat.megatron_cpu import init_cpu_distributed
    from .engine import RolloutRequest, SamplingConfig
    from .vllm_engine import VLLMEngine, VLLMEngineConfig
    from .weight_sync import is_engine_owner, save_hf_checkpoint, sync_weights

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    init_cpu_distributed(rank, world, port, tp=args.tp, pp=args.pp, timeout_s=600)
    model = load_megatron(args.hf_path)
    perturb_model_(model, args.seed, args.scale)
    engine = None
    if is_engine_owner():
        engine = VLLMEngine(VLLMEngineConfig(model_path=args.hf_path, run_dir=args.run_dir,
                                             bucket_bytes=max(1, int(args.bucket_mb * (1 << 20))), max_model_len=1024,
                                             kv_cache_memory_bytes=128 << 20))  # sync_weights starts it
    t0 = time.perf_counter()
    sync_weights(model, engine)
    sync_s = time.perf_counter() - t0
    export = save_hf_checkpoint(model, Path(args.run_dir) / "export", source_dir=args.hf_path)
    if engine is not None:
        try:
            image = synthetic_image(args.seed)
            request = RolloutRequest(image_messages(), image)
            out = engine.generate([request], SamplingConfig(temperature=0.0, max_tokens=args.max_tokens))[0]
            prompt = engine.prompt_text(request)
        finally:
            engine.shutdown()
        reference = hf_greedy(str(export), prompt, image, args.max_tokens)
        result_queue.put({"vllm": out.response_token_ids, "hf": reference, "sync_s": sync_s,
                          "version": out.weight_version, "export": str(export)})
    import torch.distributed as dist

    from ..parallel import collectives

    collectives.barrier()
    dist.destroy_process_group()


def run_check(args: argparse.Namespace) -> int:
    import torch.multiprocessing as mp

    from ..models.qwen2_5_vl.hf_config import load_hf_config

    load_hf_config(args.hf_path)  # fail fast on a wrong directory
    missing = [f for f in ("tokenizer_config.json", "preprocessor_config.json") if not (Path(args.hf_path) / f).is_file()]
    if missing:
        raise SystemExit(f"{args.hf_path} lacks {', '.join(missing)}: vLLM needs a tokenizer and processor (for a tiny "
                         "checkpoint: megatron_pgpo.models.qwen2_5_vl.tiny_tokenizer.save_tiny_processor(DIR))")
    args.run_dir = args.run_dir or tempfile.mkdtemp(prefix="pgpo-check-sync-")
    world = args.tp * args.pp
    from ..compat.megatron_cpu import init_cpu_distributed  # noqa: F401 - import errors surface here, not in workers

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = None
    while result is None and any(p.is_alive() for p in procs):
        try:
            result = queue.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty
            pass
    for p in procs:
        p.join()
    if result is None or any(p.exitcode for p in procs):
        print(f"check-sync: FAIL (a rank exited with {[p.exitcode for p in procs]})")
        return 1
    print(f"check-sync TP={args.tp} PP={args.pp}: synced weight version {result['version']} in {result['sync_s']:.2f} s (vLLM start included); "
          f"export {result['export']}")
    print(f"  vLLM        : {result['vllm']}")
    print(f"  transformers: {result['hf']}")
    code, message = verdict(result["vllm"], result["hf"], args.min_tokens)
    print(f"check-sync: {message}")
    return code


def verdict(engine_ids: Sequence[int], reference_ids: Sequence[int], min_tokens: int) -> Tuple[int, str]:
    """``(exit code, message)``: 0 PASS when both greedy responses are identical and at least ``min_tokens`` long,
    1 FAIL at the first difference, 2 INCONCLUSIVE when they agree on fewer tokens (a response that ends at once,
    e.g. with EOS, proves nothing about the weights)."""
    diff = first_difference(engine_ids, reference_ids)
    if diff is not None:
        return 1, f"FAIL (first difference at response position {diff})"
    if len(engine_ids) < min_tokens:
        return 2, (f"INCONCLUSIVE (the greedy responses agree but end after {len(engine_ids)} token(s), fewer than "
                   f"--min-tokens {min_tokens}: try another --seed or a larger --scale)")
    return 0, f"PASS ({len(engine_ids)} greedy fp32 tokens identical)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-path", required=True, help="HF Qwen2.5-VL checkpoint dir (with tokenizer and processor)")
    parser.add_argument("--tp", type=int, default=1, help="Megatron tensor parallel size (CPU processes)")
    parser.add_argument("--pp", type=int, default=1, help="Megatron pipeline parallel size")
    parser.add_argument("--seed", type=int, default=1, help="seed of the weight perturbation and the test image")
    parser.add_argument("--scale", type=float, default=0.1, help="perturbation std on matrices (half on vectors)")
    parser.add_argument("--max-tokens", type=int, default=16, help="greedy tokens to compare")
    parser.add_argument("--min-tokens", type=int, default=4, help="fewer identical tokens than this (the response "
                        "ended early, e.g. with EOS) is INCONCLUSIVE (exit code 2), not PASS")
    parser.add_argument("--bucket-mb", type=float, default=512, help="weight sync bucket size in MiB (fractions ok)")
    parser.add_argument("--run-dir", default=None, help="vLLM caches and the HF export go here (default: a temp dir)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-pgpo check-sync", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_check(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
