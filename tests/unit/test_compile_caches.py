"""Where the vLLM engine's compile caches go (``vllm_engine.compile_caches``): shared between runs, never in the
run's temp dir, with torch's precompiled-header path (always under ``$TMPDIR``) linked to the shared cache."""
from pathlib import Path

from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from megatron_pgpo.rollout.vllm_engine import compile_caches


def test_explicit_cache_dir_holds_both_caches_and_the_header_link(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "ignored"))
    run_tmp = tmp_path / "run_tmp"
    run_tmp.mkdir()
    env = compile_caches(str(tmp_path / "cache"), run_tmp)
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "inductor"),
                   "VLLM_CACHE_ROOT": str(tmp_path / "cache" / "vllm")}
    link = run_tmp / Path(default_cache_dir()).name
    assert link.is_symlink() and link.resolve() == (tmp_path / "cache" / "inductor").resolve()
    # A second engine with the same temp dir (a restart) keeps the link.
    assert compile_caches(str(tmp_path / "cache"), run_tmp) == env


def test_default_follows_the_environment_and_leaves_vllm_cache_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared"))
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    env = compile_caches(None, tmp_path)
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "shared")}
    assert (tmp_path / "shared").is_dir()
    assert (tmp_path / Path(default_cache_dir()).name).resolve() == (tmp_path / "shared").resolve()


def test_without_environment_it_is_torchs_default(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compile_caches(None, tmp_path)["TORCHINDUCTOR_CACHE_DIR"] == str(Path(default_cache_dir()).absolute())
