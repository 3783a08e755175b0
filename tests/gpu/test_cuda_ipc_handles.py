"""CUDA-IPC weight buckets between two processes, through the code vLLM's workers run (``vllm_worker.decode_payload``).

This process packs and shares a bucket (mixed dtypes, odd sizes, a non-contiguous tensor) the way
``VLLMEngine._encode`` does; a second Python process, standing in for a vLLM worker, opens the payload on its own
device and writes back what it read. The two must agree bit for bit. No vLLM needed: the worker-side function is
ours. Sharing a buffer across GPUs (rollout TP > 1) needs two GPUs and is not covered here.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]

RECEIVER = """
import pickle, sys, torch
from megatron_pgpo.rollout.vllm_worker import decode_payload
payload = pickle.loads(open(sys.argv[1], "rb").read())
torch.cuda.set_device(0)
named = decode_payload(payload, torch.device("cuda", 0))
torch.cuda.current_stream().synchronize()
torch.save({"named": [(n, t.cpu()) for n, t in named], "device": str(named[0][1].device)}, sys.argv[2])
"""


def _plain(value) -> bool:
    """Only msgpack-able plain data (what crosses vLLM's RPC without pickling)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, bytes))


def test_bucket_shared_by_handle_arrives_bit_exact_in_another_process(tmp_path):
    from megatron_pgpo.rollout.cuda_ipc import pack_bucket, share

    gen = torch.Generator(device="cuda").manual_seed(0)
    bucket = [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(33, 17, device="cuda", generator=gen).bfloat16()),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(33, device="cuda", generator=gen)),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(64, 48, device="cuda", generator=gen).t()),
        ("visual.merger.mlp.0.bias", torch.randn(5, device="cuda", generator=gen).half()),
    ]
    flat, layout = pack_bucket(bucket)
    payload = {"cuda_ipc": share(flat), "meta": layout}
    assert _plain(payload), payload
    (tmp_path / "payload.pkl").write_bytes(pickle.dumps(payload))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", RECEIVER, str(tmp_path / "payload.pkl"), str(tmp_path / "got.pt")],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    assert got["device"] == "cuda:0"
    assert [n for n, _ in got["named"]] == [n for n, _ in bucket]
    for (_, ref), (_, tensor) in zip(bucket, got["named"]):
        assert tensor.dtype == ref.dtype and tensor.shape == ref.shape
        assert torch.equal(tensor, ref.cpu())
    del flat  # only now: the receiver has exited
