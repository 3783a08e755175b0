"""The policy on Megatron-Core: build (model + DDP + distributed optimizer), the no-grad scoring pass, and the
clipped-loss update, all through Megatron's forward/backward schedules so TP, PP and DP work unchanged.

Scoring pass (``score``): every micro-batch carries both variants of its sequences — the image rows and their
text-only rows (visual tokens dropped, positions kept) stacked along the batch — so the last pipeline stage holds
both passes' vocab-parallel logits of the same tokens at once and reduces them to per-token scalars (old
log-prob, text-only log-prob, visual dependency by k3 or the exact KL, entropy). Only scalars leave a micro-batch.

Both passes ask the model for the logits that predict response tokens only (``logit_positions``): prompt, image
and padding positions never reach the output layer or the vocab-parallel reductions. With ``share_prompts``
(``trainer.share_prompts`` on the local layer spec) the responses to one prompt share a row in each variant, so
the prompt and its image are computed once per micro-batch (``model_inputs``, ``packing.py``).

Update (``update``): the loss of each micro-batch is the registry loss with the *global* denominator (valid
tokens, or responses, of the whole mini-batch across DP ranks). Megatron's schedule divides each micro-batch loss
by the number of micro-batches and DDP averages gradients over DP ranks; the loss is multiplied by both factors
beforehand, so the gradient is exactly that of the global token mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch

from .. import faults
from ..algorithms import POLICY_LOSSES
from ..algorithms.visual_dependency import k3_divergence
from ..parallel.vocab_parallel import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_logprobs
from .batch import ModelBatch, predicting_positions, scatter_to_mask, sequence_multiple, to_device
from .packing import images_of, pack_shared_prompts, shared_prompt_mask, sharing_supported, stack_packed
from .schedule import build_scheduler


#: fp16's first dynamic loss scale: torch's GradScaler's 2^16 instead of Megatron's 2^32, which overflows and skips
#: the first ~16 updates while it halves its way down (an RL run has few updates per step to spare).
FP16_INITIAL_LOSS_SCALE = 2.0 ** 16


def _stack_variants(mb: ModelBatch, pad_token_id: int = 0):
    """Image rows then text-only rows, padded to one width: (input_ids [2B, S], position_ids [3, 2B, S],
    image_mask [2B, S])."""
    ids, pos, img = mb.input_ids, mb.position_ids, mb.image_mask
    t = mb.text_only
    width = ids.shape[1]
    pad = width - t.input_ids.shape[1]
    t_ids = torch.nn.functional.pad(t.input_ids, (0, pad), value=pad_token_id)
    t_pos = torch.nn.functional.pad(t.position_ids, (0, pad), mode="replicate") if pad else t.position_ids
    return (torch.cat([ids, t_ids]), torch.cat([pos, t_pos], dim=1),
            torch.cat([img, torch.zeros_like(t_ids, dtype=torch.bool)]))


@dataclass
class ScoreOutput:
    """Per-token scalars of one micro-batch (``[B, S]`` each on the CPU, aligned to ``input_ids``; valid on response
    tokens). They are kept for the whole rollout batch, so they leave the device as soon as they are computed."""

    indices: List[int]
    logp: torch.Tensor
    logp_text: torch.Tensor
    scores: torch.Tensor
    entropy: torch.Tensor


def logit_positions(mb: ModelBatch, text_only: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(batch_index [N'], seq_index [N'])`` of the logits the loss functions read: those predicting each of the
    ``N`` response tokens of the image rows, then (``text_only``) of the text-only rows stacked below them
    (``N' = 2N``; both halves in the same token order, see ``TextOnlyBatch.select``)."""
    rows, cols = predicting_positions(mb.response_mask)
    if not text_only:
        return rows, cols
    t_rows, t_cols = predicting_positions(mb.text_only.select(mb.response_mask))
    return torch.cat([rows, t_rows + mb.input_ids.shape[0]]), torch.cat([cols, t_cols])


def scaled_logits(output: torch.Tensor, temperature: float) -> torch.Tensor:
    """The logits of the policy that samples at ``temperature`` (``rollout.temperature``): every log-prob, entropy
    and KL of the scoring pass and the update is taken of ``logits / T``, as vLLM samples from and as verl's actor
    computes them. ``T = 1`` returns ``output`` itself."""
    return output if temperature == 1.0 else output / temperature


