"""Rollouts for the training loop: prompts -> vLLM samples -> verified rewards -> ``Sample``s on every rank.

Each data-parallel replica's engine owner (``weight_sync.is_engine_owner``: the first rank of its model-parallel
group) holds a vLLM engine and a reward scorer, samples its round-robin share of the prompts and scores them; the
results are all-gathered so that every rank holds the whole rollout batch (group statistics need all of a group).
DAPO dynamic sampling (drop groups whose rewards are all equal, refill, bounded rounds) and the greedy held-out
evaluation are built on the same ``generate``.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import faults
from ..algorithms import dapo_keep_groups
from ..config import Config
from ..parallel import collectives
from .batch import Sample
from .prompts import ImageEncoder, PromptLength, PromptStream, messages_for, split_round_robin

log = logging.getLogger(__name__)


class Rollouts:
    """This rank's part of sampling (one instance per rank; every method is called by all ranks in lockstep).

    Args:
        cfg: the run config (``rollout``, ``reward``, ``algorithm.dapo``, ``trainer.seed``, ``model.hf_path``).
        run_dir: the run directory (the engine's temp files).
        image_token_id: the checkpoint's ``<|image_pad|>`` id (a consistency check of the engine's prompts).
        dp, dp_rank: data-parallel size and this rank's replica.
        device: this rank's device (the transformers engine runs there; a vLLM engine on the GPUs that
            ``parallel/placement.py`` gives the replica).
    """

    def __init__(self, cfg: Config, run_dir: str, image_token_id: int, dp: int, dp_rank: int,
                 device: Optional[torch.device] = None):
        from ..rewards import RewardScorer
        from ..rollout.weight_sync import is_engine_owner

        self.cfg, self.run_dir, self.image_token_id = cfg, run_dir, image_token_id
        self.dp, self.dp_rank = dp, dp_rank
        self.device = device if device is not None else torch.device("cpu")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.images = ImageEncoder(cfg.model.hf_path)
        self.owner = is_engine_owner()
        # The engine accepts the longest prompt the data allows plus the longest response; a prompt still longer
        # (the built-in tasks are not filtered when loaded) is skipped and counted, never a failed step.
        self.max_model_len = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        self.prompt_length = PromptLength(cfg.model.hf_path, cfg.data.prompt_template) if self.owner else None
        self.skipped_long_prompts = 0
        self.engine = self._make_engine() if self.owner else None
        r = cfg.reward
        self.scorer = RewardScorer(accuracy_weight=r.accuracy_weight, format_weight=r.format_weight,
                                   timeout_s=r.timeout_s, num_workers=r.num_workers,
                                   max_answer_chars=r.max_answer_chars) if self.owner else None
        self.eval_scorer = None  # benchmark answer checking, on rank 0 at the first evaluate()
        self.mask_ratio = masked_view_ratio(cfg)  # PAPO / VPPO: each prompt's image also with patches masked
        self._step = 0
        self._masked: Dict[int, torch.Tensor] = {}  # this step's masked pixel values per prompt, shared by its samples

    @property
    def logprobs_mode(self) -> str:
        """The engine reports log-probs of ``logits / rollout.temperature``, what the scoring pass computes
        (``policy.scaled_logits``), so ``check/rollout_logp_diff`` compares like with like at any temperature (with
        ``rollout.top_p`` < 1 vLLM also renormalises over the nucleus, and the check then reads larger)."""
        return "raw_logprobs" if self.cfg.rollout.temperature == 1.0 else "processed_logprobs"

    def _make_engine(self):
        r, p = self.cfg.rollout, self.cfg.parallel
        on_cpu = self.device.type == "cpu"
        if r.engine == "transformers":
            from ..rollout.hf_engine import TransformersEngine, TransformersEngineConfig

            dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.cfg.model.dtype]
            engine = TransformersEngine(TransformersEngineConfig(
                model_path=self.cfg.model.hf_path, device=str(self.device), dtype=dtype,
                max_model_len=self.max_model_len, logprobs_mode=self.logprobs_mode))
        else:
            from ..parallel.device import local_world_size_from_env
            from ..parallel.placement import engine_visible_devices
            from ..rollout.vllm_engine import VLLMEngine, VLLMEngineConfig

            # ranks per node from torchrun / Slurm; our local spawn sets none, and its ranks (one node, no more than
            # the visible GPUs) are placed right by the visible GPU count
            visible = None if on_cpu else engine_visible_devices(
                p.tensor_model_parallel_size, p.pipeline_model_parallel_size, self.dp, p.rollout_tensor_parallel_size,
                self.dp_rank, local_world_size_from_env())
            engine = VLLMEngine(VLLMEngineConfig(
                model_path=self.cfg.model.hf_path, run_dir=str(self.run_dir), dtype="float32" if on_cpu else "auto",
                tensor_parallel_size=p.rollout_tensor_parallel_size, max_model_len=self.max_model_len,
                enforce_eager=on_cpu if r.enforce_eager is None else r.enforce_eager, visible_devices=visible,
                enable_sleep_mode=not on_cpu if r.sleep_mode is None else r.sleep_mode,
                kv_cache_memory_bytes=r.kv_cache_memory_bytes if on_cpu else None,
                gpu_memory_utilization=r.gpu_memory_utilization, seed=self.cfg.trainer.seed,
                bucket_bytes=r.weight_sync_bucket_mb << 20, weight_transport=r.weight_transport,
                logprobs_mode=self.logprobs_mode))
        engine.start()
        return engine

    def sampling(self, greedy: bool = False, seed: Optional[int] = None, n: Optional[int] = None):
        """The engine's ``SamplingConfig`` from ``rollout.*`` (greedy: one temperature-0 sample)."""
        from ..rollout.engine import SamplingConfig

        r = self.cfg.rollout
        if greedy:
            return SamplingConfig(n=1, temperature=0.0, max_tokens=r.max_new_tokens, seed=seed)
        return SamplingConfig(n=n or r.n, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k if r.top_k > 0 else 0, max_tokens=r.max_new_tokens, seed=seed)

    def generate(self, dataset, indices: List[int], sampling, group_base: int = 0) -> List[Sample]:
        """Sample and score this replica's share of ``indices``, then all-gather: every rank gets all Samples, in
        the order of ``indices`` (a prompt's samples in the engine's order). The responses to ``indices[j]`` form
        group ``group_base + j``: a prompt drawn twice (a refill across an epoch boundary) makes two groups."""
        records = self._generate_records(dataset, indices, sampling, score=True)
        return [self._sample(dataset, rec, group_base + rec["draw"]) for rec in records]

    def _generate_records(self, dataset, indices: List[int], sampling, score: bool) -> List[dict]:
        """This replica's share of ``indices`` sampled (with ``score``: rewarded, with token ids and log-probs) by its
        engine owner, then all-gathered: every rank gets every record, in the order of ``indices``. A record's
        ``draw`` is its position in ``indices``, ``prompt_index`` the dataset index there."""
        from ..rollout.engine import RolloutRequest

        mine = split_round_robin(list(enumerate(indices)), self.dp, self.dp_rank)  # (draw, dataset index)
        local: List[dict] = []
        error: Optional[str] = None
        skipped = 0
        try:
            if self.owner and mine:
                fits = [d for d in mine if self._fits(dataset[d[1]])]
                skipped, mine = len(mine) - len(fits), fits
            if self.owner and mine:
                examples = [dataset[i] for _, i in mine]
                outputs = self.engine.generate(
                    [RolloutRequest(messages_for(e.question, self.cfg.data.prompt_template), e.image)
                     for e in examples], sampling)
                texts = [o.text for o in outputs]
                if score and texts:
                    texts[0] = faults.reward_fault_text(texts[0])  # faults.py; unchanged unless injected
                results = self.scorer.score_batch(texts, [examples[o.request_index].answer for o in outputs]) \
                    if score else [None] * len(outputs)
                for o, res in zip(outputs, results):
                    draw, index = mine[o.request_index]
                    record = dict(draw=draw, prompt_index=index, text=o.text, finish_reason=o.finish_reason)
                    if res is not None:  # what training needs; evaluation gathers the text only
                        record.update(prompt_ids=o.prompt_token_ids, response_ids=o.response_token_ids,
                                      logprobs=o.logprobs, truncated=o.finish_reason == "length", reward=res.score,
                                      accuracy=res.accuracy, format=res.format, verify_failed=res.failed)
                    local.append(record)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, not wait in the gather below
            log.exception("rollout failed on rank %d", self.rank)
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        gathered = collectives.all_gather_object((local, error, skipped))
        errors = [e for _, e, _ in gathered if e]
        if errors:
            raise RuntimeError("rollout failed: " + "; ".join(errors))
        self.skipped_long_prompts += sum(n for _, _, n in gathered)
        return sorted((r for part, _, _ in gathered if part for r in part),
                      key=lambda r: r["draw"])  # stable: sample order kept

    def _fits(self, example) -> bool:
        """Whether the example's prompt leaves room for ``rollout.max_new_tokens`` in the engine."""
        length = self.prompt_length(example)
        if length <= self.cfg.data.max_prompt_length:
            return True
        log.warning("skipped a prompt of %d tokens (data.max_prompt_length=%d, the engine takes %d tokens with the "
                    "response)", length, self.cfg.data.max_prompt_length, self.max_model_len)
        return False

    def _sample(self, dataset, rec: dict, group: int) -> Sample:
        """A record as a training ``Sample`` of ``group``. An empty response (nothing generated, e.g. a stop string
        at once) keeps its reward in the group's statistics but has no token to train on: one placeholder token
        gives its row a shape, and ``trainable=False`` keeps it out of the response mask (counted as
        ``response/empty``)."""
        example = dataset[rec["prompt_index"]]
        pixels, grid = self.images((id(dataset), rec["prompt_index"]), example.image)
        masked = None if self.mask_ratio is None else self._masked_pixels(rec["prompt_index"], pixels)
        n_slots = sum(1 for t in rec["prompt_ids"] if t == self.image_token_id)
        if n_slots != self.images.num_tokens(grid):
            raise RuntimeError(f"the engine's prompt has {n_slots} image tokens but the image processor gives "
                               f"{self.images.num_tokens(grid)}: engine and trainer preprocess images differently")
        empty = not rec["response_ids"]
        return Sample(prompt_ids=list(rec["prompt_ids"]), response_ids=list(rec["response_ids"]) or [0],
                      reward=rec["reward"], group=group, truncated=rec["truncated"], trainable=not empty,
                      rollout_logprobs=None if empty else rec["logprobs"], pixel_values=pixels,
                      image_grid_thw=grid, answer=example.answer,
                      extra={**{k: rec[k] for k in ("accuracy", "format", "text", "verify_failed")},
                                                    "question": getattr(example, "question", None)},
                      masked_pixel_values=masked)

    def _masked_pixels(self, prompt_index: int, pixels: torch.Tensor) -> torch.Tensor:
        """The prompt's image with patches masked (``algorithms/perception.py``): one mask per prompt and step, drawn
        once and shared by the prompt's samples, seeded by ``trainer.seed``, the step and the prompt."""
        if prompt_index not in self._masked:
            from ..algorithms.perception import black_patch_row, mask_patches

            processor = self.images.processor
            seed = (self.cfg.trainer.seed * 1_000_003 + self._step) * 1_000_033 + prompt_index
            self._masked[prompt_index] = mask_patches(
                pixels, self.mask_ratio, torch.Generator().manual_seed(seed),
                black_patch_row(processor.image_mean, processor.image_std, pixels.shape[1]))
        return self._masked[prompt_index]

    def batch(self, dataset, stream: PromptStream, step: int) -> Tuple[List[Sample], Dict[str, float]]:
        """The step's training samples: ``data.rollout_batch_size`` prompts from ``stream``, ``rollout.n`` samples
        each; with DAPO dynamic sampling, groups whose rewards are all equal are dropped and refilled with new
        prompts for at most ``algorithm.dapo.max_sampling_rounds`` rounds. Returns (kept samples, ``sampling/*``,
        ``reward/*`` and ``response/*`` statistics over everything sampled)."""
        cfg = self.cfg
        dapo = cfg.algorithm.dapo
        self._step, self._masked = step, {}  # seeds the masked views: reproducible, also on resume
        kept: List[Sample] = []
        everything: List[Sample] = []
        stats = {"sampling/rounds": 0.0, "sampling/dropped_groups": 0.0}
        skipped_before = self.skipped_long_prompts
        drawn = 0  # prompts drawn so far this step: group ids are draw positions, unique within the step
        self._inject_engine_fault()
        for round_ in range(dapo.max_sampling_rounds if dapo.dynamic_sampling else 1):
            need = cfg.data.rollout_batch_size - len({s.group for s in kept})
            if need <= 0:
                break
            indices = stream.take(need)
            samples = self.generate(dataset, indices, self.sampling(seed=cfg.trainer.seed * 7919 + step * 131
                                                                    + round_), group_base=drawn)
            drawn += len(indices)
            everything += samples
            stats["sampling/rounds"] += 1
            if dapo.dynamic_sampling:
                groups = torch.tensor([s.group for s in samples])
                keep = dapo_keep_groups(filter_values(samples, dapo.filter_metric), groups)
                stats["sampling/dropped_groups"] += float(len(set(groups.tolist())) - len(set(groups[keep].tolist())))
                samples = [s for s, k in zip(samples, keep.tolist()) if k]
            kept += samples
        stats["sampling/skipped_long_prompts"] = float(self.skipped_long_prompts - skipped_before)
        if self.engine is not None and kept:  # with nothing to train on there is no sync either: stay awake
            self.engine.sleep()  # training has the GPU until the next sync (rollout.sleep_mode; no-op elsewhere)
        return kept, reward_stats(everything, stats)  # kept may be empty: every group was uniform

    def discard_engines(self) -> None:
        """Shut this replica's engine down (best effort: it may be dead) so that the next ``sync`` starts a fresh
        one and loads the current weights into it (``weight_sync``: an engine that is not started is started)."""
        if self.engine is not None:
            try:
                self.engine.shutdown()
            except Exception as exc:  # noqa: BLE001 - a dead engine may fail to shut down cleanly
                log.warning("shutting the failed engine down raised %r", exc)

    def _inject_engine_fault(self, name: str = "engine_kill") -> None:
        """``faults.py``'s ``engine_kill`` / ``engine_kill_sync``: SIGKILL this replica's engine processes, as an OOM
        killer would."""
        import os
        import signal

        if self.engine is not None and faults.fires(name):
            for pid in getattr(self.engine, "engine_pids", lambda: [])():
                log.warning("fault injection: killing engine process %d", pid)
                os.kill(pid, signal.SIGKILL)

    def evaluate(self, benchmarks) -> Dict[str, float]:
        """``eval.*`` over ``{name: [Problem]}`` with every replica's engine sampling its share (the same protocol
        code as ``megatron-pgpo eval``): ``eval/<name>/avg@k``, ``eval/<name>/pass@k`` and ``eval/accuracy`` (the
        average of avg@k over benchmarks), on every rank. Rank 0 judges the answers."""
        from ..evaluation.protocol import Protocol
        from ..evaluation.runner import evaluate

        e = self.cfg.eval
        if not benchmarks:
            return {}
        if self.rank == 0 and self.eval_scorer is None:
            from ..evaluation.scoring import BenchmarkScorer

            self.eval_scorer = BenchmarkScorer(num_workers=self.cfg.reward.num_workers,
                                               timeout_s=self.cfg.reward.timeout_s)
        protocol = Protocol(model=str(self.cfg.model.hf_path), k=e.k, temperature=e.temperature, top_p=e.top_p,
                            max_new_tokens=self.cfg.rollout.max_new_tokens, seed=self.cfg.trainer.seed,
                            prompt_template=self.cfg.data.prompt_template)
        document = evaluate(benchmarks, self._sample_texts, protocol, self.eval_scorer if self.rank == 0 else None)
        stats: Dict[str, float] = {}
        if document is not None:
            for name, v in document["benchmarks"].items():
                stats[f"eval/{name}/avg@{e.k}"] = v[f"avg@{e.k}"]
                stats[f"eval/{name}/pass@{e.k}"] = v[f"pass@{e.k}"]
            stats["eval/accuracy"] = document["average"][f"avg@{e.k}"]
        return collectives.broadcast_object(stats)

    def _sample_texts(self, problems, n: int, seed: int) -> List[List[Tuple[str, str]]]:
        """``evaluation.runner.Sampler`` over the DP replicas' engines: n (text, finish reason) per problem (none for
        a problem whose prompt does not fit)."""
        e = self.cfg.eval
        from ..rollout.engine import SamplingConfig

        sampling = SamplingConfig(n=n, temperature=e.temperature, top_p=e.top_p,
                                  max_tokens=self.cfg.rollout.max_new_tokens, seed=seed)
        out: List[List[Tuple[str, str]]] = [[] for _ in problems]
        for rec in self._generate_records(problems, list(range(len(problems))), sampling, score=False):
            out[rec["prompt_index"]].append((rec["text"], rec["finish_reason"]))
        return out

    def sync(self, module, transformer_impl: str) -> float:
        """Megatron weights -> this replica's engine (a collective over the model-parallel group); seconds."""
        from ..rollout.weight_sync import sync_weights

        t0 = time.perf_counter()
        self._inject_engine_fault("engine_kill_sync")
        if self.engine is not None:
            self.engine.wake(["weights"])  # the weights' memory first, the KV cache only once they are loaded
        sync_weights(module, self.engine, transformer_impl=transformer_impl)
        if self.engine is not None:
            self.engine.wake(["kv_cache"])
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        if self.scorer is not None:
            self.scorer.close()
        if self.eval_scorer is not None:
            self.eval_scorer.close()


