#!/usr/bin/env python
"""Convert a Megatron-Core distributed checkpoint of Qwen2.5-VL back into Hugging Face safetensors.

    python tools/convert_megatron_to_hf.py qwen7b-mcore/ qwen7b-hf/ [--max-shard-size 5GB] [--dtype bf16]

Same as `megatron-pgpo convert mcore-to-hf`; `--help` lists the options. The input is a directory written by
tools/convert_hf_to_megatron.py, or a training checkpoint with config.json and megatron_pgpo.json beside it
(megatron_pgpo.models.qwen2_5_vl.convert.write_checkpoint_metadata). Memory stays at a few layers.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_pgpo.convert_cli import script_main  # noqa: E402

if __name__ == "__main__":  # required: the checkpoint loader may start helper processes
    sys.exit(script_main("mcore-to-hf"))
