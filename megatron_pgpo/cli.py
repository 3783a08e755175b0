"""The `megatron-pgpo` command line. Each subcommand is a thin layer over a library function.

    megatron-pgpo demo [CONFIG.yaml] [section.key=value ...]
    megatron-pgpo config [CONFIG.yaml] [section.key=value ...] [--describe] [--list-algorithms]
    megatron-pgpo reward RESPONSES.jsonl [--out SCORED.jsonl] [section.key=value ...]

Heavy imports (torch, megatron, vLLM) happen inside the subcommand that needs them, so `--help` is instant.
"""
from __future__ import annotations

import argparse
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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

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
        help="run PGPO's algorithm core on a batch of synthetic rollouts and show the per-token weights",
        description="Scores a built-in batch of responses with the real reward function, computes group "
        "advantages, k3 visual dependency from synthetic image/text-only log-probs, PGPO token weights and "
        "the clipped loss, and prints each token coloured by its weight.",
        epilog=EPILOG_OVERRIDES,
    )
    p.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [KEY=VALUE ...]")
    p.set_defaults(func=cmd_demo)

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
