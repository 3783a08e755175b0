"""The distributed PGPO / DAPO / GRPO training loop (one instance per rank, all ranks in lockstep).

A step:
 1. prompts: the next ``data.rollout_batch_size`` prompts of the deterministic stream; DP replica ``d`` takes
    prompts ``d, d + DP, ...``;
 2. rollouts (``rollouts.Rollouts``): each replica's engine owner samples ``rollout.n`` responses per prompt and
    scores them (reward); everything is all-gathered, so every rank holds the whole rollout batch (for group
    statistics);
 3. DAPO dynamic sampling (optional, also in ``Rollouts``): groups whose rewards are all equal are dropped and
    more prompts sampled, at most ``algorithm.dapo.max_sampling_rounds`` rounds;
 4. scoring pass (no grad, every mini-batch before any update): old log-probs, text-only log-probs, visual
    dependency S and entropy, reduced to per-token scalars on the last pipeline stage;
 5. advantages: group-normalised rewards for the whole batch, reshaped per token by the registered shaper
    (``grpo`` broadcast or ``pgpo`` weights) on the last stage;
 6. updates: ``ppo_epochs`` passes over mini-batches of ``trainer.global_batch_size`` prompts, each one optimizer
    step with the exact global token-mean loss;
 7. weight sync into the engines; metrics; periodic evaluation and checkpoints (and on a preemption signal).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import faults
from ..algorithms import ADVANTAGE_SHAPERS, POLICY_LOSSES, group_normalized_advantages, second_view
from ..algorithms.dapo import overlong_soft_penalty
from ..config import Config, to_dict
from ..parallel import collectives
from .batch import (Sample, collate, length_bucketed_micro_batches, prompt_grouped_micro_batches,
                    sequence_multiple)
from .diagnostics import log_samples, plumbing_checks, response_mask
from .offload import offloaded
from .prompts import PromptStream, split_round_robin
from .rollouts import Rollouts
from .schedule import current_lr, set_step

log = logging.getLogger(__name__)


def eval_benchmarks(cfg: Config, val_dataset) -> Dict[str, list]:
    """``{name: [Problem]}`` for ``eval.benchmarks`` (read on every rank: images stay compressed until sampled), or
    the held-out set as ``val``; ``eval.limit`` problems each at most."""
    from ..evaluation.benchmarks import load_benchmark, problems_from_examples

    e = cfg.eval
    if e.benchmarks:
        out = {}
        for name in e.benchmarks:
            problems, skipped = load_benchmark(name, e.data_dir, limit=e.limit, max_pixels=cfg.data.max_pixels,
                                               min_pixels=cfg.data.min_pixels)
            if skipped.total:
                log.warning("eval %s: skipped %d rows: %s", name, skipped.total, dict(skipped.counts))
            out[name] = problems
        return out
    if val_dataset is None:
        return {}
    count = len(val_dataset) if e.limit is None else min(e.limit, len(val_dataset))
    return {"val": problems_from_examples([val_dataset[i] for i in range(count)])}


def real_outputs(micro: List[list], outputs: List[list]) -> list:
    """The scoring pass's outputs (``outputs[k]``: one per micro-batch of ``micro[k]`` on the last stage, none
    elsewhere) without those of padding micro-batches, flattened."""
    return [so for mbs, part in zip(micro, outputs) for mb, so in zip(mbs, part) if not mb.padding]


class Trainer:
    """Everything one rank needs; ``run()`` trains to ``trainer.total_steps``.

    Args:
        cfg: the run config. ``model.hf_path`` must name a complete HF checkpoint dir (weights, tokenizer,
            preprocessor config); the demo creates one for the tiny model.
        dataset: train examples (indexable, ``len``); ``val_dataset``: held-out examples.
        device: this rank's device (``launch.init_rank`` returns it); None: the current one
            (``parallel.device.current_device``).
    """

    def __init__(self, cfg: Config, dataset, val_dataset=None, device: Optional[torch.device] = None):
        from megatron.core import parallel_state as ps

        from ..models.qwen2_5_vl.loading import load_hf_into_model
        from ..models.qwen2_5_vl.model import build_model
        from ..parallel.device import current_device
        from .policy import MegatronPolicy

        self.cfg, self.dataset, self.val_dataset = cfg, dataset, val_dataset
        self.eval_benchmarks = eval_benchmarks(cfg, val_dataset)
        self.run_dir = Path(cfg.trainer.run_dir)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.tp, self.pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.is_last_stage = ps.is_pipeline_last_stage()
        hf_path = cfg.model.hf_path
        self.device = device if device is not None else current_device()
        # Built on its device without random init: every parameter is loaded from the checkpoint next (the loader
        # refuses a model it leaves partly unloaded), then DDP wraps it (Megatron-LM's get_model order).
        def build_and_load():
            model = build_model(hf_path, tp=self.tp, pp=self.pp, dtype=cfg.model.dtype,
                                transformer_impl=cfg.model.transformer_impl,
                                sequence_parallel=cfg.parallel.sequence_parallel,
                                make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
                                recompute=cfg.model.recompute, fp8=cfg.model.fp8, fp8_recipe=cfg.model.fp8_recipe,
                                init_weights=False, device=self.device,
                                first_stage_layers=cfg.parallel.first_stage_layers,
                                last_stage_layers=cfg.parallel.last_stage_layers,
                                vision_attention=cfg.model.vision_attention,
                                vision_recompute=cfg.model.vision_recompute)
            load_hf_into_model(model, hf_path, ps.get_tensor_model_parallel_rank(), self.tp,
                               ps.get_pipeline_model_parallel_rank(), self.pp, cfg.model.transformer_impl)
            return model

        model = build_and_load()
        # The KL penalty's frozen reference: the same stage of the initial weights (not checkpointed: a resumed run
        # rebuilds it from model.hf_path).
        reference = build_and_load() if cfg.algorithm.kl.coef > 0 else None
        self.policy = MegatronPolicy(model, cfg, reference=reference)
        self.image_token_id = model.image_token_id
        self.merge = model.spatial_merge_size
        self.stream = PromptStream(len(dataset), cfg.trainer.seed, cfg.data.shuffle)
        self.step = 0
        self.rollouts = Rollouts(cfg, str(self.run_dir), self.image_token_id, self.dp, self.dp_rank, self.device)
        self.metrics = None
        self.preempted = False  # run() stopped early on a preemption signal (after saving)
        self._saved_step: Optional[int] = None  # step of the newest checkpoint this run wrote or resumed from

    # ------------------------------------------------------------------------------------------------ training
    def _mini_batches(self, samples: List[Sample]) -> List[List[int]]:
        """Sample indices of each mini-batch: ``trainer.global_batch_size`` whole groups each, in group order."""
        groups: Dict[int, List[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.group, []).append(i)
        order = list(groups.values())
        size = self.cfg.trainer.global_batch_size
        return [[i for g in order[k: k + size] for i in g] for k in range(0, len(order), size)]

    def _micro_batches(self, samples: List[Sample], indices: List[int]):
        """This DP rank's share of ``indices`` in micro-batches: with the responses to one prompt together when the
        policy packs shared prompts, else length-bucketed."""
        mine = split_round_robin(indices, self.dp, self.dp_rank)
        local = [samples[i] for i in mine]
        multiple = sequence_multiple(self.tp, self.cfg.parallel.sequence_parallel, self.cfg.model.fp8 is not None)
        if not local and indices:
            # Fewer responses than DP ranks in this mini-batch (e.g. DAPO left one small group at the end): this rank
            # still runs one micro-batch, one masked-out row (no token trained on), so it takes part in the
            # collectives of the others' passes (DDP's gradient all-reduce, the all-reduces of the statistics).
            mb = collate([dataclasses.replace(samples[indices[0]], trainable=False)], [0], self.image_token_id,
                         self.merge, pad_to_multiple_of=multiple)
            mb.padding = True
            return [mb]
        split = prompt_grouped_micro_batches if self.policy.share_prompts else length_bucketed_micro_batches
        return [collate(samples, [mine[j] for j in part], self.image_token_id, self.merge, pad_to_multiple_of=multiple)
                for part in split(local, self.cfg.trainer.micro_batch_size)]

    def _advantages(self, samples: List[Sample], scored) -> Tuple[Dict[int, torch.Tensor], Dict[str, float],
                                                                   torch.Tensor]:
        """Per-sample token advantages ``{index: [S_i]}`` (last stage), visual-dependency statistics with the
        ``check/*`` plumbing numbers (see ``diagnostics.plumbing_checks``), and the sequence advantages ``[N]``."""
        algo = self.cfg.algorithm
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        if algo.dapo.overlong_buffer > 0:
            lengths = torch.tensor([s.trained_tokens for s in samples])
            rewards = rewards + overlong_soft_penalty(lengths, self.cfg.rollout.max_new_tokens,
                                                      algo.dapo.overlong_buffer, algo.dapo.overlong_penalty_factor)
        groups = torch.tensor([s.group for s in samples])
        seq_adv = group_normalized_advantages(rewards, groups, eps=algo.adv_eps, scale_by_std=algo.scale_by_std)
        shaper = ADVANTAGE_SHAPERS.get(algo.advantage)
        out: Dict[int, torch.Tensor] = {}
        sums = torch.zeros(5, dtype=torch.float64)  # tokens, S, log1p S, I >= tau, sanitised
        from ..algorithms.pgpo import normalized_importance
        from ..algorithms.visual_dependency import sanitize_scores

        params = dict(tau=algo.pgpo.tau, beta=algo.pgpo.beta, eps=algo.pgpo.eps, s_max=algo.pgpo.s_max,
                      vppo_top_fraction=algo.vppo.top_fraction, vppo_beta_min=algo.vppo.beta_min,
                      vppo_score_clamp=algo.vppo.score_clamp)
        masks = [torch.stack([response_mask(samples[i], so.logp.shape[1]) for i in so.indices]) for so in scored]
        if getattr(shaper, "whole_batch", False) and scored:  # once over the rank's share, padded to one width
            width = max(so.logp.shape[1] for so in scored)
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
            indices = [i for so in scored for i in so.indices]
            whole = shaper(seq_adv[indices], torch.cat([pad(m) for m in masks]),
                           scores=torch.cat([pad(so.scores) for so in scored]), **params)
            parts = iter(whole.split([len(so.indices) for so in scored]))
            shaped = [next(parts)[:, :so.logp.shape[1]] for so in scored]
        else:
            shaped = [shaper(seq_adv[so.indices], mask, scores=so.scores, **params) for so, mask in zip(scored, masks)]
        for so, mask, adv in zip(scored, masks, shaped):
            clean, n_bad = sanitize_scores(so.scores, mask, algo.pgpo.s_max)
            importance = normalized_importance(so.scores, mask, algo.pgpo.eps, algo.pgpo.s_max)
            sums += torch.tensor([float(mask.sum()), float(clean[mask].sum()), float(torch.log1p(clean[mask]).sum()),
                                  float((importance[mask] >= algo.pgpo.tau).sum()), float(n_bad)], dtype=torch.float64)
            for row, i in enumerate(so.indices):
                out[i] = adv[row]
        collectives.all_reduce(sums)  # only last-stage ranks contribute (each TP rank the same numbers)
        sums /= self.tp
        tokens = max(float(sums[0]), 1.0)
        stats = {"vd/score_mean": float(sums[1]) / tokens, "vd/log1p_mean": float(sums[2]) / tokens,
                 "vd/frac_above_tau": float(sums[3]) / tokens, "vd/sanitized": float(sums[4])}
        stats.update(plumbing_checks(samples, scored, seq_adv, groups, out))
        return out, stats, seq_adv

    def tokenizer(self):
        """The checkpoint's tokenizer (loaded on first use: only rank 0 decodes sample files)."""
        if getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.hf_path)
        return self._tokenizer

    def _train_on(self, samples: List[Sample]) -> Dict[str, float]:
        cfg = self.cfg
        minis = self._mini_batches(samples)
        micro = [self._micro_batches(samples, m) for m in minis]
        t0 = time.perf_counter()
        shaper, loss_fn = ADVANTAGE_SHAPERS.get(cfg.algorithm.advantage), POLICY_LOSSES.get(cfg.algorithm.loss)
        view = second_view(shaper, loss_fn)
        if view is None and cfg.algorithm.monitor_visual_dependency:
            view = "text_only"
        scored = [self.policy.score(mbs, view=view) for mbs in micro]
        t_score = time.perf_counter() - t0
        flat = real_outputs(micro, scored)
        token_adv, stats, seq_adv = self._advantages(samples, flat)
        every = cfg.logging.samples_every
        if every and (self.step + 1) % every == 0:
            log_samples(self, samples, flat, seq_adv.tolist(), step=self.step + 1,
                        uses_scores=getattr(shaper, "second_view", None) is not None)
        old_logp = {i: so.logp[row] for so in flat for row, i in enumerate(so.indices)}
        view_logp = ({i: so.logp_text[row] for so in flat for row, i in enumerate(so.indices)}
                     if getattr(loss_fn, "second_view", None) else {})
        ref_logp = {}
        if cfg.algorithm.kl.coef > 0:  # the frozen reference's log-probs of the same tokens (image rows)
            reference = real_outputs(micro, [self.policy.score(mbs, reference=True) for mbs in micro])
            ref_logp = {i: so.logp[row] for so in reference for row, i in enumerate(so.indices)}
        entropy_sum = sum(float(so.entropy.sum()) for so in flat)
        t1 = time.perf_counter()
        updates: List[Dict[str, float]] = []
        for _ in range(cfg.trainer.ppo_epochs):
            for mini, mbs in zip(minis, micro):
                usable = [i for i in mini if samples[i].trainable
                          and not (cfg.algorithm.dapo.overlong_filter and samples[i].truncated)]
                extras = []
                for mb in mbs:
                    if mb.padding:  # a masked-out row (see _micro_batches): every input the loss reads, all 0
                        zeros = torch.zeros(mb.input_ids.shape)
                        keys = (["old_logp", "advantages"] + ["ref_logp"] * bool(ref_logp)
                                + ["view_logp"] * bool(view_logp))
                        extras.append(dict.fromkeys(keys, zeros) if self.is_last_stage else {})
                        continue
                    if cfg.algorithm.dapo.overlong_filter:
                        for row, i in enumerate(mb.indices):
                            if samples[i].truncated:
                                mb.response_mask[row] = False
                    width = mb.input_ids.shape[1]
                    if self.is_last_stage:
                        extras.append({"old_logp": torch.stack([old_logp[i][:width] for i in mb.indices]),
                                       "advantages": torch.stack([token_adv[i][:width] for i in mb.indices])})
                        if ref_logp:
                            extras[-1]["ref_logp"] = torch.stack([ref_logp[i][:width] for i in mb.indices])
                        if view_logp:  # the loss's own second view (PAPO: the masked image, pre-update)
                            extras[-1]["view_logp"] = torch.stack([view_logp[i][:width] for i in mb.indices])
                    else:
                        extras.append({})
                n_tokens = float(sum(samples[i].trained_tokens for i in usable))
                updates.append(self.policy.update(mbs, extras, max(n_tokens, 1.0), float(max(len(usable), 1))))
        t_update = time.perf_counter() - t1
        if view is None:  # no second view ran: there is no visual dependency to report
            stats = {k: v for k, v in stats.items() if not k.startswith("vd/")}
        n_tok = max(sum(s.trained_tokens for s in samples), 1)
        summary = torch.tensor([entropy_sum] + [sum(u.get(k, 0.0) for u in updates) for k in
                                                ("actor/loss", "actor/clip_fraction", "actor/approx_kl",
                                                 "actor/kl_ref", "actor/perception_kl")],
                               dtype=torch.float64)
        collectives.all_reduce(summary)  # last-stage ranks hold these; DP ranks each hold their share
        n_up = max(len(updates), 1)
        last_ranks = self.world // self.pp  # ranks on the last stage (TP ranks report the same numbers)
        stats.update({
            "actor/entropy": float(summary[0]) / n_tok / self.tp,
            "actor/loss": float(summary[1]) / n_up / self.tp,
            "actor/clip_fraction": float(summary[2]) / n_up / last_ranks,
            "actor/approx_kl": float(summary[3]) / n_up / last_ranks,
            **({"actor/kl_ref": float(summary[4]) / n_up / last_ranks} if cfg.algorithm.kl.coef > 0 else {}),
            **({"actor/perception_kl": float(summary[5]) / n_up / last_ranks} if view_logp else {}),
            "actor/grad_norm": max(u["actor/grad_norm"] for u in updates) if updates else 0.0,
            "actor/skipped_updates": sum(u["actor/skipped_updates"] for u in updates),
            "actor/lr": current_lr(self.policy.optimizer),
            "time/old_logprob": t_score, "time/update": t_update,
            "perf/tokens_per_s": n_tok * cfg.trainer.ppo_epochs / max(t_score + t_update, 1e-9),
        })
        return stats

    # ------------------------------------------------------------------------------------------------ sync, eval
    def _sync(self) -> float:
        return self.rollouts.sync(self.policy.module, self.cfg.model.transformer_impl)

    def _rebuild_engines(self) -> float:
        """Shut the (failed) engines down, then sync: that starts them again with the current weights. Returns the
        sync time."""
        self.rollouts.discard_engines()
        return self._sync()

    def evaluate(self) -> Dict[str, float]:
        """The ``eval`` section's benchmarks (or the held-out set): ``eval/<name>/avg@k`` ... and ``eval/accuracy``,
        on every rank (empty without anything to evaluate). The engine generates, so the training state waits in
        host memory meanwhile, as during rollouts (``trainer.offload_during_rollout``)."""
        with offloaded(self.policy.model, self.policy.optimizer, self.cfg.trainer.offload_during_rollout):
            return self.rollouts.evaluate(self.eval_benchmarks)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        from .checkpoint import save_training_state
        from .run_dir import atomic_save

        state = {"step": self.step, "stream_position": self.stream.position}
        path = atomic_save(str(self.run_dir), self.step, lambda d: save_training_state(self.policy, d, state),
                           keep_last=self.cfg.checkpoint.keep_last, is_writer=self.rank == 0, barrier=collectives.barrier)
        self._saved_step = self.step
        return path

    def maybe_resume(self) -> bool:
        """Load the newest undamaged checkpoint of the run directory (``run_dir.resumable_checkpoint``: a damaged
        newest one is passed over with a warning naming the file); False when there is none."""
        from .checkpoint import load_training_state
        from .run_dir import resumable_checkpoint

        found, error = None, None
        if self.rank == 0 and self.cfg.checkpoint.resume:
            try:
                found = resumable_checkpoint(str(self.run_dir))
            except RuntimeError as exc:  # every rank raises it, none waits for rank 0
                error = str(exc)
        path, error = collectives.broadcast_object((str(found) if found else None, error), src=0)
        if error:
            raise RuntimeError(error)
        if path is None:
            return False
        state = load_training_state(self.policy, Path(path))
        self.step, self.stream.position = state["step"], state["stream_position"]
        set_step(self.policy.scheduler, self.step)
        self._saved_step = self.step
        self._sync()  # the engines started from the initial weights
        return True

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self) -> Dict[str, float]:
        from .metrics import MetricsLogger
        from .progress import StepProgress
        from .run_dir import PreemptionHandler

        cfg = self.cfg
        resumed = self.maybe_resume()
        if self.rank == 0:
            self.metrics = MetricsLogger(str(self.run_dir), tensorboard=cfg.logging.tensorboard,
                                         wandb=cfg.logging.wandb, wandb_mode=cfg.logging.wandb_mode,
                                         wandb_project=cfg.logging.wandb_project, config=to_dict(cfg),
                                         resume_step=self.step if resumed else 0)
        preempt = PreemptionHandler(enabled=cfg.checkpoint.save_on_signal)
        progress = StepProgress(cfg.trainer.total_steps, self.step, enabled=self.rank == 0 and cfg.logging.console,
                                every=cfg.logging.log_every)
        last: Dict[str, float] = {}
        self.preempted = False
        try:
            while self.step < cfg.trainer.total_steps:
                t0 = time.perf_counter()
                faults.set_step(self.step + 1)
                rollout = self._rollout(preempt)
                if rollout is None:  # failed after a preemption signal: saved the last complete step
                    self.preempted = True
                    log.warning("preemption signal received: saved step %d, exiting", self.step)
                    break
                samples, stats = rollout
                stats["time/rollout"] = time.perf_counter() - t0
                if samples:
                    self.policy.start_step()
                    stats.update(self._train_on(samples))
                    stats["actor/skipped_in_row"] = float(self.policy.peak_skipped_in_row)
                # Agreed before the sync: after a signal the engine is not needed (and may be gone).
                stop = self._agree_stop(preempt.requested is not None)
                if samples and not stop:
                    try:
                        stats["time/sync"] = self._sync()
                    except Exception as exc:  # every rank raises it (sync_weights gathers its errors)
                        if self._agree_stop(preempt.requested is not None):
                            stop = True  # the signal came during the sync; the weights of this step are trained
                        else:  # e.g. the engine died after sampling: rebuild it; a second failure ends the run
                            log.warning("weight sync of step %d failed (%s): rebuilding the engines and syncing "
                                        "again", self.step + 1, exc)
                            stats["time/sync"] = self._rebuild_engines()
                            stats["sync/retries"] = 1.0
                self.policy.scheduler.step(1)  # the next step's learning rate (trainer/schedule.py)
                self.step += 1
                if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0 and not stop:
                    stats.update(self.evaluate())
                stats["time/step"] = time.perf_counter() - t0
                if self.metrics is not None:
                    self.metrics.log(self.step, stats)
                progress.update(self.step, stats)
                last = stats
                if (cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0) or stop:
                    self.save()
                self._check_skipped_updates()
                if stop:
                    self.preempted = self.step < cfg.trainer.total_steps  # (a signal in the last step: done)
                    log.warning("preemption signal received: saved step %d, exiting", self.step)
                    break
            else:
                if self._saved_step != self.step:  # (a job resumed at total_steps, e.g. requeued, saves nothing)
                    self.save()
        finally:
            preempt.restore()
            progress.close()
            if self.metrics is not None:
                self.metrics.close()
        return last

    def _rollout(self, preempt) -> Optional[Tuple[List[Sample], Dict[str, float]]]:
        """The step's rollout batch; a failed rollout is retried after rebuilding the engines with the current
        weights, ``trainer.max_rollout_retries`` times, then the run saves and stops. None: it failed after a
        preemption signal (Slurm signals the engine's processes too), the step is dropped and the last complete
        one saved."""
        cfg = self.cfg
        position = self.stream.position
        for attempt in range(cfg.trainer.max_rollout_retries + 1):
            try:
                with offloaded(self.policy.model, self.policy.optimizer, cfg.trainer.offload_during_rollout):
                    samples, stats = self.rollouts.batch(self.dataset, self.stream, self.step)
                stats["rollout/retries"] = float(attempt)
                return samples, stats
            except Exception as exc:  # every rank raises it (the rollout gathers its errors)
                self.stream.position = position  # nothing of the failed attempt is kept
                if self._agree_stop(preempt.requested is not None):
                    log.warning("rollout of step %d failed after a preemption signal (the signal reaches the "
                                "engine's processes too): dropped it", self.step + 1)
                    if self._saved_step != self.step:
                        self.save()
                    return None
                if attempt == cfg.trainer.max_rollout_retries:
                    if self._saved_step != self.step:
                        self.save()
                    raise RuntimeError(f"the rollout of step {self.step + 1} failed {attempt + 1} time(s), the "
                                       f"last time with: {exc}. Saved step {self.step} (rerun the command to resume; "
                                       "trainer.max_rollout_retries sets the retries)") from exc
                log.warning("rollout of step %d failed (%s): rebuilding the engines with the current weights, "
                            "retry %d of %d", self.step + 1, exc, attempt + 1, cfg.trainer.max_rollout_retries)
                self._rebuild_engines()
        raise AssertionError("unreachable")

    def _check_skipped_updates(self) -> None:
        """After ``trainer.max_consecutive_skipped_updates`` updates in a row with a non-finite loss or gradient:
        save the step (its metrics are logged; the weights are those of the last finite update) and stop."""
        limit = self.cfg.trainer.max_consecutive_skipped_updates
        if not limit or self.policy.peak_skipped_in_row < limit:
            return
        path = self.save() if self._saved_step != self.step else None
        raise RuntimeError(f"{self.policy.peak_skipped_in_row} updates in a row had a non-finite loss or gradient norm "
                           f"(NaN/inf) and were skipped; saved step {self.step}{f' to {path}' if path else ''} and "
                           "stopped (trainer.max_consecutive_skipped_updates). Usual causes: a learning rate too "
                           "high for the model, fp16 overflow (use bf16), or bad data; rerunning resumes after "
                           "this step.")

    def _agree_stop(self, local: bool) -> bool:
        return collectives.any_rank(local)

    def export_hf(self, out_dir: Path) -> Optional[Path]:
        from ..rollout.weight_sync import save_hf_checkpoint

        return save_hf_checkpoint(self.policy.module, out_dir, source_dir=self.cfg.model.hf_path,
                                  transformer_impl=self.cfg.model.transformer_impl)

    def close(self) -> None:
        self.rollouts.close()
