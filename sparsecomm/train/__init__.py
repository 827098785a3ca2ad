"""Training: configuration, the one training loop, records and checkpoints."""
