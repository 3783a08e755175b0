"""Load an HF Qwen2.5-VL checkpoint straight into this rank's Megatron shard (any TP/PP), and read it back.

Each rank reads only the HF tensors of its pipeline stage and keeps only its TP slice, through the one mapping
in ``mapping.py``. Shapes are checked against the model before anything is copied, with the key names in the
error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Union

import torch

from .hf_io import CheckpointMismatch, HFCheckpointReader
from .mapping import ParamMapping, param_mappings, tied_output_names, to_hf, to_mcore


def model_stage_layers(model, pp_size: int) -> List[int]:
    """The language layers of each pipeline stage of ``model``'s layout (its Megatron config's uneven split, if
    any; an even split otherwise)."""
    from .hf_config import stage_layer_counts

    config = getattr(model, "config", None)
    return stage_layer_counts(model.dims.num_layers, pp_size,
                              getattr(config, "num_layers_in_first_pipeline_stage", None) if pp_size > 1 else None,
                              getattr(config, "num_layers_in_last_pipeline_stage", None) if pp_size > 1 else None)


def stage_mappings(model, pp_rank: int, pp_size: int, transformer_impl: str = "local") -> List[ParamMapping]:
    """The mappings of the stage ``model`` holds (vision names taken from its HF config's module, if any)."""
    vision_names = []
    if model.vision_model is not None:
        vision_names = ["visual." + k for k in model.vision_model.state_dict()]
    return param_mappings(model.dims, vision_names, pp_rank, pp_size, transformer_impl,
                          stage_layers=model_stage_layers(model, pp_size))


def expected_hf_names(model, transformer_impl: str = "local") -> List[str]:
    """Every tensor name a full HF checkpoint of this model's config must contain."""
    from ...compat.torchvision_ops import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    with torch.device("meta"):
        vision = Qwen2_5_VisionTransformerPretrainedModel._from_config(model.hf_config.vision_config)
    names = ["visual." + k for k in vision.state_dict()]
    return [n for m in param_mappings(model.dims, names, 0, 1, transformer_impl) for n in m.hf]


@torch.no_grad()
def load_hf_into_model(model, hf_path: Union[str, Path], tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0,
                       pp_size: int = 1, transformer_impl: str = "local") -> None:
    """Copy this rank's shard of the HF checkpoint at ``hf_path`` into ``model`` (a ``Qwen2_5_VLMegatronModel``).

    Raises ``CheckpointMismatch`` naming missing/unexpected checkpoint tensors or wrong shapes, before copying,
    and if any parameter of ``model`` is left without a checkpoint tensor: a model built with
    ``perform_initialization=False`` (the trainer's, see ``build_model``) holds uninitialised memory until loaded.
    """
    params: Dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
    mappings = stage_mappings(model, pp_rank, pp_size, transformer_impl)
    with HFCheckpointReader(hf_path) as reader:
        reader.check_names(expected_hf_names(model, transformer_impl), allow_extra=tied_output_names(model.dims))
        shards = {}
        for m in mappings:
            if m.mcore not in params:
                raise CheckpointMismatch(f"the model has no parameter {m.mcore!r} (layer spec mismatch?)")
            shard = to_mcore(m.kind, [reader.tensor(n) for n in m.hf], model.dims, tp_rank, tp_size,
                             padded_vocab=model.padded_vocab_size)
            target = params[m.mcore]
            if tuple(shard.shape) != tuple(target.shape):
                raise CheckpointMismatch(
                    f"{m.mcore} (from {', '.join(m.hf)}): checkpoint gives shape {tuple(shard.shape)}, the model "
                    f"expects {tuple(target.shape)} at TP={tp_size}"
                )
            shards[m.mcore] = shard
        unloaded = [name for name, _ in model.named_parameters() if name not in shards]
        if unloaded:
            raise CheckpointMismatch(f"{len(unloaded)} parameters of the model have no checkpoint tensor, e.g. "
                                     f"{unloaded[:3]} (layer spec mismatch?)")
        for name, shard in shards.items():
            params[name].copy_(shard.to(params[name].dtype))


def gather_hf_tensors(model, mapping: ParamMapping, tp_group=None) -> List[torch.Tensor]:
    """The full HF tensors of one mapping, all-gathering the TP shards (every TP rank gets them)."""
    import torch.distributed as dist

    local = model.state_dict()[mapping.mcore]
    if mapping.kind == "replicated" or tp_group is None or dist.get_world_size(tp_group) == 1:
        shards = [local]
    else:
        from ...parallel import collectives

        shards = collectives.all_gather(local, group=tp_group)
    return to_hf(mapping.kind, shards, model.dims, vocab_size=model.vocab_size)
