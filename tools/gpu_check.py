"""Every GPU check in one command, one PASS / FAIL / SKIP line each, then a summary (run by tools/gpu_check.sh).

    python tools/gpu_check.py                 # on a CUDA machine: the checks below on cuda, bf16
    python tools/gpu_check.py --device cpu    # the same steps on the CPU at tiny sizes (the test suite runs this)

Checks, in order of value:
  (a) train    `megatron-pgpo train` on one device: bf16 + NCCL on a GPU (fp32 + gloo on CPU), the transformers
               rollout engine, 2 steps of a tiny warmed-up model, then a resume to step 3.
  (b) policy   the Megatron policy's scoring pass and one update (distributed optimizer) in bf16 on the device
               against the same batch on CPU fp32 (tolerances and why: POLICY_TOLERANCE in tools/gpu_check.py).
  (c) vision   the vision tower's peak memory at 5,120 patches, eager vs SDPA attention (CUDA only).
  (d) layer    one decoder layer's saved activations (torch.cuda.max_memory_allocated) against the planner's
               formula (CUDA only).
  (e) export   Megatron -> HF weight export throughput, GB/s (device stream, and with the copy to host memory).
  (f) te, vllm Transformer Engine and CUDA vLLM, where installed: the `gpu`-marked tests (SKIP with the reason).
  (g) ipc      weight buckets to another process (the vLLM worker's decode code): CUDA IPC handle vs safetensors
               bytes, GB/s side by side, bit-exact (CUDA only).

Each measurement runs in a child process of its own (``--child``), so CPU-patched Megatron, CUDA state and
process groups never mix. Exit status 1 if any check FAILED.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (b)'s tolerances, bf16 on the device against fp32 on the CPU, same weights and batch. Before the update: bf16
#: keeps 8 significant bits (relative rounding 2^-9 per element) and the tiny random model's logits are O(1), so a
#: log-prob (a difference of logits) carries ~1e-2 after a few bf16 matmuls: max 0.15, mean 0.03 nats. The update:
#: Adam's first step is ~lr * sign(gradient), so a weight whose gradient is near 0 may move +lr in one dtype and -lr
#: in the other; the effect of the update on the log-probs (after - before) must point the same way (cosine >= 0.99)
#: and agree to 10% in mean absolute size. Measured on CPU bf16: cosine 0.9998, relative error 0.045.
POLICY_TOLERANCE = {"logp_max": 0.15, "logp_mean": 0.03, "entropy_rel": 0.02, "grad_norm_rel": 0.05,
                    "update_cosine": 0.99, "update_rel": 0.1}


# ------------------------------------------------------------------------------------------------- plumbing
def _python() -> List[str]:
    return [sys.executable]


def _child(kind: str, args: argparse.Namespace, out: Path, *extra: str, timeout: int = 300) -> dict:
    """Run ``--child kind`` in a fresh process; its JSON result (or raise with the tail of its output)."""
    cmd = _python() + [__file__, "--child", kind, "--workdir", str(args.workdir), "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"child {kind} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


def _tiny_checkpoint(workdir: Path, warm_up_steps: int = 80) -> Path:
    """The demo's tiny model, warmed up on the format for a few steps (so rewards differ within groups and the
    updates in (a) are not all zero), built once per workdir."""
    path = workdir / "tiny_ckpt"
    if not (path / "config.json").exists():
        import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)
        from megatron_pgpo.demo.tiny_model import build_demo_checkpoint, warm_up

        build_demo_checkpoint(path, task="colour")
        warm_up(path, task="colour", steps=warm_up_steps, progress=False)
    return path


# ------------------------------------------------------------------------------------------------- (a) train
def check_train(args) -> Tuple[str, str]:
    ckpt = _tiny_checkpoint(args.workdir)
    run_dir = args.workdir / "train_run"
    dtype = "bf16" if args.device == "cuda" else "fp32"
    base = _python() + ["-m", "megatron_pgpo.cli", "train", "examples/tiny_cpu.yaml", f"model.hf_path={ckpt}",
                        f"model.dtype={dtype}", f"parallel.device={args.device}",
                        "parallel.tensor_model_parallel_size=1",
                        "rollout.engine=transformers", f"trainer.run_dir={run_dir}", "data.rollout_batch_size=4",
                        "trainer.global_batch_size=2", "rollout.n=4", "rollout.max_new_tokens=16",
                        "trainer.micro_batch_size=8", "trainer.eval_every=0", "checkpoint.save_every=1",
                        "reward.num_workers=1", "algorithm.dapo.dynamic_sampling=false", "logging.tensorboard=false",
                        "logging.console=false", "--nproc", "1"]
    times = []
    for steps in (2, 3):  # the second run resumes from the first one's step-2 checkpoint
        t0 = time.perf_counter()
        proc = subprocess.run(base + [f"trainer.total_steps={steps}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            return "FAIL", f"train to step {steps} exited {proc.returncode}: {proc.stderr[-2000:]}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    if steps != [1, 2, 3]:
        return "FAIL", f"metrics steps {steps}, expected [1, 2, 3] (step 3 after resuming from step 2)"
    problems = []
    for r in records:
        bad = [k for k, v in r.items() if isinstance(v, float) and v != v]
        if bad:
            problems.append(f"step {r['step']}: NaN in {bad}")
        if r.get("actor/skipped_updates", 0) != 0:
            problems.append(f"step {r['step']}: skipped updates")
        limit = 0.5 if dtype == "bf16" else 1e-3  # engine (HF bf16) vs Megatron (bf16): different kernels
        if r.get("check/rollout_logp_diff_mean", 0.0) > limit:
            problems.append(f"step {r['step']}: rollout vs trainer log-prob mean diff "
                            f"{r['check/rollout_logp_diff_mean']}")
    if problems:
        return "FAIL", "; ".join(problems)
    moved = any(r.get("actor/grad_norm", 0.0) > 0 for r in records)
    detail = (f"3 steps ({times[0]:.0f} s for 2, resume + 1 in {times[1]:.0f} s), {dtype}, rollout-vs-trainer log-prob "
              f"diff mean {max(r.get('check/rollout_logp_diff_mean', 0) for r in records):.2e}, "
              f"reward {[round(r['reward/mean'], 3) for r in records]}, grad norms "
              f"{[round(r.get('actor/grad_norm', 0.0), 4) for r in records]}")
    return ("PASS" if moved else "FAIL"), detail + ("" if moved else " (no update moved the weights)")


# ------------------------------------------------------------------------------------------------ (b) policy
def _policy_child(args) -> dict:
    """Build the tiny checkpoint's policy on ``args.child_device`` in ``args.dtype``; score a fixed batch, run one
    update with fixed advantages, score again. Returns the per-token numbers (on the CPU, as lists)."""
    import torch

    import megatron_pgpo.models.qwen2_5_vl  # noqa: F401
    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID
    from megatron_pgpo.trainer.batch import Sample, collate, prompt_grouped_micro_batches
    from megatron_pgpo.trainer.launch import free_port, init_rank
    from megatron_pgpo.trainer.policy import MegatronPolicy

    ckpt = _tiny_checkpoint(args.workdir)
    cfg = load_config(None, [f"model.hf_path={ckpt}", f"model.dtype={args.dtype}",
                             f"parallel.device={args.child_device}",
                             "trainer.lr=1e-4", "trainer.grad_clip=0", "parallel.use_distributed_optimizer=true"])
    device = init_rank(cfg, 0, 1, "127.0.0.1", free_port(), local_rank=0, local_world_size=1)
    model = build_model(str(ckpt), dtype=args.dtype, init_weights=False, device=device)
    load_hf_into_model(model, str(ckpt))
    off = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device != device]
    if off:
        raise RuntimeError(f"{len(off)} tensors of the model are not on {device}, e.g. {off[:3]}")
    policy = MegatronPolicy(model, cfg)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(16, 1176, generator=gen) for _ in range(2)]
    samples = []
    for i in range(8):
        g = i % 2
        prompt = [5, 6 + g, VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * 4 + [VISION_END_TOKEN_ID, 7]
        samples.append(Sample(prompt_ids=prompt, response_ids=torch.randint(10, 900, (3 + i,), generator=gen).tolist(),
                              pixel_values=images[g], image_grid_thw=torch.tensor([[1, 4, 4]]), group=g))
    micro = [collate(samples, idx, IMAGE_TOKEN_ID, 2) for idx in prompt_grouped_micro_batches(samples, 4)]

    def score():
        out = {}
        for so in policy.score(micro):
            for row, i in enumerate(so.indices):
                n = len(samples[i].response_ids)
                start = len(samples[i].prompt_ids)
                out[i] = {k: getattr(so, k)[row, start: start + n].tolist() for k in ("logp", "scores", "entropy")}
        return [out[i] for i in range(len(samples))]

    before = score()
    advantages = torch.randn(len(samples), generator=gen)
    extras = []
    for mb in micro:
        old = torch.zeros(mb.input_ids.shape)
        for row, i in enumerate(mb.indices):
            start = len(samples[i].prompt_ids)
            old[row, start: start + len(samples[i].response_ids)] = torch.tensor(before[i]["logp"])
        extras.append({"old_logp": old, "advantages": advantages[mb.indices][:, None] * mb.response_mask})
    tokens = float(sum(len(s.response_ids) for s in samples))
    stats = policy.update(micro, extras, tokens, float(len(samples)))
    after = score()
    return {"device": str(device), "before": before, "after": after, "grad_norm": stats["actor/grad_norm"],
            "loss": stats.get("actor/loss")}


def check_policy(args) -> Tuple[str, str]:
    dtype = "bf16"  # on the CPU too: the same comparison, bf16 kernels of the CPU
    reference = _child("policy", args, args.workdir / "policy_cpu_fp32.json", "--child-device", "cpu",
                       "--dtype", "fp32")
    got = _child("policy", args, args.workdir / f"policy_{args.device}_{dtype}.json", "--child-device", args.device,
                 "--dtype", dtype)
    tol = POLICY_TOLERANCE
    import torch

    def logps(result, phase):
        return torch.tensor([x for row in result[phase] for x in row["logp"]], dtype=torch.float64)

    def entropy(result):
        return sum(sum(row["entropy"]) for row in result["before"])

    diff = (logps(got, "before") - logps(reference, "before")).abs()
    entropy_rel = abs(entropy(got) - entropy(reference)) / abs(entropy(reference))
    moved_ref = logps(reference, "after") - logps(reference, "before")
    moved = logps(got, "after") - logps(got, "before")
    cosine = float(torch.nn.functional.cosine_similarity(moved, moved_ref, dim=0))
    update_rel = float((moved - moved_ref).abs().mean() / moved_ref.abs().mean())
    grad_rel = abs(got["grad_norm"] - reference["grad_norm"]) / max(reference["grad_norm"], 1e-12)
    measured = {"logp_max": float(diff.max()), "logp_mean": float(diff.mean()), "entropy_rel": entropy_rel,
                "grad_norm_rel": grad_rel, "update_cosine": cosine, "update_rel": update_rel}
    problems = [k for k, v in measured.items() if (v < tol[k] if k == "update_cosine" else v > tol[k])]
    detail = (f"{got['device']} {dtype} vs cpu fp32: log-prob |diff| max {measured['logp_max']:.1e} mean "
              f"{measured['logp_mean']:.1e}, entropy rel {entropy_rel:.1e}, grad norm {got['grad_norm']:.4g} vs "
              f"{reference['grad_norm']:.4g} (rel {grad_rel:.1e}); the update's effect on the log-probs (mean "
              f"{float(moved_ref.abs().mean()):.2f} nats): cosine {cosine:.4f}, rel error {update_rel:.3f}")
    return ("FAIL" if problems else "PASS"), detail + (f" -- outside tolerance: {problems}" if problems else "")


# ------------------------------------------------------------------------------------------------ (c) vision
def _vision_child(args) -> dict:
    """Peak memory of the 3B vision tower's forward + backward at 5,120 patches, bf16, per attention backend."""
    import torch

    import megatron_pgpo.models.qwen2_5_vl  # noqa: F401
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLConfig(**json.loads((ROOT / "examples/hf_configs/qwen2_5_vl_3b.json").read_text()))
    grid = torch.tensor([[1, 64, 80]], device="cuda")  # 5,120 patches, a 896 x 1120 image
    out = {}
    for attn in ("eager", "sdpa"):
        vision = config.vision_config
        vision._attn_implementation = attn
        with torch.device("cuda"):
            tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision, dtype=torch.bfloat16)
        pixels = torch.randn(5120, 1176, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        result = tower(pixels, grid_thw=grid)
        features = result.pooler_output if hasattr(result, "pooler_output") else result
        features.float().sum().backward()
        torch.cuda.synchronize()
        out[attn] = {"peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
                     "seconds": time.perf_counter() - t0}
        del tower, pixels, result, features
        torch.cuda.empty_cache()
    return out


def check_vision(args) -> Tuple[str, str]:
    if args.device != "cuda":
        return "SKIP", "needs CUDA memory statistics (torch.cuda.max_memory_allocated)"
    m = _child("vision", args, args.workdir / "vision.json")
    ratio = m["eager"]["peak_gib"] / max(m["sdpa"]["peak_gib"], 1e-9)
    detail = (f"3B vision tower fwd+bwd, 5,120 patches, bf16: eager {m['eager']['peak_gib']:.2f} GiB "
              f"({m['eager']['seconds']:.2f} s), sdpa {m['sdpa']['peak_gib']:.2f} GiB ({m['sdpa']['seconds']:.2f} s), "
              f"eager / sdpa = {ratio:.1f}x")
    return ("PASS" if m["sdpa"]["peak_gib"] <= m["eager"]["peak_gib"] else "FAIL"), detail


# ------------------------------------------------------------------------------------------------- (d) layer
def _layer_child(args) -> dict:
    """Memory one Megatron decoder layer (the 3B model's dims, local spec, bf16) keeps for backward on CUDA."""
    import torch

    import megatron_pgpo.models.qwen2_5_vl  # noqa: F401
    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.trainer.launch import free_port, init_rank

    hf = json.loads((ROOT / "examples/hf_configs/qwen2_5_vl_3b.json").read_text())
    text = hf.get("text_config", hf)
    text["num_hidden_layers"] = hf["num_hidden_layers"] = 1
    cfg = load_config(None, [f"parallel.device={args.child_device}"])
    device = init_rank(cfg, 0, 1, "127.0.0.1", free_port(), local_rank=0, local_world_size=1)
    model = build_model(hf, dtype="bf16", device=device, pre_process=False, post_process=False).train()
    lm = model.language_model
    seq, batch = 2048, 1
    hidden = torch.randn(seq, batch, lm.config.hidden_size, dtype=torch.bfloat16, device=device, requires_grad=True)
    positions = torch.arange(seq, device=device)[None, None, :].expand(3, batch, seq)
    rotary = lm.rotary_pos_emb(positions, lm.mrope_section)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    output = lm.decoder(hidden, attention_mask=None, rotary_pos_emb=rotary)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base - output.numel() * output.element_size()
    return {"measured": kept, "seq": seq, "batch": batch, "hidden": lm.config.hidden_size,
            "fused_swiglu": bool(lm.config.bias_activation_fusion),
            "heads": lm.config.num_attention_heads, "kv_heads": lm.config.num_query_groups,
            "ffn": lm.config.ffn_hidden_size}


def check_layer(args) -> Tuple[str, str]:
    if args.device != "cuda":
        return "SKIP", "needs CUDA memory statistics (the CPU suite checks the same formula with saved-tensor hooks)"
    from megatron_pgpo.planner.activations import decoder_block_extra_bytes, layer_activation_bytes

    m = _child("layer", args, args.workdir / "layer.json", "--child-device", "cuda")
    h = m["hidden"]
    norm = 8 * h + 4  # without TE/Apex Megatron falls back to torch's RMSNorm, which keeps two fp32 copies
    predicted = layer_activation_bytes(m["seq"], m["batch"], h, m["heads"], m["kv_heads"], m["ffn"], norm_bytes=norm,
                                       fused_swiglu=m["fused_swiglu"])
    # a middle stage (no embedding, no output layer, so no final norm); the layer's input was allocated before the
    # measurement began, so a saved reference to it is not counted (E h per token, ~1% of the layer): hence a band
    predicted += decoder_block_extra_bytes(m["seq"], m["batch"], h, m["heads"], final_norm=False, norm_bytes=norm)
    ratio = m["measured"] / predicted
    detail = (f"3B decoder layer, s={m['seq']}, b={m['batch']}, bf16, local spec, fused SwiGLU {m['fused_swiglu']}: "
              f"measured {m['measured'] / 2**20:.1f} "
              f"MiB, planner {predicted / 2**20:.1f} MiB (measured / planner = {ratio:.3f})")
    return ("PASS" if 0.9 <= ratio <= 1.1 else "FAIL"), detail


# ------------------------------------------------------------------------------------------------ (e) export
def _export_child(args) -> dict:
    """Megatron -> HF stream of a model's weights: bytes and seconds, on the device and with a host copy."""
    import torch

    import megatron_pgpo.models.qwen2_5_vl  # noqa: F401
    from megatron_pgpo.config import load_config
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.rollout.weight_sync import iter_full_model_hf_tensors
    from megatron_pgpo.trainer.launch import free_port, init_rank

    cfg = load_config(None, [f"parallel.device={args.child_device}"])
    device = init_rank(cfg, 0, 1, "127.0.0.1", free_port(), local_rank=0, local_world_size=1)
    if device.type == "cuda":  # the 3B model's shapes, 4 of its 36 layers (~1.3 B parameters with vision and embedding)
        hf = json.loads((ROOT / "examples/hf_configs/qwen2_5_vl_3b.json").read_text())
        text = hf.get("text_config", hf)
        text["num_hidden_layers"] = hf["num_hidden_layers"] = 4
        dtype = "bf16"
    else:
        hf, dtype = str(_tiny_checkpoint(args.workdir)), "fp32"
    model = build_model(hf, dtype=dtype, device=device)
    out = {}
    for label, to_host in (("device", False), ("host", True)):
        total, t0 = 0, None
        for rep in range(2):  # the first pass warms up allocator and kernels
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, total = time.perf_counter(), 0
            for _, tensor in iter_full_model_hf_tensors(model):
                if to_host:
                    tensor = tensor.to("cpu")
                total += tensor.numel() * tensor.element_size()
            if device.type == "cuda":
                torch.cuda.synchronize()
        out[label] = {"bytes": total, "seconds": time.perf_counter() - t0}
    return out


def check_export(args) -> Tuple[str, str]:
    m = _child("export", args, args.workdir / "export.json", "--child-device", args.device)
    gbps = {k: v["bytes"] / max(v["seconds"], 1e-9) / 1e9 for k, v in m.items()}
    return "PASS", (f"{m['device']['bytes'] / 1e9:.2f} GB of HF tensors: {gbps['device']:.1f} GB/s streamed on "
                    f"{args.device}, {gbps['host']:.1f} GB/s with the copy to host memory")


# ------------------------------------------------------------------------------------------------ (f) TE, vLLM
def check_optional(args) -> Tuple[str, str]:
    missing = []
    for module, why in (("transformer_engine", "Transformer Engine"), ("vllm", "vLLM")):
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - TE raises RuntimeError/OSError without a driver
            missing.append(f"{why}: {type(exc).__name__}")
    if args.device != "cuda":
        return "SKIP", "the gpu-marked tests need CUDA"
    proc = subprocess.run(_python() + ["-m", "pytest", "tests", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                       "-o", "timeout=240"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    note = f" (not installed: {', '.join(missing)}; their tests skip)" if missing else ""
    return ("PASS" if proc.returncode in (0, 5) else "FAIL"), f"pytest -m gpu: {tail}{note}"


# ------------------------------------------------------------------------------------------------ (g) IPC
#: The receiving process: what a vLLM worker runs on each bucket (``decode_payload``, then a copy into its own
#: tensors, as ``reload_weights`` does), timed per transport.
_IPC_RECEIVER = """
import json, pickle, sys, time, torch
from megatron_pgpo.rollout.vllm_worker import decode_payload
payloads = pickle.loads(open(sys.argv[1], "rb").read())
torch.cuda.set_device(0)
device, out = torch.device("cuda", 0), {}
for kind, payload in payloads.items():
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        named = decode_payload(payload, device)
        copies = [t.to(device, copy=True) for _, t in named]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out[kind] = {"seconds": times, "checksum": [float(c.float().sum()) for c in copies]}
    del named, copies
open(sys.argv[2], "w").write(json.dumps(out))
"""


def _ipc_child(args) -> dict:
    """512 MiB of bf16 weights in 4 tensors, sent to a receiver process by handle and as bytes."""
    import os
    import pickle

    import torch
    from safetensors.torch import save

    from megatron_pgpo.rollout.cuda_ipc import pack_bucket, share

    gen = torch.Generator(device="cuda").manual_seed(0)
    bucket = [(f"model.layers.{i}.mlp.down_proj.weight", torch.randn(8192, 8192, device="cuda", generator=gen)
               .bfloat16()) for i in range(4)]
    nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    flat, layout = pack_bucket(bucket)
    ipc = {"cuda_ipc": share(flat), "meta": layout}
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw = save({n: t.contiguous() for n, t in bucket})  # what VLLMEngine._encode does without IPC (copy to host)
    save_s = time.perf_counter() - t0
    payload_file, result = args.workdir / "ipc_payload.pkl", args.workdir / "ipc_result.json"
    payload_file.write_bytes(pickle.dumps({"cuda_ipc": ipc, "bytes": raw}))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(_python() + ["-c", _IPC_RECEIVER, str(payload_file), str(result)], env=env,
                          capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise RuntimeError(f"receiver exited {proc.returncode}: {proc.stderr[-3000:]}")
    got = json.loads(result.read_text())
    expected = [float(t.float().sum()) for _, t in bucket]
    del flat  # only now: the receiver has exited
    return {"bytes": nbytes, "pack_s": pack_s, "save_s": save_s, "expected": expected, **got}


def check_ipc(args) -> Tuple[str, str]:
    if args.device != "cuda":
        return "SKIP", "CUDA IPC needs CUDA (the CPU suite tests packing and the payload's RPC encoding)"
    m = _child("ipc", args, args.workdir / "ipc.json", timeout=300)
    exact = all(m[k]["checksum"] == m["expected"] for k in ("cuda_ipc", "bytes"))
    ipc_s = m["pack_s"] + min(m["cuda_ipc"]["seconds"])
    bytes_s = m["save_s"] + min(m["bytes"]["seconds"])
    gbps = lambda s: m["bytes"] / s / 1e9  # noqa: E731
    return ("PASS" if exact else "FAIL"), (
        f"{m['bytes'] / 2**20:.0f} MiB bucket to another process: CUDA IPC {gbps(ipc_s):.1f} GB/s (pack "
        f"{m['pack_s'] * 1e3:.0f} ms, open+copy {min(m['cuda_ipc']['seconds']) * 1e3:.0f} ms, first open "
        f"{m['cuda_ipc']['seconds'][0] * 1e3:.0f} ms), bytes {gbps(bytes_s):.1f} GB/s before the RPC's own transfer "
        f"(IPC / bytes speed-up {bytes_s / ipc_s:.1f}x); received {'bit-exact' if exact else 'WRONG'}")


CHECKS: List[Tuple[str, str, Callable]] = [
    ("a", "train", check_train), ("b", "policy", check_policy), ("c", "vision", check_vision),
    ("d", "layer", check_layer), ("e", "export", check_export), ("f", "te-vllm", check_optional),
    ("g", "ipc", check_ipc),
]
CHILDREN: Dict[str, Callable] = {"policy": _policy_child, "vision": _vision_child, "layer": _layer_child,
                                 "export": _export_child, "ipc": _ipc_child}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cuda: the GPU checks; cpu: the same steps on the CPU at tiny sizes; auto: cuda if "
                             "present")
    parser.add_argument("--only", default="", help="comma-separated check letters or names, e.g. a,b or train")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pgpo-gpu-check-")).absolute()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        args.out.write_text(json.dumps(CHILDREN[args.child](args)))
        return 0
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL  --device cuda but torch sees no CUDA device")
        return 1
    if args.device == "cuda":
        print(f">> torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}", flush=True)
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    start = time.perf_counter()
    for letter, name, check in CHECKS:
        if wanted and letter not in wanted and name not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            status, detail = check(args)
        except Exception as exc:  # noqa: BLE001 - one check's crash is its FAIL line, the others still run
            status, detail = "FAIL", f"{type(exc).__name__}: {str(exc)[-2500:]}"
        counts[status] += 1
        print(f"{status:<5} ({letter}) {name:<8} [{time.perf_counter() - t0:5.1f} s] {detail}", flush=True)
    print(f"gpu_check on {args.device} in {time.perf_counter() - start:.0f} s: {counts['PASS']} passed, "
          f"{counts['FAIL']} failed, {counts['SKIP']} skipped (workdir {args.workdir})")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
