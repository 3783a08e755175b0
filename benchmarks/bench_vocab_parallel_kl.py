"""Time and peak extra memory of ``vocab_parallel_kl`` vs gathering the vocabulary and vs Megatron's cross entropy.

    .venv/bin/python benchmarks/bench_vocab_parallel_kl.py                    # defaults, ~2-3 min on 2 cores
    .venv/bin/python benchmarks/bench_vocab_parallel_kl.py --tp 2 --tokens 256 --vocab 152064 --dtype float32

For each TP (1 process, or TP gloo processes started with "spawn"; Megatron parallel state initialised, no CPU
patches needed), each token count and vocabulary (152064 is Qwen2.5-VL's padded vocabulary), every rank builds
its own ``[tokens, V/TP]`` shards of P and Q and runs three methods:

* ``vp_kl``: ``megatron_pgpo.parallel.vocab_parallel.vocab_parallel_kl`` (exact KL, per-token scalar all-reduces,
  chunked over tokens; ``--chunk-tokens`` or its default of ~4 MiB per fp32 workspace buffer);
* ``gather``: ``all_gather`` both shards, ``torch.cat`` them to ``[tokens, V]`` and compute
  ``megatron_pgpo.algorithms.visual_dependency.full_vocab_kl`` (what one would do without the vocab-parallel code);
* ``ce``: ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` on P alone (forward), the cost of the
  log-prob that PGPO needs anyway (it is given a copy: Megatron overwrites fp32 logits in place).

Time: wall-clock of one call (after a barrier), the fastest of ``--repeats`` calls (the least disturbed by other
processes on a shared machine: eager CPU ops are OpenMP regions that stall when a core is taken), slowest rank.

Peak extra memory: the ``torch.profiler`` with ``profile_memory=True`` records every allocation and free that
goes through PyTorch's CPU allocator (``[memory]`` events with signed byte counts, including the temporaries made
inside operators and the ``all_gather`` outputs); the running sum of those events over one call, in time order,
is the tensor memory allocated since the call began, and its maximum is the peak extra memory (inputs that exist
before the call are not counted). Measured in a separate, untimed call so the profiler does not disturb the
timings. Not counted: gloo's internal transport buffers (only per-token scalars for ``vp_kl``).

Targets reported in the last columns: ``vp_kl`` peak extra memory <= gather peak / TP + one fp32 chunk
(``chunk_tokens * V/TP * 4`` bytes), and ``vp_kl`` time <= 2 x ``ce`` time.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Callable, Dict, List

import torch


def _peak_extra_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _worker(rank: int, tp: int, port: int, args: argparse.Namespace, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_pgpo.algorithms.visual_dependency import full_vocab_kl
    from megatron_pgpo.parallel import vocab_parallel_math as vpm
    from megatron_pgpo.parallel.vocab_parallel import vocab_parallel_kl

    ps.initialize_model_parallel(tp, 1)
    group = ps.get_tensor_model_parallel_group()
    dtype = getattr(torch, args.dtype)
    rows = []
    for vocab in args.vocab:
        if vocab % tp:
            raise SystemExit(f"vocab {vocab} is not divisible by TP {tp}")
        width = vocab // tp
        for tokens in args.tokens:
            gen = torch.Generator().manual_seed(1000 * rank + tokens)
            p = (torch.randn(tokens, width, generator=gen) * 3).to(dtype)
            q = (p.float() + torch.randn(tokens, width, generator=gen)).to(dtype)
            target = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(tokens))
            chunk = vpm.chunk_size(tokens, width, args.chunk_tokens)

            def gather_kl():
                if tp == 1:
                    return full_vocab_kl(p, q)
                full = []
                for shard in (p, q):
                    parts = [torch.empty_like(shard) for _ in range(tp)]
                    dist.all_gather(parts, shard, group=group)
                    full.append(torch.cat(parts, dim=-1))
                    del parts
                return full_vocab_kl(*full)

            methods: Dict[str, Callable] = {
                "vp_kl": lambda: vocab_parallel_kl(p, q, tp_group=group, chunk_tokens=args.chunk_tokens),
                "gather": gather_kl,
                "ce": lambda x: vocab_parallel_cross_entropy(x, target),
            }
            row = {"tp": tp, "tokens": tokens, "vocab": vocab, "chunk": chunk,
                   "chunk_bytes": chunk * width * 4}
            for name, fn in methods.items():
                call = fn
                if name == "ce":  # Megatron overwrites fp32 logits: fresh copies, made before the measured region
                    copies = iter([p.clone() for _ in range(args.repeats + 1)])
                    call = lambda fn=fn: fn(next(copies))  # noqa: E731
                dist.barrier(group=group)
                row[f"mem_{name}"] = _peak_extra_bytes(call)  # also the warm-up
                times = []
                for _ in range(args.repeats):
                    dist.barrier(group=group)
                    start = time.perf_counter()
                    out = call()
                    times.append(time.perf_counter() - start)
                    del out
                row[f"t_{name}"] = min(times)
            # the slowest rank / the largest memory decide
            stats = torch.tensor([row[k] for k in ("t_vp_kl", "t_gather", "t_ce", "mem_vp_kl", "mem_gather", "mem_ce")],
                                 dtype=torch.float64)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
            for key, value in zip(("t_vp_kl", "t_gather", "t_ce", "mem_vp_kl", "mem_gather", "mem_ce"), stats.tolist()):
                row[key] = value
            rows.append(row)
            del p, q
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_tp(tp: int, args: argparse.Namespace) -> List[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, tp, port, args, queue)) for rank in range(tp)]
    for proc in procs:
        proc.start()
    rows = queue.get(timeout=args.timeout)
    for proc in procs:
        proc.join(60)
        if proc.exitcode != 0:
            raise RuntimeError(f"benchmark worker exited with {proc.exitcode}")
    return rows


def _table(rows: List[dict], dtype: str) -> str:
    mib = 1 << 20
    head = (f"{'TP':>2} {'tokens':>6} {'vocab':>6} {'chunk':>5} | {'vp_kl ms':>8} {'gather ms':>9} {'ce ms':>7} "
            f"{'vp/gather':>9} {'vp/ce':>6} | {'vp_kl MiB':>9} {'gather MiB':>10} {'ce MiB':>7} {'vp/gather':>9} "
            f"{'vp/ce':>6} | {'mem<=g/TP+chunk':>15} {'t<=2ce':>6}")
    lines = [f"dtype={dtype}, time = fastest of the repeats, slowest rank, memory = peak extra tensor memory "
             f"(torch.profiler allocator events) of the largest rank", head, "-" * len(head)]
    for r in rows:
        mem_ok = r["mem_vp_kl"] <= r["mem_gather"] / r["tp"] + r["chunk_bytes"]
        lines.append(
            f"{r['tp']:>2} {r['tokens']:>6} {r['vocab']:>6} {r['chunk']:>5} | {r['t_vp_kl'] * 1e3:>8.1f} "
            f"{r['t_gather'] * 1e3:>9.1f} {r['t_ce'] * 1e3:>7.1f} {r['t_vp_kl'] / r['t_gather']:>9.2f} "
            f"{r['t_vp_kl'] / r['t_ce']:>6.2f} | {r['mem_vp_kl'] / mib:>9.1f} {r['mem_gather'] / mib:>10.1f} "
            f"{r['mem_ce'] / mib:>7.1f} {r['mem_vp_kl'] / r['mem_gather']:>9.3f} "
            f"{r['mem_vp_kl'] / r['mem_ce']:>6.2f} | "
            f"{'yes' if mem_ok else 'NO':>15} {'yes' if r['t_vp_kl'] <= 2 * r['t_ce'] else 'NO':>6}"
        )
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="What is measured and how: see the docstring at the top of this script.",
    )
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (gloo processes)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512], help="token counts")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 152064], help="padded vocabulary sizes")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="logit dtype")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="vp_kl chunk (default: ~4 MiB fp32 per buffer)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (fastest reported)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for one TP setting")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = [row for tp in args.tp for row in _run_tp(tp, args)]
    print(_table(rows, args.dtype))
    print(f"total {time.perf_counter() - start:.0f} s, {os.cpu_count()} cores, torch {torch.__version__}")


if __name__ == "__main__":
    main()
