"""Run the protocol over benchmarks with any sampler: the CLI's engine, or the trainer's rollout replicas.

``Sampler``: ``(problems, n, seed) -> one list of n (response text, finish reason) per problem``. ``evaluate`` asks
it for the samples the cache does not hold yet (in chunks, each appended to the cache as soon as it is judged, so an
interrupted run loses at most one chunk), judges them, and returns the results document.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .benchmarks import Problem
from .protocol import Protocol, SampleCache, SampleRecord, missing_samples, reason_counts, results_document, summarize
from .scoring import BenchmarkScorer

log = logging.getLogger(__name__)

Sampler = Callable[[List[Problem], int, int], List[List[Tuple[str, str]]]]


def judge(scorer: BenchmarkScorer, problems: Sequence[Problem], samples: Sequence[Sequence[Tuple[str, str]]],
          indices: Sequence[Sequence[int]]) -> List[SampleRecord]:
    """Records for ``samples[i][m]`` (the response numbered ``indices[i][m]``) of each problem."""
    flat = [(p, j, text, finish) for p, outs, idx in zip(problems, samples, indices)
            for j, (text, finish) in zip(idx, outs)]
    judged = scorer.judge_many([t for _, _, t, _ in flat], [p.answer for p, _, _, _ in flat],
                               [p.answer_type for p, _, _, _ in flat], [p.options for p, _, _, _ in flat])
    return [SampleRecord(uid=p.uid, sample=j, response=text, answer=v.answer, correct=v.correct, reason=v.reason,
                         finish_reason=finish) for (p, j, text, finish), v in zip(flat, judged)]


def evaluate(benchmarks: Dict[str, List[Problem]], sampler: Sampler, protocol: Protocol,
             scorer: Optional[BenchmarkScorer], cache: Optional[SampleCache] = None,
             skipped: Optional[Dict[str, Dict[str, int]]] = None, chunk: int = 256,
             progress: Optional[Callable[[str, int, int], None]] = None) -> Optional[Dict]:
    """Sample, judge and summarise every benchmark; the results document (None where ``scorer`` is None: a rank
    that only helps sampling).

    Problems missing the same number of samples are sampled together, ``chunk`` at a time; each call's seed is
    ``protocol.seed`` plus a running count, so a run is reproducible on one machine. ``progress(benchmark, done,
    total)`` is called after each chunk.
    """
    per_benchmark: Dict[str, Dict] = {}
    calls = 0
    for name, problems in benchmarks.items():
        cached = cache.load(name) if cache is not None else {}
        todo = missing_samples([p.uid for p in problems], cached, protocol.k)
        by_uid = {p.uid: p for p in problems}
        groups: Dict[int, List[Problem]] = {}
        for uid, indices in todo.items():
            groups.setdefault(len(indices), []).append(by_uid[uid])
        generated, done, total = 0, 0, len(todo)
        for n, group in sorted(groups.items()):
            for start in range(0, len(group), chunk):
                part = group[start:start + chunk]
                samples = sampler(part, n, protocol.seed * 1_000_003 + calls)
                calls += 1
                done += len(part)
                generated += n * len(part)
                if scorer is not None:
                    records = judge(scorer, part, samples, [todo[p.uid] for p in part])
                    if cache is not None:
                        cache.append(name, records)
                    cached.update({(r.uid, r.sample): r for r in records})
                if progress is not None:
                    progress(name, done, total)
        if scorer is not None:
            per_benchmark[name] = _summary(problems, cached, protocol.k, generated, (skipped or {}).get(name, {}))
    return None if scorer is None else results_document(protocol, per_benchmark)


def _summary(problems: Sequence[Problem], table: Dict[Tuple[str, int], SampleRecord], k: int, generated: int,
             skipped: Dict[str, int]) -> Dict:
    """One benchmark's entry of the results document from its judged records."""
    records = [table[(p.uid, j)] for p in problems for j in range(k) if (p.uid, j) in table]
    correct = {p.uid: [table[(p.uid, j)].correct for j in range(k)] for p in problems
               if all((p.uid, j) in table for j in range(k))}
    return {**summarize(correct, k), "generated": generated, "cached": len(records) - generated,
            "reasons": reason_counts(records), "skipped": dict(skipped)}


def rescore(benchmarks: Dict[str, List[Problem]], protocol: Protocol, scorer: BenchmarkScorer, cache: SampleCache,
            skipped: Optional[Dict[str, Dict[str, int]]] = None) -> Dict:
    """Judge every cached response again (no generation), rewrite the cache, and return the results document."""
    per_benchmark = {}
    for name, problems in benchmarks.items():
        cached = cache.load(name)
        by_uid = {p.uid: p for p in problems}
        keep = [r for r in cached.values() if r.uid in by_uid]
        records = judge(scorer, [by_uid[r.uid] for r in keep], [[(r.response, r.finish_reason)] for r in keep],
                        [[r.sample] for r in keep])
        cache.rewrite(name, records)
        per_benchmark[name] = _summary(problems, {(r.uid, r.sample): r for r in records}, protocol.k, 0,
                                       (skipped or {}).get(name, {}))
    return results_document(protocol, per_benchmark)
