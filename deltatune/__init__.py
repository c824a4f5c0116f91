"""deltatune: instruction finetuning with delta-tuning methods, loss masking, and measurement."""

__version__ = "0.1.0"
