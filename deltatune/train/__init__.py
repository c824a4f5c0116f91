"""The training engine: loss, optimiser and schedule, checkpoints, progress, and the loop."""