def masked_view_ratio(cfg: Config) -> Optional[float]:
    """The patch-mask probability of the masked-image view when the algorithm compares against one (PAPO's loss:
    ``algorithm.papo.mask_ratio``; VPPO's shaper: ``algorithm.vppo.mask_ratio``), else None."""
    from ..algorithms import ADVANTAGE_SHAPERS, POLICY_LOSSES, second_view

    algo = cfg.algorithm
    if second_view(ADVANTAGE_SHAPERS.get(algo.advantage), POLICY_LOSSES.get(algo.loss)) != "masked_image":
        return None
    return algo.papo.mask_ratio if algo.loss == "papo" else algo.vppo.mask_ratio


def filter_values(samples: List[Sample], metric: str) -> torch.Tensor:
    """``[N]`` what DAPO's dynamic sampling compares within each group: ``reward`` or ``accuracy``."""
    if metric == "accuracy":
        return torch.tensor([float(s.extra["accuracy"]) for s in samples])
    if metric == "reward":
        return torch.tensor([float(s.reward) for s in samples])
    raise ValueError(f"algorithm.dapo.filter_metric={metric!r}: valid: reward, accuracy")


def reward_stats(samples: List[Sample], stats: Dict[str, float]) -> Dict[str, float]:
    """``stats`` plus the mean reward, accuracy, format rate, response length and truncated fraction of
    ``samples`` (all zeros when there are none)."""
    n = max(len(samples), 1)
    stats.update({
        "reward/mean": sum(s.reward for s in samples) / n,
        "reward/accuracy": sum(s.extra["accuracy"] for s in samples) / n,
        "reward/format": sum(s.extra["format"] for s in samples) / n,
        "response/length_mean": sum(s.trained_tokens for s in samples) / n,
        "response/empty": float(sum(not s.trainable for s in samples)),
        # answers the verifier could not judge (timed out, or its worker died): scored 0, counted here
        "reward/verify_failed": float(sum(bool(s.extra.get("verify_failed")) for s in samples)),
        "response/clip_ratio": sum(s.truncated for s in samples) / n,
    })
    return stats
