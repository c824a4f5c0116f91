"""Experiments that check the papers' claims on a user's own model, one command each.

`common.py` holds the shared conventions (runs as ordinary training folders, resume, progress,
seeds, quick mode, result files); each other module here is one experiment, registered in
`deltatune/cli/experiment.py`. See docs/experiments.md.
"""
