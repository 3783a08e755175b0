"""Qwen2.5-VL as a Megatron-Core model: the transformers vision tower feeding a Megatron ``GPTModel``.

    input_ids [B, S] ──embedding──> [S, B, H] ──(image slots <- vision features)──> GPTModel decoder ──> logits
    pixel_values ──Qwen2.5-VL vision tower + merger (transformers module)──┘

* The vision tower is transformers' own module (Megatron-Core has no Qwen2.5-VL ViT), replicated on every TP
  rank and present only on the first pipeline stage. Its gradients are identical across TP ranks because the
  gradient reaching the decoder input is all-reduced by the first column-parallel layer.
* The language model is a stock ``GPTModel`` (RMSNorm, SwiGLU, GQA, qkv bias, mrope) built from the local or TE
  layer spec. Its output is vocab-parallel logits ``[B, S, V_padded / TP]`` (sequence-first inside Megatron,
  batch-first here); padded vocabulary rows are not tokens (``vocab_size`` is the real size).
* Text-only pass (docs/pgpo_spec.md section 1): ``text_only.py`` drops the visual tokens and keeps the original
  position ids; this module just runs whatever sequence it is given, with or without pixel values.
* Selected logits: ``forward(..., logit_positions=(batch_index, seq_index))`` runs the output layer on those
  positions only and returns ``[N, V_padded / TP]``. RL needs logits where a response token is predicted, a
  fraction of the sequence (prompt and image tokens are most of it), and the output layer with its vocab-parallel
  reductions is the widest matmul of the model (``V / TP`` columns, 76k for Qwen2.5-VL at TP=2).

State-dict layout (what the converter reads and writes): ``vision_model.*`` = the transformers ``visual.*``
names; ``language_model.*`` = Megatron's GPT names (``embedding.word_embeddings.weight``,
``decoder.layers.{i}.self_attention.linear_qkv.weight``, ..., ``output_layer.weight``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .hf_config import TextDims, fused_kernels, load_hf_config, padded_vocab_size, to_transformer_config
from .specs import get_block_spec


class Qwen2_5_VLMegatronModel(nn.Module):
    """One pipeline stage of Qwen2.5-VL on Megatron-Core.

    Args:
        hf_config: ``transformers.Qwen2_5_VLConfig`` (or anything ``load_hf_config`` reads).
        transformer_config: from ``to_transformer_config`` (carries TP/PP, dtype).
        transformer_impl: ``local`` or ``transformer_engine`` layer spec.
        pre_process / post_process: first / last pipeline stage (embedding + vision / output layer).
        make_vocab_size_divisible_by: Megatron's vocabulary padding unit (times TP).
        device: where the vision tower is created (None: the CPU); Megatron's layers follow the config's
            ``use_cpu_initialization`` (see ``build_model``).
        vision_attention: the vision tower's attention in transformers' terms (``eager``, ``sdpa``,
            ``flash_attention_2``; ``resolve_vision_attention`` picks one for ``auto``).
        vision_recompute: recompute each vision block in the backward pass (transformers' gradient checkpointing,
            non-reentrant): only the blocks' inputs are kept.
    """

    def __init__(self, hf_config, transformer_config, transformer_impl: str = "local", pre_process: bool = True,
                 post_process: bool = True, make_vocab_size_divisible_by: int = 128, vp_stage: Optional[int] = None,
                 device: Optional[torch.device] = None, vision_attention: str = "eager",
                 vision_recompute: bool = False):
        super().__init__()
        from megatron.core.enums import ModelType
        from megatron.core.models.gpt import GPTModel

        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        self.hf_config = load_hf_config(hf_config)
        self.config = transformer_config
        self.dims = TextDims.from_hf(self.hf_config)
        self.pre_process, self.post_process = pre_process, post_process
        self.vocab_size = self.dims.vocab_size
        self.padded_vocab_size = padded_vocab_size(
            self.vocab_size, make_vocab_size_divisible_by, transformer_config.tensor_model_parallel_size
        )
        self.image_token_id = self.hf_config.image_token_id
        self.spatial_merge_size = self.hf_config.vision_config.spatial_merge_size
        self.vision_model = (self._build_vision_tower(device, vision_attention, vision_recompute) if pre_process
                             else None)
        self.language_model = GPTModel(
            config=transformer_config,
            transformer_layer_spec=get_block_spec(transformer_impl, transformer_config, vp_stage),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=getattr(self.hf_config.text_config, "max_position_embeddings", 32768),
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=self.dims.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=int(self.dims.rope_theta),
            # Vision features are written into the full-length embedding before it is split for sequence
            # parallelism, so the embedding must not scatter by itself.
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        self.share_embeddings_and_output_weights = self.dims.tie_word_embeddings
        self._logit_positions = None
        self._sequence_parallel_override = False
        if post_process:
            self.language_model.output_layer.register_forward_pre_hook(self._select_logit_positions,
                                                                       with_kwargs=True)

    def _build_vision_tower(self, device: Optional[torch.device], attention: str, recompute: bool) -> nn.Module:
        import copy
        import contextlib

        from ...compat.torchvision_ops import ensure_torchvision_importable

        ensure_torchvision_importable()
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        vision_config = copy.deepcopy(self.hf_config.vision_config)
        vision_config._attn_implementation = attention
        # device None: the caller's default device (e.g. an enclosing torch.device("meta") of the planner)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config, dtype=self.config.params_dtype)
        if recompute:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return tower

    def _select_logit_positions(self, layer, args, kwargs):
        """Output-layer pre-hook: hidden ``[S(/TP), B, H]`` -> ``[N, 1, H]`` at ``self._logit_positions``.

        Under sequence parallelism the hidden states are first gathered along S and the layer runs as a plain
        column-parallel layer for this call (``forward`` switches it back; Megatron's ``GPTModel`` does the same
        for last-token inference logits). The gather's backward only splits, because the non-sequence-parallel
        layer already all-reduces its input gradient, so training gradients stay exact.
        """
        if self._logit_positions is None:
            return None
        hidden = args[0]
        if layer.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            layer.sequence_parallel = False
            self._sequence_parallel_override = True
        batch_index, seq_index = self._logit_positions
        return (hidden[seq_index, batch_index].unsqueeze(1), *args[1:]), kwargs

    # Megatron's pipeline schedules call this on every stage but the first.
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged vision features ``[num_image_tokens, H]`` for ``pixel_values [num_patches, C*T*P*P]``."""
        out = self.vision_model(pixel_values.to(self.config.params_dtype), grid_thw=image_grid_thw)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def embed(self, input_ids: torch.Tensor, image_mask: Optional[torch.Tensor] = None,
              pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None):
        """Decoder input ``[S, B, H]`` (split along S under sequence parallelism) with image slots filled."""
        from megatron.core import tensor_parallel

        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H], full S
        if pixel_values is not None:
            if image_mask is None:
                raise ValueError("pixel_values given without image_mask (the image placeholder positions)")
            features = self.image_features(pixel_values, image_grid_thw).to(embeddings.dtype)
            slots = image_mask.transpose(0, 1)  # [S, B] like the embeddings
            if int(slots.sum()) != features.shape[0]:
                raise ValueError(f"{int(slots.sum())} image placeholder tokens but {features.shape[0]} image "
                                 "features: the prompt and image_grid_thw disagree")
            # Image features of a batch come in batch order; [S, B] boolean indexing walks S first, so index
            # through the batch-first layout instead.
            embeddings = embeddings.transpose(0, 1).clone()
            embeddings[image_mask] = features
            embeddings = embeddings.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        logit_positions: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Vocab-parallel logits ``[B, S, V_padded / TP]`` on the last stage, hidden states elsewhere.

        Args:
            input_ids: ``[B, S]``.
            position_ids: ``[3, B, S]`` from ``rope_index.get_rope_index`` (on the full sequence).
            attention_mask: None for the causal mask; or ``bool[B, 1, S, S]`` with True = may NOT attend (the
                attention-mask form of the text-only pass; local spec only).
            pixel_values, image_grid_thw, image_mask: the image inputs (first stage only); omit for a text-only
                sequence.
            logit_positions: ``(batch_index [N], seq_index [N])`` int64: the last stage then returns the logits
                at these positions only, ``[N, V_padded / TP]`` in the given order (ignored on other stages).
        """
        decoder_input = self.embed(input_ids, image_mask, pixel_values, image_grid_thw) if self.pre_process else None
        selected = self.post_process and logit_positions is not None
        self._logit_positions = logit_positions if selected else None
        try:
            output = self.language_model(input_ids=input_ids, position_ids=position_ids,
                                         attention_mask=attention_mask, decoder_input=decoder_input)
        finally:
            self._logit_positions = None
            if self._sequence_parallel_override:  # set by the pre-hook for this call only
                self.language_model.output_layer.sequence_parallel = True
                self._sequence_parallel_override = False
        # GPTModel returns [B, S, V/TP] logits when no labels are given ([1, N, V/TP] for selected positions;
        # squeeze, a view in both directions, where indexing [0] would allocate a zero-filled gradient).
        return output.squeeze(0) if selected else output

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Megatron dist-checkpoint view: the language model's own, plus the vision tower as replicated tensors."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sharded = self.language_model.sharded_state_dict(prefix=f"{prefix}language_model.", metadata=metadata)
        if self.vision_model is not None:
            vision_sd = {k: v for k, v in self.vision_model.state_dict(keep_vars=True).items()}
            sharded.update(make_sharded_tensors_for_checkpoint(vision_sd, f"{prefix}vision_model.",
                                                               tensor_parallel_layers_axis_map={}))
        return sharded


VISION_ATTENTION = ("auto", "eager", "sdpa", "flash_attention_2")


def resolve_vision_attention(choice: str, device: Optional[torch.device] = None) -> str:
    """transformers' attention implementation for the vision tower: ``auto`` is ``flash_attention_2`` on CUDA where
    the flash-attn package is installed, else ``sdpa`` (both keep no ``[patches, patches]`` score matrix: at the
    paper's image size eager attention keeps ~10 GiB per image for the backward pass)."""
    if choice not in VISION_ATTENTION:
        raise ValueError(f"vision attention {choice!r}: choose one of {', '.join(VISION_ATTENTION)}")
    import importlib.util

    has_flash = importlib.util.find_spec("flash_attn") is not None
    if choice == "flash_attention_2" and not has_flash:
        raise ValueError("model.vision_attention=flash_attention_2 needs the flash-attn package (pip install "
                         "flash-attn); use sdpa or auto")
    if choice != "auto":
        return choice
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return "flash_attention_2" if on_cuda and has_flash else "sdpa"


def build_model(hf_config, tp: int = 1, pp: int = 1, dtype: str = "fp32", transformer_impl: str = "local",
                sequence_parallel: bool = False, make_vocab_size_divisible_by: int = 128, init_weights: bool = True,
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                device: Optional[torch.device] = None, vision_attention: str = "eager", vision_recompute: bool = False,
                **config_overrides):
    """Build this rank's stage (Megatron parallel state must be initialised at (TP, PP)).

    ``device``: build the stage for this device the way Megatron-LM's ``get_model``
    (``megatron/training/training.py``) does: Megatron's layers allocate their TP shards directly on the current
    device (``use_cpu_initialization=False``: no full-size master copy on the CPU first), the vision tower is
    created under that device, and the module is then moved there as a whole (``model_module.cuda(...)`` in
    ``get_model``: buffers such as rotary tables and any straggler). DDP wraps it afterwards (``MegatronPolicy``).
    None keeps the historical CPU build (``use_cpu_initialization=True``), which parity tests and converters use.
    With a ``device`` Megatron's fused kernels are switched on where they apply (``fused_kernels``; CUDA only).
    ``vision_attention`` / ``vision_recompute``: see ``Qwen2_5_VLMegatronModel`` (``auto`` is resolved here).
    """
    from megatron.core import parallel_state

    hf_config = load_hf_config(hf_config)
    if device is not None:
        config_overrides.setdefault("use_cpu_initialization", False)
        for flag, value in fused_kernels(torch.device(device).type == "cuda", transformer_impl).items():
            config_overrides.setdefault(flag, value)
    config = to_transformer_config(hf_config, tp=tp, pp=pp, dtype=dtype, sequence_parallel=sequence_parallel,
                                   init_weights=init_weights, **config_overrides)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    model = Qwen2_5_VLMegatronModel(hf_config, config, transformer_impl=transformer_impl, pre_process=pre_process,
                                    post_process=post_process, device=device,
                                    make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                    vision_attention=resolve_vision_attention(vision_attention, device),
                                    vision_recompute=vision_recompute)
    return model.to(device) if device is not None else model
