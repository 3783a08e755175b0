"""Memory of one training layout, per GPU and per pipeline stage, in bytes.

A GPU of a colocated run holds two things, at once or in turns:

* vLLM's share, ``rollout.gpu_memory_utilization x GPU memory``: the rollout weights (bf16, split over the rollout
  TP) and a KV cache filling the rest. KV bytes per token = 2 (K and V) x layers x KV heads x head_dim x 2 bytes,
  divided over the rollout TP (a GPU keeps at least one KV head). One engine serves each DP replica, so its share
  of a rollout step is ``rollout_batch_size / DP x n`` sequences of ``prompt + response`` tokens; when their KV
  does not fit at once vLLM runs them in waves (``rollout_waves``). It cannot start without room for one sequence.
* Training: weights + gradients + optimizer state (``buffers.py``, exact; plus a frozen reference copy of the
  weights with ``algorithm.kl.coef > 0``, which stays on the GPU during rollouts even when offloading), plus the larger of the update pass
  (activations of the in-flight micro-batches, the vision tower's on the first stage, the logits and their gradient
  on the last) and the scoring pass (no gradient: the image and text-only logits of the response tokens on the last
  stage). A flat reserve stands for the CUDA context, NCCL buffers and allocator fragmentation (not modelled).

With vLLM's sleep mode (``rollout.sleep_mode``, the default on GPUs) they take turns: the engine drops its weights
and KV cache after the rollouts (level 2), so training has the whole GPU minus the reserve; while the engine
generates, training keeps its weights, gradients and optimizer state on the GPU next to the engine's share, unless
``trainer.offload_during_rollout`` moves them to host memory. Without sleep mode both are resident together and
training has ``(1 - gpu_memory_utilization) x GPU memory`` minus the reserve.

Between the two, the weight sync: training's state is back on the GPU, the engine has woken its weights (not yet
its KV cache), and the engine owner (stage 0) holds the sync's transient buffers: one bucket of gathered full HF
tensors and its packed copy shared with vLLM by CUDA IPC (``rollout/cuda_ipc.py``), a bucket at least the size of
the largest fused group (the embedding). ``sync_headroom`` checks that phase.

The vLLM engine runs on the GPUs of stage 0's TP rank 0 and its rollout-TP peers; every GPU is charged for it,
which is exact for those and conservative for the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from ..models.qwen2_5_vl.hf_config import padded_vocab_size
from .activations import (decoder_block_extra_bytes, full_recompute_working_bytes, in_flight_micro_batches,
                          layer_activation_bytes, scoring_logits_bytes, unchunked_scoring_logits_bytes,
                          update_logits_bytes, vision_activation_bytes)
from .buffers import dtype_bytes, training_state_bytes
from .model_size import ModelShape, VisionDims, hf_parameter_count, layers_per_stage, stage_tensors

GIB = 1 << 30


@dataclass(frozen=True)
class Workload:
    """What one RL step processes (lengths in tokens, batch sizes in prompts / samples)."""

    prompt_length: int
    response_length: int
    rollout_batch_size: int  # prompts per rollout step
    n: int  # responses per prompt
    micro_batch_size: int  # samples per training micro-batch (the scoring pass stacks 2x as many rows)
    global_batch_size: Optional[int] = None  # prompts per optimizer update (None: rollout_batch_size)
    max_pixels: int = 1003520  # data.max_pixels: every image is taken at this size (the worst case)
    estimator: str = "k3"  # algorithm.pgpo.estimator
    text_only_pass: bool = True  # PGPO (or monitor_visual_dependency): the scoring pass also runs text-only rows
    kl_chunk_tokens: int = 1024  # algorithm.pgpo.kl_chunk_tokens

    @property
    def seq_length(self) -> int:
        return self.prompt_length + self.response_length


@dataclass(frozen=True)
class Layout:
    """A training layout: training TP/PP/DP, the vLLM engine's TP, and the Megatron options that change memory."""

    tp: int
    pp: int
    dp: int
    rollout_tp: int
    sequence_parallel: bool
    recompute: str = "selective"
    distributed_optimizer: bool = True
    dtype: str = "bf16"
    train_vision_tower: bool = True
    make_vocab_size_divisible_by: int = 128
    vision_attention: str = "auto"  # model.vision_attention: eager keeps [patches, patches] scores, the rest do not
    vision_recompute: bool = False  # model.vision_recompute
    fused_kernels: bool = True  # on CUDA the trainer fuses SwiGLU (models/qwen2_5_vl/hf_config.fused_kernels)
    first_stage_layers: Optional[int] = None  # parallel.first_stage_layers: an uneven pipeline split
    last_stage_layers: Optional[int] = None  # parallel.last_stage_layers
    sleep_mode: bool = True  # rollout.sleep_mode: the engine frees its share while training runs
    offload_during_rollout: bool = False  # trainer.offload_during_rollout: training state in host memory meanwhile
    weight_sync_bucket_mb: int = 512  # rollout.weight_sync_bucket_mb
    reference_model: bool = False  # algorithm.kl.coef > 0: a frozen copy of the weights for the KL penalty

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of pipeline stage ``stage`` (all its TP ranks hold the same)."""

    stage: int
    parameters: int  # elements on this rank (padded vocabulary included)
    weights: int
    grads: int
    optimizer: int
    activations: int  # decoder layers of the in-flight micro-batches (+ full-recompute working layer)
    vision_activations: int  # first stage only
    update_logits: int  # last stage only
    scoring_logits: int  # last stage only (chunked, what our code does)
    scoring_logits_unchunked: int  # last stage only (a plain fp32 log-softmax, for comparison)
    reference: int = 0  # the KL penalty's frozen reference weights (algorithm.kl.coef > 0)

    @property
    def state(self) -> int:
        return self.weights + self.grads + self.optimizer + self.reference

    @property
    def update_pass(self) -> int:
        return self.activations + self.vision_activations + self.update_logits

    @property
    def peak(self) -> int:
        return self.state + max(self.update_pass, self.scoring_logits)


@dataclass(frozen=True)
class RolloutMemory:
    """vLLM's bytes on one GPU."""

    budget: int  # gpu_memory_utilization x GPU memory
    weights: int
    kv_bytes_per_token: int  # on one GPU
    kv_needed: int  # the engine's whole rollout step at once
    kv_pool: int  # budget - weights (negative: the weights alone do not fit)
    sequence_tokens: int
    sync_buffers: int  # the engine owner's weight-sync transient: a bucket of full tensors and its packed copy

    @property
    def one_sequence(self) -> int:
        return self.sequence_tokens * self.kv_bytes_per_token

    @property
    def waves(self) -> Optional[int]:
        """Rounds of generation the KV pool needs for the whole step (None: not even one sequence fits)."""
        if self.kv_pool < self.one_sequence:
            return None
        return max(1, math.ceil(self.kv_needed / self.kv_pool))