def score_loss_func(mb: ModelBatch, extras: dict, output: torch.Tensor, *, vocab_size: int, estimator: str,
                    chunk_tokens: int, second_view: bool = True, temperature: float = 1.0):
    """Last-stage reduction of the response-token logits to per-token scalars.

    ``output``: vocab-parallel logits ``[2N, V/TP]`` (image rows' ``N`` response tokens, then the same tokens in the
    second view's rows: text-only for PGPO, masked image for PAPO / VPPO); ``second_view=False``: ``[N, V/TP]``,
    the image rows only (GRPO/DAPO), and ``logp_text`` and ``scores`` are then zeros. ``scores`` is the divergence
    of the image view from the second view (k3, or the exact KL). Divided by ``temperature`` first
    (``scaled_logits``).
    """
    output = scaled_logits(output, temperature)
    mask = mb.response_mask
    labels = mb.input_ids[mask].to(output.device)
    n = labels.shape[0]
    if output.shape[0] != (2 * n if second_view else n):
        raise ValueError(f"{output.shape[0]} logit rows for {n} response tokens (second_view={second_view})")
    img = output[:n]
    # Both variants' log-probs in one call: the same all-reduces as the image rows alone, twice the tokens.
    both = vocab_parallel_logprobs(output, torch.cat([labels, labels]) if second_view else labels,
                                   vocab_size=vocab_size)
    logp = both[:n]
    entropy = vocab_parallel_entropy(img, vocab_size=vocab_size)
    if not second_view:
        logp_text = scores = torch.zeros_like(logp)
    else:
        logp_text = both[n:]
        if estimator == "k3":
            scores = k3_divergence(logp, logp_text)
        else:
            scores = vocab_parallel_kl(img, output[n:], vocab_size=vocab_size, chunk_tokens=chunk_tokens)
    out = ScoreOutput(mb.indices, *(scatter_to_mask(x.detach().cpu(), mask)
                                    for x in (logp, logp_text, scores, entropy)))
    return output.new_zeros(()), {"score": out}


def update_loss_func(mb: ModelBatch, extras: Dict[str, torch.Tensor], output: torch.Tensor, *, vocab_size: int,
                     loss_name: str, loss_kwargs: dict, scale: float, temperature: float = 1.0):
    """Last-stage loss of one training micro-batch from the response-token logits ``[N, V/TP]`` (see the module
    docstring for ``scale``), divided by ``temperature`` first. ``extras`` are on the logits' device already
    (``_forward_step``)."""
    output = scaled_logits(output, temperature)
    mask = mb.response_mask.to(output.device)
    logp = scatter_to_mask(vocab_parallel_logprobs(output, mb.input_ids.to(output.device)[mask],
                                                   vocab_size=vocab_size), mask)
    penalties = {key: extras[key] for key in ("ref_logp", "view_logp") if key in extras}
    if loss_kwargs.get("entropy_coef", 0.0) > 0:  # with gradient: the bonus pushes it up
        penalties["entropy"] = scatter_to_mask(vocab_parallel_entropy(output, vocab_size=vocab_size), mask)
    loss, metrics = POLICY_LOSSES.get(loss_name)(logp, extras["old_logp"], extras["advantages"], mask,
                                                 **loss_kwargs, **penalties)
    reported = {k: v.detach() for k, v in metrics.items()}
    reported["loss"] = loss.detach()
    reported["tokens"] = torch.tensor(float(mb.num_response_tokens))
    return loss * scale, reported


