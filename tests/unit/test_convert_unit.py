"""Pieces of the checkpoint converter that need no process group: the streaming safetensors writer, the
no-mmap reader, load-step grouping and the CLI's size parser."""
import json
from pathlib import Path

import pytest
import torch

from megatron_pgpo.convert_cli import parse_size
from megatron_pgpo.models.qwen2_5_vl.hf_io import (INDEX_NAME, SINGLE_NAME, HFCheckpointReader, HFCheckpointWriter,
                                                   read_safetensors_header)


def _tensors():
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    out = {f"layer.{i}.w": torch.randn(7, i + 3, generator=gen).to(dtypes[i % 3]) for i in range(9)}
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    out["ids"] = torch.arange(10)
    out["mask"] = torch.tensor([True, False, True])
    return out


def _check_equal(path: Path, tensors):
    with HFCheckpointReader(path) as reader:
        assert sorted(reader.names()) == sorted(tensors)
        for name, t in tensors.items():
            for got in (reader.tensor(name), reader.read_copy(name)):
                assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    tensors = _tensors()
    with HFCheckpointWriter(tmp_path / "out") as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [SINGLE_NAME]
    assert not (tmp_path / "out.tmp").exists()
    _check_equal(tmp_path / "out", tensors)
    from safetensors.torch import load_file  # the reference implementation reads the padded header

    assert torch.equal(load_file(str(tmp_path / "out" / SINGLE_NAME))["layer.3.w"], tensors["layer.3.w"])


def test_shards_respect_the_size_limit_and_are_indexed(tmp_path):
    tensors = _tensors()
    big = torch.randn(100, 10)  # 4000 bytes: more than a shard, gets one of its own
    limit = 300
    with HFCheckpointWriter(tmp_path / "out", max_shard_bytes=limit, header_reserve_bytes=4096) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
        writer.add("big", big)
        writer.write_text("config.json", "{}")
    tensors["big"] = big
    out = tmp_path / "out"
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for shard in shards:
        _, entries = read_safetensors_header(out / shard)
        data = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
        assert data <= limit or list(entries) == ["big"]
    assert (out / "config.json").read_text() == "{}"
    _check_equal(out, tensors)


def test_header_larger_than_the_reserved_space_is_relocated(tmp_path):
    tensors = {f"a.rather.long.tensor.name.{i}": torch.full((2,), float(i)) for i in range(50)}
    with HFCheckpointWriter(tmp_path / "out", header_reserve_bytes=64) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    data_start, _ = read_safetensors_header(tmp_path / "out" / SINGLE_NAME)
    assert data_start > 64 and data_start % 8 == 0
    _check_equal(tmp_path / "out", tensors)


def test_failure_leaves_no_output_and_existing_output_is_kept(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with HFCheckpointWriter(tmp_path / "out") as writer:
            writer.add("x", torch.ones(3))
            raise RuntimeError("boom")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        HFCheckpointWriter(tmp_path / "taken")
    with HFCheckpointWriter(tmp_path / "taken", overwrite=True) as writer:
        writer.add("x", torch.ones(3))
    _check_equal(tmp_path / "taken", {"x": torch.ones(3)})
    with HFCheckpointWriter(tmp_path / "dup") as writer:
        writer.add("x", torch.ones(3))
        with pytest.raises(ValueError, match="already written"):
            writer.add("x", torch.ones(3))


def test_read_copy_is_not_memory_mapped(tmp_path):
    with HFCheckpointWriter(tmp_path / "out") as writer:
        writer.add("x", torch.arange(1000, dtype=torch.float32))
    with HFCheckpointReader(tmp_path / "out") as reader:
        copy = reader.read_copy("x")
        copy.add_(1)  # a private, writable tensor
        assert torch.equal(reader.tensor("x") + 1, copy)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1000") == 1000
    assert parse_size("1.5kb") == 1500
    with pytest.raises(Exception):
        parse_size("lots")


def test_load_steps_never_split_a_layer():
    from megatron_pgpo.models.qwen2_5_vl.convert import _load_steps
    from megatron_pgpo.models.qwen2_5_vl.mapping import ParamMapping

    names = ["language_model.embedding.word_embeddings.weight", "vision_model.a", "vision_model.b"]
    names += [f"language_model.decoder.layers.{i}.{part}" for i in range(3) for part in ("x", "y", "z")]
    names += ["language_model.decoder.final_layernorm.weight"]
    mappings = [ParamMapping(n, (n,), "replicated") for n in names]
    steps = _load_steps(mappings, [10] * len(names), step_bytes=25)
    assert sorted(i for s in steps for i in s) == list(range(len(names)))
    for i in range(3):
        layer = {names.index(f"language_model.decoder.layers.{i}.{p}") for p in ("x", "y", "z")}
        assert any(layer <= set(s) for s in steps)  # 30 bytes > step: still one step
    assert steps[0] == [0, 1]


def test_config_dtype_follows_a_cast():
    from megatron_pgpo.models.qwen2_5_vl.convert import _config_text_with_dtype

    text = json.dumps({"dtype": "float32", "torch_dtype": "float32", "model_type": "qwen2_5_vl"})
    assert _config_text_with_dtype(text, None) == text
    assert json.loads(_config_text_with_dtype(text, torch.bfloat16)) == {"dtype": "bfloat16",
                                                                         "model_type": "qwen2_5_vl"}
