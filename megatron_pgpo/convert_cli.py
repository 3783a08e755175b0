"""Command-line front of ``models/qwen2_5_vl/convert.py``: ``megatron-pgpo convert hf-to-mcore|mcore-to-hf SRC DST``
and the scripts ``tools/convert_hf_to_megatron.py`` / ``tools/convert_megatron_to_hf.py`` (all three share these
parsers).

It lives outside ``models/qwen2_5_vl`` because importing that package imports torch; here nothing heavy is
imported until a conversion runs, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import re
from typing import Optional, Sequence

HF_TO_MCORE_HELP = "convert a Hugging Face Qwen2.5-VL checkpoint into a Megatron-Core distributed checkpoint"
HF_TO_MCORE_DESCRIPTION = (
    "Reads an HF Qwen2.5-VL safetensors checkpoint (config.json + model.safetensors or sharded with an index) and "
    "writes a Megatron-Core distributed checkpoint (torch_dist format) whose keys are those of the training "
    "model's sharded_state_dict(): it loads at any TP/PP layout that divides the model. The HF config.json, "
    "tokenizer/processor files and a megatron_pgpo.json go along, so the result converts back with no other "
    "input. Streams: about one copy of the checkpoint in memory. Names and shapes are checked before any weight "
    "is read; the output appears only when complete (written as DST.tmp, then renamed)."
)
MCORE_TO_HF_HELP = ("convert a Megatron-Core distributed checkpoint (from hf-to-mcore or training) back to HF "
                    "safetensors")
MCORE_TO_HF_DESCRIPTION = (
    "Reads a Megatron-Core distributed checkpoint written by hf-to-mcore (or by training, with config.json and "
    "megatron_pgpo.json beside it) a few layers at a time and writes HF safetensors shards plus "
    "model.safetensors.index.json, config.json and the tokenizer/processor files. Memory stays at a few layers "
    "whatever the model size. A round trip HF -> Megatron -> HF is bit-exact."
)


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / ``1000000`` -> bytes (decimal units as transformers, binary with ``i``)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read a size from {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


def add_hf_to_mcore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="HF_DIR", help="Hugging Face Qwen2.5-VL checkpoint directory")
    parser.add_argument("dst", metavar="MCORE_DIR", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                        help="cast the weights (default: keep each tensor's dtype; a round trip is then bit-exact)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel size you will train at: checked against the config before any weight "
                        "is read (the checkpoint itself loads at any TP/PP that divides the model)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size you will train at (checked likewise)")
    parser.add_argument("--first-stage-layers", type=int, default=None,
                        help="language layers on pipeline stage 0 of an uneven split you will train at (checked "
                        "likewise; parallel.first_stage_layers)")
    parser.add_argument("--last-stage-layers", type=int, default=None,
                        help="language layers on the last pipeline stage (parallel.last_stage_layers)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="Megatron's vocabulary padding unit (default 128; the padding adapts to TP at load)")
    parser.add_argument("--overwrite", action="store_true", help="replace MCORE_DIR if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_mcore_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="MCORE_DIR", help="Megatron-Core distributed checkpoint directory")
    parser.add_argument("dst", metavar="HF_DIR", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB",
                        help="largest safetensors shard, e.g. 5GB (default), 500MB, 2GiB")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                        help="cast the weights (default: keep the checkpoint's dtypes); config.json's dtype follows")
    parser.add_argument("--step-size", type=parse_size, default=None,
                        help="how much Megatron data one load step reads (default: 1/16 of the checkpoint, at most "
                        "1GiB; a decoder layer is never split). Bounds the memory used")
    parser.add_argument("--overwrite", action="store_true", help="replace HF_DIR if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_hf_to_mcore(args: argparse.Namespace) -> int:
    from .models.qwen2_5_vl.convert import from_hf

    out = from_hf(args.src, args.dst, dtype=args.dtype, tp=args.tp, pp=args.pp,
                  first_stage_layers=args.first_stage_layers, last_stage_layers=args.last_stage_layers,
                  make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, overwrite=args.overwrite,
                  progress=not args.no_progress)
    print(f"wrote Megatron-Core checkpoint {out}")
    return 0


def run_mcore_to_hf(args: argparse.Namespace) -> int:
    from .models.qwen2_5_vl.convert import to_hf

    out = to_hf(args.src, args.dst, max_shard_bytes=args.max_shard_size, dtype=args.dtype, step_bytes=args.step_size,
                overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote Hugging Face checkpoint {out}")
    return 0


def add_convert_subcommands(parser: argparse.ArgumentParser) -> None:
    """Fill the ``convert`` parser of ``megatron-pgpo`` with its two directions."""
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION")
    sub.required = True
    p = sub.add_parser("hf-to-mcore", help=HF_TO_MCORE_HELP, description=HF_TO_MCORE_DESCRIPTION)
    add_hf_to_mcore_arguments(p)
    p.set_defaults(func=run_hf_to_mcore)
    p = sub.add_parser("mcore-to-hf", help=MCORE_TO_HF_HELP, description=MCORE_TO_HF_DESCRIPTION)
    add_mcore_to_hf_arguments(p)
    p.set_defaults(func=run_mcore_to_hf)


def script_main(direction: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry of the ``tools/convert_*.py`` scripts (one direction each)."""
    if direction == "hf-to-mcore":
        parser = argparse.ArgumentParser(description=HF_TO_MCORE_DESCRIPTION)
        add_hf_to_mcore_arguments(parser)
        return run_hf_to_mcore(parser.parse_args(argv))
    parser = argparse.ArgumentParser(description=MCORE_TO_HF_DESCRIPTION)
    add_mcore_to_hf_arguments(parser)
    return run_mcore_to_hf(parser.parse_args(argv))
