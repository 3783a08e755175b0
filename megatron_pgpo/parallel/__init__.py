"""Tensor-parallel helpers: vocab-parallel log-probs / entropy / KL, and Megatron-Core on CPU.

Importing this package is cheap: it imports neither megatron nor the submodules. Import what you need:

* ``megatron_pgpo.parallel.vocab_parallel``: ``vocab_parallel_logprobs``, ``vocab_parallel_entropy``,
  ``vocab_parallel_kl``, ``vocab_parallel_k3`` on ``[tokens, V_padded/TP]`` logit shards (torch only; megatron
  is consulted lazily for the default TP group).
* ``megatron_pgpo.parallel.vocab_parallel_math``: the per-rank arithmetic behind them, no communication.
* ``megatron_pgpo.compat.megatron_cpu``: ``apply_cpu_patches()`` so Megatron-Core 0.16.1 runs on CPU with gloo
  (applied explicitly, never at import).
"""