@dataclass
class MemoryPlan:
    """The estimate for one layout; ``problems`` says in words why it does not fit (empty when it does)."""

    layout: Layout
    workload: Workload
    gpu_memory: int
    gpu_memory_utilization: float
    reserve: int
    stages: List[StageMemory]
    rollout: RolloutMemory
    micro_batches_per_update: int
    problems: List[str] = field(default_factory=list)

    @property
    def training_budget(self) -> int:
        """What training may use: the GPU minus the reserve while the engine sleeps, else minus its share too."""
        if self.layout.sleep_mode:
            return self.gpu_memory - self.reserve
        return int(self.gpu_memory * (1 - self.gpu_memory_utilization)) - self.reserve

    def kept_during_rollout(self, stage: StageMemory) -> int:
        """What training keeps on a GPU of ``stage`` while the engine generates (its state, unless offloaded)."""
        return stage.reference if self.layout.offload_during_rollout else stage.state

    @property
    def rollout_headroom(self) -> int:
        """With sleep mode: the GPU minus the reserve, the engine's share and the worst stage's kept state; without
        it the training budget already leaves the share free (then the training headroom)."""
        if not self.layout.sleep_mode:
            return self.training_headroom
        kept = max(self.kept_during_rollout(s) for s in self.stages)
        return self.gpu_memory - self.reserve - self.rollout.budget - kept

    @property
    def sync_headroom(self) -> int:
        """During a weight sync, on the engine owner's GPU (stage 0): the GPU minus the reserve, the engine's woken
        weights (its whole share without sleep mode), the training state and the sync buffers."""
        engine = self.rollout.weights if self.layout.sleep_mode else self.rollout.budget
        return self.gpu_memory - self.reserve - engine - self.stages[0].state - self.rollout.sync_buffers

    @property
    def peak_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def training_headroom(self) -> int:
        """Training budget minus the worst stage's peak (negative: over by that much)."""
        return self.training_budget - self.peak_stage.peak

    @property
    def headroom(self) -> int:
        """The smallest of the training, rollout and sync headroom (negative: over by that much)."""
        return min(self.training_headroom, self.rollout_headroom, self.sync_headroom)

    @property
    def limit(self) -> str:
        """Where the headroom is smallest, in words: the phase and the stage."""
        phases = [(self.training_headroom, f"while training, on stage {self.peak_stage.stage}")]
        if self.layout.sleep_mode:
            kept = max(self.stages, key=self.kept_during_rollout)
            phases.append((self.rollout_headroom, f"while vLLM generates, on stage {kept.stage}"))
        phases.append((self.sync_headroom, "during the weight sync, on stage 0"))
        return min(phases, key=lambda phase: phase[0])[1]

    @property
    def fits(self) -> bool:
        return not self.problems


