"""The demo, in three parts:

``tiny_model``   the demo's starting checkpoint: a tiny Qwen2.5-VL-architecture model with a word-level vocabulary,
                 and its supervised warm-up on the answer format (``build_demo_checkpoint``, ``warm_up``)
``training``     ``megatron-pgpo demo`` / ``make demo``: builds and warms up that model, then trains it with PGPO on
                 the built-in task (``run_training_demo``)
``walkthrough``  ``megatron-pgpo walkthrough``: PGPO's algorithm core on synthetic rollouts, token by token, no
                 model (``run_demo``)
"""
