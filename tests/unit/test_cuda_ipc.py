"""The CUDA-IPC weight transport's CPU-testable half: bucket packing (layout, alignment, exact bytes back), the
transport choice, and that its payload shape crosses vLLM's msgpack RPC. Sharing and opening handles across
processes is tests/gpu/test_cuda_ipc_handles.py (run by tools/gpu_check.sh)."""
from __future__ import annotations

import pytest
import torch

from megatron_pgpo.rollout.cuda_ipc import ALIGN, aligned, pack_bucket, resolve_transport, unpack_bucket


def _bucket():
    gen = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(3, 5, generator=gen).bfloat16()),       # 30 bytes: the next offset must realign
        ("a.bias", torch.randn(7, generator=gen)),                        # fp32 after an odd-sized bf16 tensor
        ("b.ids", torch.randint(-9, 9, (11,), generator=gen)),            # int64
        ("b.empty", torch.empty(0, 4)),                                   # zero-size
        ("c.weight", torch.randn(4, 6, generator=gen).t()),               # non-contiguous
        ("c.half", torch.randn(2, 3, 1, generator=gen).half()),
    ]


def test_pack_then_unpack_gives_the_same_tensors_bit_for_bit():
    bucket = _bucket()
    flat, layout = pack_bucket(bucket)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert [row[0] for row in layout] == [name for name, _ in bucket]
    assert all(start % ALIGN == 0 for *_, start in layout)
    assert flat.numel() == sum(aligned(t.numel() * t.element_size()) for _, t in bucket)
    out = unpack_bucket(flat, layout)
    for (name, ref), (got_name, got) in zip(bucket, out):
        assert got_name == name and got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got, ref)
    # views, not copies: the engine loads straight from the shared buffer
    assert out[0][1].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_unpack_refuses_a_layout_that_overruns_the_buffer():
    flat, layout = pack_bucket(_bucket())
    with pytest.raises(ValueError, match="do not fit"):
        unpack_bucket(flat[:-ALIGN], layout)
    layout[1][3] += 2
    with pytest.raises(ValueError, match="alignment"):
        unpack_bucket(flat, layout)


@pytest.mark.parametrize("setting, multiprocess, device, expected", [
    ("auto", True, "cuda", "cuda_ipc"),
    ("auto", True, "cpu", "bytes"),
    ("bytes", True, "cuda", "bytes"),
    ("cuda_ipc", True, "cuda", "cuda_ipc"),
    ("auto", False, "cuda", "objects"),      # an in-process engine takes the tensors themselves
    ("cuda_ipc", False, "cpu", "objects"),
])
def test_transport_choice(setting, multiprocess, device, expected):
    assert resolve_transport(setting, multiprocess, device) == expected


def test_transport_refusals():
    with pytest.raises(ValueError, match="needs the exported tensors on a GPU"):
        resolve_transport("cuda_ipc", True, "cpu")
    with pytest.raises(ValueError, match="expected auto, bytes or cuda_ipc"):
        resolve_transport("nccl", True, "cuda")


def test_payload_crosses_vllms_msgpack_rpc():
    """The engine-core hop of ``collective_rpc`` is msgpack (no pickle): a payload of the shape ``share`` builds
    (bytes handles, ints, a bool, a str; the layout's lists) must arrive equal."""
    pytest.importorskip("vllm")
    from megatron_pgpo.compat.torchvision_ops import ensure_torchvision_importable

    ensure_torchvision_importable()
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    _, layout = pack_bucket(_bucket())
    shared = {"numel": 4096, "tensor_offset": 0, "handle": bytes(range(64)), "storage_bytes": 2 << 20,
              "storage_offset": 512, "ref_handle": b"/torch_123_456", "ref_offset": 3, "event_handle": bytes(64),
              "event_sync": True, "uuid": "GPU-7f3c1e2a-0000-0000-0000-000000000000"}
    payload = {"cuda_ipc": shared, "meta": layout}
    decoded = MsgpackDecoder().decode(MsgpackEncoder().encode(("pgpo_load_bucket", 3, payload)))
    assert decoded[2] == payload
