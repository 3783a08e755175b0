"""The training loop and what it needs: metrics sinks, checkpoint directories, preemption handling."""