def model_inputs(mb: ModelBatch, variant: str, share_prompts: bool = False, width_multiple: int = 1) -> dict:
    """Keyword arguments of the model's forward for one micro-batch.

    ``variant``: ``score`` (image rows and text-only rows, stacked), ``score_masked`` (image rows and the same rows
    with the masked image, ``mb.masked_pixel_values``), ``score_image`` or ``update`` (image rows).
    ``share_prompts``: each prompt once per micro-batch (``packing.py``). The logits come back in
    ``logit_positions`` order either way: the image rows' response tokens, then (``score`` / ``score_masked``) the
    same tokens in the second view's rows.
    """
    if variant == "score_masked":
        return _masked_view_inputs(mb, share_prompts, width_multiple)
    text_only = variant == "score"
    if not share_prompts:
        ids, pos, img = _stack_variants(mb) if text_only else (mb.input_ids, mb.position_ids, mb.image_mask)
        return dict(input_ids=ids, position_ids=pos, pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw,
                    image_mask=img, logit_positions=logit_positions(mb, text_only))
    image = pack_shared_prompts(mb.input_ids, mb.position_ids, mb.image_mask, mb.lengths, mb.prompt_lengths,
                                mb.prompt_keys, width_multiple)
    rows, cols = image.positions_of(*predicting_positions(mb.response_mask))
    pixel_values, grid = images_of(image.members, mb.image_counts, mb.pixel_values, mb.image_grid_thw)
    if not text_only:
        return dict(input_ids=image.input_ids, position_ids=image.position_ids,
                    attention_mask=shared_prompt_mask(image.segment), pixel_values=pixel_values,
                    image_grid_thw=grid, image_mask=image.image_mask, logit_positions=(rows, cols))
    t = mb.text_only
    n_visual = mb.image_mask.sum(dim=1).tolist()
    text = pack_shared_prompts(t.input_ids, t.position_ids, torch.zeros_like(t.valid), t.valid.sum(dim=1).tolist(),
                               [n - v for n, v in zip(mb.prompt_lengths, n_visual)], mb.prompt_keys)
    t_rows, t_cols = text.positions_of(*predicting_positions(t.select(mb.response_mask)))
    ids, pos, img, mask = stack_packed(image, text, width_multiple)
    return dict(input_ids=ids, position_ids=pos, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid,
                image_mask=img, logit_positions=(torch.cat([rows, t_rows + image.input_ids.shape[0]]),
                                                 torch.cat([cols, t_cols])))


def _masked_view_inputs(mb: ModelBatch, share_prompts: bool, width_multiple: int) -> dict:
    """``model_inputs`` of ``score_masked``: the image rows twice, the second copy seeing ``masked_pixel_values``
    (same tokens, positions and image slots; the vision tower encodes both images)."""
    if mb.masked_pixel_values is None:
        raise ValueError("score_masked needs masked_pixel_values (the rollouts make them for a masked-image view)")
    rows, cols = predicting_positions(mb.response_mask)
    if not share_prompts:
        return dict(input_ids=torch.cat([mb.input_ids, mb.input_ids]),
                    position_ids=torch.cat([mb.position_ids, mb.position_ids], dim=1),
                    pixel_values=torch.cat([mb.pixel_values, mb.masked_pixel_values]),
                    image_grid_thw=torch.cat([mb.image_grid_thw, mb.image_grid_thw]),
                    image_mask=torch.cat([mb.image_mask, mb.image_mask]),
                    logit_positions=(torch.cat([rows, rows + mb.input_ids.shape[0]]), torch.cat([cols, cols])))
    image = pack_shared_prompts(mb.input_ids, mb.position_ids, mb.image_mask, mb.lengths, mb.prompt_lengths,
                                mb.prompt_keys, width_multiple)
    rows, cols = image.positions_of(rows, cols)
    pixel_values, grid = images_of(image.members, mb.image_counts, mb.pixel_values, mb.image_grid_thw)
    masked, _ = images_of(image.members, mb.image_counts, mb.masked_pixel_values, mb.image_grid_thw)
    ids, pos, img, mask = stack_packed(image, image, width_multiple)
    return dict(input_ids=ids, position_ids=pos, attention_mask=mask, pixel_values=torch.cat([pixel_values, masked]),
                image_grid_thw=torch.cat([grid, grid]), image_mask=img,
                logit_positions=(torch.cat([rows, rows + image.input_ids.shape[0]]), torch.cat([cols, cols])))


