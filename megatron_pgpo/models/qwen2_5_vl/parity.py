"""Numerical parity of the Megatron Qwen2.5-VL model with transformers, on one HF checkpoint, at any TP/PP.

    megatron-pgpo check-parity --hf-path DIR --tp 2 --pp 1 [--image FILE] [--tolerance 1e-4]

``run_check`` starts ``tp * pp`` local CPU processes (``torch.multiprocessing`` spawn, gloo, the CPU patches of
``compat/megatron_cpu.py``); each builds its Megatron stage in fp32, loads its shard of the checkpoint with
``load_hf_into_model`` and runs the same inputs through every pipeline stage. The last stage gathers its
vocab-parallel logits over the TP group. The parent then runs transformers on the same inputs and prints one line
per pass with the largest absolute logit difference and PASS/FAIL against the tolerance:

* image pass: the prompt with its image, every real (non-padding) position;
* text-only pass, drop form (what training runs): visual tokens removed, original 3-D positions kept;
* text-only pass, mask form: full sequence, no token may attend to a visual token.

The transformers text-only reference is the mask form written in transformers' terms (``docs/stack.md``):
a 4-D additive attention mask plus explicit 3-D position ids computed on the full sequence. The text-only passes
are compared on the text positions only.

Inputs: the image comes from ``--image`` (PIL) or, without it, a deterministic synthetic 112x84 RGB pattern. It is
turned into patches by the checkpoint's own image processor when the directory has ``preprocessor_config.json``
(``AutoImageProcessor``, which falls back to the PIL ``Qwen2VLImageProcessorPil``), otherwise by a
``Qwen2VLImageProcessorPil`` built from the vision config (patch / merge / temporal patch size). The prompt text
is tokenized with the checkpoint's tokenizer when it has one; otherwise fixed pseudo-random token ids are used
(parity does not depend on what the words mean).

``synthetic_batch`` and ``megatron_logits`` are also what the distributed parity tests use; the stage-to-stage
forward is ``pipeline.forward_all_stages``.
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

PASSES = ("image", "text_only_drop", "text_only_mask")
PASS_TITLES = {
    "image": "image pass",
    "text_only_drop": "text-only pass (drop form)",
    "text_only_mask": "text-only pass (mask form)",
}


# ------------------------------------------------------------------------------------------------------- inputs
@dataclass
class ParityInputs:
    """One batch, identical for both implementations.

    input_ids ``[B, S]``; attention_mask ``[B, S]`` (1 = token, 0 = right padding); pixel_values
    ``[patches, C*T*P*P]``; image_grid_thw ``[images, 3]``; image_mask ``bool[B, S]``; position_ids ``[3, B, S]``
    (``rope_index.get_rope_index`` on the full sequence).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    image_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """``bool[B, S]``: real tokens."""
        return self.attention_mask.bool()

    @property
    def text_positions(self) -> torch.Tensor:
        """``bool[B, S]``: real tokens that are not image slots (where the text-only passes are compared)."""
        return self.valid & ~self.image_mask


Segment = Tuple[str, object]  # ("text", n_tokens or [ids]) | ("image", index into the grids)


