"""The one name/layout mapping between Hugging Face Qwen2.5-VL tensors and Megatron-Core tensors.

Everything that moves weights between the two worlds goes through ``param_mappings`` (checkpoint conversion,
loading HF weights into a sharded model, exporting trained weights to vLLM), so the layouts are written down once.

Megatron layouts (per language layer ``i``; ``g`` = KV group, ``q_g`` = the query heads of group ``g``):

* ``linear_qkv`` (weight ``[(nq + 2 nkv) d, H]``, bias alike) = ``cat_g [q_g; k_g; v_g]``; TP splits whole groups.
* ``linear_fc1`` = ``[gate; up]``; TP rank ``r`` holds ``[gate_r; up_r]``.
* ``linear_proj`` (o_proj) and ``linear_fc2`` (down_proj) split along dim 1; embedding / output layer along the
  (padded) vocabulary, dim 0; norms and the vision tower are replicated.
* Norms: ``input_layernorm`` / ``pre_mlp_layernorm`` under the local spec, ``linear_qkv.layer_norm_weight`` /
  ``linear_fc1.layer_norm_weight`` under the TE spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .hf_config import TextDims


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron tensor and the HF tensors it is made of.

    ``kind`` says how it is fused and sharded: ``qkv``, ``fc1``, ``row`` (split dim 1), ``vocab`` (dim 0, padded),
    ``replicated``. ``export`` is False for a copy that must not be written back (the last pipeline stage's
    output layer when embeddings are tied: HF stores that tensor once, as the embedding).
    """

    mcore: str
    hf: Tuple[str, ...]
    kind: str
    export: bool = True