def _forward_step(variant: str, loss_func, share_prompts: bool, width_multiple: int, device: torch.device,
                  data_iterator, model):
    """Megatron ``forward_step_func``: run one micro-batch, return (output, loss closure).

    The micro-batch is packed on the CPU and its model inputs and loss extras are moved to ``device`` here, one
    micro-batch at a time (the rest of the rollout batch stays on the CPU)."""
    mb, extras = next(data_iterator)
    inputs = to_device(model_inputs(mb, variant, share_prompts, width_multiple), device)
    output = model(inputs.pop("input_ids"), inputs.pop("position_ids"), **inputs)
    return output, partial(loss_func, mb, to_device(extras, device))


class MegatronPolicy:
    """This rank's Qwen2.5-VL stage wrapped in Megatron DDP, with Megatron's (distributed) optimizer.

    Args:
        model: a ``Qwen2_5_VLMegatronModel`` (this rank's stage), weights loaded.
        cfg: the run ``Config`` (optimizer, parallel and algorithm settings are read from it).
    """

    def __init__(self, model, cfg, reference=None):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg = cfg
        self.tf_config = model.config
        # The frozen reference of the KL penalty (algorithm.kl.coef > 0): this rank's stage of the initial weights,
        # sharded like the policy; forward only, never wrapped or optimised.
        self.reference = reference
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
        self.vocab_size = model.vocab_size
        if not cfg.model.train_vision_tower and model.vision_model is not None:
            model.vision_model.requires_grad_(False)
        use_dist_opt = cfg.parallel.use_distributed_optimizer
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=use_dist_opt)
        self.model = DistributedDataParallel(config=self.tf_config, ddp_config=ddp_config, module=model)
        t = cfg.trainer
        opt_config = OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                                     adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                                     clip_grad=t.grad_clip, bf16=self.tf_config.bf16, fp16=self.tf_config.fp16,
                                     params_dtype=self.tf_config.params_dtype, use_distributed_optimizer=use_dist_opt,
                                     initial_loss_scale=FP16_INITIAL_LOSS_SCALE)
        self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        self.scheduler = build_scheduler(self.optimizer, t)  # trainer/schedule.py: set per training step
        self.tf_config.no_sync_func = self.model.no_sync
        # The schedule multiplies each micro-batch loss by the optimizer's loss scale before backward (fp16: the
        # dynamic grad scaler's, which the optimizer divides out again; bf16 / fp32: 1), as Megatron-LM's
        # training.py sets it. Without it fp16 gradients were divided by 2^32 without ever being multiplied.
        self.tf_config.grad_scale_func = self.optimizer.scale_loss
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.share_prompts = cfg.trainer.share_prompts and sharing_supported(cfg.model.transformer_impl)
        self.width_multiple = sequence_multiple(ps.get_tensor_model_parallel_world_size(),
                                                self.tf_config.sequence_parallel, bool(self.tf_config.fp8))
        self.device = next(model.parameters()).device
        self.skipped_in_row = 0  # updates skipped in a row for a non-finite loss or gradient
        # the longest such run since the step began (with several updates per step, a later finite update of
        # the same step resets skipped_in_row; the limit applies to the run, not to where the step ends)
        self.peak_skipped_in_row = 0

    def start_step(self) -> None:
        """A training step begins: ``peak_skipped_in_row`` starts from the run of skipped updates carried into it."""
        self.peak_skipped_in_row = self.skipped_in_row

    @property
    def module(self):
        return self.model.module

    def _run(self, micro_batches: List[ModelBatch], extras: List[dict], variant: str, loss_func,
             forward_only: bool, model=None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        # Shapes for the pipeline's first receive buffers; with PP > 1 the config's variable_seq_lengths makes the
        # stages exchange each micro-batch's actual shape (packed rows differ in width and count).
        seq = max(mb.input_ids.shape[1] for mb in micro_batches)
        rows = max(mb.input_ids.shape[0] for mb in micro_batches) * (2 if variant in ("score", "score_masked") else 1)
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, variant, loss_func, self.share_prompts, self.width_multiple,
                                      self.device),
            data_iterator=iter(list(zip(micro_batches, extras))),
            model=[self.model if model is None else model],
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=rows,
            forward_only=forward_only,
        )

    @torch.no_grad()
    def score(self, micro_batches: List[ModelBatch], view: Optional[str] = "text_only", reference: bool = False
              ) -> List[ScoreOutput]:
        """Old-policy log-probs, the second view's log-probs (``logp_text``), their divergence (``scores``) and
        entropy (last stage; [] elsewhere).

        ``view``: ``text_only`` (PGPO), ``masked_image`` (PAPO / VPPO) or None (image rows only: GRPO/DAPO;
        ``logp_text`` and ``scores`` are 0). ``reference``: the frozen reference model's log-probs instead (image
        rows only, whatever ``view``).
        """
        if reference and self.reference is None:
            raise ValueError("no reference model: build the policy with reference= (algorithm.kl.coef > 0)")
        if reference:
            view = None
        variants = {None: "score_image", "text_only": "score", "masked_image": "score_masked"}
        if view not in variants:
            raise ValueError(f"scoring view {view!r}: valid: text_only, masked_image (or None)")
        self.model.eval()
        pgpo = self.cfg.algorithm.pgpo
        loss_func = partial(score_loss_func, vocab_size=self.vocab_size, estimator=pgpo.estimator,
                            chunk_tokens=pgpo.kl_chunk_tokens, second_view=view is not None,
                            temperature=self.cfg.rollout.temperature)
        out = self._run(micro_batches, [{}] * len(micro_batches), variants[view], loss_func,
                        True, model=self.reference if reference else None)
        return [o["score"] for o in out] if self.is_last_stage else []

    def update(self, micro_batches: List[ModelBatch], extras: List[dict], global_num_tokens: float,
               global_num_seqs: float) -> Dict[str, float]:
        """One optimizer step on the micro-batches of this rank's share of a global mini-batch.

        ``extras[i]`` holds ``old_logp`` and ``advantages`` (``[B, S]``) of micro-batch ``i``; the global counts are
        the valid response tokens / responses of the whole mini-batch over all DP ranks.
        """
        algo = self.cfg.algorithm
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_kwargs = dict(clip_low=algo.clip_low, clip_high=algo.clip_high, aggregation=algo.aggregation,
                           global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
                           kl_coef=algo.kl.coef, kl_estimator=algo.kl.estimator, entropy_coef=algo.entropy_coef,
                           entropy_penalty=algo.entropy_penalty)
        if algo.loss == "papo":
            loss_kwargs.update(perception_coef=algo.papo.coef, perception_clamp=algo.papo.clamp)
        scale = float(len(micro_batches) * self.dp_size)
        loss_func = partial(update_loss_func, vocab_size=self.vocab_size, loss_name=algo.loss,
                            loss_kwargs=loss_kwargs, scale=scale, temperature=self.cfg.rollout.temperature)
        reported = self._run(micro_batches, extras, "update", loss_func, False)
        if faults.fires("nan_grad"):  # fault injection (faults.py): as after an overflow in the backward pass
            for param in self.model.parameters():
                if getattr(param, "main_grad", None) is not None:
                    param.main_grad.fill_(float("nan"))
        # Megatron's step() clips with the global norm before it looks at it: a non-finite gradient would make the
        # clip coefficient, then every weight, NaN. So: prepare, check the norm, and only then clip and step.
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        update_ok = not found_inf and math.isfinite(grad_norm)
        if update_ok:
            if self.cfg.trainer.grad_clip > 0:
                self.optimizer.clip_grad_norm(self.cfg.trainer.grad_clip)
            update_ok = bool(self.optimizer.step_with_ready_grads())
        self.optimizer.zero_grad()
        self.skipped_in_row = 0 if update_ok else self.skipped_in_row + 1  # the same on every rank (global norm)
        self.peak_skipped_in_row = max(self.peak_skipped_in_row, self.skipped_in_row)
        stats = {"actor/grad_norm": grad_norm, "actor/skipped_updates": 0.0 if update_ok else 1.0}
        if reported:
            tokens = sum(float(r["tokens"]) for r in reported)
            for key in ("loss", "clip_fraction", "approx_kl", "kl_ref", "perception_kl"):
                if key not in reported[0]:
                    continue
                weighted = sum(float(r[key]) * float(r["tokens"]) for r in reported) / max(tokens, 1.0)
                stats[f"actor/{key}"] = float(sum(float(r["loss"]) for r in reported)) if key == "loss" else weighted
        return stats
