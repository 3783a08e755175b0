"""Model families trained by megatron-pgpo. Import the family package you need (``models.qwen2_5_vl``)."""
