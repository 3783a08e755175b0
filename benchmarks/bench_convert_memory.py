"""Peak memory of the Qwen2.5-VL checkpoint converter, HF -> Megatron and Megatron -> HF, on a synthetic checkpoint.

    .venv/bin/python benchmarks/bench_convert_memory.py                   # ~2 GB bf16 checkpoint, a few minutes
    .venv/bin/python benchmarks/bench_convert_memory.py --size-gb 4 --max-shard-size 1GB --keep

1. Builds a synthetic HF Qwen2.5-VL checkpoint of about ``--size-gb`` GB: a widened config (text hidden 2048,
   MLP 5632, 16 heads / 2 KV heads, vocabulary 32000, untied; vision tower depth 4, hidden 1280) with as many
   decoder layers as the size asks for; random ``--dtype`` weights written tensor by tensor with
   ``HFCheckpointWriter`` (names and shapes from the converter's own mapping; no transformers model is built).
2. Converts HF -> Megatron, then Megatron -> HF, each in its OWN subprocess. In each, after the imports, the
   baseline is the resident set (VmRSS), the kernel's peak counter is reset (``/proc/self/clear_refs`` = 5) and
   the conversion runs; ``peak`` = VmHWM - baseline, the process's own high-water mark above its baseline.
   A sampling thread (every 50 ms) also tracks ``tree`` = the process's RSS + the unique memory (USS) of its
   child processes (the dist-checkpoint writer forks helpers that share the parent's pages) - baseline.
3. Prints both as a ratio to the checkpoint size (the safetensors bytes), with the targets: HF -> Megatron
   <= 1.25x (one copy of the checkpoint), Megatron -> HF <= 0.5x; checks that the round trip is bit-exact;
   removes its temporary files (unless ``--keep``). Exit code 1 if a target is missed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"hf-to-mcore": 1.25, "mcore-to-hf": 0.5}


# ------------------------------------------------------------------------------------- the synthetic checkpoint
def synthetic_config(num_layers: int) -> dict:
    """A widened Qwen2.5-VL config dict (head_dim 128, mrope_section [16, 24, 24] as the real models)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "dtype": "bfloat16",
        "image_token_id": 31999, "video_token_id": 31998, "vision_start_token_id": 31996,
        "vision_end_token_id": 31997, "bos_token_id": 31995, "eos_token_id": 31995, "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen2_5_vl_text", "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": num_layers, "num_attention_heads": 16, "num_key_value_heads": 2,
            "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rope_theta": 1e6,
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 31995, "eos_token_id": 31995,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision", "depth": 4, "hidden_size": 1280, "intermediate_size": 3420,
            "num_heads": 16, "out_hidden_size": 2048, "fullatt_block_indexes": [3], "window_size": 112,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2,
        },
    }


def _layers_for(size_bytes: float, itemsize: int) -> int:
    h, ffn, kv = 2048, 5632, 2 * 128
    per_layer = (h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * ffn + 2 * h) * itemsize
    vision = 4 * (1280 * 3840 + 3840 + 1280 * 1280 + 1280 + 3 * 1280 * 3420 + 2 * 3420 + 1280 + 2 * 1280)
    fixed = (2 * 32000 * h + h + vision + 1280 * 3 * 2 * 14 * 14 + 5120 * 5120 + 5120 + 2048 * 5120 + 2048
             + 1280) * itemsize
    return max(2, round((size_bytes - fixed) / per_layer))


def build_checkpoint(out_dir: Path, size_gb: float, dtype_name: str, shard_bytes: int) -> int:
    """Write the synthetic HF checkpoint; returns its tensor bytes."""
    import torch

    from megatron_pgpo.models.qwen2_5_vl.convert import build_meta_model, expected_hf_shapes, model_mappings, \
        single_process_megatron
    from megatron_pgpo.models.qwen2_5_vl.hf_config import load_hf_config
    from megatron_pgpo.models.qwen2_5_vl.hf_io import HFCheckpointWriter

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    config = synthetic_config(_layers_for(size_gb * 1e9, dtype.itemsize))
    config["dtype"] = str(dtype).replace("torch.", "")
    with single_process_megatron():
        model = build_meta_model(load_hf_config(dict(config)))
        shapes = expected_hf_shapes(model, model_mappings(model))
    gen = torch.Generator().manual_seed(0)
    with HFCheckpointWriter(out_dir, max_shard_bytes=shard_bytes) as writer:
        for name, shape in shapes.items():
            writer.add(name, (0.02 * torch.randn(shape, generator=gen)).to(dtype))
        writer.write_text("config.json", json.dumps(config, indent=2))
    return writer.total_bytes