def assemble_inputs(hf_config, rows: Sequence[Sequence[Segment]], grids: Sequence[Tuple[int, int, int]],
                    pixel_values: torch.Tensor, seed: int = 0, pad_token_id: int = 0,
                    prompt_lengths: Optional[Sequence[int]] = None) -> ParityInputs:
    """Token ids for ``rows`` (each a list of segments), right-padded, with the image placeholders expanded.

    A ``("text", n)`` segment is ``n`` pseudo-random ids below the special tokens; ``("text", [ids])`` is used as
    given; ``("image", i)`` is ``<|vision_start|>``, one ``<|image_pad|>`` per merged patch of ``grids[i]``,
    ``<|vision_end|>``. Images must appear in the rows in grid order (the order of ``pixel_values``).
    ``prompt_lengths`` (per row): image token ids after them are response text, not image slots.
    """
    from .rope_index import get_rope_index, image_token_mask

    merge = hf_config.vision_config.spatial_merge_size
    vocab = hf_config.text_config.vocab_size
    text_high = min(hf_config.image_token_id, hf_config.vision_start_token_id, hf_config.vision_end_token_id,
                    getattr(hf_config, "video_token_id", vocab), vocab) - 8
    gen = torch.Generator().manual_seed(seed)
    sequences, next_image = [], 0
    for row in rows:
        ids: List[int] = []
        for kind, value in row:
            if kind == "text":
                if isinstance(value, int):
                    ids += torch.randint(1, text_high, (value,), generator=gen).tolist()
                else:
                    ids += list(value)
            elif kind == "image":
                if value != next_image:
                    raise ValueError(f"images must appear in grid order: expected image {next_image}, got {value}")
                t, h, w = grids[value]
                ids += [hf_config.vision_start_token_id] + [hf_config.image_token_id] * (t * h * w // merge ** 2)
                ids += [hf_config.vision_end_token_id]
                next_image += 1
            else:
                raise ValueError(f"unknown segment kind {kind!r}")
        sequences.append(ids)
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, ids in enumerate(sequences):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention_mask[b, :len(ids)] = 1
    grid_thw = torch.tensor([list(g) for g in grids], dtype=torch.long)
    lengths = torch.tensor(list(prompt_lengths)) if prompt_lengths is not None else None
    image_mask = image_token_mask(input_ids, hf_config.image_token_id, lengths) & attention_mask.bool()
    position_ids = get_rope_index(input_ids, image_mask, grid_thw, merge, attention_mask=attention_mask)
    return ParityInputs(input_ids, attention_mask, pixel_values, grid_thw, image_mask, position_ids)


def random_pixel_values(hf_config, grids: Sequence[Tuple[int, int, int]], seed: int = 0) -> torch.Tensor:
    """Standard-normal patches ``[sum(t*h*w), C*T*P*P]`` for ``grids`` (already-normalised pixel statistics)."""
    vc = hf_config.vision_config
    channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
    width = channels * vc.temporal_patch_size * vc.patch_size ** 2
    patches = sum(t * h * w for t, h, w in grids)
    return torch.randn(patches, width, generator=torch.Generator().manual_seed(seed + 7))


def synthetic_batch(hf_config, seed: int = 0) -> ParityInputs:
    """The test batch: two prompts of different lengths (right padding); the second holds two images.

    Row 0: text, a 4x6-patch image, text. Row 1: text, a 4x4-patch image, text, a 2x6-patch image, text.
    """
    grids = [(1, 4, 6), (1, 4, 4), (1, 2, 6)]
    rows = [
        [("text", 5), ("image", 0), ("text", 7)],
        [("text", 3), ("image", 1), ("text", 4), ("image", 2), ("text", 9)],
    ]
    return assemble_inputs(hf_config, rows, grids, random_pixel_values(hf_config, grids, seed), seed)


def synthetic_image(width: int = 112, height: int = 84):
    """A deterministic RGB test pattern (PIL image): gradients and a checkerboard, no randomness."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    checker = (((x // 14) + (y // 14)) % 2) * 60
    pixels = np.stack([(x * 255) // max(1, width - 1), (y * 255) // max(1, height - 1), (checker + x + y) % 256], -1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def image_prompt_inputs(hf_config, hf_path: Union[str, Path], image_path: Optional[Union[str, Path]] = None,
                        seed: int = 0) -> Tuple[ParityInputs, str]:
    """One prompt with one image for the CLI; returns the inputs and a sentence saying how they were made."""
    from PIL import Image

    hf_path = Path(hf_path)
    image = Image.open(image_path).convert("RGB") if image_path else synthetic_image()
    source = f"image {image_path}" if image_path else "synthetic 112x84 test image"
    vc = hf_config.vision_config
    processor = None
    if (hf_path / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(hf_path)
        source += " through the checkpoint's image processor"
    if processor is None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        factor = vc.patch_size * vc.spatial_merge_size
        processor = Qwen2VLImageProcessorPil(
            patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size,
            size={"shortest_edge": factor * factor, "longest_edge": 16 * factor * factor},
        )
        source += " through Qwen2VLImageProcessorPil (no preprocessor_config.json)"
    encoded = processor(images=[image], return_tensors="pt")
    grid = tuple(int(v) for v in encoded["image_grid_thw"][0])
    before, after = _prompt_text_ids(hf_path)
    if before is None:
        rows = [[("text", 6), ("image", 0), ("text", 10)]]
        source += "; pseudo-random prompt ids (no tokenizer)"
    else:
        rows = [[("text", before), ("image", 0), ("text", after)]]
        source += "; prompt tokenized by the checkpoint's tokenizer"
    inputs = assemble_inputs(hf_config, rows, [grid], encoded["pixel_values"].float(), seed)
    return inputs, source


def _prompt_text_ids(hf_path: Path):
    """Token ids around the image of a short chat prompt, or (None, None) when the checkpoint has no tokenizer."""
    if not any((hf_path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None, None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_path)
        before = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
        after = tokenizer("Describe this image.<|im_end|>\n<|im_start|>assistant\n",
                          add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - any tokenizer problem: fall back to synthetic ids
        return None, None
    return (before, after) if before and after else (None, None)


# ----------------------------------------------------------------------------------------------- Megatron side
@torch.no_grad()
def megatron_logits(model, inputs: ParityInputs, passes: Sequence[str] = PASSES) -> Optional[Dict[str, torch.Tensor]]:
    """Full-vocabulary logits ``[B, S, V]`` of each pass, on the last pipeline stage (None on other stages).

    ``text_only_drop`` is restored to the original positions (zeros at visual and padding positions).
    """
    from megatron.core import parallel_state as ps

    from .pipeline import forward_all_stages, gather_vocab_logits
    from .text_only import drop_visual_tokens, visual_blind_attention_mask

    model.eval()
    image = dict(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw, image_mask=inputs.image_mask)
    out: Dict[str, torch.Tensor] = {}
    for name in passes:
        if name == "image":
            logits = forward_all_stages(model, inputs.input_ids, inputs.position_ids, **image)
        elif name == "text_only_mask":
            mask = visual_blind_attention_mask(inputs.image_mask)
            logits = forward_all_stages(model, inputs.input_ids, inputs.position_ids, attention_mask=mask, **image)
        elif name == "text_only_drop":
            dropped = drop_visual_tokens(inputs.input_ids, inputs.position_ids, inputs.image_mask,
                                         attention_mask=inputs.attention_mask)
            logits = forward_all_stages(model, dropped.input_ids, dropped.position_ids)
            if logits is not None:
                logits = dropped.restore(logits, inputs.input_ids.shape[1])
        else:
            raise ValueError(f"unknown pass {name!r}; valid: {', '.join(PASSES)}")
        if logits is not None:
            out[name] = gather_vocab_logits(logits, model.vocab_size)
    return out if ps.is_pipeline_last_stage() else None


# ------------------------------------------------------------------------------------------- transformers side
def load_hf_model(hf_path: Union[str, Path], dtype: torch.dtype = torch.float32):
    """``Qwen2_5_VLForConditionalGeneration`` from ``hf_path`` in eval mode, eager attention."""
    from ...compat.torchvision_ops import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_path, dtype=dtype,
                                                              attn_implementation="eager").eval()


@torch.no_grad()
def hf_logits(hf_model, inputs: ParityInputs) -> Dict[str, torch.Tensor]:
    """transformers logits ``[B, S, V]``: ``image`` (the normal forward) and ``text_only`` (4-D mask form)."""
    from .text_only import visual_blind_attention_mask

    device = next(hf_model.parameters()).device
    dtype = next(hf_model.parameters()).dtype
    common = dict(input_ids=inputs.input_ids.to(device), pixel_values=inputs.pixel_values.to(device, dtype),
                  image_grid_thw=inputs.image_grid_thw.to(device),
                  mm_token_type_ids=inputs.image_mask.long().to(device))
    image = hf_model(attention_mask=inputs.attention_mask.to(device), **common).logits.float().cpu()
    blocked = visual_blind_attention_mask(inputs.image_mask).to(device)
    additive = torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)
    text_only = hf_model(attention_mask=additive, position_ids=inputs.position_ids.to(device),
                         **common).logits.float().cpu()
    return {"image": image, "text_only": text_only}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, positions: torch.Tensor) -> float:
    """Largest ``|a - b|`` over the ``bool[B, S]`` positions (first ``min(V_a, V_b)`` vocabulary columns)."""
    vocab = min(a.shape[-1], b.shape[-1])
    return float((a[..., :vocab][positions].float() - b[..., :vocab][positions].float()).abs().max())


def compare(megatron: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor],
            inputs: ParityInputs) -> Dict[str, float]:
    """Max abs difference per pass (image on every real token, text-only passes on text tokens)."""
    diffs = {}
    for name, logits in megatron.items():
        if name == "image":
            diffs[name] = max_abs_diff(logits, reference["image"], inputs.valid)
        else:
            diffs[name] = max_abs_diff(logits, reference["text_only"], inputs.text_positions)
    return diffs


# ------------------------------------------------------------------------------------------------ the runner
@dataclass
class _Job:
    hf_path: str
    tp: int
    pp: int
    port: int
    out_file: str
    image: Optional[str]
    threads: int


def _rank_main(rank: int, job: _Job) -> None:
    """One spawned rank: gloo + patches + layout, build and load its stage, run the passes, save on the last."""
    torch.set_num_threads(job.threads)
    from ...compat.megatron_cpu import init_cpu_distributed
    from .hf_config import load_hf_config
    from .loading import load_hf_into_model
    from .model import build_model

    world = job.tp * job.pp
    init_cpu_distributed(rank, world, job.port, tp=job.tp, pp=job.pp)
    from megatron.core import parallel_state as ps

    try:
        hf_config = load_hf_config(job.hf_path)
        model = build_model(hf_config, tp=job.tp, pp=job.pp, init_weights=False)
        load_hf_into_model(model, job.hf_path, tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=job.tp,
                           pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=job.pp)
        inputs, _ = image_prompt_inputs(hf_config, job.hf_path, job.image)
        logits = megatron_logits(model, inputs)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            torch.save(logits, job.out_file)
    finally:
        import torch.distributed as dist

        ps.destroy_model_parallel()
        dist.destroy_process_group()


def check_layout(hf_path: Union[str, Path], tp: int, pp: int):
    """The HF config of ``hf_path``, after checking (TP, PP) can shard it (``ModelConfigError`` otherwise)."""
    from .hf_config import ModelConfigError, TextDims, load_hf_config, validate_parallel_layout

    if tp < 1 or pp < 1:
        raise ModelConfigError(f"--tp and --pp must be >= 1 (got tp={tp}, pp={pp})")
    hf_config = load_hf_config(hf_path)
    validate_parallel_layout(TextDims.from_hf(hf_config), tp, pp)
    return hf_config


def run_check(hf_path: Union[str, Path], tp: int = 1, pp: int = 1, image: Optional[Union[str, Path]] = None,
              tolerance: float = 1e-4, echo: Callable[[str], None] = print,
              reference_path: Optional[Union[str, Path]] = None) -> bool:
    """Run the parity check (see module docstring); True when every pass is within ``tolerance``.

    ``reference_path`` (default ``hf_path``): the checkpoint transformers reads, e.g. the original when
    ``hf_path`` is a converted or exported copy. Raises ``ModelConfigError`` (bad config or layout) before any
    process starts or any weight is read.
    """
    import torch.multiprocessing as mp

    from ...compat.torchvision_ops import ensure_torchvision_importable

    hf_path = str(Path(hf_path).resolve())
    hf_config = check_layout(hf_path, tp, pp)
    ensure_torchvision_importable()
    inputs, source = image_prompt_inputs(hf_config, hf_path, image)
    against = f" against transformers on {reference_path}" if reference_path else ""
    echo(f"check-parity: {hf_path} at TP={tp} PP={pp}{against}, fp32 on CPU; {source}; "
         f"{int(inputs.valid.sum())} tokens, {int(inputs.image_mask.sum())} image tokens")
    with tempfile.TemporaryDirectory(prefix="pgpo-parity-") as tmp:
        job = _Job(hf_path, tp, pp, _free_port(), os.path.join(tmp, "logits.pt"), str(image) if image else None,
                   threads=max(1, (os.cpu_count() or 1) // (tp * pp)))
        try:
            mp.start_processes(_rank_main, args=(job,), nprocs=tp * pp, join=True, start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            echo(f"FAIL: the Megatron side did not run: {lines[-1] if lines else exc}")
            return False
        megatron = torch.load(job.out_file)
    reference = hf_logits(load_hf_model(Path(reference_path).resolve() if reference_path else hf_path), inputs)
    diffs = compare(megatron, reference, inputs)
    ok = True
    for name in PASSES:
        passed = diffs[name] <= tolerance
        ok &= passed
        echo(f"{PASS_TITLES[name]:<28} max |logit diff| = {diffs[name]:.3e}  tolerance {tolerance:.1e}  "
             f"{'PASS' if passed else 'FAIL'}")
    echo("PASS: Megatron matches transformers" if ok else "FAIL: Megatron differs from transformers")
    return ok


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_parity_command(hf_path: str, tp: int = 1, pp: int = 1, image: Optional[str] = None,
                         tolerance: float = 1e-4, reference_path: Optional[str] = None) -> int:
    """``megatron-pgpo check-parity``: exit code 0 when every pass is within tolerance, 1 otherwise (also on a
    config or layout error, which is printed to stderr)."""
    from .hf_config import ModelConfigError

    try:
        ok = run_check(hf_path, tp, pp, image, tolerance, reference_path=reference_path)
    except ModelConfigError as exc:
        print(f"check-parity: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1
