"""Config: defaults validate, YAML + dotted overrides with precedence, unknown keys and bad values are errors that
say what to change, every field is documented."""
import dataclasses
from pathlib import Path

import pytest

from megatron_pgpo.config import Config, ConfigError, describe, field_docs, load_config, to_yaml
from megatron_pgpo.config.loader import from_dict, read_yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_every_field_of_every_section_has_a_docstring():
    seen = 0
    for key, _type, _default, doc in describe():
        assert doc.strip(), key
        seen += 1
    assert seen > 60
    for cls in (Config,):
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}


def test_precedence_cli_over_file_over_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("algorithm:\n  pgpo:\n    tau: 0.3\n    beta: 1.0\ntrainer:\n  lr: 1e-5\n")
    cfg = load_config(str(cfg_file), ["algorithm.pgpo.tau=0.5", "rollout.n=4"])
    assert cfg.algorithm.pgpo.tau == 0.5  # CLI wins over the file
    assert cfg.algorithm.pgpo.beta == 1.0  # file wins over the default
    assert cfg.trainer.lr == 1e-5 and isinstance(cfg.trainer.lr, float)  # YAML reads 1e-5 as text: coerced
    assert cfg.rollout.n == 4
    assert cfg.algorithm.clip_high == 0.28  # default kept


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["algorithm.advantage=grpo", "model.fp8=null", "data.task=digits"])
    path = tmp_path / "dump.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.pgpo.taux=1"], "unknown config key 'algorithm.pgpo.taux'; did you mean 'tau'"),
        (["algorithmm.clip_low=0.1"], "did you mean 'algorithm'"),
        (["algorithm.pgpo.tau=1.5"], r"algorithm.pgpo.tau must be in \[0, 1\]"),
        (["rollout.n=1"], "at least 2 samples per prompt"),
        (["algorithm.advantage=ppo"], "valid: grpo, pgpo"),
        (["algorithm.loss=foo"], "valid: clipped"),
        (["trainer.lr=fast"], "trainer.lr must be a number"),
        (["rollout.n=2.5"], "rollout.n must be an integer"),
        (["trainer.lr.x=1"], "is a value, not a section"),
        (["model.fp8=e4m3"], "needs model.transformer_impl=transformer_engine"),
        (["parallel.sequence_parallel=true"], "needs parallel.tensor_model_parallel_size > 1"),
        (["trainer.global_batch_size=5"], "must be a multiple of trainer.global_batch_size=5"),
        (["trainer.micro_batch_size=7"], "must be a multiple of trainer.micro_batch_size=7"),
        (["model.dtype=fp64"], "model.dtype='fp64' is not valid; choose one of"),
        (["logging.wandb=yes please"], "logging.wandb must be true or false"),
        (["novalue"], "must look like section.key=value"),
        (["rollout.weight_transport=cuda_ipc", "parallel.device=cpu"], "cuda_ipc shares GPU buffers"),
        (["rollout.weight_transport=nccl"], "rollout.weight_transport='nccl' is not valid"),
        (["data.prompt_template=Answer this."], "data.prompt_template needs a {question} placeholder"),
        (["data.min_pixels=2000000"], "data.min_pixels=2000000 exceeds data.max_pixels=1003520"),
        (["algorithm.dapo.filter_metric=format"], "algorithm.dapo.filter_metric='format' is not valid"),
        (["trainer.lr_schedule=wsd"], "trainer.lr_schedule='wsd' is not valid"),
        (["eval.benchmarks=[geo3k]"], "eval.benchmarks needs eval.data_dir"),
        (["eval.benchmarks=[mmmu]", "eval.data_dir=x"], "eval.benchmarks: unknown \\['mmmu'\\]; valid: geo3k"),
    ],
)
def test_bad_values_raise_with_the_key_and_a_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unknown_key_in_file_is_an_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer:\n  learning_rate: 1e-6\n")
    with pytest.raises(ConfigError, match="unknown config key 'trainer.learning_rate'"):
        load_config(str(p))
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        read_yaml(str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_direct_construction_validates_too():
    from megatron_pgpo.config import PGPOConfig

    with pytest.raises(ConfigError, match="tau"):
        PGPOConfig(tau=-0.1)
    assert from_dict(PGPOConfig, {"tau": 0}).tau == 0.0  # int accepted for float


def test_parallel_data_parallel_size():
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"])
    assert cfg.parallel.data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match="not divisible by TP x PP"):
        cfg.parallel.data_parallel_size(6)


def test_example_configs_load():
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert files, "examples/*.yaml missing"
    for path in files:
        load_config(str(path))


def test_demo_defaults_equal_the_example_config():
    from megatron_pgpo.cli import DEMO_OVERRIDES

    assert load_config(None, DEMO_OVERRIDES) == load_config(str(EXAMPLES / "tiny_cpu.yaml"))


@pytest.mark.parametrize("size", ["3b", "7b", "32b", "72b"])
def test_paper_example_layouts_shard_the_published_models(size):
    import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)
    from megatron_pgpo.models.qwen2_5_vl.hf_config import TextDims, load_hf_config, validate_parallel_layout

    cfg = load_config(str(EXAMPLES / f"qwen2_5_vl_{size}_pgpo.yaml"))
    dims = TextDims.from_hf(load_hf_config(str(EXAMPLES / "hf_configs" / f"qwen2_5_vl_{size}.json")))
    validate_parallel_layout(dims, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    assert cfg.data.rollout_batch_size == 384 and cfg.rollout.n == 5 and cfg.trainer.lr == 1e-6


def test_uneven_pipeline_split_is_checked_against_the_model_before_any_process_starts(tmp_path):
    from megatron_pgpo.config import ConfigError, load_config
    from megatron_pgpo.models.qwen2_5_vl.tiny import save_tiny_checkpoint
    from megatron_pgpo.trainer.launch import check_supported

    with pytest.raises(ConfigError, match="needs parallel.pipeline_model_parallel_size > 1"):
        load_config(None, ["parallel.first_stage_layers=1"])
    ckpt = save_tiny_checkpoint(tmp_path / "gqa", "tiny-gqa")  # 4 language layers
    ok = load_config(None, [f"model.hf_path={ckpt}", "parallel.pipeline_model_parallel_size=2",
                            "parallel.first_stage_layers=1"])
    check_supported(ok)
    bad = load_config(None, [f"model.hf_path={ckpt}", "parallel.pipeline_model_parallel_size=3"])
    with pytest.raises(ConfigError, match="PP=3 does not divide the 4 language layers"):
        check_supported(bad)
