"""The evaluation protocol's bookkeeping: k samples per problem, avg@k / pass@k / the spread over sample sets, the
resumable per-sample cache and the result files.

    avg@k     mean correctness over all k samples of all problems (the paper reports avg@8 at temperature 1.0)
    std       population standard deviation of the k per-sample-set accuracies (set j = every problem's j-th
              sample): how much one avg@1 run would move
    pass@k    fraction of problems with at least one correct sample

Cache: ``OUT/samples/<benchmark>.jsonl``, one line per (problem uid, sample index) with the response, the extracted
answer, the judgement and its reason, appended as samples are generated; a line cut short by a crash is ignored on
reading. ``OUT/protocol.json`` records the settings the cache was made with; a rerun with other settings is refused
(they would mix), a rerun with the same settings generates only what is missing.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Protocol:
    """What makes two evaluations comparable (all of it must match to reuse cached samples)."""

    model: str
    k: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 2048
    seed: int = 0
    prompt_template: str = ""


@dataclass
class SampleRecord:
    """One scored response (a line of the cache)."""

    uid: str
    sample: int
    response: str
    answer: Optional[str]
    correct: bool
    reason: str
    finish_reason: str = "stop"


# ------------------------------------------------------------------------------------------------ metrics
def summarize(correct: Dict[str, Sequence[bool]], k: int) -> Dict[str, float]:
    """avg@k, std over the k sample sets, pass@k and counts from ``{uid: [correct of sample 0..k-1]}``."""
    problems = [v for v in correct.values() if len(v) == k]
    n = len(problems)
    if n == 0:
        return {f"avg@{k}": float("nan"), "std": float("nan"), f"pass@{k}": float("nan"), "problems": 0,
                "samples": 0}
    set_acc = [sum(bool(p[j]) for p in problems) / n for j in range(k)]
    mean = sum(set_acc) / k
    std = math.sqrt(sum((a - mean) ** 2 for a in set_acc) / k)
    return {f"avg@{k}": mean, "std": std, f"pass@{k}": sum(any(p) for p in problems) / n, "problems": n,
            "samples": n * k}


def reason_counts(records: Iterable[SampleRecord]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for r in records:
        out[r.reason] = out.get(r.reason, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------------------ cache
class SampleCache:
    """The per-sample jsonl files under ``out`` (see the module docstring)."""

    def __init__(self, out: Path, protocol: Protocol, overwrite: bool = False):
        self.out = Path(out)
        self.dir = self.out / "samples"
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.out / "protocol.json"
        wanted = asdict(protocol)
        if path.is_file() and not overwrite:
            have = json.loads(path.read_text())
            changed = {key: (have.get(key), value) for key, value in wanted.items() if have.get(key) != value}
            if changed:
                raise ValueError(f"{self.out} holds samples made with other settings "
                                 + ", ".join(f"{key}: {a!r} there, {b!r} now" for key, (a, b) in changed.items())
                                 + "; use another --out, or --overwrite to start again")
        if overwrite:
            for f in self.dir.glob("*.jsonl"):
                f.unlink()
        path.write_text(json.dumps(wanted, indent=1) + "\n")

    def path(self, benchmark: str) -> Path:
        return self.dir / f"{benchmark}.jsonl"

    def load(self, benchmark: str) -> Dict[Tuple[str, int], SampleRecord]:
        """The cached records of ``benchmark`` by (uid, sample); a damaged (cut-short) line is skipped."""
        out: Dict[Tuple[str, int], SampleRecord] = {}
        path = self.path(benchmark)
        if not path.is_file():
            return out
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = SampleRecord(**json.loads(line))
            except (ValueError, TypeError):
                continue
            out[(record.uid, record.sample)] = record
        return out

    def append(self, benchmark: str, records: Sequence[SampleRecord]) -> None:
        with self.path(benchmark).open("a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
            f.flush()

    def rewrite(self, benchmark: str, records: Sequence[SampleRecord]) -> None:
        """Replace the benchmark's file (after rescoring), atomically."""
        tmp = self.path(benchmark).with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(self.path(benchmark))


def missing_samples(uids: Sequence[str], cached: Dict[Tuple[str, int], SampleRecord], k: int
                    ) -> Dict[str, List[int]]:
    """``{uid: sample indices still to generate}`` (only problems with something missing)."""
    out = {}
    for uid in uids:
        todo = [j for j in range(k) if (uid, j) not in cached]
        if todo:
            out[uid] = todo
    return out


# ------------------------------------------------------------------------------------------------ results
def results_document(protocol: Protocol, per_benchmark: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """``results.json``: the protocol, each benchmark's numbers, and the average of avg@k over benchmarks."""
    key = f"avg@{protocol.k}"
    scored = [v[key] for v in per_benchmark.values() if v.get("problems")]
    return {"protocol": asdict(protocol), "benchmarks": per_benchmark,
            "average": {key: sum(scored) / len(scored) if scored else float("nan"), "benchmarks": len(scored)}}


def markdown_table(document: Dict[str, Any]) -> str:
    """The results as a markdown table (percentages), the average last."""
    k = document["protocol"]["k"]
    key = f"avg@{k}"
    lines = [f"| benchmark | problems | {key} (%) | std over sample sets | pass@{k} (%) | skipped rows |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in document["benchmarks"].items():
        skipped = sum(v.get("skipped", {}).values())
        if not v.get("problems"):
            lines.append(f"| {name} | 0 | - | - | - | {skipped} |")
            continue
        lines.append(f"| {name} | {v['problems']} | {100 * v[key]:.2f} | {100 * v['std']:.2f} | "
                     f"{100 * v[f'pass@{k}']:.2f} | {skipped} |")
    avg = document["average"]
    shown = "-" if avg["benchmarks"] == 0 else f"{100 * avg[key]:.2f}"
    lines.append(f"| **average** ({avg['benchmarks']} benchmarks) | | **{shown}** | | | |")
    p = document["protocol"]
    return (f"{p['model']}: {key} at temperature {p['temperature']:g}, top-p {p['top_p']:g}, up to "
            f"{p['max_new_tokens']} new tokens, seed {p['seed']}\n\n" + "\n".join(lines) + "\n")


def write_results(out: Path, document: Dict[str, Any]) -> Tuple[Path, Path]:
    out = Path(out)
    (out / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    (out / "results.md").write_text(markdown_table(document))
    return out / "results.json", out / "results.md"
