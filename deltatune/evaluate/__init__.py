"""Evaluation: held-out loss, generation scoring, multiple choice, task definitions, learn vs forget."""
