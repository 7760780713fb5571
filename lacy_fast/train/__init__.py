"""The training loop: DeepSpeed engine, checkpoints, metrics."""
