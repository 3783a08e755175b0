"""HF <-> Megatron-Core dist-checkpoint conversion (``models/qwen2_5_vl/convert.py``) on the tiny presets.

* HF -> Megatron -> HF is bit-exact (names, dtypes, every tensor, config.json) for ``tiny`` (untied, vocabulary
  padded by Megatron), ``tiny-mha`` (tied) and ``tiny-gqa`` (4 layers), also through sharded safetensors.
* A converted checkpoint loads into the Megatron model at TP=1, TP=2 and PP=2 (the 2-process worker pool) and
  gives transformers' logits on an image + text prompt.
* A checkpoint saved by a TP=2 model (with a different vocabulary padding) loads at TP=1 and PP=2 with the same
  logits, and exports to an HF checkpoint that transformers runs to the same logits.
* Bad input fails with the key names, before any weight is read.

Conversions run in the test process (``convert.single_process_megatron`` sets up and tears down a 1-rank group);
checkpoints are built once per session.
"""
import json
import shutil
from pathlib import Path

import pytest

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)

PRESETS = ("tiny", "tiny-mha", "tiny-gqa")
LOGIT_TOL = 1e-4


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def hf_ckpts(tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("convert_hf")
    return {p: save_tiny_checkpoint(root / p, p, seed=3) for p in PRESETS}


@pytest.fixture(scope="session")
def mcore_ckpts(hf_ckpts, tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.convert import from_hf

    root = tmp_path_factory.mktemp("convert_mcore")
    return {p: from_hf(hf_ckpts[p], root / p, progress=False) for p in PRESETS}


@pytest.fixture(scope="session")
def hf_logits(hf_ckpts):
    """transformers' fp32 logits ``[1, S, V]`` of the prompt, per preset."""
    return {p: _transformers_logits(hf_ckpts[p]) for p in PRESETS}


def _prompt(hf_config):
    """The image + text prompt of /tmp/exp/parity1.py: one 4x4-patch image (4 merged tokens) inside text."""
    import torch

    from megatron_pgpo.models.qwen2_5_vl.rope_index import get_rope_index, image_token_mask
    from megatron_pgpo.models.qwen2_5_vl.tiny import IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID

    ids = torch.tensor([[5, 6, VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * 4 + [VISION_END_TOKEN_ID, 7, 8, 9, 10]])
    grid = torch.tensor([[1, 4, 4]])
    pixel_values = torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    image_mask = image_token_mask(ids, IMAGE_TOKEN_ID)
    positions = get_rope_index(ids, image_mask, grid, hf_config.vision_config.spatial_merge_size)
    return ids, positions, pixel_values, grid, image_mask


def _transformers_logits(hf_dir):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ids, _, pixel_values, grid, image_mask = _prompt(model.config)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid,
                     mm_token_type_ids=image_mask.long()).logits


# ------------------------------------------------------------------------------------------- worker functions
def _megatron_logits(model):
    """Full-vocabulary logits ``[1, S, V]`` on the last pipeline stage, None elsewhere."""
    import torch

    from megatron_pgpo.models.qwen2_5_vl.pipeline import forward_all_stages, gather_vocab_logits

    ids, positions, pixel_values, grid, image_mask = _prompt(model.hf_config)
    model.eval()
    with torch.no_grad():
        logits = forward_all_stages(model, ids, positions, pixel_values=pixel_values, image_grid_thw=grid,
                                    image_mask=image_mask)
        return None if logits is None else gather_vocab_logits(logits, model.vocab_size)


def _load_and_run(ckpt_dir, first_stage_layers=None):
    """Build this rank's stage from the checkpoint's own config.json, load the dist checkpoint, run the prompt."""
    from megatron.core import parallel_state as ps

    from megatron_pgpo.models.qwen2_5_vl.convert import load_checkpoint_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model

    model = build_model(ckpt_dir, tp=ps.get_tensor_model_parallel_world_size(),
                        pp=ps.get_pipeline_model_parallel_world_size(), init_weights=False,
                        first_stage_layers=first_stage_layers)
    load_checkpoint_into_model(model, ckpt_dir)
    return _megatron_logits(model)


def _save_at_tp2(hf_dir, out_dir, make_vocab_size_divisible_by):
    """Load HF weights at TP=2, perturb them (replicated tensors identically on both ranks), save the model's own
    sharded state dict as a dist checkpoint, and return the TP=2 logits."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_pgpo.models.qwen2_5_vl.convert import write_checkpoint_metadata
    from megatron_pgpo.models.qwen2_5_vl.loading import load_hf_into_model
    from megatron_pgpo.models.qwen2_5_vl.model import build_model

    tp_rank = ps.get_tensor_model_parallel_rank()
    model = build_model(hf_dir, tp=2, make_vocab_size_divisible_by=make_vocab_size_divisible_by, init_weights=False)
    load_hf_into_model(model, hf_dir, tp_rank, 2)
    with torch.no_grad():
        for i, (name, param) in enumerate(sorted(model.named_parameters())):
            sharded = getattr(param, "tensor_model_parallel", False)
            gen = torch.Generator().manual_seed(1000 + 7 * i + (tp_rank if sharded else 0))
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    if dist.get_rank() == 0:
        write_checkpoint_metadata(out_dir, model.hf_config, source=str(hf_dir),
                                  make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                  padded_vocab_size=model.padded_vocab_size,
                                  config_json=(Path(hf_dir) / "config.json").read_text())
    dist.barrier()
    return {"padded_vocab": model.padded_vocab_size, "logits": _megatron_logits(model)}


def _last_stage_logits(results):
    found = [r for r in results if r is not None]
    assert found, "no rank returned logits"
    return found[0]


def _max_diff(a, b):
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------- round trip
def _assert_same_hf(original, converted):
    from megatron_pgpo.models.qwen2_5_vl.hf_io import HFCheckpointReader

    import torch

    with HFCheckpointReader(original) as a, HFCheckpointReader(converted) as b:
        assert sorted(a.names()) == sorted(b.names())
        for name in a.names():
            x, y = a.tensor(name), b.tensor(name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (Path(original) / "config.json").read_text() == (Path(converted) / "config.json").read_text()
    assert (Path(original) / "generation_config.json").read_text() == \
        (Path(converted) / "generation_config.json").read_text()


@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_is_bit_exact(preset, hf_ckpts, mcore_ckpts, tmp_path):
    from megatron_pgpo.models.qwen2_5_vl.convert import METADATA_NAME, to_hf

    meta = json.loads((mcore_ckpts[preset] / METADATA_NAME).read_text())
    assert meta["vocab_size"] == 1000 and meta["padded_vocab_size"] == 1024
    assert meta["tie_word_embeddings"] == (preset != "tiny")
    out = to_hf(mcore_ckpts[preset], tmp_path / "hf", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    _assert_same_hf(hf_ckpts[preset], out)


def test_round_trip_through_sharded_safetensors(hf_ckpts, mcore_ckpts, tmp_path):
    """Small shards: an index and several files; converting that sharded checkpoint again is still exact."""
    from megatron_pgpo.models.qwen2_5_vl.convert import from_hf, to_hf
    from megatron_pgpo.models.qwen2_5_vl.hf_io import INDEX_NAME

    sharded = to_hf(mcore_ckpts["tiny"], tmp_path / "sharded", max_shard_bytes=1_000_000, progress=False)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all((sharded / s).stat().st_size <= 1_000_000 + (128 << 10) for s in shards)
    _assert_same_hf(hf_ckpts["tiny"], sharded)
    again = to_hf(from_hf(sharded, tmp_path / "mcore2", progress=False), tmp_path / "hf2", progress=False)
    _assert_same_hf(hf_ckpts["tiny"], again)


def test_bf16_conversion_casts_and_records_dtype(hf_ckpts, tmp_path):
    import torch

    from megatron_pgpo.models.qwen2_5_vl.convert import from_hf, to_hf
    from megatron_pgpo.models.qwen2_5_vl.hf_io import HFCheckpointReader

    mcore = from_hf(hf_ckpts["tiny"], tmp_path / "mcore", dtype="bf16", progress=False)
    back = to_hf(mcore, tmp_path / "hf", progress=False)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    with HFCheckpointReader(hf_ckpts["tiny"]) as a, HFCheckpointReader(back) as b:
        for name in a.names():
            assert b.tensor(name).dtype == torch.bfloat16
            assert torch.equal(a.tensor(name).to(torch.bfloat16), b.tensor(name)), name


# ----------------------------------------------------------------------------------- loading at TP / PP
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_converted_checkpoint_gives_transformers_logits(workers, preset, tp, pp, mcore_ckpts, hf_logits):
    logits = _last_stage_logits(workers.run(_load_and_run, str(mcore_ckpts[preset]), tp=tp, pp=pp))
    reference = hf_logits[preset]
    assert logits.shape == reference.shape  # real vocabulary only
    assert _max_diff(logits, reference) <= LOGIT_TOL


def test_converted_checkpoint_loads_at_an_uneven_pipeline_split(workers, hf_ckpts, hf_logits, tmp_path):
    """tiny-gqa (4 layers) converted for PP=2 with 1 + 3 layers, loaded at that split: transformers' logits."""
    from megatron_pgpo.models.qwen2_5_vl.convert import from_hf
    from megatron_pgpo.models.qwen2_5_vl.hf_config import ModelConfigError

    with pytest.raises(ModelConfigError, match="must equal the 4 layers"):
        from_hf(hf_ckpts["tiny-gqa"], tmp_path / "bad", pp=2, first_stage_layers=1, last_stage_layers=1,
                progress=False)
    out = from_hf(hf_ckpts["tiny-gqa"], tmp_path / "mcore", pp=2, first_stage_layers=1, progress=False)
    logits = _last_stage_logits(workers.run(_load_and_run, str(out), 1, tp=1, pp=2))
    assert _max_diff(logits, hf_logits["tiny-gqa"]) <= LOGIT_TOL


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(workers, hf_ckpts, tmp_path):
    """Saved by a TP=2 model whose vocabulary is padded to 1200 (make_vocab_size_divisible_by=200); loaded with the
    default padding (1024) at TP=1 and at PP=2; exported to HF and run by transformers."""
    from megatron_pgpo.models.qwen2_5_vl.convert import to_hf

    ckpt = tmp_path / "tp2"
    ckpt.mkdir()
    saved = workers.run(_save_at_tp2, str(hf_ckpts["tiny"]), str(ckpt), 200, tp=2, pp=1)
    assert saved[0]["padded_vocab"] == 1200
    tp2_logits = saved[0]["logits"]
    assert _max_diff(tp2_logits, saved[1]["logits"]) == 0.0
    for tp, pp in [(1, 1), (1, 2)]:
        logits = _last_stage_logits(workers.run(_load_and_run, str(ckpt), tp=tp, pp=pp))
        assert _max_diff(logits, tp2_logits) <= 1e-5, (tp, pp)
    # The perturbation moved the model well away from the HF weights: the checkpoint's values were used.
    exported = to_hf(ckpt, tmp_path / "hf", progress=False)
    assert _max_diff(_transformers_logits(exported), tp2_logits) <= LOGIT_TOL
    assert _max_diff(_transformers_logits(hf_ckpts["tiny"]), tp2_logits) > 1e-2


# ------------------------------------------------------------------------------------------------- bad input
def _rewrite_hf(src, dst, edit):
    """Copy an HF checkpoint, applying ``edit(tensors_dict)`` to its tensors."""
    from safetensors.torch import save_file

    from megatron_pgpo.models.qwen2_5_vl.hf_io import HFCheckpointReader

    shutil.copytree(src, dst)
    with HFCheckpointReader(src) as reader:
        tensors = {n: reader.tensor(n).clone() for n in reader.names()}
    edit(tensors)
    save_file(tensors, str(Path(dst) / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _drop(name):
    return lambda t: t.pop(name)


def _add(name):
    import torch

    return lambda t: t.__setitem__(name, torch.zeros(3))


def _shrink(name):
    return lambda t: t.__setitem__(name, t[name][:-1].clone())


@pytest.mark.parametrize("edit, expected", [
    (_drop("model.layers.1.mlp.up_proj.weight"), "missing: model.layers.1.mlp.up_proj.weight"),
    (_add("model.layers.0.extra.weight"), "unexpected: model.layers.0.extra.weight"),
    (_shrink("model.layers.0.self_attn.k_proj.weight"), "model.layers.0.self_attn.k_proj.weight: checkpoint (63, 128)"),
], ids=["missing", "unexpected", "wrong-shape"])
def test_bad_hf_checkpoint_fails_with_names_before_writing(hf_ckpts, tmp_path, edit, expected):
    from megatron_pgpo.models.qwen2_5_vl.convert import from_hf
    from megatron_pgpo.models.qwen2_5_vl.hf_io import CheckpointMismatch

    bad = _rewrite_hf(hf_ckpts["tiny"], tmp_path / "bad", edit)
    with pytest.raises(CheckpointMismatch, match=expected.replace("(", r"\(").replace(")", r"\)")):
        from_hf(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def _edit_config(ckpt, dst, **changes):
    shutil.copytree(ckpt, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        config[key] = value
        config["text_config"][key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("preset, changes, expected", [
    ("tiny-mha", dict(tie_word_embeddings=False), "missing: language_model.output_layer.weight"),
    ("tiny", dict(tie_word_embeddings=True), "unexpected: language_model.output_layer.weight"),
    ("tiny", dict(intermediate_size=300), "wrong shape: language_model.decoder.layers.mlp.linear_fc1.weight"),
], ids=["missing", "unexpected", "wrong-shape"])
def test_bad_megatron_checkpoint_fails_with_key_names(mcore_ckpts, tmp_path, preset, changes, expected):
    """A dist checkpoint that does not match its config.json: export and loading into the model both refuse."""
    from megatron_pgpo.models.qwen2_5_vl.convert import load_checkpoint_into_model, single_process_megatron, to_hf
    from megatron_pgpo.models.qwen2_5_vl.hf_io import CheckpointMismatch
    from megatron_pgpo.models.qwen2_5_vl.model import build_model

    bad = _edit_config(mcore_ckpts[preset], tmp_path / "bad", **changes)
    with pytest.raises(CheckpointMismatch, match=expected):
        to_hf(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    if preset == "tiny" and "intermediate_size" not in changes:
        return  # loading ignores tensors the model does not need (another stage's); export is strict
    with single_process_megatron():
        model = build_model(bad, init_weights=False)
        with pytest.raises(CheckpointMismatch, match=expected.split(": ")[1]):
            load_checkpoint_into_model(model, bad)


def test_bad_layout_and_model_type_fail_before_reading_weights(hf_ckpts, tmp_path, monkeypatch):
    from megatron_pgpo.models.qwen2_5_vl import hf_io
    from megatron_pgpo.models.qwen2_5_vl.convert import from_hf
    from megatron_pgpo.models.qwen2_5_vl.hf_config import ModelConfigError

    def no_reading(*args, **kwargs):
        raise AssertionError("a checkpoint was opened before the layout / model type check")

    monkeypatch.setattr(hf_io.HFCheckpointReader, "__init__", no_reading)
    with pytest.raises(ModelConfigError, match=r"TP=3 does not divide attention heads \(4\)"):
        from_hf(hf_ckpts["tiny"], tmp_path / "out", tp=3, progress=False)
    with pytest.raises(ModelConfigError, match="PP=3 does not divide the 2 language layers"):
        from_hf(hf_ckpts["tiny"], tmp_path / "out", pp=3, progress=False)
    other = tmp_path / "llava"
    shutil.copytree(hf_ckpts["tiny"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ModelConfigError, match="unsupported model_type 'llava'"):
        from_hf(other, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(hf_ckpts, mcore_ckpts, tmp_path):
    from megatron_pgpo.models.qwen2_5_vl.convert import from_hf, to_hf

    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        from_hf(hf_ckpts["tiny"], tmp_path / "taken", progress=False)
    with pytest.raises(FileExistsError):
        to_hf(mcore_ckpts["tiny"], tmp_path / "taken", progress=False)


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_converts_both_ways(hf_ckpts, tmp_path):
    """``megatron-pgpo convert`` in a fresh process (the dist-checkpoint writer needs a __main__ guard there)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    mcore, back = tmp_path / "mcore", tmp_path / "hf"
    for args in (["hf-to-mcore", str(hf_ckpts["tiny-mha"]), str(mcore)],
                 ["mcore-to-hf", str(back.parent / "mcore"), str(back), "--max-shard-size", "1MB"]):
        run = subprocess.run([sys.executable, "-m", "megatron_pgpo.cli", "convert", *args, "--no-progress"],
                             cwd=root, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    _assert_same_hf(hf_ckpts["tiny-mha"], back)
    helped = subprocess.run([sys.executable, str(root / "tools" / "convert_hf_to_megatron.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--dtype" in helped.stdout and "any TP/PP" in helped.stdout
