"""The `megatron-pgpo` command line. Each subcommand is a thin layer over a library function.

    megatron-pgpo demo [CONFIG.yaml] [section.key=value ...]
    megatron-pgpo train CONFIG.yaml [section.key=value ...] [--nproc N]
    megatron-pgpo walkthrough [CONFIG.yaml] [section.key=value ...]
    megatron-pgpo config [CONFIG.yaml] [section.key=value ...] [--describe] [--list-algorithms]
    megatron-pgpo reward RESPONSES.jsonl [--out SCORED.jsonl] [section.key=value ...]
    megatron-pgpo convert hf-to-mcore|mcore-to-hf SRC DST [options]
    megatron-pgpo check-parity --hf-path DIR [--tp N] [--pp M] [--image FILE] [--tolerance 1e-4]
    megatron-pgpo check-sync --hf-path DIR --tp N [--pp M]
    megatron-pgpo visualize RUN_DIR [--step N ... | --last | --all] [--out DIR] [--max-responses 24]
    megatron-pgpo plan --model 72b|--hf-config PATH --gpus N [--config RUN.yaml] [--tp T --pp P] [--json] [--check-meta]

Heavy imports (torch, megatron, vLLM) happen inside the subcommand that needs them, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

EPILOG_OVERRIDES = (
    "Configuration: an optional YAML file, then dotted overrides such as algorithm.pgpo.tau=0.3 or "
    "trainer.lr=1e-6 (values are YAML: true, null, 3, [1, 2]). Unknown keys are errors. "
    "`megatron-pgpo config --describe` lists every key with its default and meaning."
)


def _split_config_args(items: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """``[CONFIG.yaml] key=value ...`` -> (config path or None, overrides)."""
    path, overrides = None, []
    for i, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            path = item
        else:
            raise SystemExit(f"error: {item!r} is neither the first argument (a config file) nor a key=value override")
    return path, overrides


def _load(items: Sequence[str]):
    from .config import ConfigError, load_config

    path, overrides = _split_config_args(items)
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None


#: What `megatron-pgpo demo` runs when given no config file: the defaults (tiny model, built-in task) with the
#: settings docs/pgpo_spec.md section 6 measured to learn on CPU (TP=2, two passes over 4 mini-batches per rollout
#: batch, clip 0.2, responses of at most 16 tokens); the same as examples/tiny_cpu.yaml (a test keeps them equal).
DEMO_OVERRIDES = ["parallel.tensor_model_parallel_size=2", "trainer.global_batch_size=4", "trainer.ppo_epochs=2",
                  "algorithm.clip_high=0.2", "rollout.max_new_tokens=16"]


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.training import run_training_demo

    items = list(args.config)
    if not items or "=" in items[0]:
        items = DEMO_OVERRIDES + items
    cfg = _load(items)
    summary = run_training_demo(cfg)
    return 0 if summary.get("step") else 1


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .trainer.launch import ResumeError, check_supported, launch

    cfg = _load(args.config)
    try:
        check_supported(cfg)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    if cfg.model.hf_path is None:
        raise SystemExit("config error: model.hf_path is not set; point it at a Hugging Face Qwen2.5-VL checkpoint "
                         "directory (weights, tokenizer, preprocessor config), or use `megatron-pgpo demo` for the "
                         "built-in tiny model")
    try:  # launch checks the checkpoint it would resume from against this layout before any process starts
        summary = launch(cfg, nproc=args.nproc)
    except ResumeError as exc:
        raise SystemExit(f"resume error: {exc}") from None
    if summary.get("skipped_rows"):  # the end-of-run summary of unusable training rows (also warned at load)
        counts = summary["skipped_rows"]
        print(f"skipped {sum(counts.values())} unusable training rows: "
              + ", ".join(f"{n} with {reason}" for reason, n in counts.items()), file=sys.stderr)
    if summary.get("preempted") and os.environ.get("PGPO_PREEMPTED_EXIT_CODE"):
        # Stopped early on a signal after saving: a non-zero status makes nemo-run's sbatch script requeue the job.
        return int(os.environ["PGPO_PREEMPTED_EXIT_CODE"])
    return 0


def cmd_walkthrough(args: argparse.Namespace) -> int:
    from .demo.walkthrough import run_demo

    run_demo(_load(args.config))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.list_algorithms:
        from .algorithms import ADVANTAGE_SHAPERS, POLICY_LOSSES

        print(f"advantage shapers (algorithm.advantage): {', '.join(ADVANTAGE_SHAPERS.names())}")
        print(f"policy losses (algorithm.loss):          {', '.join(POLICY_LOSSES.names())}")
        return 0
    if args.describe:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from .config import describe

        table = Table(title="megatron-pgpo configuration keys", show_lines=True)
        for col in ("key", "type", "default", "meaning"):
            table.add_column(col, overflow="fold")
        for key, type_name, default, doc in describe():
            table.add_row(key, escape(type_name), escape(repr(default)), escape(doc.replace("\n", " ")))
        Console(width=max(120, Console().width)).print(table)
        return 0
    from .config import to_yaml

    cfg = _load(args.config)
    sys.stdout.write(to_yaml(cfg))
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    from .rewards.cli_scoring import score_jsonl

    cfg = _load(args.config)
    return score_jsonl(args.responses, args.out, cfg.reward, response_key=args.response_key,
                       answer_key=args.answer_key)


def cmd_check_sync(args: argparse.Namespace) -> int:
    from .rollout.check_sync import run_check

    return run_check(args)


def cmd_check_parity(args: argparse.Namespace) -> int:
    from .models.qwen2_5_vl.parity import check_parity_command

    return check_parity_command(args.hf_path, args.tp, args.pp, args.image, args.tolerance, args.reference_path)


def cmd_visualize(args: argparse.Namespace) -> int:
    from .visualize import visualize_command

    if getattr(args, "config", None):
        raise SystemExit(f"error: visualize takes no config overrides, got {' '.join(args.config)}")
    steps = "all" if args.all else "last" if args.last else args.step
    return visualize_command(args.run_dir, args.out, steps, args.max_responses, png=not args.no_png)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.command import run_eval

    return run_eval(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner.command import run_plan

    return run_plan(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-pgpo",
        description="PGPO / DAPO / GRPO reinforcement learning for Qwen2.5-VL on Megatron-Core with vLLM rollouts.",
        epilog=EPILOG_OVERRIDES,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('megatron_pgpo').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "demo",
        help="train a tiny Qwen2.5-VL with PGPO on the built-in visual task, on CPU (the README's main command)",
        description="Builds a tiny Qwen2.5-VL-architecture checkpoint with a word-level vocabulary, warms it up on "
        "the answer format, then trains it with PGPO on the built-in 'colour of the square' task: Megatron-Core "
        "TP=2 on two CPU processes with vLLM rollouts. Prints held-out accuracy before and after RL and where the "
        "metrics, checkpoints and HF export are. Without a config file: the defaults at TP=2. Running it again "
        "resumes from the last checkpoint in trainer.run_dir.",
        epilog=EPILOG_OVERRIDES,
    )
    p.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [KEY=VALUE ...]")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train",
        help="train with PGPO / DAPO / GRPO (local processes, or one rank under torchrun/srun)",
        description="Runs the distributed training loop on model.hf_path. Under torchrun or srun (RANK and "
        "WORLD_SIZE set) this process is one rank; otherwise --nproc local processes are started (default "
        "TP x PP; more give data parallelism). Resumes from the latest checkpoint in trainer.run_dir. SIGTERM or "
        "SIGUSR1 (Slurm preemption) saves a checkpoint at the end of the current step and stops (slurm/README.md).",
        epilog=EPILOG_OVERRIDES,
    )
    p.add_argument("config", nargs="*", metavar="CONFIG.yaml [KEY=VALUE ...]")
    p.add_argument("--nproc", type=int, default=None, help="local processes to start (default: TP x PP)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "walkthrough",
        help="show PGPO's algorithm core on a batch of synthetic rollouts, token by token (seconds, no model)",
        description="Scores a built-in batch of responses with the real reward function, computes group "
        "advantages, k3 visual dependency from synthetic image/text-only log-probs, PGPO token weights and "
        "the clipped loss, and prints each token coloured by its weight.",
        epilog=EPILOG_OVERRIDES,
    )
    p.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [KEY=VALUE ...]")
    p.set_defaults(func=cmd_walkthrough)

    p = sub.add_parser(
        "config",
        help="print the resolved configuration (defaults < file < overrides) or describe every key",
        description="Validates and prints the configuration a run would use, as YAML.",
        epilog=EPILOG_OVERRIDES,
    )
    p.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [KEY=VALUE ...]")
    p.add_argument("--describe", action="store_true", help="list every key with its type, default and meaning")
    p.add_argument("--list-algorithms", action="store_true", help="list the registered advantage shapers and losses")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "reward",
        help="score a JSONL file of responses with the verifiable reward (accuracy + format)",
        description="Reads one JSON object per line with a response and its ground-truth answer, scores each with "
        "reward.accuracy_weight x accuracy (math-verify on the last \\boxed{} answer) + reward.format_weight x "
        "format (<think>...</think> then a boxed answer) under a hard per-sample time limit, prints a summary and "
        "optionally writes the scored lines.",
        epilog=EPILOG_OVERRIDES,
    )
    p.add_argument("responses", help="JSONL file, one object per line")
    p.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [KEY=VALUE ...]")
    p.add_argument("--out", help="write each input line plus score/accuracy/format/timed_out/answer here")
    p.add_argument("--response-key", default="response", help="field holding the response text (default: response)")
    p.add_argument("--answer-key", default="answer", help="field holding the ground truth (default: answer)")
    p.set_defaults(func=cmd_reward)

    from .convert_cli import add_convert_subcommands  # argparse only; no torch import

    p = sub.add_parser(
        "convert",
        help="convert a Qwen2.5-VL checkpoint between Hugging Face and Megatron-Core distributed formats",
        description="hf-to-mcore: HF safetensors -> Megatron-Core dist checkpoint (loads at any TP/PP); "
        "mcore-to-hf: back to sharded HF safetensors. Both stream (bounded memory) and check names and shapes "
        "before reading weights. `megatron-pgpo convert DIRECTION --help` for the options.",
    )
    add_convert_subcommands(p)  # each direction sets func

    p = sub.add_parser(
        "check-sync",
        help="check that a Megatron -> vLLM weight sync reproduces transformers' greedy output exactly",
        description="Loads the checkpoint into Megatron (TP x PP CPU processes), perturbs the weights, syncs them into "
        "vLLM, exports them to HF and compares vLLM fp32 greedy output with transformers generate: PASS/FAIL.",
    )
    from .rollout.check_sync import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_check_sync)

    p = sub.add_parser(
        "check-parity",
        help="compare the Megatron model's logits with transformers on an HF checkpoint at a TP/PP layout",
        description="Starts TP x PP local CPU processes (gloo), loads the HF Qwen2.5-VL checkpoint into the Megatron "
        "model, runs a prompt with an image and the text-only pass, runs transformers on the same inputs and "
        "prints the max abs logit difference of each pass with PASS/FAIL. Exit code 0 when all pass.",
    )
    p.add_argument("--hf-path", required=True, help="Hugging Face Qwen2.5-VL checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--image", help="image file for the prompt (default: a synthetic test pattern)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference (default 1e-4)")
    p.add_argument("--reference-path", help="checkpoint transformers reads (default: --hf-path), e.g. the original "
                   "when --hf-path is a converted copy")
    p.set_defaults(func=cmd_check_parity)

    p = sub.add_parser(
        "visualize",
        help="show which response tokens depend on the image (S) and their PGPO weights: an HTML page and a PNG",
        description="Reads the per-token sample records a run writes every logging.samples_every steps "
        "(RUN_DIR/samples/step_*.jsonl) and RUN_DIR/metrics.jsonl, and writes OUT/visual_dependency.html (a "
        "self-contained page: responses token by token coloured by visual dependency S and by PGPO weight, the "
        "distribution of S, mean S and accuracy over steps) and OUT/visual_dependency.png.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (trainer.run_dir)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, action="append", metavar="N",
                       help="a step with samples (repeat for several; default: the latest)")
    which.add_argument("--last", action="store_true", help="the latest step with samples (the default)")
    which.add_argument("--all", action="store_true", help="every step with samples (histogram over all of them)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/visualization)")
    p.add_argument("--max-responses", type=int, default=24, metavar="K",
                   help="responses shown token by token (default 24); the histogram covers all")
    p.add_argument("--no-png", action="store_true", help="write only the HTML page (no matplotlib needed)")
    p.set_defaults(func=cmd_visualize)

    from .evaluation.command import DESCRIPTION as EVAL_DESCRIPTION
    from .evaluation.command import add_arguments as add_eval_arguments  # argparse only; no torch import

    p = sub.add_parser(
        "eval",
        help="benchmark a checkpoint with the paper's protocol (avg@k at a temperature over named benchmarks)",
        description=EVAL_DESCRIPTION,
    )
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    from .planner.command import add_arguments as add_plan_arguments  # argparse only; no torch import

    p = sub.add_parser(
        "plan",
        help="choose TP/PP/DP and the micro-batch for a GPU count: parameter counts and per-GPU memory, or why "
        "nothing fits",
        description="Estimates, per pipeline stage, the memory of a Qwen2.5-VL PGPO run (weights, fp32 gradients, "
        "Adam state, activations, logits of the update and scoring passes) next to the colocated vLLM engine "
        "(weights + KV cache), for the given --tp/--pp or for every valid layout, and recommends one. Exit code 0 "
        "when a layout fits, 1 when none does or --check-meta finds a mismatch.",
    )
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # argparse stops filling a trailing nargs="*" positional once an option has been seen
    # (`reward in.jsonl --out x.jsonl reward.timeout_s=1`): collect such key=value leftovers as overrides.
    args, rest = parser.parse_known_args(argv)
    stray = [item for item in rest if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.config = list(getattr(args, "config", [])) + rest
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
