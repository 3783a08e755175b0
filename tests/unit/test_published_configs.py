"""The published Qwen2.5-VL configs (examples/hf_configs) build as Megatron models with exactly transformers' size.

Each config is built on the meta device at TP=1 (``init_weights=False``), the Megatron parameter count is checked
against a hand formula (padded vocabulary included), and after removing the padded vocabulary rows it must equal
the count of ``Qwen2_5_VLForConditionalGeneration`` built from the same config on the meta device. Megatron's
parallel state is process-global, so the builds run in one child process (this file run as a script).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "examples" / "hf_configs"
PUBLISHED = {"3b": "qwen2_5_vl_3b.json", "7b": "qwen2_5_vl_7b.json", "32b": "qwen2_5_vl_32b.json",
             "72b": "qwen2_5_vl_72b.json"}
# transformers' count for each published config (the sizes the model cards quote: 3.75B, 8.29B, 33.5B, 73.4B)
HF_TOTALS = {"3b": 3_754_622_976, "7b": 8_292_166_656, "32b": 33_452_718_336, "72b": 73_410_777_344}
ARCHITECTURE = {  # (layers, hidden, heads, KV heads, MLP, vocab, tied, ViT MLP, merger output)
    "3b": (36, 2048, 16, 2, 11008, 151936, True, 3420, 2048),
    "7b": (28, 3584, 28, 4, 18944, 152064, False, 3420, 3584),
    "32b": (64, 5120, 40, 8, 27648, 152064, False, 3456, 5120),
    "72b": (80, 8192, 64, 8, 29568, 152064, False, 3456, 8192),
}
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


def hand_count(hf_config: dict, padded_vocab: int) -> dict:
    """Megatron's TP=1 parameter count of a Qwen2.5-VL config, by formula (local spec, separate norms)."""
    text = hf_config.get("text_config", hf_config)
    h, f = text["hidden_size"], text["intermediate_size"]
    nq, nkv = text["num_attention_heads"], text["num_key_value_heads"]
    d = h // nq
    qkv_rows = (nq + 2 * nkv) * d
    per_layer = h + qkv_rows * h + qkv_rows + nq * d * h + h + 2 * f * h + f * h
    tied = hf_config.get("tie_word_embeddings", False)
    language = text["num_hidden_layers"] * per_layer + h + padded_vocab * h * (1 if tied else 2)

    v = hf_config["vision_config"]
    hv, iv, out = v["hidden_size"], v.get("intermediate_size", 3420), v["out_hidden_size"]
    channels = v.get("in_channels", v.get("in_chans", 3))
    patch = channels * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * hv
    block = 2 * hv + (3 * hv * hv + 3 * hv) + (hv * hv + hv) + 2 * (hv * iv + iv) + (iv * hv + hv)
    merged = hv * v.get("spatial_merge_size", 2) ** 2
    merger = hv + (merged * merged + merged) + (merged * out + out)
    vision = patch + v.get("depth", 32) * block + merger
    return {"language": language, "vision": vision, "total": language + vision}


