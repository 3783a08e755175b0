"""The planner's output: a dict for ``--json`` (bytes and element counts as integers) and rich tables (GiB)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, List, Optional

from .memory import GIB, MemoryPlan
from .model_size import ModelShape, hf_parameter_count, megatron_parameter_count
from .recommend import Recommendation

STAGE_TERMS = [("parameters", "parameters (elements)"), ("weights", "weights"), ("grads", "gradients (fp32)"),
               ("optimizer", "optimizer state"), ("reference", "reference weights (KL penalty)"),
               ("activations", "activations (decoder)"),
               ("vision_activations", "activations (vision tower)"), ("update_logits", "logits, update pass"),
               ("scoring_logits", "logits, scoring pass (chunked)"),
               ("scoring_logits_unchunked", "  same with a plain fp32 log-softmax"), ("peak", "training peak")]


def model_counts(shape: ModelShape, tp: int, make_vocab_size_divisible_by: int = 128) -> Dict[str, int]:
    """transformers' parameter count and Megatron's (padded vocabulary at ``tp``)."""
    return {"hf_parameters": hf_parameter_count(shape),
            "megatron_parameters": megatron_parameter_count(shape, tp, make_vocab_size_divisible_by)}


def plan_to_dict(plan: MemoryPlan) -> Dict[str, Any]:
    """Everything about one plan; sizes in bytes."""
    stages = []
    for s in plan.stages:
        d = asdict(s)
        d.update(state=s.state, update_pass=s.update_pass, peak=s.peak)
        stages.append(d)
    r = plan.rollout
    return {
        "layout": asdict(plan.layout), "workload": asdict(plan.workload), "gpus": plan.layout.gpus,
        "gpu_memory_bytes": plan.gpu_memory, "gpu_memory_utilization": plan.gpu_memory_utilization,
        "reserve_bytes": plan.reserve, "training_budget_bytes": plan.training_budget,
        "rollout_headroom_bytes": plan.rollout_headroom, "sync_headroom_bytes": plan.sync_headroom,
        "limit": plan.limit,
        "micro_batches_per_update": plan.micro_batches_per_update, "stages": stages,
        "peak_stage": plan.peak_stage.stage, "peak_bytes": plan.peak_stage.peak, "headroom_bytes": plan.headroom,
        "rollout": {**asdict(r), "one_sequence_kv": r.one_sequence, "waves": r.waves},
        "fits": plan.fits, "problems": list(plan.problems),
    }


def recommendation_to_dict(rec: Recommendation, shape: ModelShape, model_name: str) -> Dict[str, Any]:
    """The ``--json`` document."""
    shown = rec.best or rec.closest or rec.plans[0]
    return {
        "model": model_name,
        **model_counts(shape, shown.layout.tp, shown.layout.make_vocab_size_divisible_by),
        "megatron_parameters_tp": shown.layout.tp,
        "fits": rec.best is not None,
        "recommended": plan_to_dict(rec.best) if rec.best else None,
        "closest": plan_to_dict(rec.closest) if rec.closest else None,
        "micro_batch_size": rec.micro_batch_size,
        "plans": [plan_to_dict(p) for p in rec.plans],
        "notes": list(rec.notes), "suggestions": list(rec.suggestions),
    }


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _stage_layers(shape: ModelShape, lay) -> list:
    from ..models.qwen2_5_vl.hf_config import stage_layer_counts

    return stage_layer_counts(shape.text.num_layers, lay.pp, lay.first_stage_layers, lay.last_stage_layers)


def _stage_table(plan: MemoryPlan, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("per GPU (GiB)")
    for s in plan.stages:
        table.add_column(f"stage {s.stage}", justify="right")
    for key, label in STAGE_TERMS:
        values = [getattr(s, key) for s in plan.stages]
        if key == "parameters":
            table.add_row(label, *(f"{v:,}" for v in values))
        elif any(values) or key in ("peak", "activations"):
            style = "bold" if key == "peak" else None
            table.add_row(label, *(_gib(v) for v in values), style=style)
    r = plan.rollout
    waves = "does not fit" if r.waves is None else str(r.waves)
    table.add_section()
    table.add_row(f"vLLM share ({plan.gpu_memory_utilization:g} x {plan.gpu_memory / GIB:g} GiB)",
                  *([_gib(r.budget)] * len(plan.stages)))
    table.add_row(f"  vLLM weights (rollout TP={plan.layout.rollout_tp})", *([_gib(r.weights)] * len(plan.stages)))
    table.add_row(f"  KV cache pool ({r.kv_bytes_per_token:,} B/token/GPU)", *([_gib(r.kv_pool)] * len(plan.stages)))
    table.add_row("  KV for the whole rollout step / waves", *([f"{_gib(r.kv_needed)} / {waves}"] * len(plan.stages)))
    if plan.layout.sleep_mode:
        table.add_row("training budget (GPU - reserve; vLLM asleep)",
                      *([_gib(plan.training_budget)] * len(plan.stages)))
        table.add_row("headroom while training", *(_gib(plan.training_budget - s.peak) for s in plan.stages),
                      style="bold")
        kept = [plan.kept_during_rollout(s) for s in plan.stages]
        label = "offloaded" if plan.layout.offload_during_rollout else "weights + grads + optimizer"
        table.add_row(f"kept while vLLM generates ({label})", *(_gib(k) for k in kept))
        free = plan.gpu_memory - plan.reserve - r.budget
        table.add_row("headroom while vLLM generates", *(_gib(free - k) for k in kept), style="bold")
    else:
        table.add_row("training budget (rest - reserve)", *([_gib(plan.training_budget)] * len(plan.stages)))
        table.add_row("headroom", *(_gib(plan.training_budget - s.peak) for s in plan.stages), style="bold")
    sync = [_gib(plan.sync_headroom)] + ["-"] * (len(plan.stages) - 1)  # the engine owner is on stage 0
    table.add_row(f"headroom during the weight sync (+ buffers {_gib(r.sync_buffers)})", *sync, style="bold")
    return table


def _layouts_table(plans: List[MemoryPlan], chosen: Optional[MemoryPlan]):
    from rich.table import Table

    table = Table(title="layouts evaluated", title_justify="left")
    for col in ("TP", "PP", "DP", "rollout TP", "micro-batch", "peak GiB (stage)", "headroom GiB", "fits"):
        table.add_column(col, justify="right")
    for p in plans:
        mark = "<- chosen" if chosen is not None and p.layout == chosen.layout else ""
        table.add_row(str(p.layout.tp), str(p.layout.pp), str(p.layout.dp), str(p.layout.rollout_tp),
                      str(p.workload.micro_batch_size), f"{_gib(p.peak_stage.peak)} ({p.peak_stage.stage})",
                      _gib(p.headroom), ("yes " + mark) if p.fits else "no",
                      style="bold" if mark else None)
    return table


def print_report(rec: Recommendation, shape: ModelShape, model_name: str, console=None) -> None:
    """Counts, the layouts table, the chosen (or only / closest) plan stage by stage, notes and suggestions."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(width=120)
    detail = rec.best or rec.closest or rec.plans[0]
    counts = model_counts(shape, detail.layout.tp, detail.layout.make_vocab_size_divisible_by)
    w, lay = detail.workload, detail.layout
    console.print(f"[bold]{escape(model_name)}[/]: {counts['hf_parameters']:,} parameters (transformers), "
                  f"{counts['megatron_parameters']:,} in Megatron at TP={lay.tp} (vocabulary padded to a "
                  f"multiple of {lay.make_vocab_size_divisible_by} x TP)")
    console.print(f"workload: prompt {w.prompt_length} + response {w.response_length} tokens, rollout batch "
                  f"{w.rollout_batch_size} x n={w.n}, images up to {w.max_pixels:,} pixels, {lay.dtype}, "
                  f"recompute={lay.recompute}, distributed optimizer={lay.distributed_optimizer}, vision attention="
                  f"{lay.vision_attention}{' + recompute' if lay.vision_recompute else ''}, vLLM sleeps during "
                  f"training={lay.sleep_mode}, offload during rollouts={lay.offload_during_rollout}, scoring pass: "
                  + ("image + text-only rows" if w.text_only_pass else "image rows only"))
    if len(rec.plans) > 1:
        console.print(_layouts_table(rec.plans, rec.best))
    title = ("recommended" if rec.best else "closest, at micro-batch 1" if len(rec.plans) > 1 else
             "at micro-batch 1") + \
        f": TP={lay.tp} PP={lay.pp} DP={lay.dp}, micro-batch {w.micro_batch_size} " \
        f"({detail.micro_batches_per_update} per update per DP rank), sequence parallel={lay.sequence_parallel}" + \
        (f", layers per stage {_stage_layers(shape, lay)}" if lay.pp > 1 else "")
    console.print(_stage_table(detail, title))
    if rec.best is not None:
        console.print(f"[green]fits[/]: recommended micro-batch {rec.micro_batch_size}, "
                      f"headroom {_gib(rec.best.headroom)} GiB {rec.best.limit}")
    for note in rec.notes:
        console.print(f"[yellow]note[/]: {escape(note)}")
    for line in rec.suggestions:
        console.print(f"[cyan]suggestion[/]: {escape(line)}")
    if rec.best is None and not rec.suggestions:
        console.print("[cyan]suggestion[/]: no single change tried (full recompute, frozen vision tower, smaller "
                      "images, vLLM share, up to 16x the GPUs) makes it fit; combine them or use bigger GPUs")
