"""Config sections for data, rewards, the training loop, logging and checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Literal, Optional

from .base import Section, require, require_positive


@dataclass
class DataConfig(Section):
    PATH: ClassVar[str] = "data"

    train_path: Optional[str] = None
    """Local parquet/jsonl training file or directory with an image column. None: the built-in synthetic task."""
    val_path: Optional[str] = None
    """Held-out file in the same layout; None with the built-in task uses its held-out split."""
    layout: Literal["auto", "virl39k", "geo3k"] = "auto"
    """Column layout: ViRL39K (question/answer/image list), geo3k/EasyR1 (problem/answer/images), or detect."""
    task: Literal["colour", "count", "digits", "bars"] = "colour"
    """Built-in synthetic visual task (used when train_path is None): colour of a shape, count shapes of a colour,
    read digits, compare two bars."""
    num_train_examples: int = 2048
    """Size of the built-in task's training split."""
    num_val_examples: int = 256
    """Size of the built-in task's held-out split."""
    rollout_batch_size: int = 16
    """Prompts per training step (each sampled rollout.n times; the paper: 384)."""
    max_prompt_length: int = 1024
    """Prompts longer than this many tokens (image tokens included) are skipped and counted."""
    max_pixels: int = 1003520
    """Images are resized (aspect kept) to at most this many pixels before the processor sees them."""
    min_pixels: Optional[int] = None
    """Images of local files smaller than this are upscaled (aspect kept) to at least this many pixels (None: as
    they are; the image processor's own min_pixels still applies after)."""
    prompt_template: str = "{question} Think inside <think> </think> , then give the final answer in \\boxed{} ."
    """The user turn's text after the image: {question} is replaced by the question (training, evaluation and
    the prompt-length check use it). The default asks for the format the format reward checks."""
    shuffle: bool = True
    """Shuffle deterministically from trainer.seed and the epoch."""

    def validate(self) -> None:
        for name in ("num_train_examples", "num_val_examples", "rollout_batch_size", "max_prompt_length", "max_pixels"):
            require_positive(f"data.{name}", getattr(self, name))
        require("{question}" in self.prompt_template,
                f"data.prompt_template needs a {{question}} placeholder, got {self.prompt_template!r}")
        if self.min_pixels is not None:
            require_positive("data.min_pixels", self.min_pixels)
            require(self.min_pixels <= self.max_pixels,
                    f"data.min_pixels={self.min_pixels} exceeds data.max_pixels={self.max_pixels}")


@dataclass
class RewardConfig(Section):
    PATH: ClassVar[str] = "reward"

    accuracy_weight: float = 0.9
    """Weight of answer accuracy (last \\boxed{} answer equivalent to the ground truth)."""
    format_weight: float = 0.1
    """Weight of the format check (<think>...</think> then a boxed answer)."""
    timeout_s: float = 2.0
    """Hard wall-clock limit per sample for answer checking; a sample over it scores accuracy 0."""
    num_workers: int = 2
    """Answer-checking worker processes; 0 checks in-process (no hard time limit)."""
    max_answer_chars: int = 1000
    """Answers longer than this are never parsed (accuracy 0)."""

    def validate(self) -> None:
        require_positive("reward.accuracy_weight", self.accuracy_weight, allow_zero=True)
        require_positive("reward.format_weight", self.format_weight, allow_zero=True)
        require(self.accuracy_weight + self.format_weight > 0, "reward.accuracy_weight + reward.format_weight must be > 0")
        require_positive("reward.timeout_s", self.timeout_s)
        require_positive("reward.num_workers", self.num_workers, allow_zero=True)
        require_positive("reward.max_answer_chars", self.max_answer_chars)


