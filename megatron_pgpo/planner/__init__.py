"""Parallelism planner: parameter counts, per-GPU memory and a (TP, PP, DP) recommendation for Qwen2.5-VL PGPO runs.

    model_size.py   transformers' count and Megatron's per (TP rank, PP stage) shard, by formula
    buffers.py      weights, DDP gradient buffer and Adam state bytes, exactly as Megatron lays them out
    activations.py  activation memory (Korthikanti et al.), logits of the update and scoring passes
    memory.py       one layout's per-stage memory plus the colocated vLLM share (weights + KV cache)
    recommend.py    valid layouts, the choice, micro-batch, and why nothing fits (with re-estimated suggestions)
    report.py       rich tables and the --json document
    meta_check.py   build real shards on the meta device with a fake process group and compare exactly
    command.py      `megatron-pgpo plan`

Nothing heavy is imported here (the CLI imports this package to build its parser).
"""
