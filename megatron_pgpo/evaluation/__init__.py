"""Benchmark evaluation: the paper's protocol (avg@k at a temperature over several benchmarks), from the command line
(``megatron-pgpo eval``) and during training (``trainer.eval_every``).

``benchmarks``: each benchmark's published file layout -> ``Problem`` s; ``scoring``: answer checking per answer
type, with the reason for a 0; ``protocol``: avg@k / pass@k / spread, the results files and the resumable sample
cache; ``command``: the CLI. Nothing heavy is imported here.
"""
