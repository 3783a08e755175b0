"""Qwen2.5-VL on CUDA in bf16 equals transformers in bf16: local layer spec (no Transformer Engine needed) and
the Transformer Engine spec (fused norms: ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``,
mapped by ``mapping.py`` for ``transformer_impl="transformer_engine"``).

One process, TP=1 PP=1 (a 1-rank group); Megatron's parallel state is set up for this module and torn down after.
Tolerance: bf16 transformers differs from fp32 transformers by ~7e-3 on these logits (|logits| ~ 1); a layout or
mapping error moves them by ~0.5. The TE spec is compared on the image pass and the drop-form text-only pass (its
attention ignores an arbitrary mask, so the mask form is local-spec only).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.gpu

BF16_TOLERANCE = 5e-2
PRESETS = ("tiny", "tiny-mha")


@pytest.fixture(scope="module")
def megatron_state():
    import datetime
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.cuda.set_device(0)
    created = False
    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=2))
        created = True
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    ps.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("qwen_gpu")
    return {p: str(save_tiny_checkpoint(root / p, p, seed=13)) for p in PRESETS}


def _on(inputs, device):
    return dataclasses.replace(inputs, **{f.name: getattr(inputs, f.name).to(device)
                                          for f in dataclasses.fields(inputs)})


def _compare_bf16(hf_path: str, transformer_impl: str, passes):
    from megatron_pgpo.models.qwen2_5_vl.hf_config import load_hf_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.parity import (compare, hf_logits, load_hf_model, megatron_logits,
                                                        synthetic_batch)

    config = load_hf_config(hf_path)
    # Built the way the trainer builds it (build_model(device=...): on the device, no CPU master copy), with no
    # .cuda() here that could hide a tensor left behind.
    model = build_model(config, tp=1, pp=1, dtype="bf16", transformer_impl=transformer_impl, init_weights=False,
                        device=torch.device("cuda", torch.cuda.current_device()))
    load_hf_into_model(model, hf_path, transformer_impl=transformer_impl)
    assert all(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inputs = synthetic_batch(config, seed=4)
    ours = megatron_logits(model, _on(inputs, "cuda"), passes=passes)
    ours = {k: v.float().cpu() for k, v in ours.items()}
    reference = hf_logits(load_hf_model(hf_path, dtype=torch.bfloat16).cuda(), inputs)
    diffs = compare(ours, reference, inputs)
    del model
    torch.cuda.empty_cache()
    return diffs, ours, reference, inputs


@pytest.mark.parametrize("preset", PRESETS)
def test_local_spec_bf16_on_cuda_matches_transformers(megatron_state, checkpoints, preset):
    diffs, ours, reference, inputs = _compare_bf16(checkpoints[preset], "local",
                                                   ("image", "text_only_drop", "text_only_mask"))
    assert max(diffs.values()) <= BF16_TOLERANCE, diffs
    text = inputs.text_positions
    assert float((ours["text_only_mask"][text] - ours["image"][text]).abs().max()) > 0.1  # the passes differ


@pytest.mark.parametrize("preset", PRESETS)
def test_transformer_engine_spec_bf16_matches_transformers(megatron_state, checkpoints, preset):
    from megatron_pgpo.models.qwen2_5_vl.specs import transformer_engine_available

    if not transformer_engine_available():
        pytest.skip("Transformer Engine cannot be imported here (not installed, or no usable CUDA driver / cuDNN); "
                    "the TE-spec parity check needs a node with transformer-engine[pytorch]")
    diffs, _, _, _ = _compare_bf16(checkpoints[preset], "transformer_engine", ("image", "text_only_drop"))
    assert max(diffs.values()) <= BF16_TOLERANCE, diffs


def test_transformer_engine_fp8_forward_tracks_bf16(megatron_state, checkpoints):
    """FP8 (``model.fp8=e4m3``, the default blockwise recipe, tensorwise where the GPU lacks blockwise) on the TE
    spec, sequences padded as the trainer pads them (``sequence_multiple``): the logits follow the bf16 model's.
    FP8 keeps 3 mantissa bits, so this checks wiring (the FP8 path runs, on the right weights), not precision:
    mean |diff| < 0.1 on logits of |x| ~ 1, where a mapping error gives ~0.5."""
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.parity import synthetic_batch
    from megatron_pgpo.models.qwen2_5_vl.specs import transformer_engine_available
    from megatron_pgpo.trainer.batch import sequence_multiple

    if not transformer_engine_available():
        pytest.skip("Transformer Engine cannot be imported here; the FP8 check needs transformer-engine[pytorch]")
    hf_path = checkpoints["tiny"]
    device = torch.device("cuda", torch.cuda.current_device())
    recipe = "blockwise" if torch.cuda.get_device_capability() == (9, 0) else "tensorwise"
    outputs = {}
    for fp8 in (None, "e4m3"):
        model = build_model(hf_path, dtype="bf16", transformer_impl="transformer_engine", init_weights=False,
                            device=device, fp8=fp8, fp8_recipe=recipe)
        load_hf_into_model(model, hf_path, transformer_impl="transformer_engine")
        inputs = synthetic_batch(model.hf_config, seed=4)
        width = inputs.input_ids.shape[1]
        multiple = sequence_multiple(1, False, True)
        pad = -width % multiple
        ids = torch.nn.functional.pad(inputs.input_ids, (0, pad)).to(device)
        pos = torch.nn.functional.pad(inputs.position_ids, (0, pad), mode="replicate").to(device)
        mask = torch.nn.functional.pad(inputs.image_mask, (0, pad)).to(device)
        with torch.no_grad():
            logits = model(ids, pos, pixel_values=inputs.pixel_values.to(device),
                           image_grid_thw=inputs.image_grid_thw.to(device), image_mask=mask)
        outputs[fp8] = logits[:, :width].float().cpu()
        del model
    diff = (outputs["e4m3"] - outputs[None]).abs().mean()
    assert float(diff) < 0.1, float(diff)
