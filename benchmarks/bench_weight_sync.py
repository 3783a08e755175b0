"""Weight sync Megatron -> vLLM: time and peak extra memory against model size and bucket size.

    .venv/bin/python benchmarks/bench_weight_sync.py [--hidden 256 512 1024] [--bucket-mb 1 16 512] [--repeats 2]

For each widened tiny Qwen2.5-VL (head_dim 32, 4 language layers, MLP 2.75 x hidden, the tiny vision tower widened
to the same output), one CPU rank (gloo world of 1, Megatron TP=1) loads the checkpoint and a multiprocess vLLM
engine (the deployment ``rollout.vllm_engine`` documents) starts from it. Then, per bucket size, ``sync_weights``
is timed (best of ``--repeats``) while a sampler thread records the RSS of this process and of the engine's
processes every 2 ms: "extra" is the peak minus the RSS just before the sync. The reference is one safetensors
``save_file`` + ``load_file`` of the same HF tensors in a temp dir (page cache warm): ``ratio`` = sync / (save+load).
``GB/s`` is the model's HF bytes over the sync time, for the transport the engine used (``cuda_ipc.resolve_transport``:
safetensors bytes on this CPU machine; on a GPU node with CUDA vLLM the same script measures the CUDA IPC path, and
``tools/gpu_check.sh`` check (g) measures the IPC transport alone, without vLLM).
Timings on a shared 2-core machine are noisy; compare rows of one run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path


def make_checkpoint(path: Path, hidden: int, layers: int = 4, seed: int = 0) -> int:
    """A random widened tiny checkpoint (+ tokenizer/processor) at ``path``; returns its parameter count."""
    import torch

    from megatron_pgpo.models.qwen2_5_vl.tiny import tiny_hf_config
    from megatron_pgpo.models.qwen2_5_vl.tiny_tokenizer import save_tiny_processor
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = tiny_hf_config("tiny").to_dict()
    ffn = (int(hidden * 2.75) // 8) * 8
    d["text_config"].update(hidden_size=hidden, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64,
                            intermediate_size=ffn, num_hidden_layers=layers)
    d["text_config"].pop("layer_types", None)  # derived from num_hidden_layers
    d["vision_config"].update(out_hidden_size=hidden)
    config = Qwen2_5_VLConfig(**d)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(path, safe_serialization=True)
    save_tiny_processor(path)
    return sum(p.numel() for p in model.parameters())


class RssSampler:
    """Peak RSS (bytes) of this process and of the listed child pids, sampled every ``interval`` s in a thread."""

    def __init__(self, pids, interval: float = 0.002):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.interval = interval
        self.peak = [0] * len(self.procs)
        self._stop = threading.Event()

    def rss(self):
        out = []
        for proc in self.procs:
            try:
                out.append(proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - a child that exited
                out.append(0)
        return out

    def _run(self):
        while not self._stop.is_set():
            self.peak = [max(a, b) for a, b in zip(self.peak, self.rss())]
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.rss()
        self.peak = list(self.base)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = [max(a, b) for a, b in zip(self.peak, self.rss())]

    def extra_mib(self):
        return [(p - b) / 2**20 for p, b in zip(self.peak, self.base)]


def save_load_seconds(named, tmp: Path) -> float:
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    save_file({n: t.contiguous() for n, t in named}, str(tmp / "ref.safetensors"))
    loaded = load_file(str(tmp / "ref.safetensors"))
    seconds = time.perf_counter() - t0
    del loaded
    (tmp / "ref.safetensors").unlink()
    return seconds


def engine_pids() -> list:
    import psutil

    return [c.pid for c in psutil.Process().children(recursive=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[1, 16, 512])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from megatron_pgpo.compat.megatron_cpu import init_cpu_distributed
    from megatron_pgpo.rollout.check_sync import load_megatron
    from megatron_pgpo.rollout.cuda_ipc import resolve_transport
    from megatron_pgpo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig
    from megatron_pgpo.rollout.weight_sync import iter_full_model_hf_tensors, sync_weights

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_cpu_distributed(0, 1, port, tp=1, pp=1)
    root = Path(tempfile.mkdtemp(prefix="pgpo-bench-sync-"))
    rows = []
    for hidden in args.hidden:
        ckpt = root / f"h{hidden}"
        n_params = make_checkpoint(ckpt, hidden)
        model = load_megatron(str(ckpt))
        named = list(iter_full_model_hf_tensors(model))
        model_mib = sum(t.numel() * t.element_size() for _, t in named) / 2**20
        ref = min(save_load_seconds(named, root) for _ in range(args.repeats))
        del named
        engine = VLLMEngine(VLLMEngineConfig(model_path=str(ckpt), run_dir=str(root / "run"), max_model_len=256,
                                             kv_cache_memory_bytes=32 << 20))
        engine.start()
        transport = resolve_transport(engine.config.weight_transport, engine.config.multiprocess,
                                      next(model.parameters()).device.type)
        pids = [os.getpid()] + engine_pids()
        for bucket_mb in args.bucket_mb:
            engine.config.bucket_bytes = max(1, int(bucket_mb * 2**20))
            best, extra = float("inf"), None
            for _ in range(args.repeats):
                with RssSampler(pids) as sampler:
                    t0 = time.perf_counter()
                    sync_weights(model, engine)
                    seconds = time.perf_counter() - t0
                if seconds < best:
                    best = seconds
                mem = sampler.extra_mib()
                extra = mem if extra is None else [max(a, b) for a, b in zip(extra, mem)]
            rows.append((hidden, n_params / 1e6, model_mib, bucket_mb, best, model_mib * 2**20 / best / 1e9, ref,
                         best / ref, extra[0], max(extra[1:])))
            print(f"hidden {hidden}: bucket {bucket_mb} MiB: sync {best:.3f} s", flush=True)
        engine.shutdown()
        del model
    header = (f"{'hidden':>6} {'params M':>8} {'MiB':>7} {'bucket MiB':>10} {'sync s':>7} {'GB/s':>6} "
              f"{'save+load s':>11} {'ratio':>6} {'trainer +MiB':>12} {'engine +MiB':>11}")
    print("\n" + header + "\n" + "-" * len(header))
    for hidden, params, mib, bucket, sync_s, gbps, ref_s, ratio, trainer_mib, engine_mib in rows:
        print(f"{hidden:>6} {params:>8.2f} {mib:>7.1f} {bucket:>10g} {sync_s:>7.3f} {gbps:>6.2f} {ref_s:>11.3f} "
              f"{ratio:>6.2f} {trainer_mib:>12.1f} {engine_mib:>11.1f}")
    print(f"\ntorch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; engine: multiprocess vLLM, fp32; "
          f"transport: {transport}")


if __name__ == "__main__":
    main()
