"""Training infrastructure: the loop, DeepSpeed engines, metrics."""
