"""What a run holds and how it is read back: the state's layout, checkpoints, the evaluation
step, a saved run's config and parameters. Training writes it, inference reads it."""