@dataclass
class TrainerConfig(Section):
    PATH: ClassVar[str] = "trainer"

    total_steps: int = 150
    """Training steps (one rollout batch each)."""
    global_batch_size: int = 16
    """Prompts per optimizer update (each with its rollout.n responses); must divide data.rollout_batch_size."""
    micro_batch_size: int = 8
    """Responses per forward/backward micro-batch on each data-parallel rank."""
    share_prompts: bool = True
    """Scoring and updates compute each prompt (and its image) once per micro-batch, packing the responses that
    share it into one row with a block mask (trainer/packing.py; micro-batches then keep a prompt's responses
    together); logits and gradients are the same. Used with the local layer spec; Transformer Engine's fused
    causal attention takes no such mask, so there each response keeps its own row."""
    offload_during_rollout: bool = False
    """Move parameters, gradients and optimizer state to host memory while the engine generates, and back before
    training (trainer/offload.py, as verl's Megatron worker does): GPU memory for the engine's KV cache at the
    cost of two host copies per step. Results are unchanged (tested bit-exact)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch (updates per batch = ppo_epochs x rollout_batch_size / global_batch_size)."""
    lr: float = 2e-4
    """Peak learning rate of AdamW (the paper: 1e-6 at 3B/7B; 2e-4 suits the tiny demo model)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up (Megatron's OptimizerParamScheduler, stepped once per training step;
    the paper: constant). Logged as actor/lr."""
    lr_warmup_steps: int = 0
    """Training steps of linear warm-up from 0 to trainer.lr (0: none)."""
    min_lr: float = 0.0
    """Learning rate the linear / cosine schedule reaches at trainer.total_steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    seed: int = 1
    """Seed of model init, data order and sampling."""
    run_dir: str = "runs/tiny-pgpo"
    """Where checkpoints, metrics.jsonl, TensorBoard logs and exports go."""
    eval_every: int = 50
    """Evaluation (the ``eval`` section) every this many steps (0: only at the end)."""
    max_consecutive_skipped_updates: int = 10
    """An update whose loss or gradient is not finite is skipped (weights unchanged) and counted
    (actor/skipped_updates); after this many in a row the run saves a checkpoint and stops with an error (0: never
    stops)."""
    max_rollout_retries: int = 2
    """A rollout that fails (e.g. the vLLM engine process died) is retried this many times per step, each after
    rebuilding the engines and loading the current weights into them; then the run saves and stops (0: no retry)."""

    def validate(self) -> None:
        for name in ("max_consecutive_skipped_updates", "max_rollout_retries"):
            require_positive(f"trainer.{name}", getattr(self, name), allow_zero=True)
        for name in ("total_steps", "global_batch_size", "micro_batch_size", "ppo_epochs"):
            require_positive(f"trainer.{name}", getattr(self, name))
        require_positive("trainer.lr", self.lr)
        require(0.0 <= self.min_lr <= self.lr, f"trainer.min_lr must be in [0, trainer.lr], got {self.min_lr}")
        require_positive("trainer.lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        require_positive("trainer.weight_decay", self.weight_decay, allow_zero=True)
        require(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0, "trainer.adam_beta1/2 must be in [0, 1)")
        require_positive("trainer.adam_eps", self.adam_eps)
        require_positive("trainer.grad_clip", self.grad_clip, allow_zero=True)
        require_positive("trainer.eval_every", self.eval_every, allow_zero=True)
        require(bool(self.run_dir), "trainer.run_dir must not be empty")


@dataclass
class LoggingConfig(Section):
    PATH: ClassVar[str] = "logging"

    console: bool = True
    """Rich progress bar and a one-line summary per step on the console."""
    log_every: int = 1
    """Refresh the numbers next to the console progress bar every this many steps (files get every step)."""
    tensorboard: bool = True
    """Write TensorBoard event files under run_dir/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline writes run_dir/wandb for a later `wandb sync`."""
    wandb_project: str = "megatron-pgpo"
    """wandb project name."""
    samples_every: int = 10
    """Every this many steps, write sample responses with each token's visual dependency S and PGPO weight to
    run_dir/samples/step_XXXXXXXX.jsonl (what `megatron-pgpo visualize RUN_DIR` draws); 0: never."""
    samples_per_step: int = 16
    """How many responses (the first ones of the rollout batch) those sample files hold."""

    def validate(self) -> None:
        require_positive("logging.log_every", self.log_every)
        require_positive("logging.samples_every", self.samples_every, allow_zero=True)
        require_positive("logging.samples_per_step", self.samples_per_step)


@dataclass
class CheckpointConfig(Section):
    PATH: ClassVar[str] = "checkpoint"

    save_every: int = 50
    """Save a checkpoint every this many steps (0: only at the end and on a preemption signal)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a successful save."""
    resume: bool = True
    """Resume from the latest complete checkpoint in run_dir if there is one."""
    save_on_signal: bool = True
    """Save before exiting on SIGTERM/SIGUSR1 (Slurm preemption)."""
    export_hf: bool = True
    """Export the final model as a Hugging Face checkpoint under run_dir/hf."""

    def validate(self) -> None:
        require_positive("checkpoint.save_every", self.save_every, allow_zero=True)
        require_positive("checkpoint.keep_last", self.keep_last)


@dataclass
class EvalConfig(Section):
    PATH: ClassVar[str] = "eval"

    benchmarks: List[str] = field(default_factory=list)
    """Benchmarks evaluated every trainer.eval_every steps, read from eval.data_dir (names: `megatron-pgpo eval
    --list`); logged as eval/<name>/avg@<k>. Empty: data.val_path (or the synthetic task's held-out split) as one
    benchmark named val."""
    data_dir: Optional[str] = None
    """Directory with one subdirectory of files per benchmark (as `megatron-pgpo eval --data-dir`)."""
    k: int = 1
    """Samples per problem (the paper: 8)."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy; the paper: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    limit: Optional[int] = None
    """At most this many problems per benchmark (None: all)."""

    def validate(self) -> None:
        from ..evaluation.benchmarks import BENCHMARKS

        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        require(not unknown, f"eval.benchmarks: unknown {unknown}; valid: {', '.join(BENCHMARKS)}")
        require(not self.benchmarks or bool(self.data_dir), "eval.benchmarks needs eval.data_dir")
        require_positive("eval.k", self.k)
        require(self.temperature >= 0, f"eval.temperature must be >= 0, got {self.temperature}")
        require(0.0 < self.top_p <= 1.0, f"eval.top_p must be in (0, 1], got {self.top_p}")
        if self.limit is not None:
            require_positive("eval.limit", self.limit)