# ------------------------------------------------------------------------------------------- measurement (child)
def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class _TreeSampler(threading.Thread):
    """Max over time of (own RSS + USS of every child process), sampled every 50 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.peak = 0
        self.max_children = 0
        self.stop = threading.Event()

    def run(self):
        import psutil

        while not self.stop.is_set():
            children = 0
            for child in self.me.children(recursive=True):
                try:
                    children += child.memory_full_info().uss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.max_children = max(self.max_children, children)
            self.peak = max(self.peak, self.me.memory_info().rss + children)
            self.stop.wait(0.05)


def child_main(direction: str, src: str, dst: str, max_shard_bytes: int) -> None:
    # Everything the conversion imports, before the baseline (the package first: torchvision shim).
    import megatron_pgpo.models.qwen2_5_vl  # noqa: F401
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401

    from megatron_pgpo.models.qwen2_5_vl.convert import from_hf, to_hf

    baseline = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    sampler = _TreeSampler()
    sampler.start()
    start = time.perf_counter()
    if direction == "hf-to-mcore":
        from_hf(src, dst, progress=False)
    else:
        to_hf(src, dst, max_shard_bytes=max_shard_bytes, progress=False)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    print("RESULT " + json.dumps({"baseline": baseline, "hwm": _status("VmHWM"), "hwm_reset": reset,
                                  "tree_peak": sampler.peak, "children_uss": sampler.max_children,
                                  "seconds": seconds}))


# --------------------------------------------------------------------------------------------------- driver
def _run_child(direction: str, src: Path, dst: Path, max_shard_bytes: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", direction, str(src), str(dst),
           "--max-shard-size", str(max_shard_bytes)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"{direction} failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _same(a: Path, b: Path) -> bool:
    import torch

    from megatron_pgpo.models.qwen2_5_vl.hf_io import HFCheckpointReader

    with HFCheckpointReader(a) as x, HFCheckpointReader(b) as y:
        if sorted(x.names()) != sorted(y.names()):
            return False
        return all(torch.equal(x.tensor(n), y.tensor(n)) for n in x.names())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="synthetic checkpoint size in GB (default 2)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weight dtype (default bf16)")
    parser.add_argument("--max-shard-size", type=int, default=500_000_000,
                        help="safetensors shard size in bytes, both for the input and the output (default 500 MB)")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--child", nargs=3, metavar=("DIRECTION", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child, args.max_shard_size)
        return 0

    sys.path.insert(0, str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        size = build_checkpoint(work / "hf", args.size_gb, args.dtype, args.max_shard_size)
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB {args.dtype}, "
              f"{len(list((work / 'hf').glob('*.safetensors')))} shards, built in {time.perf_counter() - t0:.0f} s")
        results = {"hf-to-mcore": _run_child("hf-to-mcore", work / "hf", work / "mcore", args.max_shard_size)}
        results["mcore-to-hf"] = _run_child("mcore-to-hf", work / "mcore", work / "hf_back", args.max_shard_size)
        exact = _same(work / "hf", work / "hf_back")
        ok = exact
        print(f"{'direction':<12} {'time':>7} {'baseline':>9} {'peak':>9} {'peak/ckpt':>9} {'tree':>9} "
              f"{'tree/ckpt':>9} {'target':>7}  result")
        for direction, r in results.items():
            peak = r["hwm"] - r["baseline"]
            tree = r["tree_peak"] - r["baseline"]
            target = TARGETS[direction]
            passed = peak / size <= target and tree / size <= target
            ok &= passed
            print(f"{direction:<12} {r['seconds']:>6.1f}s {r['baseline'] / 2**20:>7.0f}MB {peak / 2**20:>7.0f}MB "
                  f"{peak / size:>9.3f} {tree / 2**20:>7.0f}MB {tree / size:>9.3f} {target:>6.2f}x  "
                  f"{'PASS' if passed else 'FAIL'}" + ("" if r["hwm_reset"] else "  (VmHWM not reset)"))
        for direction, r in results.items():
            print(f"{direction}: largest USS of its child processes {r['children_uss'] / 2**20:.0f} MB")
        print(f"round trip bit-exact: {exact}")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
