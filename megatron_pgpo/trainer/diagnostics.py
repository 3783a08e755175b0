"""What a training step reports about itself beyond the learning curves: plumbing invariants measured on the real
batch (``check/*`` metrics) and sample responses with their per-token visual dependency and PGPO weights (the
files ``megatron-pgpo visualize`` draws).

Both are collective: every rank of the run calls them with its own view of the step (the per-token scalars live
on the last pipeline stage, each data-parallel rank holding its share of the batch).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from ..parallel import collectives
from .batch import Sample


def response_mask(sample: Sample, width: int) -> torch.Tensor:
    """``bool[width]``: True on the response tokens of ``sample`` in its padded row."""
    mask = torch.zeros(width, dtype=torch.bool)
    mask[len(sample.prompt_ids): sample.length] = sample.trainable
    return mask


def plumbing_checks(samples: List[Sample], scored, seq_adv: torch.Tensor, groups: torch.Tensor,
                    token_adv: Dict[int, torch.Tensor]) -> Dict[str, float]:
    """Cheap invariants of every step, logged as ``check/*`` (the integration tests assert on them):

    - ``check/group_adv_sum_max``: max over groups of ``|sum of the group's sequence advantages|`` (0: each group is
      centred before any reshaping);
    - ``check/token_adv_sum_err``: max over responses of ``|sum_t A_t - L * A| / |A|``, i.e. how far the PGPO
      weights are from summing to the response length ``L`` (responses with ``A != 0``);
    - ``check/rollout_logp_diff_max`` / ``_mean``: ``|old log-prob of the training pass - the rollout engine's
      log-prob|`` over response tokens (a jump: engine and trainer disagree, e.g. stale weights or preprocessing).

    Args:
        samples: the step's whole batch (every rank holds all of it); ``seq_adv [N]`` / ``groups [N]`` alike.
        scored: this rank's ``ScoreOutput`` list (empty off the last stage); ``token_adv``: ``{index: [S]}`` of them.
    """
    group_sums = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add_(0, groups, seq_adv.double())
    maxima = torch.zeros(2, dtype=torch.float64)  # token-advantage sum error, |log-prob difference|
    diff_sum = torch.zeros(2, dtype=torch.float64)  # sum of |log-prob difference|, tokens
    for so in scored:
        for row, i in enumerate(so.indices):
            s = samples[i]
            n, start, a = s.trained_tokens, len(s.prompt_ids), float(seq_adv[i])
            if abs(a) > 1e-6:
                maxima[0] = max(float(maxima[0]), abs(float(token_adv[i].double().sum()) - n * a) / abs(a))
            if n and s.rollout_logprobs is not None and len(s.rollout_logprobs) == n:
                engine = torch.tensor(s.rollout_logprobs, dtype=torch.float64)
                d = (so.logp[row, start: start + n].double() - engine).abs()
                maxima[1] = max(float(maxima[1]), float(d.max()))
                diff_sum += torch.tensor([float(d.sum()), float(n)], dtype=torch.float64)
    collectives.all_reduce(maxima, dist.ReduceOp.MAX)
    collectives.all_reduce(diff_sum)
    return {"check/group_adv_sum_max": float(group_sums.abs().max()), "check/token_adv_sum_err": float(maxima[0]),
            "check/rollout_logp_diff_max": float(maxima[1]),
            "check/rollout_logp_diff_mean": float(diff_sum[0]) / max(float(diff_sum[1]), 1.0)}


def log_samples(trainer, samples: List[Sample], scored, seq_adv: List[float], *, step: int,
                uses_scores: bool) -> None:
    """The first ``logging.samples_per_step`` responses of the step with their tokens, S and PGPO weights (all 1
    when the shaper does not use S), gathered from the last stage and written by rank 0 to
    ``RUN_DIR/samples/step_XXXXXXXX.jsonl`` (see ``samples_log``)."""
    from megatron.core import parallel_state as ps

    cfg = trainer.cfg
    pgpo, limit = cfg.algorithm.pgpo, cfg.logging.samples_per_step
    rows = []
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        from ..algorithms.pgpo import pgpo_token_weights

        for so in scored:
            mask = torch.stack([response_mask(samples[i], so.logp.shape[1]) for i in so.indices])
            weights = (pgpo_token_weights(so.scores, mask, pgpo.tau, pgpo.beta, pgpo.eps, pgpo.s_max) if uses_scores
                       else mask.float())
            for row, i in enumerate(so.indices):
                if i < limit:
                    rows.append((i, so.scores[row][mask[row]].tolist(), weights[row][mask[row]].tolist()))
    gathered = collectives.all_gather_object(rows)
    if dist.get_rank() != 0:
        return
    from .samples_log import write_sample_records

    tokenizer = trainer.tokenizer()
    records = []
    for i, scores, weights in sorted((r for part in gathered for r in part), key=lambda r: r[0]):
        s = samples[i]
        records.append({
            "step": step, "prompt_index": s.group, "group_advantage": seq_adv[i], "reward": s.reward,
            "accuracy": s.extra["accuracy"], "format": s.extra["format"], "question": s.extra.get("question"),
            "answer": s.answer, "tokens": [tokenizer.decode([t]) for t in s.response_ids],
            "token_ids": list(s.response_ids), "scores": scores, "weights": weights})
    write_sample_records(str(trainer.run_dir), step, records)