def layer_mappings(i: int, mcore_i: int, transformer_impl: str = "local") -> List[ParamMapping]:
    """Mappings of HF language layer ``i`` stored as Megatron layer ``mcore_i`` (its index in its stage)."""
    h, m = f"model.layers.{i}.", f"language_model.decoder.layers.{mcore_i}."
    if transformer_impl == "local":
        ln1, ln2 = f"{m}input_layernorm.weight", f"{m}pre_mlp_layernorm.weight"
    else:
        ln1, ln2 = f"{m}self_attention.linear_qkv.layer_norm_weight", f"{m}mlp.linear_fc1.layer_norm_weight"
    a = f"{h}self_attn."
    return [
        ParamMapping(ln1, (f"{h}input_layernorm.weight",), "replicated"),
        ParamMapping(f"{m}self_attention.linear_qkv.weight", (f"{a}q_proj.weight", f"{a}k_proj.weight",
                                                               f"{a}v_proj.weight"), "qkv"),
        ParamMapping(f"{m}self_attention.linear_qkv.bias", (f"{a}q_proj.bias", f"{a}k_proj.bias", f"{a}v_proj.bias"),
                     "qkv"),
        ParamMapping(f"{m}self_attention.linear_proj.weight", (f"{a}o_proj.weight",), "row"),
        ParamMapping(ln2, (f"{h}post_attention_layernorm.weight",), "replicated"),
        ParamMapping(f"{m}mlp.linear_fc1.weight", (f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"), "fc1"),
        ParamMapping(f"{m}mlp.linear_fc2.weight", (f"{h}mlp.down_proj.weight",), "row"),
    ]


def param_mappings(dims: TextDims, vision_names: Sequence[str], pp_rank: int = 0, pp_size: int = 1,
                   transformer_impl: str = "local", stage_layers: Optional[Sequence[int]] = None
                   ) -> List[ParamMapping]:
    """Every mapping of pipeline stage ``pp_rank`` (all of them for ``pp_size = 1``), in checkpoint order.

    ``vision_names`` are the HF vision tensor names (``visual.*``), which live on stage 0. ``stage_layers``: the
    language layers of each stage (``hf_config.stage_layer_counts``); None: an even split.
    """
    from .hf_config import stage_layer_counts

    counts = list(stage_layers) if stage_layers is not None else stage_layer_counts(dims.num_layers, pp_size)
    if len(counts) != pp_size or sum(counts) != dims.num_layers:
        raise ValueError(f"stage layers {counts} do not split {dims.num_layers} layers over PP={pp_size}")
    offset, per_stage = sum(counts[:pp_rank]), counts[pp_rank]
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    out: List[ParamMapping] = []
    if first:
        out.append(ParamMapping("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                                "vocab"))
        out += [ParamMapping("vision_model." + n[len("visual."):], (n,), "replicated") for n in vision_names]
    for local in range(per_stage):
        out += layer_mappings(offset + local, local, transformer_impl)
    if last:
        out.append(ParamMapping("language_model.decoder.final_layernorm.weight", ("model.norm.weight",),
                                "replicated"))
        if not dims.tie_word_embeddings:
            out.append(ParamMapping("language_model.output_layer.weight", ("lm_head.weight",), "vocab"))
        elif not first:
            # Tied embeddings across pipeline stages: Megatron keeps a second copy on the last stage (kept in sync
            # through the embedding group); it is loaded from the embedding and never exported.
            out.append(ParamMapping("language_model.output_layer.weight", ("model.embed_tokens.weight",), "vocab",
                                    export=False))
    return out


# ---- tensor layouts: full HF tensors <-> one TP rank's Megatron shard ----

def _qkv_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: TextDims) -> torch.Tensor:
    """``[nkv, (nq/nkv + 2) d, ...]``: per KV group, its query heads then its key and value head."""
    nkv, d = dims.num_kv_heads, dims.head_dim
    per = dims.num_heads // nkv
    rest = q.shape[1:]
    return torch.cat([q.reshape(nkv, per * d, *rest), k.reshape(nkv, d, *rest), v.reshape(nkv, d, *rest)], dim=1)


def to_mcore(kind: str, hf: Sequence[torch.Tensor], dims: TextDims, tp_rank: int = 0, tp_size: int = 1,
             padded_vocab: Optional[int] = None) -> torch.Tensor:
    """TP rank ``tp_rank``'s Megatron tensor made from the full HF tensors ``hf`` (in ``ParamMapping.hf`` order)."""
    if kind == "replicated":
        return hf[0]
    if kind == "qkv":
        groups = _qkv_groups(*hf, dims)
        per_rank = dims.num_kv_heads // tp_size
        shard = groups[tp_rank * per_rank:(tp_rank + 1) * per_rank]
        return shard.reshape(-1, *hf[0].shape[1:])
    if kind == "fc1":
        gate, up = (t.chunk(tp_size, dim=0)[tp_rank] for t in hf)
        return torch.cat([gate, up], dim=0)
    if kind == "row":
        return hf[0].chunk(tp_size, dim=1)[tp_rank]
    if kind == "vocab":
        full = hf[0]
        if padded_vocab is not None and padded_vocab > full.shape[0]:
            pad = full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])
            full = torch.cat([full, pad], dim=0)
        return full.chunk(tp_size, dim=0)[tp_rank]
    raise ValueError(f"unknown mapping kind {kind!r}")


def to_hf(kind: str, shards: Sequence[torch.Tensor], dims: TextDims, vocab_size: Optional[int] = None
          ) -> List[torch.Tensor]:
    """The full HF tensors (``ParamMapping.hf`` order) from every TP rank's Megatron shard, in rank order."""
    if kind == "replicated":
        return [shards[0]]
    if kind == "qkv":
        nkv_local = dims.num_kv_heads // len(shards)
        d, per = dims.head_dim, dims.num_heads // dims.num_kv_heads
        rest = shards[0].shape[1:]
        groups = torch.cat([s.reshape(nkv_local, (per + 2) * d, *rest) for s in shards], dim=0)
        q, k, v = groups.split([per * d, d, d], dim=1)
        return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
    if kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    if kind == "row":
        return [torch.cat(list(shards), dim=1)]
    if kind == "vocab":
        full = torch.cat(list(shards), dim=0)
        return [full[:vocab_size] if vocab_size is not None else full]
    raise ValueError(f"unknown mapping kind {kind!r}")


def tied_output_names(dims: TextDims) -> Dict[str, str]:
    """HF names that alias another tensor when embeddings are tied (written once, as the embedding)."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if dims.tie_word_embeddings else {}


def iter_hf_names(mappings: Sequence[ParamMapping]) -> Iterator[str]:
    for m in mappings:
        yield from m.hf