def image_patches(v: VisionDims, max_pixels: int) -> int:
    """Patches of an image resized to ``max_pixels`` (whole merge units of ``patch x merge`` pixels square)."""
    unit = v.patch_size * v.spatial_merge_size
    return max(1, max_pixels // (unit * unit)) * v.spatial_merge_size ** 2


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def rollout_memory(shape: ModelShape, layout: Layout, workload: Workload, gpu_memory: int,
                   gpu_memory_utilization: float) -> RolloutMemory:
    """vLLM's weights, KV bytes per token and KV cache on one GPU (see the module docstring)."""
    t = shape.text
    rtp = layout.rollout_tp
    kv_heads_per_gpu = max(1, t.num_kv_heads // rtp)
    kv_per_token = 2 * t.num_layers * kv_heads_per_gpu * t.head_dim * 2
    sequences = math.ceil(workload.rollout_batch_size / layout.dp) * workload.n
    budget = int(gpu_memory * gpu_memory_utilization)
    weights = math.ceil(hf_parameter_count(shape) * 2 / rtp)
    bucket = max(layout.weight_sync_bucket_mb << 20, t.vocab_size * t.hidden_size * 2)  # a group is never split
    return RolloutMemory(budget=budget, weights=weights, kv_bytes_per_token=kv_per_token,
                         kv_needed=sequences * workload.seq_length * kv_per_token, kv_pool=budget - weights,
                         sequence_tokens=workload.seq_length, sync_buffers=2 * bucket)


def stage_memory(shape: ModelShape, layout: Layout, workload: Workload, stage: int,
                 micro_batches: int) -> StageMemory:
    """Bytes on one GPU of ``stage`` (see the module docstring)."""
    t, v = shape.text, shape.vision
    tp, pp, sp = layout.tp, layout.pp, layout.sequence_parallel
    element = dtype_bytes(layout.dtype)
    first, last = layout.first_stage_layers, layout.last_stage_layers
    tensors = stage_tensors(shape, tp, pp, stage, layout.make_vocab_size_divisible_by, first, last)
    state = training_state_bytes(tensors, layout.dtype, layout.dp, layout.distributed_optimizer,
                                 train_vision_tower=layout.train_vision_tower)
    s, b = workload.seq_length, workload.micro_batch_size
    layer_args = dict(seq=s, micro_batch=b, hidden=t.hidden_size, heads=t.num_heads, kv_heads=t.num_kv_heads,
                      ffn=t.ffn_hidden_size, tp=tp, sequence_parallel=sp, element_bytes=element)
    in_flight = in_flight_micro_batches(pp, stage, micro_batches)
    per_micro_batch = layers_per_stage(t, pp, stage, first, last) * layer_activation_bytes(
        recompute=layout.recompute, fused_swiglu=layout.fused_kernels, **layer_args)
    if stage < pp - 1:  # the output kept for the next stage until the backward pass
        per_micro_batch += s * b * t.hidden_size * element / (tp if sp else 1)
    per_micro_batch += decoder_block_extra_bytes(s, b, t.hidden_size, t.num_heads, tp, sp, layout.recompute,
                                                 final_norm=stage == pp - 1, element_bytes=element)
    activations = in_flight * per_micro_batch
    if layout.recompute == "full":
        activations += full_recompute_working_bytes(fused_swiglu=layout.fused_kernels, **layer_args)
    vision = 0.0
    if stage == 0 and layout.train_vision_tower:
        vision = vision_activation_bytes(image_patches(v, workload.max_pixels), in_flight * b,
                                         v.hidden_size, v.num_heads, v.ffn_hidden_size, v.depth,
                                         v.full_attention_blocks, v.window_patches, v.patch_input, element,
                                         attention=layout.vision_attention, recompute=layout.vision_recompute)
    update_logits = scoring = unchunked = 0
    if stage == pp - 1:
        vocab_shard = padded_vocab_size(t.vocab_size, layout.make_vocab_size_divisible_by, tp) // tp
        tokens = b * workload.response_length  # logits only where a response token is predicted
        update_logits = update_logits_bytes(tokens, vocab_shard, element)
        scoring = scoring_logits_bytes(tokens, vocab_shard, element, workload.estimator, workload.kl_chunk_tokens,
                                       workload.text_only_pass)
        unchunked = unchunked_scoring_logits_bytes(tokens, vocab_shard, element, workload.text_only_pass)
    return StageMemory(stage=stage, parameters=sum(x.numel for x in tensors), weights=state.weights,
                       grads=state.grads, optimizer=state.optimizer, activations=int(activations),
                       vision_activations=int(vision), update_logits=update_logits, scoring_logits=scoring,
                       scoring_logits_unchunked=unchunked, reference=state.weights if layout.reference_model else 0)


def estimate(shape: ModelShape, layout: Layout, workload: Workload, gpu_memory_gib: float,
             gpu_memory_utilization: float = 0.5, reserve_gib: float = 2.0) -> MemoryPlan:
    """Per-stage memory and vLLM's share for ``layout``; ``problems`` lists every reason it does not fit."""
    gpu_memory = int(gpu_memory_gib * GIB)
    samples = (workload.global_batch_size or workload.rollout_batch_size) * workload.n
    micro_batches = max(1, math.ceil(samples / (layout.dp * workload.micro_batch_size)))
    stages = [stage_memory(shape, layout, workload, i, micro_batches) for i in range(layout.pp)]
    rollout = rollout_memory(shape, layout, workload, gpu_memory, gpu_memory_utilization)
    plan = MemoryPlan(layout=layout, workload=workload, gpu_memory=gpu_memory,
                      gpu_memory_utilization=gpu_memory_utilization, reserve=int(reserve_gib * GIB), stages=stages,
                      rollout=rollout, micro_batches_per_update=micro_batches)
    worst = plan.peak_stage
    if plan.training_headroom < 0:
        terms = {"weights": worst.weights, "gradients": worst.grads, "optimizer state": worst.optimizer,
                 "activations": worst.activations + worst.vision_activations,
                 "logits": max(worst.update_logits, worst.scoring_logits)}
        largest = ", ".join(f"{k} {_gib(val)}" for k, val in sorted(terms.items(), key=lambda kv: -kv[1]) if val)
        budget = (f"{gpu_memory_gib:g} GiB with the engine asleep" if layout.sleep_mode else
                  f"(1 - gpu_memory_utilization {gpu_memory_utilization:g}) x {gpu_memory_gib:g} GiB")
        plan.problems.append(
            f"training needs {_gib(worst.peak)} on stage {worst.stage} but only {_gib(plan.training_budget)} is "
            f"left ({budget} - {reserve_gib:g} GiB reserve): {_gib(-plan.training_headroom)} over; its terms: "
            f"{largest}")
    if layout.sleep_mode and plan.rollout_headroom < 0:
        kept = max(plan.kept_during_rollout(s) for s in stages)
        plan.problems.append(
            f"while the engine generates, its share {_gib(rollout.budget)} (gpu_memory_utilization "
            f"{gpu_memory_utilization:g}) and the training state kept on the GPU {_gib(kept)} exceed "
            f"{gpu_memory_gib:g} GiB - {reserve_gib:g} GiB reserve by {_gib(-plan.rollout_headroom)}: "
            + ("give vLLM a smaller share" if layout.offload_during_rollout else
               "offload the training state during rollouts (trainer.offload_during_rollout) or give vLLM a smaller "
               "share"))
    if plan.sync_headroom < 0 and plan.rollout_headroom >= 0 and plan.training_headroom >= 0:
        engine = "weights" if layout.sleep_mode else "share"
        plan.problems.append(
            f"during the weight sync stage 0 holds its training state {_gib(stages[0].state)}, the engine's "
            f"{engine} {_gib(rollout.weights if layout.sleep_mode else rollout.budget)} and the sync buffers "
            f"{_gib(rollout.sync_buffers)}: {_gib(-plan.sync_headroom)} over {gpu_memory_gib:g} GiB - "
            f"{reserve_gib:g} GiB reserve; use a smaller rollout.weight_sync_bucket_mb or more GPUs")
    if rollout.waves is None:
        need = rollout.weights + rollout.one_sequence
        plan.problems.append(
            f"vLLM needs {_gib(need)} per GPU (weights {_gib(rollout.weights)} at rollout TP={layout.rollout_tp} + "
            f"KV of one {workload.seq_length}-token sequence {_gib(rollout.one_sequence)}) but its share is "
            f"{_gib(rollout.budget)} (gpu_memory_utilization {gpu_memory_utilization:g}): "
            f"{_gib(need - rollout.budget)} over")
    if layout.rollout_tp > layout.tp * layout.pp:
        plan.problems.append(f"rollout TP={layout.rollout_tp} needs more GPUs than one model replica has "
                             f"(TP x PP = {layout.tp * layout.pp})")
    return plan
