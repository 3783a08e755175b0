"""Soak test: N steps of the tiny config with faults injected at a fixed seed, the run relaunched after every
crash, then the invariants that matter: every step's metrics exactly once in metrics.jsonl, and the last
checkpoint loads (exported to HF through the converter, then opened by transformers).

    .venv/bin/python benchmarks/soak.py [--steps 100] [--seed 0] [--fault-rate 0.15] [--kills 2]
                                        [--out runs/soak] [key=value ...]

Faults (``megatron_pgpo/faults.py``, through ``MEGATRON_PGPO_FAULTS``), drawn per step with probability
``--fault-rate``: ``nan_grad`` (the update is skipped), ``reward_hang`` / ``reward_crash`` (that sample scores 0),
``engine_kill`` (the vLLM engine is rebuilt and the step retried) and ``kill_in_save`` (rank 0 dies mid-checkpoint:
the soak relaunches, the run resumes from the previous checkpoint). On top, ``--kills`` times the soak SIGKILLs the
whole process group (ranks, engine, reward workers) at a random moment, as an OOM killer or a lost node would.
A fault of a step that the run had already logged does not fire again when the step is redone after a resume.

Not part of the test suite (minutes); the README reports a 100-step run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ("nan_grad", "reward_hang", "reward_crash", "engine_kill", "kill_in_save")
SAVE_EVERY = 5
#: the tiny run the soak repeats (small batches: faults per minute, not learning, is the point)
RUN = ["data.rollout_batch_size=4", "trainer.global_batch_size=2", "rollout.n=4", "rollout.max_new_tokens=12",
       "trainer.micro_batch_size=4", "trainer.eval_every=0", f"checkpoint.save_every={SAVE_EVERY}",
       "reward.num_workers=1",
       "algorithm.dapo.dynamic_sampling=false", "logging.tensorboard=false", "logging.console=false",
       "checkpoint.export_hf=false"]


def fault_plan(steps: int, rate: float, seed: int) -> dict:
    """``{step: fault}`` drawn with ``random.Random(seed)``; a ``kill_in_save`` moves to the next step that saves
    (every ``SAVE_EVERY``), where it can fire."""
    rng = random.Random(seed)
    plan = {}
    for step in range(1, steps + 1):
        if rng.random() < rate:
            fault = rng.choice(FAULTS)
            if fault == "kill_in_save":
                step = min(steps, -(-step // SAVE_EVERY) * SAVE_EVERY)
            plan.setdefault(step, fault)
    return plan


def logged_steps(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seeds the fault plan and the kill moments")
    parser.add_argument("--fault-rate", type=float, default=0.15, help="probability of a fault at each step")
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs of the whole run at random moments")
    parser.add_argument("--max-launches", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "soak")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of the run")
    args = parser.parse_args(argv)

    from megatron_pgpo.demo.tiny_model import build_demo_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out / "run"
    checkpoint = args.out / "hf"
    if not (checkpoint / "model.safetensors").is_file():
        build_demo_checkpoint(checkpoint, task="colour", seed=args.seed)
    plan = fault_plan(args.steps, args.fault_rate, args.seed)
    rng = random.Random(args.seed + 1)
    kills = args.kills
    print(f"fault plan ({len(plan)} faults): {plan}", flush=True)
    cmd = [sys.executable, "-m", "megatron_pgpo.cli", "train", "examples/tiny_cpu.yaml", f"model.hf_path={checkpoint}",
           f"trainer.run_dir={run_dir}", f"trainer.total_steps={args.steps}", *RUN, *args.overrides]
    start, launches, outcomes = time.perf_counter(), 0, []
    log = (args.out / "soak.log").open("a")
    while launches < args.max_launches:
        done = max(logged_steps(run_dir), default=0)
        faults = ",".join(f"{name}@{step}" for step, name in sorted(plan.items()) if step > done)
        launches += 1
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "MEGATRON_PGPO_FAULTS": faults},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:  # a random moment of this launch's life, or its end
            proc.wait(timeout=rng.uniform(30, 240) if kills else None)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills -= 1
        outcomes.append(proc.returncode)
        now = max(logged_steps(run_dir), default=0)
        print(f"launch {launches}: steps logged {done} -> {now}, exit {proc.returncode}", flush=True)
        if proc.returncode == 0:
            break
    wall = time.perf_counter() - start
    steps = logged_steps(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    export = args.out / "exported"
    convert = subprocess.run([sys.executable, "-m", "megatron_pgpo.cli", "convert", "mcore-to-hf", str(run_dir),
                              str(export), "--no-progress", "--overwrite"], cwd=ROOT, capture_output=True, text=True)
    loads = convert.returncode == 0
    if loads:
        from transformers import Qwen2_5_VLForConditionalGeneration

        Qwen2_5_VLForConditionalGeneration.from_pretrained(export)
    summary = {
        "steps": args.steps, "launches": launches, "exit_codes": outcomes, "wall_s": round(wall, 1),
        "planned_faults": {name: sum(1 for f in plan.values() if f == name) for name in FAULTS},
        "external_kills": args.kills - kills,
        "every_step_once": steps == list(range(1, args.steps + 1)),
        "last_checkpoint_loads": loads,
        "rollout_retries": sum(r.get("rollout/retries", 0) for r in records),
        "skipped_updates": sum(r.get("actor/skipped_updates", 0) for r in records),
        "reward_verify_failed": sum(r.get("reward/verify_failed", 0) for r in records),
        "mean_step_s": round(sum(r["time/step"] for r in records) / max(len(records), 1), 2),
    }
    (args.out / "soak_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    if not loads:
        print(convert.stderr[-3000:])
    return 0 if summary["every_step_once"] and loads and outcomes[-1] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
