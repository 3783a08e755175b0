#!/usr/bin/env python
"""Convert a Hugging Face Qwen2.5-VL checkpoint into a Megatron-Core distributed checkpoint.

    python tools/convert_hf_to_megatron.py Qwen2.5-VL-7B-Instruct/ qwen7b-mcore/ [--dtype bf16] [--tp 4 --pp 2]

Same as `megatron-pgpo convert hf-to-mcore`; `--help` lists the options. The result loads at any TP/PP that
divides the model (megatron_pgpo.models.qwen2_5_vl.convert.load_checkpoint_into_model) and converts back with
tools/convert_megatron_to_hf.py.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_pgpo.convert_cli import script_main  # noqa: E402

if __name__ == "__main__":  # required: the checkpoint writer starts helper processes
    sys.exit(script_main("hf-to-mcore"))
