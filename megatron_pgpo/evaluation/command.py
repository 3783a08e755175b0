"""``megatron-pgpo eval MODEL --benchmarks ... --data-dir DIR``: the paper's protocol from any checkpoint.

MODEL is a Hugging Face checkpoint directory, a training run directory (its latest checkpoint) or one training
checkpoint; a Megatron checkpoint is converted to HF once, into ``OUT/model_hf`` (the converter's rules), and
evaluated from there. Samples come from one rollout engine (vLLM, or transformers' ``generate``), with the chat
template and format instruction of training; answers are judged by ``scoring.py``. Writes ``OUT/results.json``,
``OUT/results.md`` and ``OUT/samples/<benchmark>.jsonl``; a rerun with the same settings generates only what is
missing (``--rescore`` judges the saved responses again without generating).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Dict, List, Tuple

log = logging.getLogger(__name__)

DESCRIPTION = __doc__.split("\n\n", 1)[1].split("\n\n")[0].replace("\n", " ")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL", help="HF checkpoint dir, training run dir or training checkpoint")
    p.add_argument("--benchmarks", help="comma-separated names (see --list), e.g. geo3k,mathverse,mathverse_v")
    p.add_argument("--data-dir", help="directory with one subdirectory of files per benchmark (see --list)")
    p.add_argument("--list", action="store_true", help="list the benchmarks, their sources and the files read")
    p.add_argument("--k", type=int, default=8, help="samples per problem (default 8: avg@8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="response length limit (default 2048)")
    p.add_argument("--max-prompt-length", type=int, default=4096,
                   help="longer prompts (image tokens included) are skipped and counted (default 4096)")
    p.add_argument("--max-pixels", type=int, default=1003520, help="larger images are downscaled (default 1003520)")
    p.add_argument("--limit", type=int, help="at most this many problems per benchmark")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", default="eval_out", help="output directory (default ./eval_out)")
    p.add_argument("--engine", choices=("vllm", "transformers"), default="vllm", help="rollout engine (default vllm)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallelism (default 1)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM's share of each GPU (default 0.9)")
    p.add_argument("--prompt-template", default=None,
                   help="the text after the image, {question} replaced by the question (default: training's "
                   "data.prompt_template default, which asks for the answer in \\boxed{})")
    p.add_argument("--min-pixels", type=int, default=None, help="smaller images are upscaled (default: none)")
    p.add_argument("--verifier-workers", type=int, default=2, help="answer-checking processes (default 2)")
    p.add_argument("--rescore", action="store_true", help="judge the saved responses again; generate nothing")
    p.add_argument("--overwrite", action="store_true", help="discard saved samples and start again")


def _validate(args: argparse.Namespace) -> None:
    problems = []
    if not args.model:
        problems.append("MODEL is required")
    if not args.benchmarks:
        problems.append("--benchmarks is required")
    if not args.data_dir:
        problems.append("--data-dir is required")
    for key in ("k", "max_new_tokens", "max_prompt_length", "max_pixels", "tensor_parallel_size"):
        if getattr(args, key) < 1:
            problems.append(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit must be >= 1, got {args.limit}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        problems.append("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.verifier_workers < 0:
        problems.append("--verifier-workers must be >= 0")
    if problems:
        raise SystemExit("error: " + "; ".join(problems) + " (megatron-pgpo eval --help)")


def resolve_model(model: str, out: Path) -> Path:
    """An HF checkpoint directory for MODEL (see the module docstring); converts a Megatron checkpoint once."""
    path = Path(model)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    from ..models.qwen2_5_vl.convert import resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(path)
    if not (ckpt / "metadata.json").is_file():
        raise SystemExit(f"error: {model} is neither an HF checkpoint (config.json + *.safetensors) nor a training run "
                         "or checkpoint directory")
    target = out / "model_hf"
    source_note = target / "converted_from.txt"
    if target.is_dir() and source_note.is_file() and source_note.read_text().strip() == str(ckpt.resolve()):
        return target
    from ..models.qwen2_5_vl.convert import to_hf

    log.warning("converting %s to HF safetensors in %s", ckpt, target)
    to_hf(str(ckpt), str(target), overwrite=True, progress=True)
    source_note.write_text(str(ckpt.resolve()) + "\n")
    return target


def load_benchmarks(args, prompt_length) -> Tuple[Dict[str, list], Dict[str, Dict[str, int]]]:
    from .benchmarks import load_benchmark

    loaded, skipped = {}, {}
    for name in [n.strip() for n in args.benchmarks.split(",") if n.strip()]:
        problems, counter = load_benchmark(name, args.data_dir, limit=args.limit, max_pixels=args.max_pixels,
                                           min_pixels=args.min_pixels)
        fits = []
        for p in problems:
            if prompt_length(p) > args.max_prompt_length:
                counter.skip(f"a prompt longer than {args.max_prompt_length} tokens", p.uid)
            else:
                fits.append(p)
        loaded[name], skipped[name] = fits, dict(counter.counts)
    return loaded, skipped


def make_engine(args, model_path: Path, out: Path):
    import torch

    on_cpu = not torch.cuda.is_available()
    max_len = args.max_prompt_length + args.max_new_tokens
    if args.engine == "transformers":
        from ..rollout.hf_engine import TransformersEngine, TransformersEngineConfig

        return TransformersEngine(TransformersEngineConfig(
            model_path=str(model_path), device="cpu" if on_cpu else "cuda", max_model_len=max_len,
            dtype="float32" if on_cpu else "bfloat16"))
    from ..rollout.vllm_engine import VLLMEngine, VLLMEngineConfig

    return VLLMEngine(VLLMEngineConfig(
        model_path=str(model_path), run_dir=str(out / "engine"), dtype="float32" if on_cpu else "auto",
        tensor_parallel_size=args.tensor_parallel_size, max_model_len=max_len, enforce_eager=on_cpu,
        kv_cache_memory_bytes=(512 << 20) if on_cpu else None, gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed))


class EngineSampler:
    """``runner.Sampler`` over one rollout engine, started at the first call (an eval whose samples are all cached
    starts none); ``close`` stops it."""

    def __init__(self, make_engine: Callable, args, template: str):
        self.make_engine, self.args, self.template, self.engine = make_engine, args, template, None

    def __call__(self, problems, n: int, seed: int) -> List[List[Tuple[str, str]]]:
        from ..rollout.engine import RolloutRequest, SamplingConfig
        from ..trainer.prompts import messages_for

        if self.engine is None:
            self.engine = self.make_engine()
            self.engine.start()
        a = self.args
        outputs = self.engine.generate(
            [RolloutRequest(messages_for(p.question, self.template), p.image) for p in problems],
            SamplingConfig(n=n, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_new_tokens, seed=seed))
        grouped: List[List[Tuple[str, str]]] = [[] for _ in problems]
        for o in outputs:
            grouped[o.request_index].append((o.text, o.finish_reason))
        return grouped

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def run_eval(args: argparse.Namespace) -> int:
    if getattr(args, "config", None):
        raise SystemExit(f"error: eval takes no config overrides, got {' '.join(args.config)}")
    from .benchmarks import describe

    if args.list:
        for name, source, patterns in describe():
            print(f"{name:<12} {source}\n{'':<12} files: DATA_DIR/{name}/ matching {patterns}")
        return 0
    _validate(args)
    import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)

    from ..trainer.prompts import DEFAULT_TEMPLATE, PromptLength, render_prompt
    from .protocol import Protocol, SampleCache, markdown_table, write_results
    from .runner import rescore
    from .scoring import BenchmarkScorer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(args.model, out)
    template = DEFAULT_TEMPLATE if args.prompt_template is None else args.prompt_template
    try:
        render_prompt("", template)
    except ValueError as exc:
        raise SystemExit(f"error: --prompt-template: {exc}") from None
    benchmarks, skipped = load_benchmarks(args, PromptLength(str(model_path), template))
    protocol = Protocol(model=str(Path(args.model).resolve()), k=args.k, temperature=args.temperature,
                        top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, prompt_template=template)
    cache = SampleCache(out, protocol, overwrite=args.overwrite)
    with BenchmarkScorer(num_workers=args.verifier_workers) as scorer:
        if args.rescore:
            document = rescore(benchmarks, protocol, scorer, cache, skipped)
        else:
            document = _generate_and_score(args, model_path, out, benchmarks, skipped, protocol, cache, scorer,
                                           template)
    paths = write_results(out, document)
    print(markdown_table(document))
    print(f"wrote {paths[0]}, {paths[1]} and {out / 'samples'}/")
    return 0


def _generate_and_score(args, model_path, out, benchmarks, skipped, protocol, cache, scorer, template):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .runner import evaluate

    sampler = EngineSampler(lambda: make_engine(args, model_path, out), args, template)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True) as bar:
            tasks = {}

            def progress(name, done, total):
                if name not in tasks:
                    tasks[name] = bar.add_task(f"eval {name}", total=total)
                bar.update(tasks[name], completed=done)
            return evaluate(benchmarks, sampler, protocol, scorer, cache, skipped, progress=progress)
    finally:
        sampler.close()