# ----------------------------------------------------------------------------------------------- child process
def _count_in_this_process(paths: dict) -> dict:
    """Build every config on the meta device under a 1-rank gloo group; Megatron and transformers counts."""
    import socket

    import torch

    from megatron_pgpo.models.qwen2_5_vl.hf_config import load_hf_config
    from megatron_pgpo.models.qwen2_5_vl.model import build_model
    from megatron_pgpo.compat.megatron_cpu import init_cpu_distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_cpu_distributed(0, 1, port, tp=1, pp=1)
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = {}
    for name, source in paths.items():
        config = load_hf_config(source)
        with torch.device("meta"):
            model = build_model(config, tp=1, pp=1, init_weights=False,
                                make_vocab_size_divisible_by=MAKE_VOCAB_SIZE_DIVISIBLE_BY)
            hf = Qwen2_5_VLForConditionalGeneration(config)
        out[name] = {
            "megatron_total": sum(p.numel() for p in model.parameters()),
            "megatron_vision": sum(p.numel() for p in model.vision_model.parameters()),
            "on_meta": all(p.is_meta for p in model.parameters()),
            "padded_vocab": model.padded_vocab_size,
            "vocab": model.vocab_size,
            "hidden": model.dims.hidden_size,
            "tied": model.dims.tie_word_embeddings,
            "hf_total": sum(p.numel() for p in hf.parameters()),
            "hf_vision": sum(p.numel() for p in hf.model.visual.parameters()),
        }
        del model, hf
    return out


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny import tiny_hf_config

    tmp = tmp_path_factory.mktemp("tiny_configs")
    paths = {name: str(CONFIG_DIR / file) for name, file in PUBLISHED.items()}
    for preset in ("tiny", "tiny-mha"):  # vocabulary 1000 -> padded to 1024: the subtraction is not a no-op
        tiny_hf_config(preset).save_pretrained(tmp / preset)
        paths[preset] = str(tmp / preset / "config.json")
    proc = subprocess.run([sys.executable, __file__, json.dumps(paths)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_is_the_real_architecture(name):
    raw = json.loads((CONFIG_DIR / PUBLISHED[name]).read_text())
    layers, hidden, heads, kv, mlp, vocab, tied, vit_mlp, out = ARCHITECTURE[name]
    assert raw["model_type"] == "qwen2_5_vl" and raw["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert (raw["num_hidden_layers"], raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"],
            raw["intermediate_size"], raw["vocab_size"], raw["tie_word_embeddings"]) == (
        layers, hidden, heads, kv, mlp, vocab, tied)
    assert raw["vision_config"].get("intermediate_size", 3420) == vit_mlp
    assert raw["vision_config"]["out_hidden_size"] == out
    assert raw["rope_scaling"]["mrope_section"] == [16, 24, 24]
    assert (raw["image_token_id"], raw["vision_start_token_id"]) == (151655, 151652)


@pytest.mark.parametrize("name", list(PUBLISHED) + ["tiny", "tiny-mha"])
def test_megatron_parameter_count_equals_transformers(counts, name):
    c = counts[name]
    assert c["on_meta"]
    padded_rows = c["padded_vocab"] - c["vocab"]
    assert c["padded_vocab"] % MAKE_VOCAB_SIZE_DIVISIBLE_BY == 0 and 0 <= padded_rows < MAKE_VOCAB_SIZE_DIVISIBLE_BY
    real = c["megatron_total"] - padded_rows * c["hidden"] * (1 if c["tied"] else 2)
    assert real == c["hf_total"], f"{name}: Megatron {real:,} (real vocabulary) vs transformers {c['hf_total']:,}"
    assert c["megatron_vision"] == c["hf_vision"]
    if name in HF_TOTALS:
        assert c["hf_total"] == HF_TOTALS[name]
    else:
        assert padded_rows == 24  # 1000 -> 1024


@pytest.mark.parametrize("name", list(PUBLISHED) + ["tiny", "tiny-mha"])
def test_megatron_padded_count_matches_the_hand_formula(counts, name):
    c = counts[name]
    path = CONFIG_DIR / PUBLISHED[name] if name in PUBLISHED else None
    if path is None:
        from megatron_pgpo.models.qwen2_5_vl.tiny import tiny_hf_config

        raw = json.loads(tiny_hf_config(name).to_json_string())
    else:
        raw = json.loads(path.read_text())
    expected = hand_count(raw, c["padded_vocab"])
    assert c["megatron_vision"] == expected["vision"]
    assert c["megatron_total"] == expected["total"], (name, c["megatron_total"], expected)


if __name__ == "__main__":  # the child process of the `counts` fixture
    print(json.dumps(_count_in_this_process(json.loads(sys.argv[1]))))
