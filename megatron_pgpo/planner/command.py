"""`megatron-pgpo plan`: arguments (argparse only, imported when the CLI builds its parser) and the command.

Values come from the flags, else from ``--config`` (a run YAML such as ``examples/qwen2_5_vl_72b_pgpo.yaml``: its
parallel layout, dtype, recompute, batch sizes, lengths, image size, vLLM share), else from the paper's recipe
(prompt 4096 + response 2048 tokens, 384 prompts x 5 responses, 128 prompts per update, micro-batch 2, bf16,
selective recompute, distributed optimizer, vLLM share 0.5). Every input is checked before the model config is read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

PUBLISHED = ("3b", "7b", "32b", "72b")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "examples" / "hf_configs"

#: The paper's recipe (docs/pgpo_spec.md section 4), used for whatever neither a flag nor --config sets.
DEFAULTS: Dict[str, Any] = dict(
    prompt_length=4096, response_length=2048, rollout_batch_size=384, n=5, global_batch_size=128,
    micro_batch_size=2, max_pixels=1003520, estimator="k3", kl_chunk_tokens=1024, text_only_pass=True, dtype="bf16",
    recompute="selective", sequence_parallel=None, distributed_optimizer=True, train_vision_tower=True,
    gpu_memory_utilization=0.5, rollout_tp=None, tp=None, pp=None, make_vocab_size_divisible_by=128,
    vision_attention="auto", vision_recompute=False, sleep_mode=True, offload_during_rollout=False,
    first_stage_layers=None, last_stage_layers=None, weight_sync_bucket_mb=512, reference_model=False,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `plan` subcommand's arguments (no heavy imports)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=PUBLISHED, help="a published Qwen2.5-VL size (examples/hf_configs)")
    src.add_argument("--hf-config", metavar="PATH", help="a Qwen2.5-VL config.json or checkpoint directory")
    p.add_argument("--config", dest="run_config", metavar="RUN.yaml",
                   help="read layout, batch sizes and lengths from a run config (flags override it)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--tp", type=int, help="evaluate this tensor-parallel size (default: try every valid one)")
    p.add_argument("--pp", type=int, help="evaluate this pipeline-parallel size (default: try every valid one)")
    p.add_argument("--rollout-tp", type=int, help="vLLM tensor-parallel size (default: smallest that fits)")
    p.add_argument("--first-stage-layers", type=int, help="language layers on pipeline stage 0 (default: the planner "
                   "tries the even split and lighter first stages, which also hold the vision tower)")
    p.add_argument("--last-stage-layers", type=int, help="language layers on the last pipeline stage")
    p.add_argument("--prompt-length", type=int, help="prompt tokens, image tokens included (default 4096)")
    p.add_argument("--response-length", type=int, help="response tokens (default 2048)")
    p.add_argument("--rollout-batch-size", type=int, help="prompts per rollout step (default 384)")
    p.add_argument("--n", type=int, help="responses per prompt (default 5)")
    p.add_argument("--global-batch-size", type=int, help="prompts per optimizer update (default 128)")
    p.add_argument("--micro-batch-size", type=int, help="samples per training micro-batch (default 2)")
    p.add_argument("--max-pixels", type=int, help="image size in pixels, the worst case (default 1003520)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), help="Megatron activation recompute")
    p.add_argument("--sequence-parallel", dest="sequence_parallel", action="store_true", default=None,
                   help="force sequence parallelism on (default: on when TP > 1)")
    p.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false")
    p.add_argument("--no-distributed-optimizer", dest="distributed_optimizer", action="store_false", default=None,
                   help="replicate the optimizer state on every DP rank")
    p.add_argument("--freeze-vision-tower", dest="train_vision_tower", action="store_false", default=None,
                   help="model.train_vision_tower=false")
    p.add_argument("--vision-attention", choices=("auto", "eager", "sdpa", "flash_attention_2"),
                   help="model.vision_attention (default auto: flash-attention or SDPA, no attention scores kept)")
    p.add_argument("--vision-recompute", dest="vision_recompute", action="store_true", default=None,
                   help="model.vision_recompute=true: each vision block keeps only its input")
    p.add_argument("--no-sleep-mode", dest="sleep_mode", action="store_false", default=None,
                   help="rollout.sleep_mode=false: the engine keeps its share while training runs (default: it "
                        "sleeps, as on GPUs by default)")
    p.add_argument("--offload-during-rollout", dest="offload_during_rollout", action="store_true", default=None,
                   help="trainer.offload_during_rollout=true: the training state waits in host memory during rollouts")
    p.add_argument("--weight-sync-bucket-mb", type=int,
                   help="rollout.weight_sync_bucket_mb: the weight sync's bucket, held twice on stage 0 (default 512)")
    p.add_argument("--kl-reference", dest="reference_model", action="store_true", default=None,
                   help="algorithm.kl.coef > 0: a frozen reference copy of the weights for the KL penalty")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="model dtype (default bf16)")
    p.add_argument("--estimator", choices=("k3", "exact"), help="algorithm.pgpo.estimator (default k3)")
    p.add_argument("--kl-chunk-tokens", type=int, help="algorithm.pgpo.kl_chunk_tokens (default 1024)")
    p.add_argument("--no-text-only-pass", dest="text_only_pass", action="store_false", default=None,
                   help="GRPO/DAPO: the scoring pass runs the image rows only (default: PGPO's image + text-only)")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of each GPU (default 0.5)")
    p.add_argument("--reserve-gib", type=float, default=2.0,
                   help="per-GPU reserve for CUDA context, NCCL and fragmentation (default 2)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    p.add_argument("--check-meta", action="store_true",
                   help="also build every stage of the chosen layout on the meta device (fake process group) and "
                        "compare its parameter count with the formula (exit 1 on a mismatch)")


def _from_run_config(path: str) -> Dict[str, Any]:
    from ..config import ConfigError, load_config

    try:
        cfg = load_config(path, [])
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    from ..algorithms import ADVANTAGE_SHAPERS, POLICY_LOSSES, second_view

    par, model, r, d, t = cfg.parallel, cfg.model, cfg.rollout, cfg.data, cfg.trainer
    shaper = ADVANTAGE_SHAPERS.get(cfg.algorithm.advantage)  # as the loop decides whether to run a second view
    # a second view of the image (text-only or masked) doubles the scoring pass's rows
    text_only = bool(second_view(shaper, POLICY_LOSSES.get(cfg.algorithm.loss))
                     or cfg.algorithm.monitor_visual_dependency)
    return dict(tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                first_stage_layers=par.first_stage_layers, last_stage_layers=par.last_stage_layers,
                rollout_tp=par.rollout_tensor_parallel_size, sequence_parallel=par.sequence_parallel,
                distributed_optimizer=par.use_distributed_optimizer, dtype=model.dtype, recompute=model.recompute,
                train_vision_tower=model.train_vision_tower, vision_attention=model.vision_attention,
                vision_recompute=model.vision_recompute,
                sleep_mode=True if r.sleep_mode is None else r.sleep_mode,  # None: on with CUDA, what plans are for
                offload_during_rollout=t.offload_during_rollout, weight_sync_bucket_mb=r.weight_sync_bucket_mb,
                reference_model=cfg.algorithm.kl.coef > 0,
                make_vocab_size_divisible_by=model.make_vocab_size_divisible_by, n=r.n,
                response_length=r.max_new_tokens, gpu_memory_utilization=r.gpu_memory_utilization,
                rollout_batch_size=d.rollout_batch_size, prompt_length=d.max_prompt_length,
                max_pixels=d.max_pixels, global_batch_size=t.global_batch_size,
                micro_batch_size=t.micro_batch_size, estimator=cfg.algorithm.pgpo.estimator,
                kl_chunk_tokens=cfg.algorithm.pgpo.kl_chunk_tokens, text_only_pass=text_only)


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """Flags > --config > DEFAULTS, validated; raises SystemExit with the reason."""
    values = dict(DEFAULTS)
    if getattr(args, "config", None):  # key=value leftovers the top-level parser collects
        raise SystemExit(f"error: plan takes no config overrides, got {' '.join(args.config)}")
    if args.run_config:
        if not Path(args.run_config).is_file():
            raise SystemExit(f"error: --config {args.run_config}: no such file")
        values.update(_from_run_config(args.run_config))
    for key in DEFAULTS:
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    problems = []
    positive = ["prompt_length", "response_length", "rollout_batch_size", "global_batch_size", "micro_batch_size",
                "max_pixels", "kl_chunk_tokens", "weight_sync_bucket_mb"]
    for key in positive + ["tp", "pp", "rollout_tp", "first_stage_layers", "last_stage_layers"]:
        if values[key] is not None and values[key] < 1:
            problems.append(f"--{key.replace('_', '-')} must be >= 1, got {values[key]}")
    if args.gpus < 1:
        problems.append(f"--gpus must be >= 1, got {args.gpus}")
    if values["n"] < 2:
        problems.append(f"--n must be >= 2 (group-relative advantages), got {values['n']}")
    if args.gpu_memory_gib <= 0:
        problems.append(f"--gpu-memory-gib must be > 0, got {args.gpu_memory_gib}")
    if not 0 < values["gpu_memory_utilization"] < 1:
        problems.append(f"--gpu-memory-utilization must be in (0, 1), got {values['gpu_memory_utilization']}")
    if args.reserve_gib < 0:
        problems.append(f"--reserve-gib must be >= 0, got {args.reserve_gib}")
    tp, pp = values["tp"], values["pp"]
    if args.gpus >= 1 and (tp or 1) * (pp or 1) and args.gpus % ((tp or 1) * (pp or 1)):
        problems.append(f"TP x PP = {tp or 1} x {pp or 1} does not divide --gpus {args.gpus}")
    if values["sequence_parallel"] and tp == 1:
        problems.append("sequence parallelism needs TP > 1")
    if args.hf_config and not Path(args.hf_config).exists():
        problems.append(f"--hf-config {args.hf_config}: no such file or directory")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    return values


def run_plan(args: argparse.Namespace) -> int:
    """Resolve the inputs, estimate / recommend, print tables or JSON, optionally run the meta-device check."""
    values = resolve(args)
    from ..models.qwen2_5_vl.hf_config import ModelConfigError, load_hf_config, validate_parallel_layout
    from .memory import Workload
    from .model_size import ModelShape
    from .recommend import Options, recommend
    from .report import print_report, recommendation_to_dict

    source = args.hf_config or str(CONFIG_DIR / f"qwen2_5_vl_{args.model}.json")
    name = args.hf_config or f"Qwen2.5-VL-{args.model.upper()}"
    try:
        shape = ModelShape.from_hf(load_hf_config(source))
        if values["tp"] or values["pp"]:
            validate_parallel_layout(shape.text, values["tp"] or 1, values["pp"] or 1, values["first_stage_layers"],
                                     values["last_stage_layers"])
    except ModelConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    workload = Workload(prompt_length=values["prompt_length"], response_length=values["response_length"],
                        rollout_batch_size=values["rollout_batch_size"], n=values["n"],
                        micro_batch_size=values["micro_batch_size"], global_batch_size=values["global_batch_size"],
                        max_pixels=values["max_pixels"], estimator=values["estimator"],
                        kl_chunk_tokens=values["kl_chunk_tokens"], text_only_pass=values["text_only_pass"])
    options = Options(gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib,
                      gpu_memory_utilization=values["gpu_memory_utilization"], reserve_gib=args.reserve_gib,
                      recompute=values["recompute"], sequence_parallel=values["sequence_parallel"],
                      distributed_optimizer=values["distributed_optimizer"], dtype=values["dtype"],
                      train_vision_tower=values["train_vision_tower"], rollout_tp=values["rollout_tp"],
                      make_vocab_size_divisible_by=values["make_vocab_size_divisible_by"],
                      vision_attention=values["vision_attention"], vision_recompute=values["vision_recompute"],
                      sleep_mode=values["sleep_mode"], offload_during_rollout=values["offload_during_rollout"],
                      first_stage_layers=values["first_stage_layers"], last_stage_layers=values["last_stage_layers"],
                      weight_sync_bucket_mb=values["weight_sync_bucket_mb"],
                      reference_model=values["reference_model"])
    try:
        rec = recommend(shape, workload, options, tp=values["tp"], pp=values["pp"])
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    document = recommendation_to_dict(rec, shape, name)
    meta_ok: Optional[bool] = None
    if args.check_meta:
        meta_ok, document["meta_check"] = _meta_check(source, shape, rec, values, quiet=args.json)
    if args.json:
        json.dump(document, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_report(rec, shape, name)
        if meta_ok is not None:
            _print_meta_check(document["meta_check"], meta_ok)
    if meta_ok is False:
        return 1
    return 0 if rec.best is not None else 1


def _meta_check(source: str, shape, rec, values: Dict[str, Any], quiet: bool):
    from .meta_check import check_layout

    plan = rec.best or rec.closest or rec.plans[0]
    tp, pp = plan.layout.tp, plan.layout.pp
    if not quiet:
        print(f"meta-device check: building the {pp} stage(s) of TP={tp} PP={pp} (TP ranks {sorted({0, tp - 1})}) "
              "in a child process ...", flush=True)
    checks = check_layout(source, shape, tp, pp, tp_ranks=sorted({0, tp - 1}), dtype=values["dtype"],
                          make_vocab_size_divisible_by=values["make_vocab_size_divisible_by"],
                          first_stage_layers=plan.layout.first_stage_layers,
                          last_stage_layers=plan.layout.last_stage_layers)
    rows = [dict(stage=c.stage, tp_rank=c.tp_rank, built=c.built, predicted=c.predicted, ok=c.ok,
                 first_difference=c.first_difference) for c in checks]
    return all(c.ok for c in checks), rows


def _print_meta_check(rows, ok: bool) -> None:
    for r in rows:
        status = "equal" if r["ok"] else f"MISMATCH {r['first_difference'] or ''}"
        print(f"  stage {r['stage']} TP rank {r['tp_rank']}: meta build {r['built']:,} parameters, formula "
              f"{r['predicted']:,}: {status}")
    print("meta-device check: PASS" if ok else "meta-device check: FAIL")
