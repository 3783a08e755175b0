"""`megatron-pgpo demo` / `make demo`: the whole pipeline on a tiny model, on CPU, in minutes.

1. builds a tiny Qwen2.5-VL-architecture checkpoint with a word-level vocabulary for the built-in task (random
   weights) and warms it up on the answer format with random answers (run_dir/init_hf; reused if present);
2. trains it with PGPO (or whatever the config says) on the built-in task: Megatron-Core with TP=2 on two CPU
   processes, vLLM rollouts, verifiable rewards;
3. prints held-out accuracy before and after RL and where the metrics, checkpoints and HF export are.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..config import Config


def run_training_demo(cfg: Config) -> dict:
    from rich.console import Console

    from .tiny_model import build_demo_checkpoint, warm_up
    from ..trainer.launch import launch

    console = Console()
    run_dir = Path(cfg.trainer.run_dir)
    start = time.perf_counter()
    if cfg.model.hf_path is None:
        init = run_dir / "init_hf"
        if not (init / "model.safetensors").is_file() or not (init / ".warmed_up").is_file():
            console.rule("[bold]1/3 tiny checkpoint + format warm-up")
            build_demo_checkpoint(init, task=cfg.data.task, preset=cfg.model.tiny_preset, seed=cfg.trainer.seed)
            info = warm_up(init, task=cfg.data.task, seed=cfg.trainer.seed)
            (init / ".warmed_up").write_text(f"{info}\n")
            console.print(f"warm-up: final loss {info['loss']:.3f} in {info['seconds']:.0f} s -> {init}")
        else:
            console.print(f"reusing the warmed-up tiny checkpoint in {init}")
        cfg.model.hf_path = str(init)
    console.rule(f"[bold]2/3 RL: {cfg.algorithm.advantage} on '{cfg.data.task}', TP={cfg.parallel.tensor_model_parallel_size}"
                 f" x PP={cfg.parallel.pipeline_model_parallel_size}, {cfg.trainer.total_steps} steps")
    summary = launch(cfg)
    console.rule("[bold]3/3 result")
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    chance = ""
    if cfg.data.train_path is None:
        from ..data.synthetic import answer_vocabulary

        chance = f"  (chance on '{cfg.data.task}': {1 / len(answer_vocabulary(cfg.data.task)):.2f})"
    if before is not None:
        console.print(f"held-out accuracy before RL: [bold]{before:.2f}[/]{chance}")
    if after is not None:
        console.print(f"held-out accuracy after RL:  [bold green]{after:.2f}[/]")
    console.print(f"metrics:     {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})")
    console.print(f"checkpoints: {run_dir / 'checkpoints'} (resume: run the same command again)")
    if summary.get("export"):
        console.print(f"HF export:   {summary['export']}")
    console.print(f"total time:  {time.perf_counter() - start:.0f} s")
    return summary
