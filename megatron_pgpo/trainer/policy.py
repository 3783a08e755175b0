"""The policy on Megatron-Core: build (model + DDP + distributed optimizer), the no-grad scoring pass, and the
clipped-loss update, all through Megatron's forward/backward schedules so TP, PP and DP work unchanged.

Scoring pass (``score``): every micro-batch carries both variants of its sequences — the image rows and their
text-only rows (visual tokens dropped, positions kept) stacked along the batch — so the last pipeline stage holds
both passes' vocab-parallel logits of the same tokens at once and reduces them to per-token scalars (old
log-prob, text-only log-prob, visual dependency by k3 or the exact KL, entropy). Only scalars leave a micro-batch.

Update (``update``): the loss of each micro-batch is the registry loss with the *global* denominator (valid
tokens, or responses, of the whole mini-batch across DP ranks). Megatron's schedule divides each micro-batch loss
by the number of micro-batches and DDP averages gradients over DP ranks; the loss is multiplied by both factors
beforehand, so the gradient is exactly that of the global token mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, List

import torch

from ..algorithms import POLICY_LOSSES
from ..algorithms.visual_dependency import k3_divergence
from ..parallel.vocab_parallel import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_logprobs
from .batch import ModelBatch, token_logprobs_from_shifted


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


def shifted_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, vocab_size: int, tp_group=None) -> torch.Tensor:
    """``[B, S]`` log-prob of each token given its prefix from vocab-parallel ``logits [B, S, V/TP]``."""
    lp = vocab_parallel_logprobs(logits[:, :-1], input_ids[:, 1:], vocab_size=vocab_size, tp_group=tp_group)
    return token_logprobs_from_shifted(lp)


@dataclass
class ScoreOutput:
    """Per-token scalars of one micro-batch (``[B, S]`` each, aligned to ``input_ids``; valid on response tokens)."""

    indices: List[int]
    logp: torch.Tensor
    logp_text: torch.Tensor
    scores: torch.Tensor
    entropy: torch.Tensor


def score_loss_func(mb: ModelBatch, extras: dict, output: torch.Tensor, *, vocab_size: int, estimator: str,
                    chunk_tokens: int, text_only: bool = True):
    """Last-stage reduction of the stacked (image; text-only) logits ``[2B, S, V/TP]`` to per-token scalars.

    ``text_only=False``: ``output`` holds the image rows only (``[B, S, V/TP]``, no text-only pass: GRPO/DAPO);
    ``logp_text`` and ``scores`` are then zeros.
    """
    batch, seq = mb.input_ids.shape
    img_logits = output[:batch]
    logp = shifted_logprobs(img_logits, mb.input_ids, vocab_size)
    entropy = token_logprobs_from_shifted(vocab_parallel_entropy(img_logits[:, :-1], vocab_size=vocab_size))
    if not text_only:
        mask = mb.response_mask
        zeros = torch.zeros_like(logp)
        out = ScoreOutput(mb.indices, torch.where(mask, logp, zeros).detach(), zeros, zeros.clone(),
                          torch.where(mask, entropy, zeros).detach())
        return output.new_zeros(()), {"score": out}
    txt_logits = output[batch:, : mb.text_only.input_ids.shape[1]]
    logp_text = mb.text_only.restore(shifted_logprobs(txt_logits, mb.text_only.input_ids, vocab_size), seq)
    if estimator == "k3":
        scores = k3_divergence(logp, logp_text)
    else:
        # Position t - 1 predicts token t in both passes; the text-only logits are moved back to original positions.
        txt_full = mb.text_only.restore(txt_logits, seq)
        kl = vocab_parallel_kl(img_logits[:, :-1], txt_full[:, :-1], vocab_size=vocab_size, chunk_tokens=chunk_tokens)
        scores = token_logprobs_from_shifted(kl)
    mask = mb.response_mask
    out = ScoreOutput(mb.indices, *(torch.where(mask, x, torch.zeros_like(x)).detach()
                                    for x in (logp, logp_text, scores, entropy)))
    return output.new_zeros(()), {"score": out}


def update_loss_func(mb: ModelBatch, extras: Dict[str, torch.Tensor], output: torch.Tensor, *, vocab_size: int,
                     loss_name: str, loss_kwargs: dict, scale: float):
    """Last-stage loss of one training micro-batch (see the module docstring for ``scale``)."""
    logp = shifted_logprobs(output, mb.input_ids, vocab_size)
    loss, metrics = POLICY_LOSSES.get(loss_name)(logp, extras["old_logp"], extras["advantages"], mb.response_mask,
                                                 **loss_kwargs)
    reported = {k: v.detach() for k, v in metrics.items()}
    reported["loss"] = loss.detach()
    reported["tokens"] = torch.tensor(float(mb.num_response_tokens))
    return loss * scale, reported


def _forward_step(variant: str, loss_func, data_iterator, model):
    """Megatron ``forward_step_func``: run one micro-batch, return (output, loss closure)."""
    mb, extras = next(data_iterator)
    if variant == "score":  # "score_image" and "update" run the image rows only
        ids, pos, img = _stack_variants(mb)
    else:
        ids, pos, img = mb.input_ids, mb.position_ids, mb.image_mask
    output = model(ids, pos, pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw, image_mask=img)
    return output, partial(loss_func, mb, extras)


class MegatronPolicy:
    """This rank's Qwen2.5-VL stage wrapped in Megatron DDP, with Megatron's (distributed) optimizer.

    Args:
        model: a ``Qwen2_5_VLMegatronModel`` (this rank's stage), weights loaded.
        cfg: the run ``Config`` (optimizer, parallel and algorithm settings are read from it).
    """

    def __init__(self, model, cfg):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg = cfg
        self.tf_config = model.config
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
                                     params_dtype=self.tf_config.params_dtype, use_distributed_optimizer=use_dist_opt)
        self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        self.tf_config.no_sync_func = self.model.no_sync
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.is_last_stage = ps.is_pipeline_last_stage()

    @property
    def module(self):
        return self.model.module

    def _run(self, micro_batches: List[ModelBatch], extras: List[dict], variant: str, loss_func,
             forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        seq = max(mb.input_ids.shape[1] for mb in micro_batches)
        rows = max(mb.input_ids.shape[0] for mb in micro_batches) * (2 if variant == "score" else 1)
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, variant, loss_func),
            data_iterator=iter(list(zip(micro_batches, extras))),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=rows,
            forward_only=forward_only,
        )

    @torch.no_grad()
    def score(self, micro_batches: List[ModelBatch], text_only: bool = True) -> List[ScoreOutput]:
        """Old-policy log-probs, text-only log-probs, visual dependency and entropy (last stage; [] elsewhere).

        ``text_only=False`` skips the text-only pass (what GRPO/DAPO need): ``logp_text`` and ``scores`` are 0.
        """
        self.model.eval()
        pgpo = self.cfg.algorithm.pgpo
        loss_func = partial(score_loss_func, vocab_size=self.vocab_size, estimator=pgpo.estimator,
                            chunk_tokens=pgpo.kl_chunk_tokens, text_only=text_only)
        out = self._run(micro_batches, [{}] * len(micro_batches), "score" if text_only else "score_image", loss_func,
                        True)
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
                           global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)
        scale = float(len(micro_batches) * self.dp_size)
        loss_func = partial(update_loss_func, vocab_size=self.vocab_size, loss_name=algo.loss,
                            loss_kwargs=loss_kwargs, scale=scale)
        reported = self._run(micro_batches, extras, "update", loss_func, False)
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
        stats = {"actor/grad_norm": grad_norm, "actor/skipped_updates": 0.0 if update_ok else 1.0}
        if reported:
            tokens = sum(float(r["tokens"]) for r in reported)
            for key in ("loss", "clip_fraction", "approx_kl"):
                weighted = sum(float(r[key]) * float(r["tokens"]) for r in reported) / max(tokens, 1.0)
                stats[f"actor/{key}"] = float(sum(float(r["loss"]) for r in reported)) if key == "loss" else weighted
        return stats
