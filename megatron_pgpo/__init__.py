"""megatron-pgpo: PGPO / DAPO / GRPO for vision-language models on Megatron-Core.

Importing the package is cheap: nothing here imports megatron, vLLM or Transformer Engine.
"""
__version__ = "0.1.0"
