"""GRPO, DAPO, PAPO, VPPO, PGPO and PGPO's three ablations on the demo task over seeds: `megatron-pgpo demo`-sized
runs, one after the other, then a table.

    .venv/bin/python benchmarks/compare_algorithms.py [--variants dapo pgpo ...] [--seeds 0 1 2] [--out DIR]
                                                      [key=value ...]

Each run is `megatron-pgpo demo trainer.seed=S <the variant's overrides>` in its own run directory (the seed also
changes the tiny model's initialisation and warm-up). The demo's settings are DAPO's (dynamic sampling,
clip-higher, token-mean loss); each variant changes what ``VARIANTS`` lists, with the defaults docs/algorithms.md
gives (PAPO and VPPO with their papers' coefficients). Prints, per run, the held-out greedy accuracy before / after
RL, the training accuracy per 25 steps and the mean step time; then per variant the mean and range over seeds, as
a markdown table. Runs that already finished (a ``summary.json`` in their directory) are reused. Reports, does not
assert: when learning starts varies with the seed (docs/pgpo_spec.md section 6).
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

#: variant -> config overrides on top of the demo's (DAPO) settings
VARIANTS = {
    "grpo": ["algorithm.advantage=grpo", "algorithm.clip_high=0.2", "algorithm.dapo.dynamic_sampling=false",
             "algorithm.aggregation=seq-mean-token-mean", "algorithm.kl.coef=0.01"],
    "dapo": ["algorithm.advantage=grpo"],
    "papo": ["algorithm.advantage=grpo", "algorithm.loss=papo", "algorithm.papo.coef=0.01",
             "algorithm.entropy_penalty=0.03"],
    "vppo": ["algorithm.advantage=vppo", "algorithm.entropy_penalty=0.06"],
    "pgpo": ["algorithm.advantage=pgpo"],
    "pgpo_suppression_only": ["algorithm.advantage=pgpo_suppression_only"],
    "pgpo_boosting_only": ["algorithm.advantage=pgpo_boosting_only"],
    "pgpo_no_normalization": ["algorithm.advantage=pgpo_no_normalization"],
}


def run(variant: str, seed: int, out: Path, extra) -> dict:
    run_dir = out / f"{variant}-seed{seed}"
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    cmd = [sys.executable, "-m", "megatron_pgpo.cli", "demo", f"trainer.seed={seed}", *VARIANTS[variant],
           f"trainer.run_dir={run_dir}", "logging.console=false", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before = after = None
    for line in proc.stdout.splitlines():
        if "held-out accuracy before RL" in line:
            before = float(line.split(":")[1].split()[0])
        if "held-out accuracy after RL" in line:
            after = float(line.split(":")[1].split()[0])
    windows = [statistics.mean(r["reward/accuracy"] for r in records[i: i + 25]) for i in range(0, len(records), 25)]
    summary = {"variant": variant, "seed": seed, "before": before, "after": after, "wall_s": wall,
               "step_s": statistics.mean(r["time/step"] for r in records),
               "train_accuracy_by_25_steps": windows}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def table(results, variants) -> str:
    lines = ["| variant | held-out accuracy after RL: mean (range) | seeds | step time (s) |",
             "| --- | --- | --- | --- |"]
    for variant in variants:
        mine = [r for r in results if r["variant"] == variant and r["after"] is not None]
        if not mine:
            continue
        after = [r["after"] for r in mine]
        lines.append(f"| {variant} | {statistics.mean(after):.2f} ({min(after):.2f}-{max(after):.2f}) | "
                     f"{len(mine)} | {statistics.mean(r['step_s'] for r in mine):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run, e.g. "
                        "trainer.total_steps=60")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for variant in args.variants:
            r = run(variant, seed, args.out, args.overrides)
            results.append(r)
            curve = " ".join(f"{a:.2f}" for a in r["train_accuracy_by_25_steps"])
            print(f"{variant:22} seed {seed}: held-out {r['before']} -> {r['after']}, train accuracy per 25 steps "
                  f"[{curve}], {r['step_s']:.2f} s/step, {r['wall_s']:.0f} s", flush=True)
    print("\n" + table(results, args.variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
