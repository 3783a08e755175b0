"""Choose a (TP, PP, DP) layout and a micro-batch size for a GPU count, or say why nothing fits.

Valid layouts (what ``validate_parallel_layout`` and Megatron accept): TP <= 8 (one node's NVLink domain) dividing
the attention heads, the KV heads and the MLP width; PP <= 16 with an even split of the language layers or an
uneven one (``pipeline_splits``: a lighter first stage, which also holds the vision tower and the embedding, the
other stages sharing the rest evenly; unless ``first_stage_layers`` / ``last_stage_layers`` are given, the split
with the most headroom is chosen); TP x PP dividing the GPU count; DP = GPUs / (TP x PP). Sequence parallelism is
on whenever TP > 1 unless told otherwise.

The vLLM engine's TP (``rollout_tp``), unless given, is chosen among 1, 2, 4, 8 (dividing the attention heads,
compatible with the KV heads, within one model replica: <= TP x PP): the one whose KV cache needs the fewest
generation waves for its share of a rollout step, the smallest on a tie (vLLM's share of the GPU is fixed by
``gpu_memory_utilization``, so a larger rollout TP only leaves more of it to the KV cache).

Choice: among the layouts that fit (``memory.estimate`` reports no problem) the smallest TP x PP wins (more data
parallelism, less communication per token), ties broken by the most headroom. The micro-batch is the given one
if something fits with it, else the largest smaller power of two that does; then it is raised while the chosen
layout still fits. When nothing fits even at micro-batch 1, the layout that came closest is explained term by
term, with the single changes that would make it fit (each re-estimated, not guessed).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional

from .memory import GIB, Layout, MemoryPlan, Workload, estimate
from .model_size import ModelShape

MAX_TP = 8
MAX_PP = 16  # deeper pipelines leave each stage a handful of layers and mostly bubbles
MAX_UNEVEN_SPLITS = 3  # lighter first stages tried per PP (the least uneven ones)
MAX_MICRO_BATCH = 64


@dataclass(frozen=True)
class Options:
    """Everything besides the model and the workload that the estimate depends on."""

    gpus: int
    gpu_memory_gib: float = 80.0
    gpu_memory_utilization: float = 0.5
    reserve_gib: float = 2.0
    recompute: str = "selective"
    sequence_parallel: Optional[bool] = None  # None: on when TP > 1
    distributed_optimizer: bool = True
    dtype: str = "bf16"
    train_vision_tower: bool = True
    rollout_tp: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    vision_attention: str = "auto"
    vision_recompute: bool = False
    first_stage_layers: Optional[int] = None  # None (and no last): the planner chooses the split
    last_stage_layers: Optional[int] = None
    sleep_mode: bool = True
    offload_during_rollout: bool = False
    weight_sync_bucket_mb: int = 512
    reference_model: bool = False


@dataclass
class Recommendation:
    """The chosen plan (None when nothing fits), every plan evaluated at the chosen micro-batch, and in words why."""

    best: Optional[MemoryPlan]
    plans: List[MemoryPlan]
    micro_batch_size: Optional[int]
    notes: List[str] = field(default_factory=list)
    suggestions: List[str] = field(default_factory=list)
    closest: Optional[MemoryPlan] = None  # when nothing fits: the plan that came closest, at micro-batch 1


def pipeline_splits(num_layers: int, pp: int, max_uneven: int = MAX_UNEVEN_SPLITS) -> List[tuple]:
    """``(first_stage_layers, last_stage_layers)`` splits worth trying at PP: the even one (``(None, None)``) where
    PP divides the layers, then the ``max_uneven`` least uneven ones with a lighter first stage (it also holds the
    vision tower and the embedding) whose other stages share the rest evenly, or, where no such split exists
    (28 layers at PP=8), with a last stage no heavier than the middle ones as well."""
    if pp == 1:
        return [(None, None)]
    out = [(None, None)] if num_layers % pp == 0 else []
    uneven = []  # (how uneven, first, last)
    for first in range(1, num_layers):
        rest = num_layers - first
        if rest % (pp - 1) == 0 and first < rest // (pp - 1):
            uneven.append((rest // (pp - 1) - first, first, None))
    if not uneven and pp > 2:
        for first in range(1, num_layers):
            for last in range(1, num_layers - first):
                rest = num_layers - first - last
                if rest > 0 and rest % (pp - 2) == 0:
                    share = rest // (pp - 2)
                    if first < share and last <= share:
                        uneven.append((2 * share - first - last, first, last))
    return out + [(first, last) for _, first, last in sorted(uneven)[:max_uneven]]


def valid_layouts(shape: ModelShape, gpus: int) -> List[tuple]:
    """Every (TP, PP) that shards this model on ``gpus`` GPUs (PP with an even or an uneven split), smallest
    TP x PP first."""
    t = shape.text
    out = []
    for tp in (1, 2, 4, 8):
        if tp > MAX_TP or any(x % tp for x in (t.num_heads, t.num_kv_heads, t.ffn_hidden_size)):
            continue
        for pp in range(1, min(t.num_layers, MAX_PP) + 1):
            if pipeline_splits(t.num_layers, pp) and gpus % (tp * pp) == 0:
                out.append((tp, pp))
    return sorted(out, key=lambda x: (x[0] * x[1], x[1]))


def _rollout_tp_candidates(shape: ModelShape, tp: int, pp: int) -> List[int]:
    t = shape.text
    return [r for r in (1, 2, 4, 8) if r <= tp * pp and t.num_heads % r == 0
            and (t.num_kv_heads % r == 0 or r % t.num_kv_heads == 0)]


def plan_layout(shape: ModelShape, workload: Workload, options: Options, tp: int, pp: int) -> MemoryPlan:
    """``memory.estimate`` for (TP, PP) on ``options.gpus`` GPUs, choosing the rollout TP if not given and, at PP > 1,
    the pipeline split if not given (the one with the most headroom: an uneven split gives stage 0, which also holds
    the vision tower, fewer layers)."""
    if options.gpus % (tp * pp):
        raise ValueError(f"TP x PP = {tp} x {pp} does not divide {options.gpus} GPUs")
    given = (options.first_stage_layers, options.last_stage_layers)
    if given != (None, None) and _valid_split(shape.text.num_layers, pp, *given):
        splits = [given]
    else:  # none given, or the given one belongs to another PP (``recommend`` compares other layouts too)
        splits = pipeline_splits(shape.text.num_layers, pp) or [(None, None)]
    plans = [_plan_split(shape, workload, options, tp, pp, first, last) for first, last in splits]
    return max(plans, key=lambda p: (p.fits, p.headroom))


def _valid_split(num_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> bool:
    from ..models.qwen2_5_vl.hf_config import ModelConfigError, stage_layer_counts

    try:
        stage_layer_counts(num_layers, pp, first, last)
        return True
    except ModelConfigError:
        return False


def _plan_split(shape: ModelShape, workload: Workload, options: Options, tp: int, pp: int,
                first: Optional[int], last: Optional[int]) -> MemoryPlan:
    sp = tp > 1 if options.sequence_parallel is None else options.sequence_parallel
    base = Layout(tp=tp, pp=pp, dp=options.gpus // (tp * pp), rollout_tp=options.rollout_tp or 1,
                  sequence_parallel=sp, recompute=options.recompute,
                  distributed_optimizer=options.distributed_optimizer, dtype=options.dtype,
                  train_vision_tower=options.train_vision_tower,
                  make_vocab_size_divisible_by=options.make_vocab_size_divisible_by,
                  vision_attention=options.vision_attention, vision_recompute=options.vision_recompute,
                  sleep_mode=options.sleep_mode, offload_during_rollout=options.offload_during_rollout,
                  first_stage_layers=first, last_stage_layers=last,
                  weight_sync_bucket_mb=options.weight_sync_bucket_mb, reference_model=options.reference_model)
    mem = dict(gpu_memory_gib=options.gpu_memory_gib, gpu_memory_utilization=options.gpu_memory_utilization,
               reserve_gib=options.reserve_gib)
    if options.rollout_tp is not None:
        return estimate(shape, base, workload, **mem)
    plans = [estimate(shape, replace(base, rollout_tp=r), workload, **mem)
             for r in _rollout_tp_candidates(shape, tp, pp) or [1]]
    return min(plans, key=lambda p: (p.rollout.waves is None, p.rollout.waves or 0, p.layout.rollout_tp))


def _choose(plans: List[MemoryPlan]) -> Optional[MemoryPlan]:
    fitting = [p for p in plans if p.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda p: (p.layout.tp * p.layout.pp, -p.headroom))


def _micro_batch_candidates(given: int) -> List[int]:
    out, mb = [given], given
    while mb > 1:
        mb //= 2
        out.append(mb)
    return out


def recommend(shape: ModelShape, workload: Workload, options: Options, tp: Optional[int] = None,
              pp: Optional[int] = None) -> Recommendation:
    """Evaluate the given (TP, PP), or every valid layout, and choose (see the module docstring)."""
    if tp is not None and pp is not None:
        layouts = [(tp, pp)]
    else:
        layouts = [(t, p) for t, p in valid_layouts(shape, options.gpus)
                   if (tp is None or t == tp) and (pp is None or p == pp)]
    if not layouts:
        raise ValueError(f"no valid (TP, PP) layout of this model on {options.gpus} GPUs"
                         + (f" with TP={tp}" if tp else "") + (f" with PP={pp}" if pp else ""))
    notes: List[str] = []
    first_plans: List[MemoryPlan] = []
    for mb in _micro_batch_candidates(workload.micro_batch_size):
        w = replace(workload, micro_batch_size=mb)
        plans = [plan_layout(shape, w, options, t, p) for t, p in layouts]
        first_plans = first_plans or plans
        best = _choose(plans)
        if best is not None:
            if mb != workload.micro_batch_size:
                notes.append(f"nothing fits at micro-batch {workload.micro_batch_size}; the largest that fits is {mb}")
            best, mb = _raise_micro_batch(shape, w, options, best)
            plans = [plan_layout(shape, replace(workload, micro_batch_size=mb), options, t, p) for t, p in layouts]
            return Recommendation(best=best, plans=plans, micro_batch_size=mb, notes=notes)
    closest = max(plans, key=lambda p: p.headroom)  # at micro-batch 1
    notes.append(f"nothing fits on {options.gpus} x {options.gpu_memory_gib:g} GiB GPUs, even at micro-batch 1; "
                 f"closest: TP={closest.layout.tp} PP={closest.layout.pp} DP={closest.layout.dp}")
    notes += closest.problems
    hints = suggestions(shape, closest, options)
    if tp is not None or pp is not None:  # the layout was fixed: would another one on these GPUs fit?
        other = recommend(shape, workload, options)
        if other.best is not None:
            lay = other.best.layout
            hints.insert(0, f"--tp {lay.tp} --pp {lay.pp} (the recommended layout on these GPUs): fits at "
                            f"micro-batch {other.micro_batch_size} with {other.best.headroom / GIB:.1f} GiB headroom")
    return Recommendation(best=None, plans=first_plans, micro_batch_size=None, notes=notes, suggestions=hints,
                          closest=closest)


def _raise_micro_batch(shape: ModelShape, workload: Workload, options: Options, best: MemoryPlan):
    samples = (workload.global_batch_size or workload.rollout_batch_size) * workload.n // best.layout.dp
    mb = workload.micro_batch_size
    while mb * 2 <= min(MAX_MICRO_BATCH, max(1, samples)):
        bigger = plan_layout(shape, replace(workload, micro_batch_size=mb * 2), options, best.layout.tp,
                             best.layout.pp)
        if not bigger.fits:
            break
        best, mb = bigger, mb * 2
    return best, mb


def suggestions(shape: ModelShape, plan: MemoryPlan, options: Options) -> List[str]:
    """Single changes that make ``plan`` fit, each re-estimated (empty if none of them does)."""
    lay, w = plan.layout, plan.workload
    out: List[str] = []

    def tried(what: str, opts: Options = options, workload: Workload = w) -> None:
        p = plan_layout(shape, workload, opts, lay.tp, lay.pp)
        if p.fits:
            out.append(f"{what}: fits with {p.headroom / GIB:.1f} GiB headroom")

    if lay.recompute != "full":
        tried("--recompute full (model.recompute)", replace(options, recompute="full"))
    if not lay.distributed_optimizer:
        tried("without --no-distributed-optimizer (parallel.use_distributed_optimizer=true)",
              replace(options, distributed_optimizer=True))
    if lay.train_vision_tower and lay.vision_attention == "eager":
        tried("--vision-attention auto (model.vision_attention: no [patches, patches] attention scores kept)",
              replace(options, vision_attention="auto"))
    if lay.train_vision_tower and not lay.vision_recompute:
        tried("--vision-recompute (model.vision_recompute: each vision block keeps only its input)",
              replace(options, vision_recompute=True))
    if lay.train_vision_tower:
        tried("--freeze-vision-tower (model.train_vision_tower=false: no vision gradients, optimizer state or "
              "activations)", replace(options, train_vision_tower=False))
    if not lay.sleep_mode:
        tried("without --no-sleep-mode (rollout.sleep_mode: the engine frees its share while training runs)",
              replace(options, sleep_mode=True))
    elif not lay.offload_during_rollout:
        tried("--offload-during-rollout (trainer.offload_during_rollout: the training state waits in host memory "
              "while the engine generates)", replace(options, offload_during_rollout=True))
    pixels = w.max_pixels // 2
    while pixels >= 28 * 28 * 16:
        p = plan_layout(shape, replace(w, max_pixels=pixels), options, lay.tp, lay.pp)
        if p.fits:
            out.append(f"--max-pixels {pixels} (data.max_pixels: the vision tower's activations shrink): fits with "
                       f"{p.headroom / GIB:.1f} GiB headroom")
            break
        pixels //= 2
    rollout = plan.rollout
    # the largest share vLLM may take: next to training's peak, or with sleep mode next to what training keeps
    worst = (max(plan.kept_during_rollout(s) for s in plan.stages) if lay.sleep_mode else plan.peak_stage.peak)
    u_max = 1 - (worst + plan.reserve) / plan.gpu_memory
    u_min = (rollout.weights + rollout.one_sequence) / plan.gpu_memory
    if u_min <= u_max and not u_min <= options.gpu_memory_utilization <= u_max:
        u = max(u_min, int(u_max * 100) / 100)
        tried(f"--gpu-memory-utilization {u:.2f} (rollout.gpu_memory_utilization)",
              replace(options, gpu_memory_utilization=u))
    for factor in (2, 4, 8, 16):
        gpus = options.gpus * factor
        p = plan_layout(shape, w, replace(options, gpus=gpus), lay.tp, lay.pp)
        if p.fits:
            out.append(f"--gpus {gpus} (DP={p.layout.dp}: the distributed optimizer and each vLLM engine's share "
                       f"of the rollout shrink): fits with {p.headroom / GIB:.1f} GiB headroom")
            break
    if not out:
        combined = combined_suggestion(shape, plan, options)
        if combined:
            out.append(combined)
    return out


def combined_suggestion(shape: ModelShape, plan: MemoryPlan, options: Options, max_steps: int = 12) -> Optional[str]:
    """Greedy: apply, one at a time, whichever change gains the most headroom (full recompute, vision recompute, the
    distributed optimizer, half the image pixels, twice the GPUs up to 16x, 0.05 less vLLM share while vLLM can
    still start)
    until the layout fits; the flags that got it there, or None."""
    lay, opts, w, current = plan.layout, options, plan.workload, plan
    flags: dict = {}
    for _ in range(max_steps):
        candidates = []
        if opts.recompute != "full":
            candidates.append(("--recompute", "full", replace(opts, recompute="full"), w))
        if opts.train_vision_tower and not opts.vision_recompute:
            candidates.append(("--vision-recompute", "", replace(opts, vision_recompute=True), w))
        if opts.sleep_mode and not opts.offload_during_rollout:
            candidates.append(("--offload-during-rollout", "", replace(opts, offload_during_rollout=True), w))
        if not opts.distributed_optimizer:
            candidates.append(("(without --no-distributed-optimizer)", "", replace(opts, distributed_optimizer=True),
                               w))
        if w.max_pixels // 2 >= 28 * 28 * 16:
            candidates.append(("--max-pixels", str(w.max_pixels // 2), opts, replace(w, max_pixels=w.max_pixels // 2)))
        if opts.gpus < 16 * options.gpus:
            candidates.append(("--gpus", str(opts.gpus * 2), replace(opts, gpus=opts.gpus * 2), w))
        if opts.gpu_memory_utilization > 0.1:
            u = round(opts.gpu_memory_utilization - 0.05, 2)
            candidates.append(("--gpu-memory-utilization", f"{u:g}", replace(opts, gpu_memory_utilization=u), w))
        scored = [(plan_layout(shape, w2, o2, lay.tp, lay.pp), flag, value, o2, w2)
                  for flag, value, o2, w2 in candidates]
        scored = [x for x in scored if x[0].rollout.waves is not None]
        if not scored:
            return None
        best = max(scored, key=lambda x: x[0].headroom)
        if best[0].headroom <= current.headroom:
            return None
        current, opts, w = best[0], best[3], best[4]
        flags[best[1]] = best[2]
        if current.fits:
            joined = " ".join(f"{k} {v}".strip() for k, v in flags.items())
            return (f"together: {joined}: fits with {current.headroom / GIB:.1f} GiB headroom "
                    f"(vLLM: {current.rollout.waves} wave(s) of generation per step)")
    return None
