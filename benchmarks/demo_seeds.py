"""DAPO vs PGPO on the demo task over several seeds: `megatron-pgpo demo`-sized runs, one after the other.

    .venv/bin/python benchmarks/demo_seeds.py [--seeds 1 2 3] [--algorithms dapo pgpo] [--out runs/seeds]
                                              [key=value ...]

Each run is exactly `megatron-pgpo demo trainer.seed=S algorithm.advantage=...` (DAPO = the ``grpo`` shaper with
the demo's DAPO settings: dynamic sampling, token-mean loss) in its own run directory, so the seed also changes
the tiny model's initialisation and warm-up. Prints the training accuracy (mean over 25-step windows), the
held-out accuracy before / after RL and the wall time of every run, then the per-algorithm means. Runs that
already finished (a ``summary.json`` in their directory) are not repeated. Reports, does not assert: when learning
starts varies with the seed (docs/pgpo_spec.md section 6).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADVANTAGE = {"dapo": "grpo", "pgpo": "pgpo"}


def run(algorithm: str, seed: int, out: Path, extra) -> dict:
    run_dir = out / f"{algorithm}-seed{seed}"
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    cmd = [sys.executable, "-m", "megatron_pgpo.cli", "demo", f"trainer.seed={seed}",
           f"algorithm.advantage={ADVANTAGE[algorithm]}", f"trainer.run_dir={run_dir}", "logging.console=false", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{algorithm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before = after = None
    for line in proc.stdout.splitlines():
        if "held-out accuracy before RL" in line:
            before = float(line.split(":")[1].split()[0])
        if "held-out accuracy after RL" in line:
            after = float(line.split(":")[1].split()[0])
    windows = [statistics.mean(r["reward/accuracy"] for r in records[i: i + 25]) for i in range(0, len(records), 25)]
    summary = {"algorithm": algorithm, "seed": seed, "before": before, "after": after, "wall_s": wall,
               "train_accuracy_by_25_steps": windows,
               "reward_by_25_steps": [statistics.mean(r["reward/mean"] for r in records[i: i + 25])
                                      for i in range(0, len(records), 25)]}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--algorithms", nargs="+", choices=sorted(ADVANTAGE), default=["dapo", "pgpo"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "seeds")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for algorithm in args.algorithms:
            r = run(algorithm, seed, args.out, args.overrides)
            results.append(r)
            curve = " ".join(f"{a:.2f}" for a in r["train_accuracy_by_25_steps"])
            print(f"{algorithm:5} seed {seed}: held-out {r['before']} -> {r['after']}, train accuracy per 25 steps "
                  f"[{curve}], {r['wall_s']:.0f} s", flush=True)
    for algorithm in args.algorithms:
        mine = [r for r in results if r["algorithm"] == algorithm and r["after"] is not None]
        if mine:
            print(f"{algorithm}: mean held-out after RL {statistics.mean(r['after'] for r in mine):.3f} over "
                  f"{len(mine)} seeds; mean wall {statistics.mean(r['wall_s'] for r in mine):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
